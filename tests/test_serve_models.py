"""`/score` (recsys) and `/generate` (llm) on tiny random models, over a real server on 127.0.0.1."""
from __future__ import annotations

import json

import httpx
import numpy as np
import pytest
import torch

from slimcart.models.sasrec import SASRec, SASRecConfig, save_sasrec
from slimcart.serve.app import ServeOptions
from slimcart.serve.llm import KVCacheDecoder, RecomputeDecoder
from slimcart.serve.run import prepare
from slimcart.workloads import get_workload
from slimcart.workloads.recsys import left_pad

from serving_util import running
from test_llm_workload import _tiny_model_dir

pytestmark = pytest.mark.usefixtures("one_thread")
N_ITEMS = 30


@pytest.fixture(scope="module")
def sasrec_dir(tmp_path_factory):
    torch.manual_seed(0)
    cfg = SASRecConfig(n_items=N_ITEMS, max_len=12, hidden=16, heads=2, layers=2, dropout=0.1)
    folder = tmp_path_factory.mktemp("sasrec")
    save_sasrec(SASRec(cfg).eval(), folder)
    return folder


@pytest.fixture(scope="module")
def recsys_server(sasrec_dir):
    app, opts = prepare("recsys", str(sasrec_dir), None, ServeOptions(max_batch=16, max_k=10), threads=1)
    with running(app, opts) as (url, _):
        yield url


def _scores(sasrec_dir, history):
    wl = get_workload("recsys")
    bundle = wl.load_model(str(sasrec_dir))
    return np.asarray(wl.torch_runner(bundle)({"seq": left_pad([np.array(history)], wl.max_len(bundle))}))[0]


def test_score_top_k_excludes_history_and_matches_the_model(recsys_server, sasrec_dir):
    history = [3, 7, 7, 12]
    r = httpx.post(f"{recsys_server}/score", json={"history": history, "k": 5})
    assert r.status_code == 200, r.text
    s = _scores(sasrec_dir, history)
    s[[0, 3, 7, 12]] = -np.inf
    want = np.argsort(-s, kind="stable")[:5]
    assert r.json()["items"] == want.tolist()
    np.testing.assert_allclose(r.json()["scores"], s[want], rtol=1e-5)


def test_score_of_candidates(recsys_server, sasrec_dir):
    r = httpx.post(f"{recsys_server}/score", json={"history": [1, 2], "items": [5, 9, 2]})
    s = _scores(sasrec_dir, [1, 2])
    np.testing.assert_allclose(r.json()["scores"], s[[5, 9, 2]], rtol=1e-5)


@pytest.mark.parametrize("payload,fragment", [
    ({"history": [1, 31]}, "history: unknown item id(s) [31] (this model knows items 1..30)"),
    ({"history": [0, -4]}, "unknown item id(s) [0, -4]"),
    ({"history": [1], "items": [99]}, "items: unknown item id(s) [99]"),
    ({"history": []}, "history: List should have at least 1 item"),
    ({"history": ["3"]}, "history[0]: Input should be a valid integer"),
    ({"history": [1], "k": 11}, "k: Input should be less than or equal to 10"),
    ({"history": [1], "exclude_seen": "yes"}, "exclude_seen: Input should be a valid boolean"),
])
def test_bad_score_requests(recsys_server, payload, fragment):
    r = httpx.post(f"{recsys_server}/score", json=payload)
    assert r.status_code == 422 and fragment in r.json()["error"], r.text


# ---------------------------------------------------------------- llm
@pytest.fixture(scope="module")
def llm_dir(tmp_path_factory):
    return _tiny_model_dir(tmp_path_factory.mktemp("llm"))


@pytest.fixture(scope="module")
def llm_server(llm_dir):
    opts = ServeOptions(max_new_tokens=24, max_prompt_tokens=64, max_streams=2)
    app, opts = prepare("llm", str(llm_dir), None, opts, threads=1)
    with running(app, opts) as (url, _):
        yield url


PROMPT = "the blender is loud but"


def _reference_tokens(llm_dir, n):
    """Greedy tokens from the workload's runner (transformers generate), EOS not stopping it."""
    wl = get_workload("llm")
    bundle = wl.load_model(str(llm_dir))
    ids = bundle.tokenizer.encode(PROMPT, add_special_tokens=False)
    out = wl.torch_runner(bundle)({"input_ids": np.array([ids]), "max_new_tokens": n})
    return bundle, ids, out[0].tolist()


@pytest.mark.parametrize("decoder", ["kv", "recompute"])
def test_step_decoders_equal_generate(llm_dir, decoder):
    bundle, ids, want = _reference_tokens(llm_dir, 12)
    wl = get_workload("llm")
    dec = KVCacheDecoder(bundle.module.model, bundle.tokenizer) if decoder == "kv" \
        else RecomputeDecoder(wl.torch_runner(bundle), bundle.tokenizer)
    state, tok = dec.start(ids)
    got = [tok]
    while len(got) < 12:
        state, tok = dec.step(state, tok)
        got.append(tok)
    assert got == want


