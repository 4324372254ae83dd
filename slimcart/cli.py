"""The `slimcart` command line: a thin typer layer over slimcart.api."""
from __future__ import annotations

import contextlib
import json
import os
import time
import traceback
from pathlib import Path
from typing import Optional

import typer
from rich.console import Console
from rich.table import Table

from .errors import SlimcartError

# Library chatter (weight-loading bars, load reports, exporter warnings) would bury the one-line errors
# and the result table; slimcart prints its own progress.
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")
os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")

app = typer.Typer(add_completion=False, no_args_is_help=True)
console = Console(stderr=True)
out_console = Console()

WorkloadOpt = typer.Option(..., "--workload", "-w", help="search | llm | recsys")
DataOpt = typer.Option(None, "--data", help="dataset folder or file (default: $SLIMCART_DATA, else synthetic data)")
ThreadsOpt = typer.Option(None, "--threads", help="intra-op threads for every runtime (default: all cores, max 8)")


def _fail(msg: str) -> None:
    console.print(f"[bold red]error:[/] {msg}", highlight=False, soft_wrap=True)
    raise typer.Exit(2)


OPTIONS = {"verbose": False, "log_file": None}


@app.callback()
def main_options(
    verbose: bool = typer.Option(False, "--verbose", "-v", help="show library warnings and full tracebacks"),
    log_file: Optional[Path] = typer.Option(None, "--log-file", help="also append timestamped progress lines to this file"),
    trust_remote_code: bool = typer.Option(False, "--trust-remote-code",
                                           help="let model folders run their own Python code (off: such folders are refused)"),
) -> None:
    """Compress and accelerate e-commerce models, with measured results."""
    from . import hf

    OPTIONS.update(verbose=verbose, log_file=log_file)
    hf.allow_remote_code(trust_remote_code)


def _quiet_libraries() -> None:
    import logging
    import warnings

    if OPTIONS["verbose"]:
        return
    warnings.filterwarnings("ignore")
    logging.getLogger().setLevel(logging.ERROR)
    try:
        from transformers.utils import logging as hf_logging

        hf_logging.set_verbosity_error()
        hf_logging.disable_progress_bar()
    except ImportError:  # pragma: no cover
        pass


def _log(msg: str) -> None:
    if OPTIONS["log_file"] is not None:
        with open(OPTIONS["log_file"], "a") as f:
            f.write(f"{time.strftime('%Y-%m-%d %H:%M:%S')} {msg}\n")


def _run(fn, *args, **kwargs):
    """Call the API with progress: a live status line with elapsed time on a terminal, plain timestamped
    lines when output goes to a file (CI, job schedulers). SlimcartError becomes one error line and exit
    code 2; anything else is a bug: one line and exit 3 (the traceback with --verbose or in --log-file)."""
    _quiet_libraries()
    start, live = time.monotonic(), console.is_terminal
    status = console.status("starting") if live else contextlib.nullcontext()
    with status:
        def progress(msg: str) -> None:
            _log(msg)
            elapsed = time.monotonic() - start
            if not live:
                console.print(f"[{time.strftime('%H:%M:%S')} +{elapsed:.0f}s] {msg}", highlight=False, markup=False)
                return
            if msg.startswith("WARNING") or msg.startswith("resuming") or msg.startswith("wrote"):
                console.print(msg, style="bold yellow" if msg.startswith("WARNING") else None, highlight=False)
            status.update(f"{msg}  [dim]({elapsed:.0f}s)[/]")
        try:
            return fn(*args, progress=progress, **kwargs)
        except SlimcartError as e:
            _stop(status)
            _log(f"error: {e}")
            _fail(str(e))
        except KeyboardInterrupt:
            _stop(status)
            _fail("interrupted — rerun the same command to resume")
        except Exception as e:  # a bug, not the user's input: say so in one line
            _stop(status)
            _log("internal error:\n" + traceback.format_exc())
            if OPTIONS["verbose"]:
                traceback.print_exc()
            console.print(f"[bold red]internal error:[/] {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''} "
                          "(a slimcart bug: rerun with --verbose for the traceback and please report it)", highlight=False,
                          soft_wrap=True)
            raise typer.Exit(3) from None


def _stop(status) -> None:
    if hasattr(status, "stop"):
        status.stop()


