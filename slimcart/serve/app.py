"""The HTTP server: FastAPI on uvicorn (httptools + uvloop when installed).

Why this stack: on this 2-core machine a trivial JSON endpoint cost 0.69 ms p50 on FastAPI/uvicorn
(uvloop) against 1.40 ms on LitServe, whose front end hands every request to a worker process
through queues (bench/server_stack.py, bench/results/server_stack.json); and the bounded queue with
429 + Retry-After that serving needs is ours to write on either.

Every request: body read up to `max_body_bytes` (413), JSON parsed (400), validated against the
endpoint's strict schema (422 naming the field), checked by the servable (4xx), then queued
(429/503 with Retry-After when refused) and answered. An unexpected failure is a 500 for that
request only; nothing a client sends stops the server. On SIGTERM/SIGINT the server stops
accepting connections, /ready turns 503, requests in flight finish (up to `graceful_s`), then the
batcher drains and stops.
"""
from __future__ import annotations

import asyncio
import json
import logging
import math
import time
from contextlib import asynccontextmanager
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from pydantic import BaseModel, ConfigDict, Field, ValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException

from .batching import MicroBatcher, Rejected
from .metrics import ServerMetrics
from .servable import Endpoint, Limits, RequestError, Servable

log = logging.getLogger("slimcart.serve")


class ServeOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")
    host: str = "127.0.0.1"
    port: int = Field(8000, ge=0, le=65535)
    max_batch: int = Field(32, ge=1, le=4096)  # items (texts, histories) per model call
    max_wait_ms: float = Field(5.0, ge=0, le=10_000)  # how long the first item waits for company
    max_queue: int = Field(256, ge=1)  # items waiting; beyond it: 429
    max_queue_wait_ms: float | None = Field(500.0, gt=0)  # predicted wait beyond it: 429 (None: off)
    timeout_s: float = Field(10.0, gt=0)  # a request not answered by then: 503
    max_body_bytes: int = Field(1 << 20, ge=1024)
    max_connections: int = Field(1024, ge=1)  # uvicorn answers 503 beyond it
    graceful_s: float = Field(30.0, ge=0)
    max_streams: int = Field(4, ge=1)  # /generate streams decoded at once
    max_items: int = Field(64, ge=1)
    max_chars: int = Field(2000, ge=1)
    max_k: int = Field(100, ge=1)
    max_new_tokens: int = Field(256, ge=1)
    max_prompt_tokens: int = Field(1024, ge=1)

    def limits(self) -> Limits:
        return Limits(max_items=min(self.max_items, self.max_batch), max_chars=self.max_chars, max_k=self.max_k,
                      max_new_tokens=self.max_new_tokens, max_prompt_tokens=self.max_prompt_tokens)


def _error(status: int, message: str, retry_after: float | None = None):
    headers = {"Retry-After": str(max(1, math.ceil(retry_after)))} if retry_after is not None else None
    return JSONResponse({"error": message, "status": status}, status_code=status, headers=headers)


def describe(e: ValidationError) -> str:
    """'texts[3]: String should have at most 2000 characters' for the first few problems."""
    parts = []
    for err in e.errors()[:3]:
        loc = "".join(f"[{p}]" if isinstance(p, int) else f".{p}" for p in err["loc"]).lstrip(".") or "body"
        parts.append(f"{loc}: {err['msg']}")
    more = len(e.errors()) - 3
    return "; ".join(parts) + (f" (and {more} more)" if more > 0 else "")


async def _read_body(request, limit: int) -> bytes:
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise RequestError(f"body of {int(declared)} bytes is over the {limit}-byte limit", 413)
    body = bytearray()
    async for chunk in request.stream():  # also bounds bodies sent without a length (chunked)
        body += chunk
        if len(body) > limit:
            raise RequestError(f"body is over the {limit}-byte limit", 413)
    return bytes(body)


