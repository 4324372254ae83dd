"""The `slimcart` command line: a thin typer layer over slimcart.api."""
from __future__ import annotations

import json
import os
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

app = typer.Typer(add_completion=False, no_args_is_help=True, help="Compress and accelerate e-commerce models, with measured results.")
console = Console(stderr=True)
out_console = Console()

WorkloadOpt = typer.Option(..., "--workload", "-w", help="search | llm | recsys")
DataOpt = typer.Option(None, "--data", help="dataset folder or file (default: $SLIMCART_DATA, else synthetic data)")
ThreadsOpt = typer.Option(None, "--threads", help="intra-op threads for every runtime (default: all cores, max 8)")


def _fail(msg: str) -> None:
    console.print(f"[bold red]error:[/] {msg}", highlight=False, soft_wrap=True)
    raise typer.Exit(2)


def _quiet_libraries() -> None:
    import logging
    import warnings

    warnings.filterwarnings("ignore")
    logging.getLogger().setLevel(logging.ERROR)
    try:
        from transformers.utils import logging as hf_logging

        hf_logging.set_verbosity_error()
        hf_logging.disable_progress_bar()
    except ImportError:  # pragma: no cover
        pass


def _run(fn, *args, **kwargs):
    """Call the API with a live status line; SlimcartError becomes one error line and exit code 2."""
    _quiet_libraries()
    with console.status("starting") as status:
        def progress(msg: str) -> None:
            if msg.startswith("WARNING") or msg.startswith("resuming") or msg.startswith("wrote"):
                console.print(msg, style="bold yellow" if msg.startswith("WARNING") else None, highlight=False)
            status.update(msg)
        try:
            return fn(*args, progress=progress, **kwargs)
        except SlimcartError as e:
            status.stop()
            _fail(str(e))
        except KeyboardInterrupt:
            status.stop()
            _fail("interrupted — rerun the same command to resume")


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
) -> None:
    """Compress MODEL with RECIPE; measure baseline and result in the same run; write OUT."""
    from . import api

    m = _run(api.compress, workload, model, recipe, out, data=data, overwrite=overwrite, threads=threads,
             repeats=repeats, measure_rss=not no_rss)
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
         recipe: str = typer.Option("int8-static", "--recipe", help="a search recipe (see `slimcart recipes`)")) -> None:
    """The main job: compress the bundled MiniLM for product search, print before/after, write the report."""
    from . import api

    # int8-static: static W8A8 calibrated on the workload's own queries, runtime picked by timing;
    # on CrowdFlower it is 3x PyTorch fp32 at -0.2% nDCG@10 and builds in seconds (docs/bench-quantization.md).
    console.print(f"[bold]slimcart demo[/]: all-MiniLM-L6-v2 for product search, recipe {recipe}")
    m = _run(api.compress, "search", "minilm", recipe, out, data=data, overwrite=True, threads=threads)
    _print_compare(m)
    out_console.print(f"report: {out / 'report.md'}   metrics: {out / 'metrics.json'}")


def _duration(text: str) -> float:
    """'90m', '1.5h', '600s' or a plain number of minutes -> seconds."""
    t = text.strip().lower()
    scale = {"s": 1, "m": 60, "h": 3600}.get(t[-1:], None)
    try:
        value = float(t[:-1] if scale else t) * (scale or 60)
    except ValueError:
        raise SlimcartError(f"--time-budget '{text}' is not a duration like 90m, 1.5h or 600s") from None
    if value <= 0:
        raise SlimcartError(f"--time-budget must be positive, got '{text}'")
    return value


