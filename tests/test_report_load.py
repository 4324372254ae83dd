"""report.md: the "How to load" snippet for each saved format, and the guard-task warning."""
import json

import pytest

from slimcart.report.markdown import guard_warning, how_to_load, render_report


def _metrics(base_q, comp_q, workload="search"):
    side = {"runtime": "torch", "size_bytes": 100, "latency_ms": {"p50": 1.0, "p99": 2.0}, "throughput_per_s": 10.0,
            "peak_rss_bytes": None}
    return {"recipe": "r", "workload": workload, "model": "m",
            "data": {"name": "d", "synthetic": False, "split": "test", "n": 5},
            "baseline": {**side, "quality": base_q}, "compressed": {**side, "quality": comp_q},
            "ratios": {"size": 1.0, "latency_p50": 1.0, "throughput": 1.0}, "bench": {"repeats": 1},
            "environment": {"cpu": "x", "cpu_flags": [], "threads": 1, "versions": {}}}


def _folder(tmp_path, meta):
    tmp_path.mkdir(parents=True, exist_ok=True)
    if meta is not None:
        (tmp_path / "slimcart-format.json").write_text(json.dumps(meta))
    return tmp_path


@pytest.mark.parametrize("meta,needles", [
    (None, ["SentenceTransformer(\"path/to/OUT/model\")"]),
    ({"format": "onnx", "model": "onnx/model.onnx", "runs_on": ["onnxruntime", "openvino"]},
     ["onnx/model.onnx", "backend=\"onnx\"", "1_Pooling"]),
    ({"format": "onnx", "model": "onnx/model.onnx", "runs_on": ["onnxruntime"], "ort_only_ops": ["QAttention"]},
     ["runs on ONNX Runtime only", "QAttention"]),
    ({"format": "openvino-ir", "model": "openvino/openvino_model.xml"}, ["openvino/openvino_model.xml", "backend=\"openvino\""]),
    ({"format": "structured-hf"}, ["stock loaders refuse", "slimcart.load", "load(\"search\""]),
])
def test_how_to_load_names_the_stock_loader(tmp_path, meta, needles):
    text = "\n".join(how_to_load("search", _folder(tmp_path / "m", meta)))
    for n in needles:
        assert n in text
    report = render_report(_metrics({"ndcg@10": 0.8}, {"ndcg@10": 0.8}), {"ndcg@10": True}, tmp_path / "m")
    assert "## How to load" in report and needles[0] in report


def test_guard_warning_only_when_guard_loss_hides_behind_the_primary_metric():
    base = {"ndcg@10": 0.860, "guard_mrr": 0.800, "guard_recall@1": 0.700}
    hidden = {"ndcg@10": 0.858, "guard_mrr": 0.780, "guard_recall@1": 0.690}  # -0.23% vs -2.5%
    msg = guard_warning(_metrics(base, hidden))
    assert msg and "guard_mrr" in msg and "2.5%" in msg
    assert "Guard task" in render_report(_metrics(base, hidden), {})
    assert guard_warning(_metrics(base, {**hidden, "ndcg@10": 0.84})) is None  # the primary loss already says it
    assert guard_warning(_metrics(base, {**hidden, "guard_mrr": 0.795, "guard_recall@1": 0.699})) is None
    assert guard_warning(_metrics({"ndcg@10": 0.86}, {"ndcg@10": 0.86})) is None  # no guard task measured
