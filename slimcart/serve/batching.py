"""Dynamic micro-batching with a bounded queue, admission control and deadlines.

Requests from the event loop are queued; one collector task forms batches and runs each on one
model thread (the event loop stays free to accept, validate and reject requests meanwhile).

Batch forming: take the oldest item, then keep taking items while the batch's total size stays
<= max_batch, waiting at most `max_wait_ms` after the first item for more to arrive. A request's
size is its number of texts/histories, so a batch never exceeds what the model was warmed for.

Why admission control and not only a queue bound: a request that will wait longer than the
latency objective is useless to its client, and queueing it delays everyone behind it. The
predicted time until a new item is answered is

    wait ~= (event-loop lag) + (remaining time of the running batch) + sum of t(b) over the batches
            ahead of it and its own

where the queue ahead (plus the item) splits into full batches of max_batch and one remainder, and
t(b) = s * (a + c * b) is the batch time: a (fixed cost) and c (per item) are fitted at warm-up from
a batch of 1 and a full batch, s is an exponential moving average of observed / fitted time, so the
estimate follows the machine's current speed while keeping the shape. The event-loop lag covers the
case where HTTP handling, not the model, is the bottleneck. An item is refused (429 with
Retry-After) when the queue holds `max_queue` size units (a hard memory bound) or, while there is
work ahead of it, when its predicted wait exceeds `max_queue_wait_ms`. Items whose deadline passes
while queued are dropped before they reach the model (503), so overload sheds work instead of
growing latency.
"""
from __future__ import annotations

import asyncio
import time
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, Callable

from .metrics import ServerMetrics


class Rejected(Exception):
    """The request was not run: `status` (429/503), a message, and seconds after which to retry."""

    def __init__(self, status: int, message: str, retry_after: float, reason: str):
        super().__init__(message)
        self.status, self.message, self.retry_after, self.reason = status, message, retry_after, reason


@dataclass
class _Entry:
    item: Any
    size: int
    future: asyncio.Future
    deadline: float
    enqueued: float = field(default_factory=time.monotonic)


