"""LLM workload: metrics against hand-computed values on a tiny random Llama, data parsing, errors."""
from __future__ import annotations

import math
import os
from pathlib import Path

import numpy as np
import pytest
import torch

from slimcart import api
from slimcart.errors import SlimcartError
from slimcart.workloads import synthetic
from slimcart.workloads.llm import LlmWorkload, parse_blitzer, split_of

WORDS = ("the blender is loud but it crushes ice fast . my kettle leaked after a week and "
         "support never replied ! great headphones , comfy and the battery lasts all day").split()


def _tiny_model_dir(root: Path) -> Path:
    """A randomly initialised 2-layer Llama plus a small byte-level BPE tokenizer (EOS = id 0), offline."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    alphabet = pre_tokenizers.ByteLevel.alphabet()
    trainer = trainers.BpeTrainer(vocab_size=320, special_tokens=["<eos>"], initial_alphabet=alphabet)
    bpe.train_from_iterator([" ".join(WORDS)] * 4, trainer)
    tok = PreTrainedTokenizerFast(tokenizer_object=bpe, eos_token="<eos>")
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=1024,
                      eos_token_id=0, bos_token_id=0, pad_token_id=0, tie_word_embeddings=False)
    model = LlamaForCausalLM(cfg).eval()
    folder = root / "tiny-llama"
    model.save_pretrained(str(folder), safe_serialization=True)
    tok.save_pretrained(str(folder))
    return folder


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    wl = LlmWorkload()
    wl.eval_window, wl.eval_windows, wl.eval_batch = 32, 5, 2  # 5 windows, two forward batches (2+2+1)
    folder = _tiny_model_dir(tmp_path_factory.mktemp("model"))
    return wl, wl.load_model(str(folder)), folder


@pytest.fixture(scope="module")
def text_data(tmp_path_factory):
    rng = np.random.default_rng(1)
    lines = [" ".join(rng.choice(WORDS, size=int(rng.integers(5, 30)))) for _ in range(300)]
    path = tmp_path_factory.mktemp("data") / "reviews.txt"
    path.write_text("\n".join(lines) + "\n")
    return LlmWorkload().load_data(str(path)), lines


def _hand_windows(tok, texts, width, count):
    ids = []
    for t in texts:
        ids += tok(t, add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
    ids = ids[: width * count]
    return torch.tensor(ids[: len(ids) // width * width]).view(-1, width)


def test_perplexity_and_accuracy_match_hand_computation(tiny, text_data):
    wl, bundle, _ = tiny
    data, _ = text_data
    result = wl.evaluate(wl.torch_runner(bundle), bundle, data)
    ids = _hand_windows(bundle.tokenizer, data.test_texts, 32, 5)
    assert ids.shape == (5, 32)
    with torch.no_grad():
        logits = bundle.module.model(input_ids=ids).logits.double()
    pred, target = logits[:, :-1].reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1)
    ce = torch.nn.functional.cross_entropy(pred, target)
    assert result.quality["perplexity"] == pytest.approx(math.exp(float(ce)), rel=1e-5)
    hits = int((pred.argmax(-1) == target).sum())
    assert result.quality["next_token_acc"] == pytest.approx(hits / target.numel(), abs=1e-12)
    assert set(result.quality) == set(wl.quality_keys)


def test_eval_windows_fixed_and_capped(tiny, text_data):
    wl, bundle, _ = tiny
    data, _ = text_data
    a, b = wl.eval_windows_of(bundle, data), wl.eval_windows_of(bundle, data)
    assert len(a) == 5 and all(w.shape == (1, 32) and w.dtype == np.int64 for w in a)
    assert all(np.array_equal(x, y) for x, y in zip(a, b))
    eos = bundle.tokenizer.eos_token_id
    assert any((w == eos).any() for w in a)  # documents are joined with EOS


def test_split_is_deterministic_and_about_ten_percent(text_data):
    data, lines = text_data
    assert set(data.test_texts).isdisjoint(data.train_texts)
    frac = np.mean([split_of(str(i)) == "test" for i in range(5000)])
    assert 0.08 < frac < 0.12
    assert [split_of(t) for t in lines] == [split_of(t) for t in lines]
    assert data.info.n == len(data.test_texts) and not data.info.synthetic


def test_blitzer_parser_handles_raw_ampersand_and_entities():
    raw = """<?xml version="1.0"?>
