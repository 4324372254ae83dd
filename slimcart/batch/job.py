"""Offline batch inference: `embed` (catalogue -> vectors) and `score` (interaction log -> top-k per user).

A job reads its input once (never writing to it), cuts the rows into fixed shards, computes the
shards that are not already finished on local worker processes or Ray Data actors, writes each
shard atomically into a hidden `.OUT.partial` folder beside OUT, checks that the shards hold every
input row once and in order, and only then renames the folder to OUT. Killed and rerun with the
same arguments, a job skips the shards it already wrote (`job.json` there records what it was).
"""
from __future__ import annotations

import dataclasses
import json
import multiprocessing
import os
import shutil
import time
from pathlib import Path
from typing import Any, Callable, Literal

import pyarrow as pa
import pyarrow.parquet as pq
from pydantic import BaseModel, ConfigDict, Field

from .. import artifacts
from ..errors import SlimcartError
from . import engines, inputs
from .shards import is_finished, plan, remove_temporaries, verify, write_atomic
from .tasks import EmbedTask, ScoreTask

JOB_FILE = "job.json"
MANIFEST = "_manifest.json"  # leading underscore: Parquet readers skip it when reading the folder
Progress = Callable[[int, int], None]  # (rows done, rows total)


class JobOptions(BaseModel):
    """How a job runs (not what it computes: changing these keeps finished shards valid)."""

    model_config = ConfigDict(extra="forbid")
    engine: Literal["local", "ray"] = "local"
    workers: int | None = Field(None, ge=1)
    threads: int | None = Field(None, ge=1)  # per worker
    shard_rows: int = Field(1024, ge=1)
    ray_address: str | None = None
    overwrite: bool = False

    def resolved(self) -> tuple[int, int]:
        """(workers, threads per worker): by default one single-threaded worker per core (up to 8)."""
        cores = os.cpu_count() or 1
        workers = self.workers or max(1, min(cores // (self.threads or 1), 8))
        threads = self.threads or max(1, cores // workers)
        return workers, threads


def check_paths(src: Path, out: Path, overwrite: bool) -> None:
    """The input must exist; the output may not be the input, sit inside it, or contain it."""
    if not src.exists():
        raise SlimcartError(f"input {src} does not exist")
    if not src.is_file():
        raise SlimcartError(f"input {src} must be a file (.csv, .tsv, .parquet or .jsonl)")
    s, o = src.resolve(), out.resolve()
    partial = artifacts.partial_dir(out)
    for p in (o, partial):
        if p == s or s in p.parents or p in s.parents:
            raise SlimcartError(f"output {out} would overlap the input {src}: choose another output folder")
    artifacts.check_output_path(out, overwrite)


def _prepare_partial(partial: Path, identity: dict, say: Callable[[str], None]) -> None:
    job = partial / JOB_FILE
    if partial.exists():
        if not job.is_file():
            raise SlimcartError(f"{partial} exists but was not written by a slimcart batch job: remove it first")
        try:
            previous = json.loads(job.read_text())
        except (OSError, json.JSONDecodeError):
            previous = None
        if previous == identity:
            say(f"resuming the unfinished job in {partial}")
            remove_temporaries(partial)
            return
        say(f"an unfinished job with other settings was in {partial}: starting over")
        shutil.rmtree(partial)
    partial.mkdir(parents=True)
    artifacts.write_json(job, identity)


def run_job(task: Any, rows: pa.Table, identity: dict, out: Path, opts: JobOptions, progress: Progress | None = None,
            say: Callable[[str], None] = lambda m: None, publish: bool = True) -> dict:
    """Compute `task` over `rows` into OUT (or, with publish=False, leave the verified shards in OUT's
    partial folder and return it in the manifest as `folder`)."""
    if getattr(multiprocessing.current_process(), "_inheriting", False):
        # A spawned worker re-running a caller's script that lacks `if __name__ == "__main__":` would
        # otherwise start the job again inside the worker (what multiprocessing's own check catches later).
        raise SlimcartError("batch jobs with workers must be started under `if __name__ == '__main__':`")
    workers, threads = opts.resolved()
    if workers * threads > (os.cpu_count() or 1):
        say(f"warning: {workers} workers x {threads} threads oversubscribe the {os.cpu_count()} cores (slower, not faster)")
    task = dataclasses.replace(task, threads=threads)
    identity = {**identity, **task.identity(), "shard_rows": opts.shard_rows, "rows": rows.num_rows}
    partial = artifacts.partial_dir(out)
    _prepare_partial(partial, identity, say)
    shards = plan(rows.num_rows, opts.shard_rows)
    finished = [s for s in shards if is_finished(partial, s)]
    pending = [s for s in shards if s not in finished]
    done_rows = sum(s.rows for s in finished)
    if progress:
        progress(done_rows, rows.num_rows)

    def on_done(shard, table):
        nonlocal done_rows
        write_atomic(partial, shard, table)
        done_rows += shard.rows
        if progress:
            progress(done_rows, rows.num_rows)

    t0 = time.perf_counter()
    if opts.engine == "ray":
        engines.run_ray(task, pending, rows, workers, on_done, address=opts.ray_address, shard_rows=opts.shard_rows)
    else:
        engines.run_local(task, pending, rows, workers, on_done)
    seconds = time.perf_counter() - t0
    verify(partial, shards, rows.num_rows)
    computed = sum(s.rows for s in pending)
    manifest = {
        **identity, "shards": len(shards), "skipped_shards": [s.index for s in finished],
        "computed_shards": [s.index for s in pending], "engine": opts.engine, "workers": workers,
        "threads_per_worker": threads, "seconds": seconds,
        "rows_per_s": computed / seconds if computed and seconds > 0 else None,
        "schema": pq.read_schema(partial / shards[0].name).to_string(show_schema_metadata=False).splitlines(),
    }
    artifacts.write_json(partial / MANIFEST, manifest)
    if not publish:
        return {**manifest, "folder": str(partial)}
    (partial / JOB_FILE).unlink()
    artifacts.publish(partial, out)
    say(f"wrote {out}")
    return manifest


def embed(workload: str, model: str, src: str | Path, out: str | Path, column: str, id_column: str | None = None,
          header: bool = True, batch_size: int = 64, opts: JobOptions | None = None, progress: Progress | None = None,
          say: Callable[[str], None] = lambda m: None) -> dict:
    """Embed the `column` texts of a catalogue; OUT = Parquet shards (row, [id], embedding)."""
    opts = opts or JobOptions()
    src, out = Path(src).expanduser(), Path(out).expanduser()
    check_paths(src, out, opts.overwrite)
    if batch_size < 1:
        raise SlimcartError(f"--batch-size must be at least 1, got {batch_size}")
    rows = inputs.read_catalogue(src, column, id_column, header)
    task = EmbedTask(workload, model, threads=1, batch_size=batch_size)
    identity = {"input": inputs.fingerprint(src), "column": column, "id_column": id_column, "header": header}
    return run_job(task, rows, identity, out, opts, progress, say)


def score(workload: str, model: str, src: str | Path, out: str | Path, k: int = 10, exclude_seen: bool = True,
          opts: JobOptions | None = None, progress: Progress | None = None,
          say: Callable[[str], None] = lambda m: None) -> dict:
    """Top-k items per user of an interaction log; OUT = Parquet shards (row, user, items, scores)."""
    opts = opts or JobOptions()
    src, out = Path(src).expanduser(), Path(out).expanduser()
    check_paths(src, out, opts.overwrite)
    if workload != "recsys":
        raise SlimcartError(f"slimcart score runs the recsys workload (got '{workload}')")
    if k < 1:
        raise SlimcartError(f"--k must be at least 1, got {k}")
    rows, vocab = inputs.read_histories(src)
    task = ScoreTask(workload, model, threads=1, vocab=tuple(vocab.tolist()), k=k, exclude_seen=exclude_seen)
    identity = {"input": inputs.fingerprint(src)}
    return run_job(task, rows, identity, out, opts, progress, say)
