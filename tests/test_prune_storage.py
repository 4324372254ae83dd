"""Pruned models save, reload and export: bitmask encoding is lossless and smaller, structurally
pruned folders are plain safetensors + config.json that reload to the same function, ONNX export
matches torch, and whole recipes run end to end through api.compress."""
from __future__ import annotations

import copy
import json

import numpy as np
import pytest
import torch

from slimcart import api
from slimcart.contracts import FORMAT_FILE, load_saved
from slimcart.recipe import load_plugins
from slimcart.compress.prune import SparsityConfig, StructuredConfig, prune
from slimcart.compress.prune.storage import SparseBitmask, StructuredHF, decode_sparse, encode_sparse
from slimcart.recipe import Recipe
from slimcart.workloads import get_workload

load_plugins()  # every saved-model format registered


pytestmark = pytest.mark.usefixtures("one_thread")

PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".pkl", ".ckpt")


def test_bitmask_roundtrip_is_exact_and_smaller():
    g = torch.Generator().manual_seed(0)
    w = torch.randn(64, 96, generator=g)
    w[torch.rand(64, 96, generator=g) < 0.5] = 0
    tensors = {"w": w, "dense": torch.randn(8, 8, generator=g), "bias": torch.zeros(96)}
    enc, shapes = encode_sparse(tensors)
    assert set(shapes) == {"w"}  # the dense matrix and the 1-D bias stay as they are
    out = decode_sparse(enc, shapes)
    assert all(torch.equal(out[k], tensors[k]) for k in tensors)
    enc_bytes = enc["w.__mask"].numel() + enc["w.__values"].numel() * 4
    assert enc_bytes == pytest.approx(64 * 96 / 8 + int((w != 0).sum()) * 4)
    assert enc_bytes < 0.56 * w.numel() * 4  # 50% zeros: 16 + 1 bits per weight instead of 32


def _search(tiny_encoder_dir):
    wl = get_workload("search")
    return wl, wl.load_model(str(tiny_encoder_dir))


def _texts_batch(wl, bundle):
    return wl.tokenize(bundle.tokenizer, ["red running shoes", "Acme coffee maker 12-cup, stainless", "usb c"])


def _files(folder):
    return sorted(p.name for p in folder.rglob("*") if p.is_file())


def test_head_pruned_encoder_saves_reloads_and_exports(tmp_path, tiny_encoder_dir):
    from slimcart.runtime.onnx_runtime import OnnxRunner, export_onnx

    wl, bundle = _search(tiny_encoder_dir)
    batch = _texts_batch(wl, bundle)
    calib = [batch]
    prune(bundle.module, StructuredConfig(heads=0.5, ffn=0.5), calib)
    want = wl.torch_runner(bundle)(batch)
    folder = tmp_path / "m"
    folder.mkdir()
    StructuredHF().save(folder, wl, bundle)
    assert not any(f.endswith(PICKLE_SUFFIXES) for f in _files(folder))
    cfg = json.loads((folder / "config.json").read_text())
    assert cfg["slimcart_structure"] == {"heads": [2, 2], "intermediate": [64, 64], "dense_heads": 4}
    assert cfg["num_attention_heads"] == 2  # the real count: exporters read it
    runner, loaded = load_saved(folder, wl, 1)
    np.testing.assert_allclose(runner(batch), want, rtol=1e-5, atol=1e-6)
    assert loaded.module.transformer.encoder.layer[0].attention.self.query.weight.shape == (32, 64)
    assert loaded.source == folder
    spec = wl.export_spec(loaded)
    export_onnx(loaded.module, spec["example"], tmp_path / "m.onnx", spec["dynamic_axes"], spec["output_name"])
    np.testing.assert_allclose(OnnxRunner(tmp_path / "m.onnx", threads=1)(batch), want, rtol=1e-4, atol=1e-5)


def test_uniform_ffn_pruning_is_a_stock_hf_folder(tmp_path, tiny_encoder_dir):
    wl, bundle = _search(tiny_encoder_dir)
    batch = _texts_batch(wl, bundle)
    prune(bundle.module, StructuredConfig(ffn=0.5, criterion="magnitude"))
    want = wl.torch_runner(bundle)(batch)
    wl.save_model(bundle, tmp_path / "m")
    assert not (tmp_path / "m" / FORMAT_FILE).exists()
    runner, _ = load_saved(tmp_path / "m", wl, 1)  # no format file: the workload's own loader, AutoModel.from_pretrained
    np.testing.assert_allclose(runner(batch), want, rtol=1e-5, atol=1e-6)
    assert json.loads((tmp_path / "m" / "config.json").read_text())["intermediate_size"] == 64


def test_sparse_bitmask_folder_is_smaller_and_reloads(tmp_path, tiny_encoder_dir):
    wl, bundle = _search(tiny_encoder_dir)
    batch = _texts_batch(wl, bundle)
    dense_dir = tmp_path / "dense"
    wl.save_model(bundle, dense_dir)
    prune(bundle.module, SparsityConfig(sparsity=0.5))
    want = wl.torch_runner(bundle)(batch)
    folder = tmp_path / "sparse"
    folder.mkdir()
    SparseBitmask(None).save(folder, wl, bundle)
    assert "model.sparse.safetensors" in _files(folder) and "model.safetensors" not in _files(folder)
    runner, _ = load_saved(folder, wl, 1)
    np.testing.assert_array_equal(runner(batch), want)
    # Linear weights are ~1/4 of this tiny model (its 30k-token embedding dominates): expect a real but modest cut
    dense_b, sparse_b = (dense_dir / "model.safetensors").stat().st_size, (folder / "model.sparse.safetensors").stat().st_size
    linear_b = sum(m.weight.numel() * 4 for m in bundle.module.modules() if isinstance(m, torch.nn.Linear))
    assert sparse_b < dense_b - 0.4 * linear_b