<reviews>
<review>
<unique_id>
B0001:great_pan:jo_&_al
</unique_id>
<rating>
5.0
</rating>
<title>
Pots & pans
</title>
<review_text>
Heats evenly &amp; cleans up in &amp;lt;2 minutes.
Second line.
</review_text>
</review>
<review>
<unique_id>
B0002:meh:x
</unique_id>
<title>
Meh
</title>
<review_text>
AT&T would not ship it.
</review_text>
</review>
</reviews>"""
    rows = parse_blitzer(raw)
    assert [r["unique_id"] for r in rows] == ["B0001:great_pan:jo_&_al", "B0002:meh:x"]
    assert rows[0]["title"] == "Pots & pans"
    assert rows[0]["review_text"] == "Heats evenly & cleans up in <2 minutes.\nSecond line."
    assert rows[1]["review_text"] == "AT&T would not ship it."


def test_blitzer_folder_loads_title_and_text(tmp_path):
    folder = tmp_path / "reviews-blitzer" / "kitchen"
    folder.mkdir(parents=True)
    blocks = [f"<review><unique_id>id{i}</unique_id><title>T{i}</title><review_text>Body {i} & more</review_text></review>"
              for i in range(60)]
    (folder / "positive.review").write_text("<reviews>\n" + "\n".join(blocks) + "\n</reviews>")
    data = LlmWorkload().load_data(str(tmp_path))
    assert data.info.name == "reviews-blitzer" and not data.info.synthetic
    assert len(data.test_texts) + len(data.train_texts) == 60
    expected_test = {f"T{i}\nBody {i} & more" for i in range(60) if split_of(f"id{i}") == "test"}
    assert set(data.test_texts) == expected_test


def test_synthetic_fallback_is_labelled_and_deterministic(monkeypatch):
    monkeypatch.delenv("SLIMCART_DATA", raising=False)
    wl = LlmWorkload()
    a, b = wl.load_data(None), wl.load_data(None)
    assert wl.data_info(a).synthetic and a.info.name == "synthetic-reviews"
    assert a.test_texts == b.test_texts and len(a.test_texts) > 10
    assert synthetic.review_texts(0) == synthetic.review_texts(0) != synthetic.review_texts(1)


def test_table_data_with_text_column(tmp_path):
    path = tmp_path / "r.csv"
    path.write_text("id,text\n" + "".join(f"{i},review number {i} is fine\n" for i in range(40)))
    data = LlmWorkload().load_data(str(path))
    assert len(data.test_texts) + len(data.train_texts) == 40


@pytest.mark.parametrize("content,suffix", [("", ".txt"), ("\n  \n", ".txt"), ("", ".csv"), ("id,title\n1,x\n", ".csv")])
def test_empty_or_bad_data_raises(tmp_path, content, suffix):
    path = tmp_path / f"d{suffix}"
    path.write_text(content)
    with pytest.raises(SlimcartError):
        LlmWorkload().load_data(str(path))


def test_bad_models_raise(tmp_path):
    wl = LlmWorkload()
    with pytest.raises(SlimcartError, match="unknown model"):
        wl.load_model("no-such-llm-alias")
    (tmp_path / "empty").mkdir()
    with pytest.raises(SlimcartError, match="config.json"):
        wl.load_model(str(tmp_path / "empty"))
    bad = tmp_path / "corrupt"
    bad.mkdir()
    (bad / "config.json").write_text("{not json")
    with pytest.raises(SlimcartError):
        wl.load_model(str(bad))


def test_decode_returns_exactly_max_new_tokens_and_is_greedy(tiny):
    wl, bundle, _ = tiny
    runner = wl.torch_runner(bundle)
    prompt = np.array([[5, 9, 17, 3, 40, 41]], dtype=np.int64)
    out = runner({"input_ids": prompt, "max_new_tokens": 7})
    assert out.shape == (1, 7)
    # Same tokens as a hand-written greedy loop without KV cache.
    ids = torch.from_numpy(prompt)
    with torch.no_grad():
        for _ in range(7):
            nxt = bundle.module.model(input_ids=ids).logits[:, -1].argmax(-1, keepdim=True)
            ids = torch.cat([ids, nxt], 1)
    assert np.array_equal(out, ids[:, 6:].numpy())


def test_decode_does_not_stop_at_eos(tiny):
    wl, _, folder = tiny
    bundle = wl.load_model(str(folder))
    with torch.no_grad():  # zero final norm -> all logits 0 -> greedy pick is id 0, which is EOS
        bundle.module.model.model.norm.weight.zero_()
    out = wl.torch_runner(bundle)({"input_ids": np.array([[5, 6, 7]]), "max_new_tokens": 9})
    # Nine tokens although EOS wins every step: EOS is suppressed until max_new_tokens, so the
    # tie-break goes to the next id (1).
    assert out.shape == (1, 9) and (out == 1).all()


def test_bench_calibration_and_example_shapes(tiny, text_data):
    wl, bundle, _ = tiny
    data, _ = text_data
    wl_default = LlmWorkload()
    inputs = wl_default.bench_inputs(bundle, data)
    assert inputs.unit == "tokens" and inputs.items_per_serving_batch == 32
    for req in inputs.single + inputs.serving:
        assert req["input_ids"].shape[0] == 1 and req["input_ids"].dtype == np.int64 and req["max_new_tokens"] == 32
    batches, per_batch = inputs.extra["prefill_tokens"]
    assert batches and all(b["input_ids"].shape == (1, per_batch) for b in batches) and "max_new_tokens" not in batches[0]
    calib = wl_default.calibration_batches(bundle, data, 3)
    assert 1 <= len(calib) <= 3 and all(b["input_ids"].shape[0] == 1 and b["input_ids"].shape[1] <= 512 for b in calib)
    logits = wl.torch_runner(bundle)(wl.example_batch(bundle))
    assert logits.shape[:2] == wl.example_batch(bundle)["input_ids"].shape and logits.dtype == np.float32
    spec = wl.export_spec(bundle)
    assert spec["output_name"] == "logits" and set(spec["dynamic_axes"]) == {"input_ids", "logits"}


def test_save_and_load_artifact_roundtrip(tiny, tmp_path):
    wl, bundle, _ = tiny
    wl.save_model(bundle, tmp_path / "out")
    assert (tmp_path / "out" / "model.safetensors").exists()
    runner, loaded = api.load(wl, tmp_path / "out", threads=1)
    batch = wl.example_batch(bundle)
    np.testing.assert_allclose(runner(batch), wl.torch_runner(bundle)(batch), rtol=1e-6, atol=1e-6)
    assert loaded.tokenizer.eos_token_id == bundle.tokenizer.eos_token_id


@pytest.mark.slow
def test_smollm2_perplexity_on_real_reviews(tmp_path):
    root = Path(os.environ.get("SLIMCART_DATA", "/work/shared/data"))
    if not (root / "reviews-blitzer").is_dir():
        pytest.skip("reviews-blitzer data not available")
    wl = LlmWorkload()
    wl.eval_windows = 4
    bundle = wl.load_model("smollm2")
    data = wl.load_data(str(root / "reviews-blitzer"))
    q = wl.evaluate(wl.torch_runner(bundle), bundle, data).quality
    assert math.isfinite(q["perplexity"]) and 5 < q["perplexity"] < 60
    assert 0.2 < q["next_token_acc"] < 0.8
    # The GGUF-loaded model is an ordinary fp32 model: it saves as HF safetensors and reloads identically.
    wl.save_model(bundle, tmp_path / "hf")
    assert not (tmp_path / "hf" / "model.safetensors").is_symlink()
    runner, loaded = api.load(wl, tmp_path / "hf", threads=1)
    batch = wl.example_batch(bundle)
    np.testing.assert_allclose(runner(batch), wl.torch_runner(bundle)(batch), rtol=1e-5, atol=1e-5)
