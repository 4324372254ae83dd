"""Token streaming: a decode scheduler that interleaves generation streams on one model thread.

Up to `max_streams` streams are active. Each scheduler round prefills the streams that just joined
(one forward pass each, their first token goes out right away) and advances every other active
stream by one token in ONE batched decode step (`Decoder.step_many`). So concurrent streams share
the model fairly, a new stream waits at most one round for its first token, and B streams cost one
pass over the weights per token instead of B. Streams beyond `max_streams` wait in a bounded
queue (full: 429); a stream still waiting after `timeout_s` is dropped (503); a stream whose
client went away is dropped at the next round.
"""
from __future__ import annotations

import asyncio
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Any, Protocol

from .batching import Rejected
from .metrics import ServerMetrics


class Decoder(Protocol):
    eos_token_id: int | None

    def start(self, prompt_ids: list[int]) -> tuple[Any, int]: ...  # prefill -> (state, first token)

    def step_many(self, states: list[Any], tokens: list[int]) -> tuple[list[Any], list[int]]: ...  # one token each

    def text(self, ids: list[int]) -> str: ...  # detokenize


@dataclass
class Stream:
    prompt_ids: list[int]
    max_new_tokens: int
    stop_at_eos: bool
    loop: asyncio.AbstractEventLoop
    events: asyncio.Queue = field(default_factory=asyncio.Queue)
    enqueued: float = field(default_factory=time.monotonic)
    state: Any = None
    next_token: int | None = None
    generated: list[int] = field(default_factory=list)
    sent_text: str = ""
    cancelled: bool = False

    def emit(self, event: dict) -> None:
        self.loop.call_soon_threadsafe(self.events.put_nowait, event)


class DecodeScheduler:
    def __init__(self, decoder: Decoder, *, max_streams: int, max_queue: int, timeout_s: float,
                 metrics: ServerMetrics):
        self.decoder, self.max_streams, self.max_queue = decoder, max_streams, max_queue
        self.timeout_s, self.metrics = timeout_s, metrics
        self._waiting: deque[Stream] = deque()
        self._active: list[Stream] = []
        self._lock = threading.Lock()
        self._wake = threading.Event()
        self._stop = False
        self._thread = threading.Thread(target=self._loop, name="slimcart-decode", daemon=True)
        self.accepting = True

    def start(self) -> None:
        self._thread.start()

    def stop(self, drain_timeout_s: float = 30.0) -> None:
        self.accepting = False
        end = time.monotonic() + drain_timeout_s
        while (self._waiting or self._active) and time.monotonic() < end:
            time.sleep(0.01)
        self._stop = True
        self._wake.set()
        self._thread.join(timeout=5)

    def open(self, prompt_ids: list[int], max_new_tokens: int, stop_at_eos: bool) -> Stream:
        if not self.accepting:
            self.metrics.rejections.labels("generate", "draining").inc()
            raise Rejected(503, "server is shutting down", 1, "draining")
        with self._lock:
            if len(self._waiting) >= self.max_queue:
                self.metrics.rejections.labels("generate", "queue_full").inc()
                raise Rejected(429, f"generation queue full ({len(self._waiting)} streams waiting, "
                                    f"{len(self._active)} decoding)", 1, "queue_full")
            s = Stream(prompt_ids, max_new_tokens, stop_at_eos, asyncio.get_running_loop())
            self._waiting.append(s)
            self.metrics.queue_depth.labels("generate").set(len(self._waiting))
        self._wake.set()
        return s

    # ---------------------------------------------------------------- model thread
    def _admit(self) -> None:
        now = time.monotonic()
        with self._lock:
            while self._waiting and len(self._active) < self.max_streams:
                s = self._waiting.popleft()
                if s.cancelled:
                    continue
                if now - s.enqueued > self.timeout_s:
                    self.metrics.rejections.labels("generate", "expired").inc()
                    s.emit({"rejected": Rejected(503, f"stream waited more than {self.timeout_s:g} s to start", 1,
                                                 "expired")})
                    continue
                self._active.append(s)
            self.metrics.queue_depth.labels("generate").set(len(self._waiting))
            self.metrics.active_streams.set(len(self._active))

    def _emit(self, s: Stream, tok: int) -> bool:
        """Send stream s its new token; False when it is finished."""
        s.next_token = tok
        eos = s.stop_at_eos and tok == self.decoder.eos_token_id
        if not eos:
            s.generated.append(tok)
            text = self.decoder.text(s.generated)
            # A token may end inside a multi-byte character: hold the text back until it is whole.
            if not text.endswith("\ufffd"):
                s.emit({"token": tok, "text": text[len(s.sent_text):]})
                s.sent_text = text
            else:
                s.emit({"token": tok, "text": ""})
            self.metrics.tokens.inc()
        if eos or len(s.generated) >= s.max_new_tokens:
            tail = self.decoder.text(s.generated)[len(s.sent_text):]
            s.emit({"done": True, "tokens": len(s.generated), "finish_reason": "eos" if eos else "length",
                    "text": tail})
            return False
        return True

    def _round(self, streams: list[Stream]) -> list[Stream]:
        """Prefill new streams, one batched decode step for the others; the streams still going."""
        keep = []
        joined = [s for s in streams if s.state is None]
        going = [s for s in streams if s.state is not None]
        for s in joined:
            try:
                s.state, tok = self.decoder.start(s.prompt_ids)
            except Exception as e:  # noqa: BLE001 - one broken stream must not stop the others
                s.emit({"error": f"generation failed: {type(e).__name__}: {str(e)[:200]}"})
                continue
            self.metrics.ttft.observe(time.monotonic() - s.enqueued)
            if self._emit(s, tok):
                keep.append(s)
        if going:
            try:
                states, tokens = self.decoder.step_many([s.state for s in going], [s.next_token for s in going])
            except Exception as e:  # noqa: BLE001
                for s in going:
                    s.emit({"error": f"generation failed: {type(e).__name__}: {str(e)[:200]}"})
                return keep
            for s, st, tok in zip(going, states, tokens):
                s.state = st
                if self._emit(s, tok):
                    keep.append(s)
        return keep

    def _loop(self) -> None:
        while not self._stop:
            self._admit()
            if not self._active:
                self._wake.wait(0.1)
                self._wake.clear()
                continue
            keep = self._round([s for s in self._active if not s.cancelled])
            with self._lock:
                self._active = keep
                self.metrics.active_streams.set(len(keep))
