"""Timing inputs at a profile's batch, end to end: a request is timed from its raw form (text, item
history) through the workload's preparation (tokenization, padding) to the model's output.

The raw requests are recovered from the workload's own benchmark inputs (`Workload.bench_inputs`), so
they are the same real queries, titles, histories and prompts every other benchmark times:
    search  texts decoded from the tokenized requests; prepared by `SearchWorkload.tokenize`; any batch
    recsys  histories = the non-padding items of each row; prepared by left-padding; any batch
    llm     prompts decoded to text; prepared by the tokenizer; batch 1 (the decode runner serves one prompt)
A workload slimcart has no adapter for is timed on its prepared inputs at its own serving batch, and
the plan says preparation is not included.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

import numpy as np

from ..contracts import BenchInputs, ModelBundle


@dataclass
class Requests:
    inputs: BenchInputs  # single: raw batch-1 requests; serving: raw batches of `batch` items
    prepare: Callable[[Any], Any]
    batch: int
    end_to_end: bool
    note: str


class EndToEnd:
    """A runner that takes raw requests: preparation + model, timed together."""

    def __init__(self, runner: Any, prepare: Callable[[Any], Any]):
        self.runner, self.prepare = runner, prepare
        self.runtime = getattr(runner, "runtime", "?")

    def __call__(self, raw: Any) -> Any:
        return self.runner(self.prepare(raw))


def _chunks(items: list, size: int, count: int) -> list[list]:
    out = [items[i:i + size] for i in range(0, len(items), size)]
    out = [c for c in out if len(c) == size] or out[:1]
    return out[:count]


def _search(wl, bundle: ModelBundle, base: BenchInputs, batch: int) -> Requests:
    tok = bundle.tokenizer

    def texts(b):
        return tok.batch_decode(b["input_ids"], skip_special_tokens=True)

    singles = [texts(b) for b in base.single]
    pool = [t for b in base.serving for t in texts(b)]
    serving = _chunks(pool, batch, max(4, min(64, 512 // batch)))
    return Requests(BenchInputs(single=singles, serving=serving, items_per_serving_batch=len(serving[0]), unit=base.unit),
                    lambda raw: wl.tokenize(tok, list(raw)), len(serving[0]), True,
                    "queries and product titles as text, tokenized inside every timed call")


def _recsys(wl, bundle: ModelBundle, base: BenchInputs, batch: int) -> Requests:
    from ..workloads.ranking import left_pad

    L = wl.max_len(bundle)

    def hists(b):
        return [row[row != 0] for row in np.asarray(b["seq"])]

    singles = [hists(b) for b in base.single]
    pool = [h for b in base.serving for h in hists(b)]
    serving = _chunks(pool, batch, max(4, min(64, 4096 // batch)))
    return Requests(BenchInputs(single=singles, serving=serving, items_per_serving_batch=len(serving[0]), unit=base.unit),
                    lambda raw: {"seq": left_pad(list(raw), L)}, len(serving[0]), True,
                    "item histories, left-padded inside every timed call")


def _llm(wl, bundle: ModelBundle, base: BenchInputs, batch: int) -> Requests:
    tok = bundle.tokenizer

    def raw(b):
        if "max_new_tokens" not in b:
            return b  # prefill windows: token ids already (no text preparation to time)
        return (tok.decode(np.asarray(b["input_ids"])[0], skip_special_tokens=True), int(b["max_new_tokens"]))

    def prepare(r):
        if isinstance(r, dict):
            return r
        text, n = r
        return {"input_ids": np.asarray([tok.encode(text, add_special_tokens=False)], np.int64), "max_new_tokens": n}

    extra = {k: ([raw(b) for b in bs], items) for k, (bs, items) in base.extra.items()}
    return Requests(BenchInputs(single=[raw(b) for b in base.single], serving=[raw(b) for b in base.serving],
                                items_per_serving_batch=base.items_per_serving_batch, unit=base.unit, extra=extra),
                    prepare, 1, True, "review prompts as text, tokenized inside every timed call; greedy decode at batch 1")


ADAPTERS = {"search": _search, "recsys": _recsys, "llm": _llm}


def requests_for(wl, bundle: ModelBundle, data: Any, batch: int) -> Requests:
    base = wl.bench_inputs(bundle, data)
    adapter = ADAPTERS.get(getattr(wl, "name", None))
    if adapter is None:
        return Requests(base, lambda x: x, base.items_per_serving_batch, False,
                        "the workload's prepared inputs at its own serving batch (preparation not timed)")
    return adapter(wl, bundle, base, batch)