def test_batched_decode_steps_equal_each_stream_alone(llm_dir):
    """Streams of different lengths joining at different times, stepped together in one forward
    pass (left-padded caches): each gets exactly the tokens it gets alone."""
    wl = get_workload("llm")
    bundle = wl.load_model(str(llm_dir))
    prompts = ["the blender", "my kettle leaked after a week and support never replied", "great"]
    runner = wl.torch_runner(bundle)
    want = []
    for p in prompts:
        ids = bundle.tokenizer.encode(p, add_special_tokens=False)
        want.append(runner({"input_ids": np.array([ids]), "max_new_tokens": 10})[0].tolist())
    dec = KVCacheDecoder(bundle.module.model, bundle.tokenizer)
    joins = {0: 0, 1: 3, 2: 5}  # round at which each stream joins
    states, got = {}, {i: [] for i in joins}
    for rnd in range(16):
        going = [i for i in states if len(got[i]) < 10]
        if going:
            new_states, toks = dec.step_many([states[i] for i in going], [got[i][-1] for i in going])
            for i, st, t in zip(going, new_states, toks):
                states[i] = st
                got[i].append(t)
        for i, at in joins.items():
            if at == rnd:
                states[i], t = dec.start(bundle.tokenizer.encode(prompts[i], add_special_tokens=False))
                got[i].append(t)
    assert [got[i] for i in range(3)] == want
    # Stronger than the tokens of a random tiny model (which may repeat one token): every stream's KV
    # cache after the batched steps equals the cache of the same tokens decoded alone (keys carry
    # the rotary position, so a wrong position or mask shows up here).
    for i, p in enumerate(prompts):
        alone, _ = dec.start(bundle.tokenizer.encode(p, add_special_tokens=False))
        for t in got[i][:-1]:
            alone, _ = dec.step(alone, t)
        for (k1, v1), (k2, v2) in zip(states[i], alone):
            assert k1.shape == k2.shape
            torch.testing.assert_close(k1, k2, atol=1e-5, rtol=1e-4)
            torch.testing.assert_close(v1, v2, atol=1e-5, rtol=1e-4)


def test_generate_plain_and_streamed_agree_with_the_model(llm_server, llm_dir):
    bundle, _, want = _reference_tokens(llm_dir, 16)
    r = httpx.post(f"{llm_server}/generate", json={"prompt": PROMPT, "max_new_tokens": 16, "stop_at_eos": False})
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["tokens"] == 16 and body["finish_reason"] == "length"
    assert body["text"] == bundle.tokenizer.decode(want, skip_special_tokens=True)

    events = []
    with httpx.stream("POST", f"{llm_server}/generate",
                      json={"prompt": PROMPT, "max_new_tokens": 16, "stop_at_eos": False, "stream": True}) as s:
        assert s.headers["content-type"].startswith("text/event-stream")
        for line in s.iter_lines():
            if line.startswith("data: "):
                events.append(json.loads(line[6:]))
    assert events[-1]["done"] and events[-1]["tokens"] == 16
    assert [e["token"] for e in events[:-1]] == want
    assert "".join(e["text"] for e in events) == body["text"]


def test_generate_stops_at_eos_when_asked(llm_server, llm_dir):
    bundle, _, want = _reference_tokens(llm_dir, 24)
    r = httpx.post(f"{llm_server}/generate", json={"prompt": PROMPT, "max_new_tokens": 24}).json()
    eos = bundle.tokenizer.eos_token_id
    if eos in want:
        assert r["finish_reason"] == "eos" and r["tokens"] == want.index(eos)
    else:
        assert r["finish_reason"] == "length" and r["tokens"] == 24


@pytest.mark.parametrize("payload,status,fragment", [
    ({"prompt": ""}, 422, "prompt: String should have at least 1 character"),
    ({"prompt": "   "}, 422, "prompt is empty"),
    ({"prompt": "hi", "max_new_tokens": 0}, 422, "max_new_tokens: Input should be greater than or equal to 1"),
    ({"prompt": "hi", "max_new_tokens": 25}, 422, "max_new_tokens: Input should be less than or equal to 24"),
    ({"prompt": "loud " * 200}, 413, "the limit is 64"),
    ({"prompt": "hi", "stream": "yes"}, 422, "stream: Input should be a valid boolean"),
])
def test_bad_generate_requests(llm_server, payload, status, fragment):
    r = httpx.post(f"{llm_server}/generate", json=payload)
    assert r.status_code == status and fragment in r.json()["error"], r.text


def test_concurrent_streams_all_finish(llm_server):
    import asyncio

    async def go():
        async with httpx.AsyncClient(base_url=llm_server, timeout=30) as c:
            return await asyncio.gather(*(c.post("/generate", json={"prompt": PROMPT, "max_new_tokens": 8,
                                                                    "stop_at_eos": False}) for _ in range(4)))

    rs = asyncio.run(go())
    assert all(r.status_code == 200 and r.json()["tokens"] == 8 for r in rs)
    assert len({r.json()["text"] for r in rs}) == 1  # greedy: the same prompt gives the same text
