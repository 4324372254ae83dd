"""`slimcart serve`: real servers on 127.0.0.1 (random port), a tiny random encoder or a slow fake model.

Checked: /embed equals the workload's own embeddings, /search equals brute force, every bad request
is a 4xx JSON naming the problem (and the server lives on), micro-batching really batches, a full
queue answers 429 + Retry-After and recovers, timeouts answer 503, shutdown finishes in-flight
requests, /metrics is valid Prometheus text.
"""
from __future__ import annotations

import asyncio
import gc
import itertools
import threading
import time

import httpx
import numpy as np
import pytest
from pydantic import create_model

from slimcart.batch.index_job import build_index
from slimcart.batch.job import JobOptions
from slimcart.errors import SlimcartError
from slimcart.serve.app import ServeOptions
from slimcart.serve.run import prepare
from slimcart.serve.servable import Endpoint, Limits, Prepared, Servable, Strict
from slimcart.workloads import get_workload

from serving_util import metric_samples, running, sample, serve_servable

pytestmark = pytest.mark.usefixtures("one_thread")

BRANDS = ["acme", "globex", "initech", "umbrella", "stark"]
THINGS = ["wireless headphones", "espresso machine", "running shoes", "4k television", "usb c cable",
          "stand mixer", "gaming laptop", "fridge freezer"]
TITLES = [f"{b} {t} {i}" for i, (b, t) in enumerate(itertools.product(BRANDS, THINGS))]


@pytest.fixture(scope="module")
def catalogue(tmp_path_factory):
    path = tmp_path_factory.mktemp("cat") / "catalogue.csv"
    path.write_text("sku,title\n" + "".join(f"P{i:03d},{t}\n" for i, t in enumerate(TITLES)))
    return path


@pytest.fixture(scope="module")
def exact_index(tiny_encoder_dir, catalogue, tmp_path_factory):
    out = tmp_path_factory.mktemp("idx") / "index"
    build_index("search", str(tiny_encoder_dir), catalogue, out, column="title", id_column="sku",
                opts=JobOptions(workers=1, threads=1, shard_rows=16))
    return out


@pytest.fixture(scope="module")
def search_app(tiny_encoder_dir, exact_index):
    opts = ServeOptions(max_batch=8, max_wait_ms=2, max_items=8, max_chars=200, max_body_bytes=4096, max_k=20)
    app, opts = prepare("search", str(tiny_encoder_dir), exact_index, opts, threads=1)
    yield app, opts
    gc.unfreeze()  # prepare froze this test process's heap, as it does a server's


@pytest.fixture(scope="module")
def search_server(search_app):
    app, opts = search_app
    with running(app, opts) as (url, _):
        yield url


# ---------------------------------------------------------------- answers are right
def test_prepare_freezes_the_loaded_heap_out_of_the_collectors_view(search_app):
    """Everything alive after warm-up (model, torch, transformers, the app) is in the permanent
    generation, so a full collection during serving walks only what requests allocated since."""
    frozen = gc.get_freeze_count()
    assert frozen > 50_000, frozen  # torch + transformers alone are hundreds of thousands of objects
    tracked = len(gc.get_objects())  # what a collection walks
    assert tracked < frozen / 5, (tracked, frozen)


def test_embed_equals_the_workloads_embeddings(search_server, tiny_encoder_dir):
    wl = get_workload("search")
    bundle = wl.load_model(str(tiny_encoder_dir))
    texts = ["red running shoes", "a much longer product title for a stand mixer with a glass bowl"]
    want = wl.embed(wl.torch_runner(bundle), bundle.tokenizer, texts)
    r = httpx.post(f"{search_server}/embed", json={"texts": texts})
    assert r.status_code == 200, r.text
    got = np.array(r.json()["vectors"], np.float32)
    assert got.shape == want.shape and r.json()["dim"] == want.shape[1]
    np.testing.assert_allclose(got, want, atol=1e-5)