def _print_compare(m: dict) -> None:
    from .report.markdown import comparison_rows
    from .workloads import get_workload

    t = Table(title=f"{m['recipe']} on {m['workload']} / {m['model']}  ({m['data']['name']}, n={m['data']['n']})")
    for col in ("metric", "baseline (torch fp32)", f"compressed ({m['compressed']['runtime']})", "change / ratio"):
        t.add_column(col)
    for row in comparison_rows(m, get_workload(m["workload"]).higher_is_better):
        t.add_row(*row)
    out_console.print(t)
    if m["data"]["synthetic"]:
        out_console.print("[bold yellow]SYNTHETIC DATA: quality figures only show the pipeline works.[/]")
    if m.get("size_only"):
        out_console.print(f"size-only (no speed-up kernel): {', '.join(m['size_only'])}")
    trust = m.get("speed_reliability")
    if trust and not trust["reliable"]:
        out_console.print("[bold yellow]speed figures unreliable:[/] " + "; ".join(trust["reasons"]), highlight=False)


@app.command()
def compress(
    workload: str = WorkloadOpt,
    model: str = typer.Option(..., "--model", "-m", help="alias (minilm, smollm2, sasrec) or model folder"),
    recipe: str = typer.Option(..., "--recipe", "-r", help="built-in recipe name or a recipe YAML file"),
    out: Path = typer.Option(..., "--out", "-o", help="output folder (refused if it exists, unless --overwrite)"),
    data: Optional[str] = DataOpt,
    overwrite: bool = typer.Option(False, "--overwrite", help="replace an existing output folder"),
    threads: Optional[int] = ThreadsOpt,
    repeats: int = typer.Option(5, "--repeats", help="interleaved timing rounds"),
    no_rss: bool = typer.Option(False, "--no-rss", help="skip the peak-memory probe processes"),
    target: Optional[str] = typer.Option(None, "--target", help="runtime to deploy on: torch | onnxruntime | openvino "
                                         "(default: the recipe's choice; `runtime: auto` steps time the candidates and "
                                         "keep ONNX Runtime unless OpenVINO is >3% faster)"),
) -> None:
    """Compress MODEL with RECIPE; measure baseline and result in the same run; write OUT."""
    from . import api

    m = _run(api.compress, workload, model, recipe, out, data=data, overwrite=overwrite, threads=threads,
             repeats=repeats, measure_rss=not no_rss, target=target)
    _print_compare(m)


@app.command("eval")
def eval_(workload: str = WorkloadOpt, model: str = typer.Option(..., "--model", "-m"), data: Optional[str] = DataOpt,
          threads: Optional[int] = ThreadsOpt, as_json: bool = typer.Option(False, "--json", help="print JSON")) -> None:
    """Measure the quality of a model (alias, folder or slimcart output folder)."""
    from . import api

    r = _run(api.evaluate, workload, model, data=data, threads=threads)
    if as_json:
        print(json.dumps(r, indent=2))
        return
    t = Table(title=f"{workload} / {model} on {r['runtime']} — {r['data']['name']} (n={r['data']['n']})")
    t.add_column("metric")
    t.add_column("value")
    for k, v in r["quality"].items():
        t.add_row(k, f"{v:.4f}")
    out_console.print(t)
    if r["data"]["synthetic"]:
        out_console.print("[bold yellow]SYNTHETIC DATA: quality figures only show the pipeline works.[/]")


@app.command()
def bench(workload: str = WorkloadOpt, model: str = typer.Option(..., "--model", "-m"),
          baseline: Optional[str] = typer.Option(None, "--baseline", help="model to time against (default: the output folder's source)"),
          data: Optional[str] = DataOpt, threads: Optional[int] = ThreadsOpt, repeats: int = typer.Option(5, "--repeats"),
          as_json: bool = typer.Option(False, "--json")) -> None:
    """Time a model against its baseline, interleaved in one process."""
    from . import api

    r = _run(api.bench, workload, model, baseline=baseline, data=data, threads=threads, repeats=repeats)
    if as_json:
        print(json.dumps(r, indent=2))
        return
    t = Table(title=f"{workload}: interleaved timing, {r['environment']['threads']} threads")
    for col in ("side", "model", "runtime", "p50 ms", "p99 ms", f"{r['unit']}/s"):
        t.add_column(col)
    for name, s in r["sides"].items():
        t.add_row(name, s["model"], s["runtime"], f"{s['latency_ms']['p50']:.2f}", f"{s['latency_ms']['p99']:.2f}",
                  f"{s['throughput_per_s']:.1f}")
    out_console.print(t)
    if "ratios" in r:
        out_console.print(f"throughput ratio model/baseline: {r['ratios']['throughput']:.2f}x")


