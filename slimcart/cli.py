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

WorkloadOpt = typer.Option(..., "--workload", "-w", help="search | llm | recsys | vision | session | ctr")
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
    model: str = typer.Option(..., "--model", "-m", help="alias (minilm, smollm2, sasrec, cnn) or model folder"),
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
          epochs: int = typer.Option(30, "--epochs", help="maximum epochs (early stopping on the validation metric: "
                                                          "NDCG@10 for recsys, accuracy for vision, HR@20 for session, AUC for ctr)"),
          seed: int = typer.Option(0, "--seed"), threads: Optional[int] = ThreadsOpt) -> None:
    """Train the workload's own model (recsys: SASRec on the interaction log; vision: the product-photo ResNet
    from scratch; session: GRU4Rec on the browsing sessions;
    ctr: DIN on a click or interaction log). Resumes an interrupted run."""
    from .bench import resolve_threads, set_threads
    from .workloads import get_workload

    try:
        set_threads(resolve_threads(threads))
        wl = get_workload(workload)
        if not hasattr(wl, "train"):
            raise SlimcartError(f"workload '{workload}' has no trainable model of its own (recsys, vision, session and ctr have one)")
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


# ---------------------------------------------------------------- serving and batch inference
def _job_options(engine: str, workers: Optional[int], threads: Optional[int], shard_rows: int,
                 ray_address: Optional[str], overwrite: bool):
    from pydantic import ValidationError

    from .batch.job import JobOptions

    try:
        return JobOptions(engine=engine, workers=workers, threads=threads, shard_rows=shard_rows,
                          ray_address=ray_address, overwrite=overwrite)
    except ValidationError as e:
        err = e.errors()[0]
        _fail(f"--{str(err['loc'][0]).replace('_', '-')}: {err['msg']}")


def _run_job(fn, *args, **kwargs):
    """A batch job with a progress bar (rows, rate, ETA); SlimcartError -> one line, exit 2."""
    from rich.progress import (
        BarColumn,
        MofNCompleteColumn,
        Progress,
        TextColumn,
        TimeElapsedColumn,
        TimeRemainingColumn,
    )

    _quiet_libraries()
    columns = [TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
               TextColumn("{task.fields[rate]}"), TimeElapsedColumn(), TextColumn("ETA"), TimeRemainingColumn()]
    with Progress(*columns, console=console) as bar:
        task = bar.add_task("rows", total=None, rate="")

        def progress(done: int, total: int) -> None:
            bar.update(task, completed=done, total=total)
            speed = bar.tasks[0].speed
            bar.update(task, rate=f"{speed:,.0f} rows/s" if speed else "")

        def say(msg: str) -> None:
            bar.console.print(msg, highlight=False)

        try:
            return fn(*args, progress=progress, say=say, **kwargs)
        except SlimcartError as e:
            bar.stop()
            _fail(str(e))
        except KeyboardInterrupt:
            bar.stop()
            _fail("interrupted — rerun the same command to resume (finished shards are kept)")


EngineOpt = typer.Option("local", "--engine", help="local worker processes, or ray (Ray Data actors)")
WorkersOpt = typer.Option(None, "--workers", help="worker processes / Ray actors (default: one per core)")
WorkerThreadsOpt = typer.Option(None, "--threads", help="threads per worker (default: cores / workers)")
ShardRowsOpt = typer.Option(1024, "--shard-rows", help="rows per output shard (the unit of resuming)")
RayAddressOpt = typer.Option(None, "--ray-address", help="Ray cluster address (default: a local Ray for this job)")
OverwriteOpt = typer.Option(False, "--overwrite", help="replace an existing output folder")


@app.command()
def embed(model: str = typer.Option(..., "--model", "-m", help="search encoder: alias, folder or slimcart output"),
          input: Path = typer.Option(..., "--input", "-i", help="catalogue: .csv, .tsv, .parquet or .jsonl"),
          out: Path = typer.Option(..., "--out", "-o", help="output folder of Parquet shards"),
          column: str = typer.Option(..., "--column", help="text column (a number with --no-header)"),
          id_column: Optional[str] = typer.Option(None, "--id-column", help="column copied to the output as id"),
          no_header: bool = typer.Option(False, "--no-header", help="the CSV has no header line: columns are 0, 1, ..."),
          batch_size: int = typer.Option(64, "--batch-size", help="texts per model call"),
          engine: str = EngineOpt, workers: Optional[int] = WorkersOpt, threads: Optional[int] = WorkerThreadsOpt,
          shard_rows: int = ShardRowsOpt, ray_address: Optional[str] = RayAddressOpt, overwrite: bool = OverwriteOpt) -> None:
    """Embed every text of a catalogue (parallel, resumable); OUT = Parquet shards (row, id, embedding)."""
    from .batch.job import embed as run_embed

    opts = _job_options(engine, workers, threads, shard_rows, ray_address, overwrite)
    m = _run_job(run_embed, "search", model, input, out, column, id_column, header=not no_header,
                 batch_size=batch_size, opts=opts)
    rate = f"{m['rows_per_s']:,.0f} rows/s" if m["rows_per_s"] else "nothing left to compute"
    out_console.print(f"{m['rows']} rows -> {out} ({m['shards']} shards, {len(m['skipped_shards'])} reused; {rate} "
                      f"with {m['workers']} x {m['threads_per_worker']} threads, {m['engine']})")