def test_search_equals_brute_force(search_server, tiny_encoder_dir):
    wl = get_workload("search")
    bundle = wl.load_model(str(tiny_encoder_dir))
    runner = wl.torch_runner(bundle)
    cat = wl.embed(runner, bundle.tokenizer, TITLES)
    query = "globex espresso machine"
    sims = cat @ wl.embed(runner, bundle.tokenizer, [query])[0]
    top = np.argsort(-sims, kind="stable")[:5]
    r = httpx.post(f"{search_server}/search", json={"query": query, "k": 5})
    assert r.status_code == 200, r.text
    res = r.json()["results"]
    np.testing.assert_allclose([x["score"] for x in res], sims[top], atol=1e-5)
    # ids may swap only between equal scores
    assert [x["id"] for x in res] == [f"P{i:03d}" for i in top] or np.allclose(sims[top][:-1], sims[top][1:])
    assert res[0]["title"] == TITLES[top[0]]


# ---------------------------------------------------------------- bad requests
BAD = [
    (b"{not json", 400, "not valid JSON"),
    (b"\xff\xfe", 400, "not valid JSON"),
    (b"[1, 2]", 422, "body: Input should be a valid dictionary"),
    (b'{"texts": "one string"}', 422, "texts: Input should be a valid list"),
    (b'{"texts": []}', 422, "texts: List should have at least 1 item"),
    (b'{"texts": [""]}', 422, "texts[0]: String should have at least 1 character"),
    (b'{"texts": ["ok", "   "]}', 422, "texts[1] is empty or only whitespace"),
    (b'{"texts": ["ok", 7]}', 422, "texts[1]: Input should be a valid string"),
    (b'{"texts": ["' + b"x" * 201 + b'"]}', 422, "texts[0]: String should have at most 200 characters"),
    (b'{"texts": [' + b",".join([b'"a"'] * 9) + b"]}", 422, "texts: List should have at most 8 items"),
    (b'{"texts": ["a"], "normalize": false}', 422, "normalize: Extra inputs are not permitted"),
    (b'{"text": ["a"]}', 422, "texts: Field required"),
    (b'{"texts": ["' + b"y" * 5000 + b'"]}', 413, "over the 4096-byte limit"),
]


@pytest.mark.parametrize("body,status,fragment", BAD, ids=range(len(BAD)))
def test_bad_embed_requests_get_a_4xx_naming_the_problem(search_server, body, status, fragment):
    r = httpx.post(f"{search_server}/embed", content=body, headers={"content-type": "application/json"})
    assert r.status_code == status, r.text
    assert fragment in r.json()["error"], r.json()


@pytest.mark.parametrize("payload,fragment", [
    ({"query": "tv", "k": 0}, "k: Input should be greater than or equal to 1"),
    ({"query": "tv", "k": 21}, "k: Input should be less than or equal to 20"),
    ({"query": "tv", "k": "5"}, "k: Input should be a valid integer"),
    ({"query": "tv", "k": 2.5}, "k: Input should be a valid integer"),
    ({"query": "\t "}, "query is empty or only whitespace"),
    ({"query": ["tv"]}, "query: Input should be a valid string"),
])
def test_bad_search_requests(search_server, payload, fragment):
    r = httpx.post(f"{search_server}/search", json=payload)
    assert r.status_code == 422 and fragment in r.json()["error"], r.text


def test_chunked_body_over_the_limit_is_413(search_server):
    def chunks():
        for _ in range(10):
            yield b"x" * 1000

    r = httpx.post(f"{search_server}/embed", content=chunks())
    assert r.status_code == 413 and "limit" in r.json()["error"]


def test_unknown_route_and_method(search_server):
    r = httpx.get(f"{search_server}/embed")
    assert r.status_code == 405 and "POST /embed" in r.json()["error"]
    r = httpx.post(f"{search_server}/score", json={})
    assert r.status_code == 404 and "no route" in r.json()["error"]


def test_server_lives_on_after_bad_input(search_server):
    for body, _, _ in BAD:
        httpx.post(f"{search_server}/embed", content=body)
    assert httpx.get(f"{search_server}/health").status_code == 200
    assert httpx.post(f"{search_server}/embed", json={"texts": ["still fine"]}).status_code == 200


def test_ready_describes_the_model_and_index(search_server):
    r = httpx.get(f"{search_server}/ready")
    body = r.json()
    assert r.status_code == 200 and body["ready"] is True
    assert body["index"]["count"] == len(TITLES) and body["index"]["probe_cosine"] > 0.999
    assert body["endpoints"] == ["/embed", "/search"]