def _trial_line(t: dict) -> str:
    params = " ".join(f"{k}={v}" for k, v in t["params"].items())
    if "error" in t:
        return f"#{t['number']:<3} FAILED  {params}  ({t['error']})"
    f, obj = t["figures"], t["objective"]
    from .plan.study import FIG

    missed = ", ".join(k for k, v in t["constraints"].items() if v > 0)
    return (f"#{t['number']:<3} {f['fidelity']:<6} {params} | loss {f['quality_loss']:+.2%} | {obj} {f[FIG[obj]]:.4g} | "
            f"{f['size_bytes'] / 1e6:.1f} MB | {f['energy_j_per_item']:.3g} J/item | "
            + ("[green]feasible[/]" if t["feasible"] else f"[yellow]misses {missed}[/]") + f" | {t['seconds']:.0f} s")


@app.command()
def plan(
    workload: str = WorkloadOpt,
    model: str = typer.Option(..., "--model", "-m", help="alias or model folder"),
    profile: str = typer.Option(..., "--profile", "-p", help="built-in profile (see `slimcart profiles`) or a YAML file"),
    out: Optional[Path] = typer.Option(None, "--out", "-o", help="plan folder (rerun the same command to resume)"),
    data: Optional[str] = DataOpt,
    time_budget: str = typer.Option("60m", "--time-budget", help="worker time for the search, e.g. 90m, 2h"),
    trials: Optional[int] = typer.Option(None, "--trials", help="stop after this many complete trials"),
    storage: Optional[str] = typer.Option(None, "--storage", help="study storage URL (default: SQLite in OUT); "
                                          "postgresql://user@host/db lets several --worker processes share one study"),
    study: Optional[str] = typer.Option(None, "--study", help="study name (default: derived from the plan's inputs)"),
    worker: bool = typer.Option(False, "--worker", help="only run trials of the shared study (no final phase)"),
    sampler: str = typer.Option("tpe", "--sampler", help="tpe (seeded, screened) or random (plain random search)"),
    seed: int = typer.Option(0, "--seed"),
    threads: Optional[int] = typer.Option(None, "--threads", help="override the profile's threads"),
    batch: Optional[int] = typer.Option(None, "--batch", help="override the profile's batch"),
    objective: Optional[str] = typer.Option(None, "--objective", help="override the profile's objective"),
    max_quality_loss: Optional[float] = typer.Option(None, "--max-quality-loss", help="e.g. 0.005 = 0.5%"),
    max_latency_p50_ms: Optional[float] = typer.Option(None, "--max-latency-p50-ms"),
    max_latency_p99_ms: Optional[float] = typer.Option(None, "--max-latency-p99-ms"),
    max_size_mb: Optional[float] = typer.Option(None, "--max-size-mb"),
    max_size_ratio: Optional[float] = typer.Option(None, "--max-size-ratio"),
    max_peak_rss_mb: Optional[float] = typer.Option(None, "--max-peak-rss-mb"),
    min_throughput: Optional[float] = typer.Option(None, "--min-throughput"),
    max_energy_j_per_item: Optional[float] = typer.Option(None, "--max-energy-j-per-item"),
    watts_per_core: Optional[float] = typer.Option(None, "--watts-per-core", help="energy estimate's power per busy core"),
    train_minutes: Optional[float] = typer.Option(None, "--train-minutes", help="training budget of a full trial"),
    overwrite: bool = typer.Option(False, "--overwrite", help="discard an existing plan folder"),
    accept_hardware: bool = typer.Option(False, "--accept-hardware", help="continue a study measured on another CPU"),
    dry_run: bool = typer.Option(False, "--dry-run", help="show the search space and stop"),
) -> None:
    """Search compositions of techniques, by measurement, for the model that fits PROFILE; write OUT."""
    from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

    from .plan.run import PlanOptions
    from .plan.run import plan as run_plan
    from .plan.space import Settings

    try:
        if out is None and not dry_run:
            raise SlimcartError("--out is required (the plan folder)")
        overrides = {"threads": threads, "batch": batch, "objective": objective, "max_quality_loss": max_quality_loss,
                     "max_latency_p50_ms": max_latency_p50_ms, "max_latency_p99_ms": max_latency_p99_ms,
                     "max_size_mb": max_size_mb, "max_size_ratio": max_size_ratio, "max_peak_rss_mb": max_peak_rss_mb,
                     "min_throughput": min_throughput, "max_energy_j_per_item": max_energy_j_per_item}
        if sampler not in ("tpe", "random"):
            raise SlimcartError(f"--sampler must be tpe or random, got '{sampler}'")
        settings = Settings(**({"train_minutes": train_minutes} if train_minutes else {}))
        opts = PlanOptions(workload=workload, model=model, profile=profile, out=out or Path("."), data=data,
                           time_budget_s=_duration(time_budget), max_trials=trials, storage=storage, study_name=study,
                           worker=worker, sampler=sampler, seed=seed,
                           overrides={k: v for k, v in overrides.items() if v is not None}, settings=settings,
                           watts_per_core=watts_per_core, overwrite=overwrite, accept_hardware=accept_hardware)
    except SlimcartError as e:
        _fail(str(e))
    except Exception as e:  # pydantic: a bad value of a typed option
        _fail(str(e).splitlines()[0])
    _quiet_libraries()
    if dry_run:
        r = _run(lambda progress: run_plan(opts, lambda k, x: progress(str(x)), dry_run=True))
        out_console.print(r["label"])
        out_console.print("\n".join(r["space"]), highlight=False)
        out_console.print(f"objectives: {', '.join(r['objectives'])}; limits: {r['profile']['limits']}")
        return
    with Progress(TextColumn("{task.description}"), BarColumn(), TextColumn("{task.fields[spent]}"), TimeElapsedColumn(),
                  console=console, transient=False) as bar:
        task = bar.add_task("starting", total=opts.time_budget_s, spent="")

        def emit(kind: str, x) -> None:
            if kind == "trial":
                console.print(_trial_line(x), highlight=False)
            elif kind == "budget":
                spent, total = x
                bar.update(task, completed=min(spent, total or spent), spent=f"{spent / 60:.1f}/{(total or 0) / 60:.0f} min")
            elif kind == "warning":
                console.print(f"[bold yellow]WARNING: {x}[/]")
            elif kind == "best":
                console.print(f"best feasible so far: trial {x} (saved in {opts.out / 'best'})")
            else:
                bar.update(task, description=str(x)[:70])
        try:
            r = run_plan(opts, emit)
        except SlimcartError as e:
            bar.stop()
            _fail(str(e))
        except KeyboardInterrupt:
            bar.stop()
            _fail("interrupted — rerun the same command to continue the study")
    if worker:
        out_console.print(f"worker finished ({r['reason']}); study {r['study']}: {r['trials']} trials")
        return
    if "chosen" not in r:
        _fail(f"no trial completed: {r.get('errors')}")
    c = r["chosen"]
    out_console.print(("[green]" if c["feasible_on_validation"] else "[yellow]") + f"chosen: trial {c['number']}[/]")
    for w in c["why"]:
        out_console.print(f"  {w}", highlight=False)
    out_console.print(f"test split: {'meets every limit' if c['meets_every_limit_on_test'] else 'misses ' + ', '.join(k for k, v in c['test_constraints'].items() if v > 0)}; "
                      f"quality loss {c['test_figures']['quality_loss']:+.2%}")
    out_console.print(f"model: {opts.out / 'model'}   report: {opts.out / 'report.html'}   all trials: {opts.out / 'plan.json'}")


@app.command()
def profiles() -> None:
    """List the built-in scenario profiles of `slimcart plan`."""
    from .plan.profile import builtin_profiles, load_profile

    t = Table(title="built-in profiles (slimcart plan --profile NAME)")
    for col in ("name", "threads", "batch", "objective", "constraints"):
        t.add_column(col)
    for name in builtin_profiles():
        p = load_profile(name)
        cons = ", ".join(f"{k}={v}" for k, v in p.constraints.model_dump().items() if v is not None)
        t.add_row(name, str(p.threads), str(p.batch), p.objective, cons)
    out_console.print(t)


def main() -> None:  # pragma: no cover
    app()


if __name__ == "__main__":  # pragma: no cover
    main()