def build_app(servable: Servable, opts: ServeOptions, warm: tuple[float, float] = (0.0, 0.0),
              metrics: ServerMetrics | None = None, say=lambda msg: None):
    metrics = metrics or ServerMetrics()
    batcher = MicroBatcher(servable.run, max_batch=opts.max_batch, max_wait_ms=opts.max_wait_ms,
                           max_queue=opts.max_queue, max_queue_wait_ms=opts.max_queue_wait_ms,
                           timeout_s=opts.timeout_s, metrics=metrics) if servable.batched else None
    scheduler = None
    if not servable.batched:
        from .streaming import DecodeScheduler

        scheduler = DecodeScheduler(servable.decoder, max_streams=opts.max_streams, max_queue=opts.max_queue,
                                    timeout_s=opts.timeout_s, metrics=metrics)
    status = {"ready": False, "draining": False}

    @asynccontextmanager
    async def lifespan(app):
        if batcher is not None:
            batcher.start()
            batcher.warm(*warm)
        if scheduler is not None:
            scheduler.start()
        status["ready"] = True
        yield
        status["ready"], status["draining"] = False, True
        if batcher is not None:
            await batcher.stop(opts.graceful_s)
        if scheduler is not None:
            await asyncio.to_thread(scheduler.stop, opts.graceful_s)
        say("stopped: requests in flight finished, queue drained")

    app = FastAPI(title="slimcart serve", lifespan=lifespan, openapi_url=None, docs_url=None, redoc_url=None)
    app.state.status, app.state.metrics, app.state.batcher = status, metrics, batcher

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request, exc):  # 404 unknown path, 405 wrong method: same JSON shape as ours
        paths = ", ".join(["/health", "/ready", "/metrics"] + [f"POST {e.path}" for e in servable.endpoints])
        msg = f"no route {request.method} {request.url.path} (routes: {paths})" if exc.status_code in (404, 405) \
            else str(exc.detail)
        return _error(exc.status_code, msg)

    @app.get("/health")
    async def health():
        return {"status": "ok"}

    @app.get("/ready")
    async def ready():
        body = {"ready": status["ready"] and not status["draining"], **servable.info(),
                "endpoints": [e.path for e in servable.endpoints], "limits": opts.model_dump(exclude={"host", "port"})}
        return JSONResponse(body, status_code=200 if body["ready"] else 503)

    @app.get("/metrics")
    async def prometheus():
        return Response(metrics.render(), media_type=metrics.content_type)

    def route(ep: Endpoint):
        async def handle(request: Request):
            t0 = time.monotonic()
            metrics.inflight.inc()
            code = 500
            try:
                resp = await _answer(ep, request)
                code = resp.status_code
                return resp
            finally:
                metrics.inflight.dec()
                metrics.requests.labels(ep.path, str(code)).inc()
                if code == 200:
                    metrics.latency.labels(ep.path).observe(time.monotonic() - t0)

        app.add_api_route(ep.path, handle, methods=["POST"], summary=ep.summary)

    async def _answer(ep: Endpoint, request):
        try:
            if batcher is not None:
                batcher.admit(1)  # overloaded: refuse before spending time on the body
            body = await _read_body(request, opts.max_body_bytes)
            try:
                payload = json.loads(body)
            except (json.JSONDecodeError, UnicodeDecodeError) as e:
                raise RequestError(f"body is not valid JSON ({e})", 400) from None
            try:
                req = ep.request.model_validate(payload)
            except ValidationError as e:
                raise RequestError(describe(e)) from None
            prepared = ep.prepare(req)
            if ep.streamed:
                return await _stream(prepared.item)
            out = await batcher.submit(prepared.item, prepared.size)
            return JSONResponse(ep.respond(out))
        except RequestError as e:
            return _error(e.status, e.message)
        except Rejected as e:
            return _error(e.status, e.message, e.retry_after)
        except Exception as e:  # noqa: BLE001 - a bug answers this request with 500; the server lives on
            log.exception("request to %s failed", ep.path)
            return _error(500, f"internal error ({type(e).__name__}); the request was not the problem")

    async def _stream(item: dict):
        s = scheduler.open(item["ids"], item["max_new_tokens"], item["stop_at_eos"])
        try:
            first = await asyncio.wait_for(s.events.get(), opts.timeout_s)
        except (asyncio.TimeoutError, asyncio.CancelledError):
            s.cancelled = True
            raise Rejected(503, f"generation did not start within {opts.timeout_s:g} s", 1, "timeout") from None
        if "rejected" in first:
            raise first["rejected"]
        if not item["stream"]:
            text, event = [], first
            while True:
                if "error" in event:
                    raise RuntimeError(event["error"])
                text.append(event["text"])
                if event.get("done"):
                    return JSONResponse({"text": "".join(text), "tokens": event["tokens"],
                                         "finish_reason": event["finish_reason"]})
                event = await s.events.get()

        async def events():
            event = first
            try:
                while True:
                    yield f"data: {json.dumps(event)}\n\n"
                    if event.get("done") or "error" in event:
                        return
                    event = await s.events.get()
            finally:
                s.cancelled = True  # client gone or stream over: the scheduler drops it

        return StreamingResponse(events(), media_type="text/event-stream")

    for ep in servable.endpoints:
        route(ep)
    return app


def make_server(app: Any, opts: ServeOptions):
    """A uvicorn server whose shutdown signal first marks the app as draining (/ready -> 503)."""
    import importlib.util

    import uvicorn

    class _Server(uvicorn.Server):
        def handle_exit(self, sig, frame):
            app.state.status["draining"] = True
            super().handle_exit(sig, frame)

    fast = importlib.util.find_spec("uvloop") is not None and importlib.util.find_spec("httptools") is not None
    config = uvicorn.Config(app, host=opts.host, port=opts.port, loop="uvloop" if fast else "asyncio",
                            http="httptools" if fast else "h11", log_level="warning", access_log=False,
                            timeout_graceful_shutdown=opts.graceful_s, limit_concurrency=opts.max_connections,
                            timeout_keep_alive=5)
    return _Server(config)