def test_index_of_another_encoder_is_refused(exact_index, tmp_path, tiny_encoder_dir):
    import shutil

    import torch
    from transformers import BertModel

    other = tmp_path / "other"
    shutil.copytree(tiny_encoder_dir, other)
    model = BertModel.from_pretrained(str(other))
    torch.manual_seed(123)
    for p in model.parameters():
        torch.nn.init.normal_(p, std=0.2)
    model.save_pretrained(str(other), safe_serialization=True)
    with pytest.raises(SlimcartError, match="built with another encoder"):
        prepare("search", str(other), exact_index, ServeOptions(), threads=1)


def test_index_for_another_workload_and_missing_index_are_clear_errors(exact_index, tmp_path):
    with pytest.raises(SlimcartError, match="--index is for the search workload"):
        prepare("recsys", "sasrec", exact_index, ServeOptions(), threads=1)
    with pytest.raises(SlimcartError, match="not a slimcart index"):
        prepare("search", "minilm", tmp_path, ServeOptions(), threads=1)


# ---------------------------------------------------------------- a fake model with a known speed
class SlowDouble(Servable):
    """`/double` {"x": int} -> {"y": 2x}; each batch takes `seconds`; records the batches it ran."""

    workload = "test"

    def __init__(self, seconds: float):
        super().__init__(Limits())
        self.seconds, self.batches = seconds, []
        req = create_model("DoubleRequest", __base__=Strict, x=(int, ...))
        self.endpoints.append(Endpoint("/double", req, lambda r: Prepared(r.x), lambda out: {"y": out}))

    def run(self, items):
        self.batches.append(list(items))
        time.sleep(self.seconds)
        return [2 * i for i in items]


async def _fire(url: str, xs, path="/double", timeout=30.0):
    async with httpx.AsyncClient(base_url=url, timeout=timeout) as c:
        return await asyncio.gather(*(c.post(path, json={"x": x}) for x in xs))


def test_micro_batching_batches_concurrent_requests():
    fake = SlowDouble(0.05)
    opts = ServeOptions(max_batch=8, max_wait_ms=300, max_queue=64)
    with serve_servable(fake, opts) as (url, _):
        rs = asyncio.run(_fire(url, range(8)))
        assert [r.json()["y"] for r in rs] == [2 * x for x in range(8)]
        m = metric_samples(httpx.get(f"{url}/metrics").text)
    # 8 requests arriving within the 300 ms window fill one batch of 8 (two if the first left early)
    assert len(fake.batches) <= 2 and max(len(b) for b in fake.batches) >= 4, fake.batches
    assert sample(m, "slimcart_batch_size_count", queue="model") == len(fake.batches)
    assert sample(m, "slimcart_batch_size_sum", queue="model") == 8
    assert sample(m, "slimcart_batch_size_bucket", queue="model", le="2.0") < len(fake.batches) or len(fake.batches) == 1


def test_full_queue_answers_429_with_retry_after_and_recovers():
    fake = SlowDouble(0.2)
    opts = ServeOptions(max_batch=1, max_wait_ms=0, max_queue=2, max_queue_wait_ms=None)
    with serve_servable(fake, opts) as (url, _):
        rs = asyncio.run(_fire(url, range(12)))
        codes = [r.status_code for r in rs]
        assert set(codes) <= {200, 429}, codes
        assert codes.count(429) >= 6, codes  # 1 running + 2 queued can be accepted at once
        for r in rs:
            if r.status_code == 429:
                assert int(r.headers["retry-after"]) >= 1 and "queue full" in r.json()["error"]
            else:
                assert r.json()["y"] == 2 * int(r.request.content.decode().split(":")[1].strip(" }"))
        m = metric_samples(httpx.get(f"{url}/metrics").text)
        assert sample(m, "slimcart_rejections_total", queue="model", reason="queue_full") == codes.count(429)
        time.sleep(0.5)  # load gone: the queue has drained
        assert httpx.post(f"{url}/double", json={"x": 5}).json() == {"y": 10}
        assert sample(metric_samples(httpx.get(f"{url}/metrics").text), "slimcart_queue_depth", queue="model") == 0


