"""The trained session model's figures: test and validation HR@20 / MRR@20, a popularity baseline,
the same test rows through the exported ONNX model in ONNX Runtime, and fp32 timing of the workload's
bench inputs (torch vs ORT, one interleaved run).

    SLIMCART_DATA=../shared/data python bench/session_gru4rec.py [--model gru4rec] [--threads 1]

Test = the 60,858 Diginetica test prefixes (all rows, every item ranked); validation = every prefix of
the newest 10% of the training sessions. 95% intervals: bootstrap over rows. Writes
bench/results/session_gru4rec.json.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from slimcart.bench import environment, measure_interleaved, paired_ratio, set_threads  # noqa: E402
from slimcart.workloads import get_workload  # noqa: E402
from slimcart.workloads.ranking import reciprocal_ranks  # noqa: E402
from slimcart.workloads.session import quality, rank_rows  # noqa: E402


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')} load {os.getloadavg()[0]:.1f}] {msg}", flush=True)


def interval(ranks: np.ndarray, seed: int = 0, resamples: int = 1000) -> dict:
    """Row-bootstrap 95% intervals of HR@20 and MRR@20."""
    idx = np.random.default_rng(seed).integers(0, len(ranks), (resamples, len(ranks)))
    hit, rr = (ranks < 20).astype(float), reciprocal_ranks(ranks, 20)
    return {"hr@20": np.percentile(hit[idx].mean(1), [2.5, 97.5]).tolist(),
            "mrr@20": np.percentile(rr[idx].mean(1), [2.5, 97.5]).tolist()}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="gru4rec")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "session_gru4rec.json")
    args = ap.parse_args()
    set_threads(args.threads)
    res: dict = {"environment": environment(args.threads), "loadavg_before": os.getloadavg()}
    wl = get_workload("session")
    data = wl.load_data(None)
    bundle = wl.load_model(args.model)
    res["data"] = data.info.as_dict()
    res["training"] = {k: v for k, v in bundle.extra["config"].get("training", {}).items() if k != "history"}
    res["training_history"] = bundle.extra["config"].get("training", {}).get("history")
    runner = wl.torch_runner(bundle)

    t0 = time.perf_counter()
    test = wl.evaluate(runner, bundle, data)
    res["test"] = {**test.quality, "ci95": interval(test.outputs["ranks"]), "seconds": time.perf_counter() - t0}
    log(f"test {test.quality} in {res['test']['seconds']:.0f}s")
    vin, vtgt = data.validation_rows()
    with torch.inference_mode():
        vr = rank_rows(lambda b: runner({"seq": b}), vin, vtgt, wl.config(bundle).max_len, data.n_items)
    res["validation_all_rows"] = {**quality(vr), "rows": len(vin), "ci95": interval(vr)}
    log(f"validation {res['validation_all_rows']}")

    # popularity: every row gets the training click counts as scores (the floor any model must beat)
    counts = np.bincount(np.concatenate(data.train + data.valid), minlength=data.n_items + 1).astype(np.float32)
    counts[0] = -1
    pop = rank_rows(lambda b: np.tile(counts, (len(b), 1)), data.test_prefixes, data.test_targets, 50, data.n_items)
    res["test_popularity_baseline"] = quality(pop)
    log(f"popularity {res['test_popularity_baseline']}")

    with tempfile.TemporaryDirectory() as tmp:
        from slimcart.runtime.onnx_runtime import OnnxRunner, export_onnx

        spec = wl.export_spec(bundle)
        export_onnx(bundle.module, spec["example"], Path(tmp) / "model.onnx", spec["dynamic_axes"], spec["output_name"])
        ort = OnnxRunner(Path(tmp) / "model.onnx", threads=args.threads)
        ort_test = wl.evaluate(ort, bundle, data)
        res["test_onnxruntime"] = {**ort_test.quality,
                                   "rows_with_other_rank": int((ort_test.outputs["ranks"] != test.outputs["ranks"]).sum())}
        log(f"ORT test {res['test_onnxruntime']}")
        inputs = wl.bench_inputs(bundle, data)
        t = measure_interleaved({"torch fp32": runner, "onnxruntime fp32": ort}, inputs, repeats=5, progress=log)
        res["timing"] = {k: v.summary() for k, v in t.items()}
        res["timing"]["ort_throughput_ratio"] = paired_ratio(t["onnxruntime fp32"].throughput_per_s, t["torch fp32"].throughput_per_s)
    res["loadavg_after"] = os.getloadavg()
    args.out.parent.mkdir(parents=True, exist_ok=True)
    tmp_out = args.out.with_suffix(".tmp")
    tmp_out.write_text(json.dumps(res, indent=2, default=float))
    tmp_out.rename(args.out)
    print(json.dumps({k: res[k] for k in ("test", "validation_all_rows", "test_popularity_baseline", "test_onnxruntime", "timing")}, indent=1, default=float))
    log(f"written {args.out}")


if __name__ == "__main__":
    main()
