"""Helpers for the serving tests: a real uvicorn server on 127.0.0.1 (random free port) in a thread."""
from __future__ import annotations

import signal
import threading
import time
from contextlib import contextmanager

from prometheus_client.parser import text_string_to_metric_families

from slimcart.serve.app import build_app, make_server


@contextmanager
def running(app, opts, start_timeout: float = 30.0):
    """Yield (base_url, server); on exit ask the server to stop as SIGTERM would and wait for it."""
    server = make_server(app, opts.model_copy(update={"port": 0, "host": "127.0.0.1"}))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    end = time.monotonic() + start_timeout
    while not server.started:
        if time.monotonic() > end or not thread.is_alive():
            raise RuntimeError("test server did not start")
        time.sleep(0.02)
    port = server.servers[0].sockets[0].getsockname()[1]
    try:
        yield f"http://127.0.0.1:{port}", server
    finally:
        server.handle_exit(signal.SIGTERM, None)
        thread.join(timeout=30)
        assert not thread.is_alive(), "server did not shut down"


def serve_servable(servable, opts, warm=(0.0, 0.0)):
    return running(build_app(servable, opts, warm=warm), opts)


def metric_samples(text: str) -> dict:
    """{(name, frozenset(labels)): value} from Prometheus text (parsed by prometheus_client's parser)."""
    out = {}
    for fam in text_string_to_metric_families(text):
        for s in fam.samples:
            out[(s.name, frozenset(s.labels.items()))] = s.value
    return out


def sample(samples: dict, name: str, **labels) -> float:
    return samples.get((name, frozenset(labels.items())), 0.0)