def test_predicted_wait_over_the_budget_is_refused():
    fake = SlowDouble(0.1)
    # warm-up says a batch takes 0.1 s: with a 250 ms budget at most ~2 batches may be ahead
    opts = ServeOptions(max_batch=1, max_wait_ms=0, max_queue=100, max_queue_wait_ms=250)
    with serve_servable(fake, opts, warm=(0.1, 0.1)) as (url, _):
        rs = asyncio.run(_fire(url, range(10)))
        codes = [r.status_code for r in rs]
        assert 2 <= codes.count(200) <= 4 and codes.count(429) == 10 - codes.count(200), codes
        assert all("predicted queue wait" in r.json()["error"] for r in rs if r.status_code == 429)
    # an idle model is never refused on the estimate, even when one batch alone is over the budget
    with serve_servable(SlowDouble(0.05), opts, warm=(1.0, 1.0)) as (url, _):
        assert httpx.post(f"{url}/double", json={"x": 4}).json() == {"y": 8}


def test_request_timeout_answers_503_and_the_model_skips_it():
    fake = SlowDouble(0.6)
    opts = ServeOptions(max_batch=1, max_wait_ms=0, max_queue=10, max_queue_wait_ms=None, timeout_s=0.3)
    with serve_servable(fake, opts) as (url, _):
        rs = asyncio.run(_fire(url, range(3)))
        assert [r.status_code for r in rs].count(503) >= 2
        assert all("timed out" in r.json()["error"] and int(r.headers["retry-after"]) >= 1
                   for r in rs if r.status_code == 503)
        time.sleep(0.8)
    assert len(fake.batches) <= 2  # timed-out requests still queued were never run


def test_graceful_shutdown_finishes_requests_in_flight():
    fake = SlowDouble(1.0)
    opts = ServeOptions(max_batch=4, max_wait_ms=0, graceful_s=10)
    results = {}
    with serve_servable(fake, opts) as (url, server):
        def call():
            results["r"] = httpx.post(f"{url}/double", json={"x": 21}, timeout=10)

        t = threading.Thread(target=call)
        t.start()
        while not fake.batches:  # the request is on the model now
            time.sleep(0.01)
        server.handle_exit(15, None)  # what SIGTERM does
        t.join(10)
        assert results["r"].status_code == 200 and results["r"].json() == {"y": 42}
        time.sleep(0.3)
        with pytest.raises(httpx.ConnectError):  # no new connections once shutting down
            httpx.post(f"{url}/double", json={"x": 1}, timeout=2)


def test_a_failing_model_gives_500_for_that_request_only():
    class Broken(SlowDouble):
        def run(self, items):
            if 13 in items:
                raise RuntimeError("boom")
            return super().run(items)

    opts = ServeOptions(max_batch=1, max_wait_ms=0)
    with serve_servable(Broken(0.0), opts) as (url, _):
        r = httpx.post(f"{url}/double", json={"x": 13})
        assert r.status_code == 500 and "internal error" in r.json()["error"]
        assert httpx.post(f"{url}/double", json={"x": 1}).json() == {"y": 2}


def test_metrics_are_prometheus_text(search_server):
    before = metric_samples(httpx.get(f"{search_server}/metrics").text)
    httpx.post(f"{search_server}/embed", json={"texts": ["a", "b", "c"]})
    httpx.post(f"{search_server}/embed", content=b"{")
    r = httpx.get(f"{search_server}/metrics")
    assert r.headers["content-type"].startswith("text/plain")
    m = metric_samples(r.text)
    names = {name for name, _ in m}
    for family in ("slimcart_request_latency_seconds_bucket", "slimcart_batch_size_bucket", "slimcart_queue_depth",
                   "slimcart_requests_total", "slimcart_inflight_requests"):
        assert family in names, family

    def delta(name, **labels):
        return sample(m, name, **labels) - sample(before, name, **labels)

    assert delta("slimcart_requests_total", endpoint="/embed", status="200") == 1
    assert delta("slimcart_requests_total", endpoint="/embed", status="400") == 1
    assert delta("slimcart_request_latency_seconds_count", endpoint="/embed") == 1
    assert delta("slimcart_batch_size_sum", queue="model") == 3