@app.command()
def score(workload: str = typer.Option("recsys", "--workload", "-w", help="recsys"),
          model: str = typer.Option(..., "--model", "-m", help="alias (sasrec), folder or slimcart output"),
          input: Path = typer.Option(..., "--input", "-i", help="interaction log the model was trained on"),
          out: Path = typer.Option(..., "--out", "-o", help="output folder of Parquet shards"),
          k: int = typer.Option(10, "--k", help="recommendations per user"),
          keep_seen: bool = typer.Option(False, "--keep-seen", help="allow items already in the user's history"),
          engine: str = EngineOpt, workers: Optional[int] = WorkersOpt, threads: Optional[int] = WorkerThreadsOpt,
          shard_rows: int = ShardRowsOpt, ray_address: Optional[str] = RayAddressOpt, overwrite: bool = OverwriteOpt) -> None:
    """Top-k recommendations for every user of an interaction log; OUT = Parquet shards (user, items, scores)."""
    from .batch.job import score as run_score

    opts = _job_options(engine, workers, threads, shard_rows, ray_address, overwrite)
    m = _run_job(run_score, workload, model, input, out, k=k, exclude_seen=not keep_seen, opts=opts)
    out_console.print(f"{m['rows']} users -> {out} ({m['shards']} shards, {len(m['skipped_shards'])} reused)")


@app.command()
def index(model: str = typer.Option(..., "--model", "-m", help="search encoder: alias, folder or slimcart output"),
          input: Path = typer.Option(..., "--input", "-i", help="catalogue: .csv, .tsv, .parquet or .jsonl"),
          out: Path = typer.Option(..., "--out", "-o", help="index folder"),
          column: str = typer.Option(..., "--column", help="product text column (a number with --no-header)"),
          id_column: Optional[str] = typer.Option(None, "--id-column", help="product id column (default: row number)"),
          no_header: bool = typer.Option(False, "--no-header"),
          kind: str = typer.Option("exact", "--kind", help="exact (brute force) or hnsw (approximate)"),
          hnsw_m: int = typer.Option(32, "--hnsw-m", help="HNSW graph degree"),
          batch_size: int = typer.Option(64, "--batch-size"),
          engine: str = EngineOpt, workers: Optional[int] = WorkersOpt, threads: Optional[int] = WorkerThreadsOpt,
          shard_rows: int = ShardRowsOpt, ray_address: Optional[str] = RayAddressOpt, overwrite: bool = OverwriteOpt) -> None:
    """Build a catalogue index for `slimcart serve --index` (embeds with the batch job, then FAISS)."""
    from .batch.index_job import build_index

    opts = _job_options(engine, workers, threads, shard_rows, ray_address, overwrite)
    m = _run_job(build_index, "search", model, input, out, column, id_column, header=not no_header, kind=kind,
                 hnsw_m=hnsw_m, batch_size=batch_size, opts=opts)
    extra = f", recall@10 vs exact {m['recall@10_vs_exact']:.3f}" if "recall@10_vs_exact" in m else ""
    out_console.print(f"{m['kind']} index of {m['count']} items -> {out}{extra}")


@app.command()
def serve(model: str = typer.Argument(..., help="slimcart output folder, model folder or alias"),
          workload: str = typer.Option("search", "--workload", "-w", help="search | recsys | llm"),
          index: Optional[Path] = typer.Option(None, "--index", help="catalogue index from `slimcart index` (enables /search)"),
          host: str = typer.Option("127.0.0.1", "--host"), port: int = typer.Option(8000, "--port"),
          threads: int = typer.Option(1, "--threads", help="model threads (the event loop takes the rest)"),
          max_batch: int = typer.Option(32, "--max-batch", help="items per model call"),
          max_wait_ms: float = typer.Option(5.0, "--max-wait-ms", help="how long a batch waits to fill"),
          max_queue: int = typer.Option(256, "--max-queue", help="items waiting before 429"),
          max_queue_wait_ms: float = typer.Option(500.0, "--max-queue-wait-ms", help="predicted wait before 429 (0: off)"),
          timeout_s: float = typer.Option(10.0, "--timeout", help="seconds before an unanswered request gets 503"),
          max_streams: int = typer.Option(4, "--max-streams", help="llm: streams decoded at once"),
          graceful_s: float = typer.Option(30.0, "--graceful", help="seconds in-flight requests get on shutdown")) -> None:
    """Serve MODEL over HTTP: /embed /search (search), /score (recsys), /generate (llm); /health /ready /metrics."""
    from pydantic import ValidationError

    from .serve.app import ServeOptions
    from .serve.run import serve as run_serve

    _quiet_libraries()
    try:
        opts = ServeOptions(host=host, port=port, max_batch=max_batch, max_wait_ms=max_wait_ms, max_queue=max_queue,
                            max_queue_wait_ms=max_queue_wait_ms or None, timeout_s=timeout_s, max_streams=max_streams,
                            graceful_s=graceful_s)
    except ValidationError as e:
        err = e.errors()[0]
        _fail(f"--{str(err['loc'][0]).replace('_', '-')}: {err['msg']}")
    try:
        run_serve(workload, model, index, opts, threads, say=lambda m: console.print(m, highlight=False))
    except SlimcartError as e:
        _fail(str(e))

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
    bound = "" if f.get("quality_loss_bound") is None else f" (<= {f['quality_loss_bound']:+.2%})"
    return (f"#{t['number']:<3} {f['fidelity']:<6} {params} | loss {f['quality_loss']:+.2%}{bound} | {obj} {f[FIG[obj]]:.4g} | "
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
    quality_confidence: Optional[float] = typer.Option(
        None, "--quality-confidence", help="check the quality limit against this one-sided upper bound of the "
        "validation loss (paired bootstrap; default 0.9; 0 = the point estimate)"),
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
                     "quality_confidence": quality_confidence,
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