class MicroBatcher:
    """`await submit(item, size)` -> the output `run_batch` produced for that item."""

    def __init__(self, run_batch: Callable[[list[Any]], list[Any]], *, max_batch: int, max_wait_ms: float,
                 max_queue: int, max_queue_wait_ms: float | None, timeout_s: float, metrics: ServerMetrics,
                 name: str = "model"):
        self.run_batch, self.max_batch, self.max_wait = run_batch, max_batch, max_wait_ms / 1e3
        self.max_queue, self.timeout_s, self.metrics, self.name = max_queue, timeout_s, metrics, name
        self.max_queue_wait = None if max_queue_wait_ms is None else max_queue_wait_ms / 1e3
        self._queue: deque[_Entry] = deque()
        self._queued_size = 0
        self._arrived: asyncio.Event | None = None
        self._task: asyncio.Task | None = None
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix=f"slimcart-{name}")
        self._fixed, self._per_item, self._scale = 0.0, 0.0, 1.0  # t(b) = scale * (fixed + per_item * b)
        self._running_until = 0.0  # expected end of the batch on the model thread
        self._watch: asyncio.Task | None = None
        self.loop_lag = 0.0  # how late the event loop runs: requests wait about this long before we see them
        self.accepting = True

    # ---------------------------------------------------------------- lifecycle
    def start(self) -> None:
        self._arrived = asyncio.Event()
        self._task = asyncio.get_running_loop().create_task(self._collect(), name=f"batcher-{self.name}")
        self._watch = asyncio.get_running_loop().create_task(self._watch_loop(), name="loop-lag")

    async def _watch_loop(self, tick: float = 0.01) -> None:
        """Event-loop lag: when the HTTP side (parsing, JSON, other requests) is the bottleneck, requests
        queue in socket buffers where the model queue cannot see them; the lag measures that wait."""
        while True:
            t = time.monotonic()
            await asyncio.sleep(tick)
            lag = max(0.0, time.monotonic() - t - tick)
            self.loop_lag = lag if lag > self.loop_lag else 0.7 * self.loop_lag + 0.3 * lag  # fast up, slow down
            self.metrics.loop_lag.set(self.loop_lag)

    async def stop(self, drain_timeout_s: float = 30.0) -> None:
        """Refuse new items, let queued ones finish (up to drain_timeout_s), then stop the collector."""
        self.accepting = False
        end = time.monotonic() + drain_timeout_s
        while self._queue and time.monotonic() < end:
            await asyncio.sleep(0.01)
        for task in (self._task, self._watch):
            if task is not None:
                task.cancel()
                try:
                    await task
                except asyncio.CancelledError:
                    pass
        for e in self._queue:
            if not e.future.done():
                e.future.set_exception(Rejected(503, "server is shutting down", 1, "draining"))
        self._queue.clear()
        self._executor.shutdown(wait=True)

    def warm(self, t_one: float, t_full: float) -> None:
        """Fit t(b) from warm-up timings of a batch of 1 and of max_batch, so admission works from the
        first request."""
        if self.max_batch > 1:
            self._per_item = max(0.0, (t_full - t_one) / (self.max_batch - 1))
        else:
            self._per_item = t_full
        self._fixed = max(0.0, t_one - self._per_item)

    def batch_time(self, size: int) -> float:
        return self._scale * (self._fixed + self._per_item * size)

    # ---------------------------------------------------------------- submit
    def predicted_wait(self, size: int) -> float:
        running = max(0.0, self._running_until - time.monotonic())
        full, rest = divmod(self._queued_size + size, self.max_batch)
        model = running + full * self.batch_time(self.max_batch) + (self.batch_time(rest) if rest else 0.0)
        return self.loop_lag + model

    def _reject(self, status: int, message: str, retry_after: float, reason: str) -> Rejected:
        self.metrics.rejections.labels(self.name, reason).inc()
        return Rejected(status, message, retry_after, reason)

    def admit(self, size: int) -> None:
        """Raise Rejected if an item of this size would be refused now (cheap: called before the body
        is even read, and again with the real size)."""
        if not self.accepting:
            raise self._reject(503, "server is shutting down", 1, "draining")
        if self._queued_size + size > self.max_queue:
            raise self._reject(429, f"queue full ({self._queued_size} items waiting, limit {self.max_queue})",
                               self.predicted_wait(size), "queue_full")
        if self.max_queue_wait is None or self._fixed + self._per_item <= 0:
            return
        # An idle model answers at once: refusing then would gain nothing, whatever the estimate says,
        # unless the HTTP side alone is already over the budget.
        model_busy = self._queued_size > 0 or self._running_until > 0
        if model_busy or self.loop_lag > self.max_queue_wait:
            wait = self.predicted_wait(size)
            if wait > self.max_queue_wait:
                raise self._reject(429, f"overloaded: predicted queue wait {wait * 1e3:.0f} ms exceeds "
                                        f"{self.max_queue_wait * 1e3:.0f} ms", wait, "predicted_wait")

    async def submit(self, item: Any, size: int = 1) -> Any:
        self.admit(size)
        fut = asyncio.get_running_loop().create_future()
        entry = _Entry(item, size, fut, time.monotonic() + self.timeout_s)
        self._queue.append(entry)
        self._queued_size += size
        self.metrics.queue_depth.labels(self.name).set(self._queued_size)
        self._arrived.set()
        try:
            return await asyncio.wait_for(asyncio.shield(fut), self.timeout_s)
        except asyncio.TimeoutError:
            fut.cancel()  # the collector skips it if it has not run yet
            raise self._reject(503, f"request timed out after {self.timeout_s:g} s", self.predicted_wait(size),
                               "timeout") from None
        except asyncio.CancelledError:  # the client went away: do not spend model time on it
            fut.cancel()
            raise

    # ---------------------------------------------------------------- collector
    def _pop_live(self) -> _Entry | None:
        now = time.monotonic()
        while self._queue:
            e = self._queue.popleft()
            self._queued_size -= e.size
            if e.future.done():  # cancelled by a timeout or a disconnect
                continue
            if now > e.deadline:
                self.metrics.rejections.labels(self.name, "expired").inc()
                e.future.set_exception(Rejected(503, "request expired in the queue", self.predicted_wait(0), "expired"))
                continue
            return e
        return None

    async def _collect(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            if not self._queue:
                self._arrived.clear()
                await self._arrived.wait()
            first = self._pop_live()
            if first is None:
                continue
            batch, total = [first], first.size
            fill_until = first.enqueued + self.max_wait
            while total < self.max_batch:
                if self._queue:
                    if total + self._queue[0].size > self.max_batch:
                        break
                    e = self._pop_live()
                    if e is not None:
                        batch.append(e)
                        total += e.size
                    continue
                left = fill_until - time.monotonic()
                if left <= 0:
                    break
                self._arrived.clear()
                try:
                    await asyncio.wait_for(self._arrived.wait(), left)
                except asyncio.TimeoutError:
                    break
            self.metrics.queue_depth.labels(self.name).set(self._queued_size)
            await self._run(loop, batch, total)

    async def _run(self, loop, batch: list[_Entry], total: int) -> None:
        self.metrics.batch_size.labels(self.name).observe(total)
        t0 = time.monotonic()
        self._running_until = t0 + self.batch_time(total)
        try:
            outputs = await loop.run_in_executor(self._executor, self.run_batch, [e.item for e in batch])
            if len(outputs) != len(batch):  # a servable bug, not the client's
                raise RuntimeError(f"servable returned {len(outputs)} outputs for {len(batch)} items")
        except Exception as exc:  # noqa: BLE001 - every waiting request gets the error, the loop lives on
            for e in batch:
                if not e.future.done():
                    e.future.set_exception(exc)
            return
        finally:
            dt = time.monotonic() - t0
            self._running_until = 0.0
            self.metrics.batch_seconds.labels(self.name).observe(dt)
            fitted = self._fixed + self._per_item * total
            if fitted > 0:
                self._scale = 0.8 * self._scale + 0.2 * min(10.0, max(0.1, dt / fitted))
        for e, out in zip(batch, outputs):
            if not e.future.done():
                e.future.set_result(out)
