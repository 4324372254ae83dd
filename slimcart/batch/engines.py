"""Where shards are computed: local worker processes (default) or Ray Data actors.

Both engines hand every finished shard back to the caller (`on_done(shard, table)`), which writes
it; workers never write files, so there is one atomic-write path and Ray works on a cluster
without a shared file system. Each worker process / actor loads the model once and runs with
`threads` intra-op threads, so workers x threads never exceeds the core budget.
"""
from __future__ import annotations

import multiprocessing
import os
from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait
from typing import Any, Callable

import pyarrow as pa

from ..errors import SlimcartError
from .shards import Shard

OnDone = Callable[[Shard, pa.Table], None]

# ---------------------------------------------------------------- local worker processes
_STATE: Any = None  # the model a worker process holds (set by its first shard)


def _pin_threads(threads: int) -> None:
    """Before torch starts its thread pools (they read these once)."""
    for var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS"):
        os.environ[var] = str(threads)


def _compute_in_worker(task: Any, shard_table: pa.Table) -> pa.Table:
    global _STATE
    if _STATE is None:  # loaded here, not in an initializer, so a load error reaches the parent intact
        _pin_threads(task.threads)
        _STATE = task.load()
    return task.compute(_STATE, shard_table)


def run_local(task: Any, pending: list[Shard], table: pa.Table, workers: int, on_done: OnDone) -> None:
    """workers == 1 runs in this process; more use a spawned process pool (fork would copy torch's
    thread pools in an undefined state). At most 2 shards per worker are in flight, so memory stays
    bounded by the shard size, not the input size."""
    if not pending:
        return
    if workers == 1:
        state = task.load()
        for s in pending:
            on_done(s, task.compute(state, table.slice(s.start, s.rows)))
        return
    ctx = multiprocessing.get_context("spawn")
    todo = list(reversed(pending))
    with ProcessPoolExecutor(max_workers=workers, mp_context=ctx) as pool:
        running: dict = {}
        try:
            while todo or running:
                while todo and len(running) < 2 * workers:
                    s = todo.pop()
                    running[pool.submit(_compute_in_worker, task, table.slice(s.start, s.rows))] = s
                done, _ = wait(running, return_when=FIRST_COMPLETED)
                for fut in done:
                    s = running.pop(fut)
                    on_done(s, fut.result())
        except BaseException:
            for fut in running:
                fut.cancel()
            raise


# ---------------------------------------------------------------- Ray Data
class _RayShardWorker:
    """A Ray Data actor: holds the model, turns one input block (= one shard) into output rows."""

    def __init__(self, task: Any):
        _pin_threads(task.threads)
        self.task, self.state = task, task.load()

    def __call__(self, batch: pa.Table) -> pa.Table:
        return self.task.compute(self.state, batch)


def _user_error(exc: BaseException) -> SlimcartError | None:
    """The SlimcartError inside Ray's wrapped exceptions, if that is what failed."""
    seen = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        if isinstance(exc, SlimcartError):
            return exc
        exc = getattr(exc, "cause", None) or exc.__cause__
    return None


def run_ray(task: Any, pending: list[Shard], table: pa.Table, workers: int, on_done: OnDone,
            address: str | None = None, shard_rows: int = 0) -> None:
    """Ray Data `map_batches` with `workers` model-holding actors of `task.threads` CPUs each. Without an
    address a local Ray is started for this job (and stopped after); with one, the job runs there."""
    try:
        import ray
    except ImportError:
        raise SlimcartError("--engine ray needs Ray Data: pip install 'ray[data]'") from None
    if not pending:
        return
    started = False
    if not ray.is_initialized():
        kwargs = {"address": address} if address else {
            "num_cpus": workers * task.threads, "include_dashboard": False, "object_store_memory": 256 << 20}
        try:
            ray.init(log_to_driver=False, configure_logging=False, **kwargs)
        except Exception as e:  # noqa: BLE001 - cannot reach / start Ray: a clear one-liner
            raise SlimcartError(f"cannot start Ray{' at ' + address if address else ''}: {str(e).splitlines()[0]}") from None
        started = True
    try:
        ctx = ray.data.DataContext.get_current()
        ctx.enable_progress_bars = False  # slimcart draws its own bar
        ds = ray.data.from_arrow([table.slice(s.start, s.rows) for s in pending])  # one block per shard
        out = ds.map_batches(_RayShardWorker, fn_constructor_args=(task,), batch_size=None, batch_format="pyarrow",
                             concurrency=workers, num_cpus=task.threads)
        by_index = {s.index: s for s in pending}
        parts: dict[int, list[pa.Table]] = {}
        got: dict[int, int] = {}
        # Ray may split or merge blocks on the way: regroup output rows by the shard they belong to.
        for block in out.iter_batches(batch_size=None, batch_format="pyarrow"):
            rows = block.column("row").to_numpy()
            for idx in sorted(set((rows // shard_rows).tolist())):
                piece = block.filter(pa.array(rows // shard_rows == idx))
                parts.setdefault(idx, []).append(piece)
                got[idx] = got.get(idx, 0) + piece.num_rows
                if got[idx] == by_index[idx].rows:
                    whole = pa.concat_tables(parts.pop(idx)).sort_by("row")
                    on_done(by_index[idx], whole)
    except Exception as e:  # noqa: BLE001
        err = _user_error(e)
        if err is not None:
            raise SlimcartError(str(err)) from None
        raise
    finally:
        if started:
            ray.shutdown()
