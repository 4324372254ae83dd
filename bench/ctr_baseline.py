"""Benchmark: the uncompressed DIN baselines of the ctr workload (the figures compression must match).

Per dataset: train the default checkpoint if it is missing (`CTRWorkload.train`, the same code as
`slimcart train --workload ctr`), then on the TEST split AUC (with a 95% bootstrap interval,
resampling users for behaviour data), logloss, ECE and predicted/observed CTR; the same figures on the
VALIDATION split (what early stopping saw); embedding vs dense bytes; training time; and scoring
speed of the fp32 model in eager PyTorch and ONNX Runtime at batch 1 and batch 1,024 (interleaved,
`slimcart.bench.measure_interleaved`). The load average is recorded before and after every phase:
this machine is shared, so speed and wall-clock figures are only indicative.

    SLIMCART_DATA=/work/shared/data python bench/ctr_baseline.py [--datasets recsys-amazon-videogames,ctr-ipinyou]

Writes bench/results/ctr_baseline.json.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import numpy as np  # noqa: E402
import torch  # noqa: E402

from slimcart.bench import environment, measure_interleaved, set_threads  # noqa: E402
from slimcart.models.ctr import parameter_bytes  # noqa: E402
from slimcart.workloads import get_workload  # noqa: E402
from slimcart.workloads.ctr import ALIAS, DATASET, checkpoint_dir  # noqa: E402
from slimcart.workloads.ctr_metrics import bootstrap_auc, ctr_quality  # noqa: E402


def load() -> list[float]:
    return [round(x, 2) for x in os.getloadavg()]


def onnx_runner(wl, bundle, folder: Path, threads: int):
    from slimcart.runtime.onnx_runtime import OnnxRunner

    spec = wl.export_spec(bundle)
    path = folder / "model.onnx"
    with torch.inference_mode():  # keyword inputs: DIN's hist/dense are both optional (see export_spec)
        torch.onnx.export(bundle.module, (), str(path), kwargs={k: torch.as_tensor(v) for k, v in spec["example"].items()},
                          input_names=list(spec["example"]), output_names=[spec["output_name"]],
                          dynamic_axes=spec["dynamic_axes"], opset_version=17, dynamo=False)
    return OnnxRunner(path, threads=threads)


def run(dataset: str, threads: int, repeats: int, progress) -> dict:
    wl = get_workload("ctr")
    row = {"dataset": dataset, "load_before": load()}
    data = wl.load_data(None if dataset == DATASET else dataset)
    row["data"] = data.info.as_dict()
    row["rows"] = {k: int(len(getattr(data, k))) for k in ("train", "valid", "test")}
    row["clicks"] = {k: int(getattr(data, k).label.sum()) for k in ("train", "valid", "test")}
    spec = ALIAS if dataset == DATASET else f"{ALIAS}@{dataset}"
    if not (checkpoint_dir(data.name) / "model.safetensors").exists():
        progress(f"{dataset}: training (load {load()})")
        wl.train(data, progress=progress)
    bundle = wl.load_model(spec)
    cfg = bundle.extra["config"]
    tr = cfg["training"]
    row["training"] = {k: tr[k] for k in ("epoch", "best_epoch", "seconds", "cpu_seconds", "val_auc")}
    row["training"]["loadavg_per_epoch"] = [h.get("loadavg") for h in tr["history"]]
    row["training"]["val_auc_per_epoch"] = [round(h["val_auc"], 5) for h in tr["history"]]
    row["hyperparameters"] = {k: tr[k] for k in ("dim", "lr", "batch", "emb_l2", "dropout", "patience", "max_minutes",
                                                   "max_len", "negatives")}
    row["bytes"] = parameter_bytes(bundle.module)
    row["bytes"]["tables"] = {n: int(m.weight.numel() * 4) for n, m in bundle.module.embedding_tables().items()}
    row["bytes"]["embedding_share"] = row["bytes"]["embedding"] / (row["bytes"]["embedding"] + row["bytes"]["dense"])

    torch_runner = wl.torch_runner(bundle)
    max_len = int(cfg["model"]["max_len"])
    valid_logits = wl.predict(torch_runner, data, data.valid, max_len)
    row["valid"] = ctr_quality(data.valid.label, valid_logits)
    res = wl.evaluate(torch_runner, bundle, data)
    row["test"] = res.quality
    row["test"]["auc_bootstrap"] = bootstrap_auc(res.outputs["labels"], res.outputs["logits"], res.outputs["groups"])
    row["test"]["bootstrap_unit"] = "users" if res.outputs["groups"] is not None else "rows"
    row["load_after_eval"] = load()

    with tempfile.TemporaryDirectory() as tmp:
        sides = {"torch-fp32": torch_runner, "onnxruntime-fp32": onnx_runner(wl, bundle, Path(tmp), threads)}
        inputs = wl.bench_inputs(bundle, data)
        b = inputs.serving[0]
        ort_diff = float(np.abs(sides["onnxruntime-fp32"](b) - torch_runner(b)).max())
        t0, load0 = time.perf_counter(), load()
        timing = measure_interleaved(sides, inputs, repeats=repeats, progress=progress)
        row["speed"] = {
            name: {"batch1_latency_ms_p50": t.summary()["latency_ms"]["p50"],
                   "batch1_rows_per_s": 1e3 / t.summary()["latency_ms"]["p50"],
                   f"batch{inputs.items_per_serving_batch}_rows_per_s": t.summary()["throughput_per_s"]}
            for name, t in timing.items()}
        row["speed"]["onnx_max_abs_diff_vs_torch"] = ort_diff
        row["speed"]["threads"], row["speed"]["seconds"] = threads, time.perf_counter() - t0
        row["speed"]["load_before"], row["speed"]["load_after"] = load0, load()
    return row


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--datasets", default=f"{DATASET},ctr-ipinyou")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--repeats", type=int, default=5)
    args = ap.parse_args()
    set_threads(args.threads)
    out = ROOT / "bench" / "results" / "ctr_baseline.json"
    result = {"environment": environment(args.threads), "runs": {}}
    for name in args.datasets.split(","):
        result["runs"][name] = run(name, args.threads, args.repeats, lambda m: print(m, flush=True))
        print(json.dumps(result["runs"][name], indent=1), flush=True)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(result, indent=1))
    tmp.rename(out)
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