def test_structured_then_sparse_nests(tmp_path, tiny_encoder_dir):
    wl, bundle = _search(tiny_encoder_dir)
    batch = _texts_batch(wl, bundle)
    prune(bundle.module, StructuredConfig(heads=0.5, criterion="magnitude"))
    prune(bundle.module, SparsityConfig(pattern="2:4"))
    want = wl.torch_runner(bundle)(batch)
    (tmp_path / "m").mkdir()
    SparseBitmask(StructuredHF()).save(tmp_path / "m", wl, bundle)
    meta = json.loads((tmp_path / "m" / FORMAT_FILE).read_text())
    assert meta["format"] == "sparse-bitmask" and meta["inner"]["format"] == "structured-hf"
    runner, _ = load_saved(tmp_path / "m", wl, 1)
    np.testing.assert_array_equal(runner(batch), want)


def _recipe(name, steps):
    return Recipe.model_validate({"name": name, "steps": steps})


def test_compress_structured_recipe_end_to_end(tmp_path, tiny_encoder_dir, synthetic_data):
    rec = _recipe("t-heads-ffn", [
        {"kind": "prune_structured", "heads": 0.5, "ffn": 0.5, "calibration_batches": 2},
        {"kind": "recover", "steps": 3, "calibration_batches": 2},
    ])
    m = api.compress("search", str(tiny_encoder_dir), rec, tmp_path / "out", repeats=1, measure_rss=False)
    assert m["compressed"]["runtime"] == "torch" and not m["size_only"]
    assert any("structured pruning" in n for n in m["notes"]) and any("recovery" in n for n in m["notes"])
    assert m["ratios"]["size"] < 1
    assert json.loads((tmp_path / "out" / "model" / FORMAT_FILE).read_text())["format"] == "structured-hf"


def test_compress_oneshot_prune_then_distill_recovery_keeps_sparsity(tmp_path, tiny_encoder_dir, synthetic_data):
    """prune (one-shot) -> recover (distill) needs the dense model kept by the prune step as the teacher."""
    rec = _recipe("t-sparse-recover", [
        {"kind": "prune", "method": "sparsegpt", "sparsity": 0.5, "calibration_batches": 2},
        {"kind": "recover", "method": "distill", "steps": 4, "lr": 1e-3, "calibration_batches": 2},
    ])
    m = api.compress("search", str(tiny_encoder_dir), rec, tmp_path / "out", repeats=1, measure_rss=False)
    assert m["size_only"] and any("recovery (distill)" in n for n in m["notes"])
    _, bundle = api.load("search", tmp_path / "out", threads=1)
    lins = [mod for n, mod in bundle.module.named_modules() if isinstance(mod, torch.nn.Linear) and ".layer." in n]
    assert lins and all(int((lin.weight == 0).sum()) == lin.weight.numel() // 2 for lin in lins)


def test_compress_sparse_recipe_is_labelled_size_only(tmp_path, tiny_encoder_dir, synthetic_data):
    rec = _recipe("t-sparse", [{"kind": "prune", "method": "wanda", "pattern": "2:4", "calibration_batches": 2}])
    m = api.compress("search", str(tiny_encoder_dir), rec, tmp_path / "out", repeats=1, measure_rss=False)
    assert m["size_only"] and "bitmask" in m["size_only"][0]
    assert "Size-only" in (tmp_path / "out" / "report.md").read_text()
    assert m["ratios"]["size"] < 1


def test_structured_then_int8_onnx_recipe(tmp_path, tiny_encoder_dir, synthetic_data):
    rec = _recipe("t-int8", [
        {"kind": "prune_structured", "heads": 0.5, "ffn": 0.5, "criterion": "magnitude"},
        {"kind": "export_onnx", "optimize": False},
        {"kind": "ort_dynamic_int8"},
    ])
    m = api.compress("search", str(tiny_encoder_dir), rec, tmp_path / "out", repeats=1, measure_rss=False)
    assert m["compressed"]["runtime"] == "onnxruntime" and (tmp_path / "out" / "model" / "model.onnx").exists()
    assert m["compressed"]["quality"]["cosine"] > 0.5


@pytest.mark.parametrize("step,msg", [
    ({"kind": "prune_structured", "heads": 0.9}, "every head"),
    ({"kind": "prune", "pattern": "3:7"}, "multiple of 7"),
])
def test_bad_requests_fail_before_any_output(tmp_path, tiny_encoder_dir, synthetic_data, step, msg):
    from slimcart.errors import SlimcartError

    with pytest.raises(SlimcartError, match=msg):
        api.compress("search", str(tiny_encoder_dir), _recipe("bad", [step]), tmp_path / "out", repeats=1, measure_rss=False)
    assert not (tmp_path / "out").exists()
