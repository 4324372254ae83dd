"""What a workload exposes over HTTP, without knowing HTTP.

A `Servable` lists its endpoints. Each endpoint has a pydantic request model (types, limits),
`prepare(request) -> Prepared` (checks that need the model, e.g. item ids in range, then the item
and its size in batch units), and is either
  - batched: the server queues prepared items; `run(items) -> outputs` runs one micro-batch on the
    model thread; `respond(output) -> dict` is the JSON body; or
  - streamed: `Streamer` objects step a generation one token at a time (see streaming.py).

Servables register by workload name (`SERVABLES`); `slimcart serve` looks the name up.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, ClassVar

from pydantic import BaseModel, ConfigDict


class RequestError(Exception):
    """The request is wrong (4xx); the message names the field and the problem."""

    def __init__(self, message: str, status: int = 422):
        super().__init__(message)
        self.message, self.status = message, status


class Strict(BaseModel):
    """Request bodies: unknown fields are an error (a typo is not silently ignored), no coercion of types."""

    model_config = ConfigDict(extra="forbid", strict=True)


@dataclass
class Prepared:
    item: Any
    size: int = 1  # batch units this request takes (texts, histories)


@dataclass
class Endpoint:
    path: str
    request: type[BaseModel]
    prepare: Callable[[Any], Prepared]
    respond: Callable[[Any], dict] = lambda out: out
    streamed: bool = False
    summary: str = ""


@dataclass
class Limits:
    """Request limits every servable applies (set from the CLI)."""

    max_items: int = 64  # texts per /embed request, histories per /score request
    max_chars: int = 2000  # per text; the tokenizer truncates to the model's window anyway
    max_k: int = 100
    max_history: int = 2048  # items in a /score history (the model reads the newest max_len of them)
    max_new_tokens: int = 256
    max_prompt_tokens: int = 1024


class Servable:
    """Base class: a model behind endpoints. Subclasses set `workload` and fill `endpoints`."""

    workload: ClassVar[str] = ""
    batched: ClassVar[bool] = True  # False: streamed through `self.decoder` (see streaming.Decoder)
    decoder: Any = None

    def __init__(self, limits: Limits):
        self.limits = limits
        self.endpoints: list[Endpoint] = []
        self.notes: list[str] = []

    def run(self, items: list[Any]) -> list[Any]:  # pragma: no cover - abstract
        raise NotImplementedError

    def warmup(self, max_batch: int) -> tuple[float, float]:
        """Run the model (first-call costs happen now, not on a user's request); returns the seconds
        of a batch of 1 and of a full batch, which seed the batcher's wait estimate."""
        return 0.0, 0.0

    def info(self) -> dict:
        return {"workload": self.workload}


def timed_pair(fn: Callable[[Any], Any], one: Any, full: Any, repeats: int = 3) -> tuple[float, float]:
    """Median seconds of fn(one) and fn(full), after one untimed call of each (first-call costs)."""
    import statistics
    import time

    fn(one), fn(full)
    out = []
    for arg in (one, full):
        times = []
        for _ in range(repeats):
            t = time.perf_counter()
            fn(arg)
            times.append(time.perf_counter() - t)
        out.append(statistics.median(times))
    return out[0], out[1]


SERVABLES: dict[str, Callable[..., Servable]] = {}


def register_servable(workload: str):
    def deco(factory):
        SERVABLES[workload] = factory
        return factory

    return deco