@app.command()
def train(workload: str = WorkloadOpt, data: Optional[str] = DataOpt,
          out: Optional[Path] = typer.Option(None, "--out", "-o", help="checkpoint folder (default: the alias location)"),
          epochs: int = typer.Option(30, "--epochs", help="maximum epochs (early stopping on validation NDCG@10)"),
          seed: int = typer.Option(0, "--seed"), threads: Optional[int] = ThreadsOpt) -> None:
    """Train the workload's own model (recsys: SASRec on the interaction log). Resumes an interrupted run."""
    from .bench import resolve_threads, set_threads
    from .workloads import get_workload

    try:
        set_threads(resolve_threads(threads))
        wl = get_workload(workload)
        if not hasattr(wl, "train"):
            raise SlimcartError(f"workload '{workload}' has no trainable model of its own (only recsys does)")
        dataset = wl.load_data(data)
        if wl.data_info(dataset).synthetic:
            console.print("[bold yellow]WARNING: no real data found — training on SYNTHETIC data[/]")
        from rich.progress import Progress

        with Progress(console=console) as bar:
            task = bar.add_task("training", total=None)
            path = wl.train(dataset, out, epochs=epochs, seed=seed,
                            progress=lambda msg: bar.update(task, description=msg))
    except SlimcartError as e:
        _fail(str(e))
    out_console.print(f"checkpoint: {path}")


@app.command()
def recipes(markdown: bool = typer.Option(False, "--markdown", help="print a Markdown table (docs/recipes.md)")) -> None:
    """List the built-in recipes."""
    from .recipe import builtin_recipes, load_recipe

    if markdown:
        print("# Built-in recipes\n\nGenerated by `slimcart recipes --markdown`. Each is a YAML file in "
              "`slimcart/recipes/`; copy one and pass its path to `--recipe` to customise it.\n")
        print("| recipe | workloads | steps | what it does |\n|---|---|---|---|")
        for name in builtin_recipes():
            r = load_recipe(name)
            desc = " ".join(r.description.split())
            print(f"| `{name}` | {', '.join(r.workloads or ['any'])} | {' → '.join(s.kind for s in r.steps)} | {desc} |")
        return
    t = Table(title="built-in recipes")
    for col in ("name", "workloads", "steps"):
        t.add_column(col)
    for name in builtin_recipes():
        r = load_recipe(name)
        t.add_row(name, ", ".join(r.workloads or ["any"]), " → ".join(s.kind for s in r.steps))
    out_console.print(t)


@app.command()
def demo(out: Path = typer.Option(Path("runs/demo"), "--out", "-o"), data: Optional[str] = DataOpt,
         threads: Optional[int] = ThreadsOpt,
         overwrite: bool = typer.Option(False, "--overwrite", help="replace OUT if it exists"),
         recipe: str = typer.Option("int8-static", "--recipe", help="a search recipe (see `slimcart recipes`)")) -> None:
    """The main job: compress the bundled MiniLM for product search, print before/after, write the report."""
    from . import api

    # int8-static: static W8A8 calibrated on the workload's own queries, runtime picked by timing;
    # on CrowdFlower it is 3x PyTorch fp32 at -0.2% nDCG@10 and builds in seconds (docs/bench-quantization.md).
    console.print(f"[bold]slimcart demo[/]: all-MiniLM-L6-v2 for product search, recipe {recipe}")
    m = _run(api.compress, "search", "minilm", recipe, out, data=data, overwrite=overwrite, threads=threads)
    _print_compare(m)
    out_console.print(f"report: {out / 'report.md'}   metrics: {out / 'metrics.json'}")


def main() -> None:  # pragma: no cover
    app()


if __name__ == "__main__":  # pragma: no cover
    main()
