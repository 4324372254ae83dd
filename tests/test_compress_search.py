"""End to end: `slimcart compress` on the search workload writes a complete, reloadable output."""
import json

import numpy as np
import pytest
from typer.testing import CliRunner

from slimcart import api
from slimcart.cli import app
from slimcart.recipe import load_recipe
from slimcart.workloads import get_workload

from conftest import tree_fingerprint

SIDE_KEYS = {"runtime", "quality", "size_bytes", "latency_ms", "throughput_per_s", "peak_rss_bytes"}


def _check_metrics(m, synthetic, runtimes=("onnxruntime",)):
    assert {"workload", "model", "recipe", "data", "environment", "baseline", "compressed", "ratios"} <= set(m)
    assert m["data"]["synthetic"] is synthetic and m["data"]["n"] > 0
    for side in ("baseline", "compressed"):
        s = m[side]
        assert SIDE_KEYS <= set(s)
        guard = set() if synthetic else {"guard_mrr", "guard_recall@1"}  # real data root: PriceRunner guard task too
        assert set(s["quality"]) == {"ndcg@10", "recall@10", "cosine"} | guard
        assert s["latency_ms"]["p99"] >= s["latency_ms"]["p50"] > 0
        assert s["throughput_per_s"] > 0 and s["size_bytes"] > 0
    assert m["baseline"]["runtime"] == "torch-fp32-eager" and m["compressed"]["runtime"] in runtimes
    assert m["ratios"]["size"] == pytest.approx(m["compressed"]["size_bytes"] / m["baseline"]["size_bytes"])


def test_compress_tiny_encoder_synthetic(tmp_path, tiny_encoder_dir, synthetic_data):
    before = tree_fingerprint(tiny_encoder_dir)
    out = tmp_path / "out"
    m = api.compress("search", str(tiny_encoder_dir), "int8-dynamic", out, repeats=2, measure_rss=False)
    _check_metrics(m, synthetic=True)
    assert tree_fingerprint(tiny_encoder_dir) == before  # input untouched
    assert sorted(p.name for p in out.iterdir()) == ["metrics.json", "model", "recipe.yaml", "report.md"]
    assert json.loads((out / "metrics.json").read_text())["ratios"] == m["ratios"]
    assert "SYNTHETIC DATA" in (out / "report.md").read_text()
    assert load_recipe(out / "recipe.yaml").to_dict() == load_recipe("int8-dynamic").to_dict()
    # int8 weights: the ONNX file is well under the fp32 safetensors size
    assert m["ratios"]["size"] < 0.4
    # the saved model reloads and agrees with the fp32 encoder
    wl = get_workload("search")
    runner, bundle = api.load(wl, str(out), threads=1)
    base = wl.load_model(str(tiny_encoder_dir))
    batch = wl.tokenize(bundle.tokenizer, ["red running shoes", "Acme coffee maker 12-cup"])
    cos = (runner(batch) * wl.torch_runner(base)(batch)).sum(1)
    assert np.all(cos > 0.9)
    assert abs(m["compressed"]["quality"]["cosine"] - 1) < 0.1
    assert not any(p.name.startswith(".") for p in tmp_path.iterdir())  # no partial folder left


def test_interrupted_run_resumes(tmp_path, tiny_encoder_dir, synthetic_data, monkeypatch):
    out = tmp_path / "out"
    import slimcart.api as api_mod

    def boom(*a, **k):
        raise KeyboardInterrupt

    monkeypatch.setattr(api_mod, "measure_interleaved", boom)
    with pytest.raises(KeyboardInterrupt):
        api.compress("search", str(tiny_encoder_dir), "int8-dynamic", out, repeats=1, measure_rss=False)
    assert not out.exists() and (tmp_path / ".out.partial" / "build.json").exists()
    monkeypatch.undo()
    monkeypatch.delenv("SLIMCART_DATA", raising=False)
    msgs = []
    api.compress("search", str(tiny_encoder_dir), "int8-dynamic", out, repeats=1, measure_rss=False, progress=msgs.append)
    assert any(m.startswith("resuming") for m in msgs)
    assert not any(m.startswith("step ") for m in msgs)  # the build was reused, not redone
    assert (out / "metrics.json").exists() and not (tmp_path / ".out.partial").exists()


def test_cli_compress_eval_bench(tmp_path, tiny_encoder_dir, synthetic_data):
    r = CliRunner()
    out = tmp_path / "o"
    res = r.invoke(app, ["compress", "-w", "search", "-m", str(tiny_encoder_dir), "-r", "int8-dynamic", "-o", str(out),
                         "--repeats", "1", "--no-rss"])
    assert res.exit_code == 0, res.output
    assert "ndcg@10" in res.output and "SYNTHETIC" in res.output
    res = r.invoke(app, ["eval", "-w", "search", "-m", str(out), "--json"])
    assert res.exit_code == 0, res.output
    q = json.loads(res.stdout)["quality"]
    m = json.loads((out / "metrics.json").read_text())
    assert q["ndcg@10"] == pytest.approx(m["compressed"]["quality"]["ndcg@10"], abs=1e-6)
    res = r.invoke(app, ["bench", "-w", "search", "-m", str(out), "--repeats", "1", "--json"])
    assert res.exit_code == 0, res.output
    b = json.loads(res.stdout)
    assert set(b["sides"]) == {"baseline", "model"} and b["ratios"]["throughput"] > 0


@pytest.mark.slow
def test_demo_main_job_on_real_data(tmp_path, real_data):
    """`slimcart demo` (what `make demo` runs): real MiniLM, real CrowdFlower, static int8, peak memory of both
    sides (the one real-data compress of the suite: the recipes themselves are covered on tiny models)."""
    out = tmp_path / "demo"
    res = CliRunner().invoke(app, ["demo", "--out", str(out)])
    assert res.exit_code == 0, res.output
    m = json.loads((out / "metrics.json").read_text())
    _check_metrics(m, synthetic=False, runtimes=("onnxruntime", "openvino"))
    assert m["recipe"] == "int8-static" and (out / "report.md").exists() and (out / "recipe.yaml").exists()
    assert m["data"]["name"] == "search-crowdflower"
    b, c = m["baseline"]["quality"], m["compressed"]["quality"]
    assert 0.7 < b["ndcg@10"] < 1 and 0.5 < b["recall@10"] < 1
    assert c["cosine"] > 0.98 and c["ndcg@10"] > 0.98 * b["ndcg@10"]
    assert m["baseline"]["peak_rss_bytes"] > 0 and m["compressed"]["peak_rss_bytes"] > 0
    assert m["ratios"]["size"] < 0.3 and m["ratios"]["throughput"] > 1.0
    assert "ndcg@10" in res.output


