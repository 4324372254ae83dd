"""Benchmark: the uncompressed DIN baselines of the ctr workload (the figures compression must match).

Per dataset: train the default checkpoint if it is missing (`CTRWorkload.train`, the same code as
`slimcart train --workload ctr`), then on the TEST split AUC (with a 95% bootstrap interval,
resampling users for behaviour data), logloss, ECE and predicted/observed CTR; the same figures on the
VALIDATION split (what early stopping saw); embedding vs dense bytes; training time; and scoring
speed of the fp32 model in eager PyTorch and ONNX Runtime at batch 1 and batch 1,024 (interleaved,
`slimcart.bench.measure_interleaved`). The load average is recorded before and after every phase:
this machine is shared, so speed and wall-clock figures are only indicative.

    SLIMCART_DATA=/work/shared/data python bench/ctr_baseline.py [--datasets recsys-amazon-videogames,ctr-ipinyou]

Writes bench/results/ctr_baseline.json and docs/bench-ctr.md (`--render` rewrites the doc from the JSON).
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

from slimcart.bench import environment, measure_interleaved, set_threads  # noqa: E402
from slimcart.models.ctr import parameter_bytes  # noqa: E402
from slimcart.workloads import get_workload  # noqa: E402
from slimcart.workloads.ctr import ALIAS, DATASET, checkpoint_dir  # noqa: E402
from slimcart.workloads.ctr_metrics import bootstrap_auc, ctr_quality  # noqa: E402


def load() -> list[float]:
    return [round(x, 2) for x in os.getloadavg()]


def onnx_runner(wl, bundle, folder: Path, threads: int):
    from slimcart.runtime.onnx_runtime import OnnxRunner, export_model

    return OnnxRunner(export_model(wl, bundle, bundle.module, folder)[0], threads=threads)


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
    # checkpoints from slimcart.training.fit (epochs, history of {"step", "val"}) or from the loop before it (epoch)
    row["training"] = {"epoch": tr.get("epochs", tr.get("epoch")), **{k: tr[k] for k in ("best_epoch", "seconds",
                                                                                          "cpu_seconds", "val_auc")}}
    row["training"]["stopped"] = tr.get("stopped")
    row["training"]["loadavg_per_epoch"] = [h["loadavg"] for h in tr["history"] if "loadavg" in h]
    row["training"]["val_auc_per_epoch"] = [round(h.get("val", h.get("val_auc")), 5) for h in tr["history"]]
    row["hyperparameters"] = {k: tr[k] for k in ("dim", "lr", "batch", "emb_l2", "dropout", "patience", "max_minutes",
                                                   "max_len", "negatives", "calibrate")}
    row["training"]["platt"] = tr.get("platt")
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


NOTES = """
## What the figures are

- **Model**: DIN (Zhou et al., KDD 2018), `slimcart/models/ctr.py`: per-table `nn.Embedding` rows, DIN's
  attention-weighted history pooling (Amazon), a 200-80 PReLU MLP. Without a behaviour history
  (iPinYou) it is DIN's own base model, "Embedding & MLP". Training: Adam, BCE, early stopping on
  validation AUC, 9-minute wall-clock budget, seed 0, then Platt scaling (a * logit + c fitted on the
  validation split and folded into the output layer: AUC unchanged, calibrated rates). The settings
  were chosen on Amazon validation figures only (`TRAIN_DEFAULTS` in `slimcart/workloads/ctr.py`);
  iPinYou uses the same settings.
- **Amazon Video Games, DIN protocol**: per user (5-core log, item ids only: the data has no
  categories), the last item is the test positive, the second-last the validation positive, earlier
  positions train; each positive is paired with one item the user never touched. The test interval
  resamples users (a user's positive and negative share a history). Test AUC sits below validation
  AUC: the test positive is each user's newest item, and 3.8% of test positives (2.5% of validation
  positives) are items that never occur in the training part of the log, whose rows stay untrained.
- **iPinYou** (advertiser 2997): test = test.fm.txt, validation = stratified 20% of train.fm.txt.
  Training covers one weekday and test another (train weekday 2, test weekday 5; the creative of the
  test rows never occurs in training), and the test click rate is about a quarter of the training
  rate, so the model's predicted CTR is far above the observed one (`calibration` = predicted /
  observed): that is the data's shift, not a bug. Platt scaling is fitted on validation rows from the
  training days, so on iPinYou it cannot correct that shift. Its test AUC rests on 50 clicks: read the
  interval, and do not tune on it.
- **Wall-clock budget**: training stops when the next epoch would pass 9 minutes, so on a loaded
  machine it runs fewer epochs (the validation AUC per epoch shows where it stopped); the run is
  seeded and each epoch is reproducible, so a less loaded machine gives the same epochs plus more.
- **Embedding bytes** = fp32 bytes of the tables; dense = everything else (attention + MLP).
  iPinYou's tables keep only values seen at least twice in training (others share row 0), which is
  why its tables are small next to the 133k ids of featindex.fm.txt.
- **Speed** is indicative only: one thread, measured on a shared 2-core machine under the load shown.
  Batch 1 = one row per call; batch 1,024 = 1,024 real test rows per call. ONNX Runtime runs the
  same fp32 graph (exported with keyword inputs; max |difference| to PyTorch shown).
"""


def fmt_ci(t: dict) -> str:
    lo, hi = t["auc_bootstrap"]["ci95"]
    return f"{t['auc']:.4f} [{lo:.4f}, {hi:.4f}]"


def render(result: dict) -> str:
    runs = result["runs"]
    lines = ["# ctr workload: uncompressed DIN baselines", "",
             "Generated by `bench/ctr_baseline.py` from `bench/results/ctr_baseline.json`. Quality figures are "
             "on the TEST split unless marked validation; AUC intervals are 95% bootstrap intervals "
             "(1,000 resamples).", "",
             "| | " + " | ".join(runs) + " |", "|---|" + "---|" * len(runs)]

    def row(name, fn):
        lines.append(f"| {name} | " + " | ".join(fn(r) for r in runs.values()) + " |")

    row("test rows (clicks)", lambda r: f"{r['rows']['test']:,} ({r['clicks']['test']:,})")
    row("train / validation rows", lambda r: f"{r['rows']['train']:,} / {r['rows']['valid']:,}")
    row("**test AUC [95% CI]**", lambda r: fmt_ci(r["test"]) + f" ({r['test']['bootstrap_unit']} resampled)")
    row("test logloss", lambda r: f"{r['test']['logloss']:.4f}")
    row("test ECE / predicted÷observed CTR", lambda r: f"{r['test']['ece']:.4f} / {r['test']['calibration']:.3f}")
    row("validation AUC / logloss", lambda r: f"{r['valid']['auc']:.4f} / {r['valid']['logloss']:.4f}")
    row("Platt scaling (validation logloss before -> after)", lambda r: "off" if not r["training"].get("platt") else
        "logit x {scale:.3f} + {shift:.3f} ({val_logloss_before:.4f} -> {val_logloss_after:.4f})".format(**r["training"]["platt"]))
    row("validation AUC per epoch (from the initial model when the first entry is step 0)",
        lambda r: ", ".join(f"{v:.4f}" for v in r["training"]["val_auc_per_epoch"]))
    row("epochs run (best)", lambda r: f"{r['training']['epoch']} ({r['training']['best_epoch']})")
    row("training wall / CPU seconds", lambda r: f"{r['training']['seconds']:.0f} / {r['training']['cpu_seconds']:.0f}")
    row("load average during training", lambda r: ", ".join(f"{x:.1f}" for x in r["training"]["loadavg_per_epoch"]) or "n/a")
    row("embedding bytes (fp32)", lambda r: f"{r['bytes']['embedding']:,}")
    row("dense bytes (attention + MLP)", lambda r: f"{r['bytes']['dense']:,}")
    row("embedding share", lambda r: f"{r['bytes']['embedding_share']:.1%}")
    row("largest tables", lambda r: ", ".join(f"{k[4:]} {v:,}" for k, v in sorted(
        r["bytes"]["tables"].items(), key=lambda kv: -kv[1])[:3]))
    for side in ("torch-fp32", "onnxruntime-fp32"):
        row(f"{side}: batch-1 latency p50 (ms)", lambda r, s=side: f"{r['speed'][s]['batch1_latency_ms_p50']:.3f}")
        row(f"{side}: batch-1024 rows/s", lambda r, s=side: f"{r['speed'][s]['batch1024_rows_per_s']:,.0f}")
    row("ONNX max abs diff vs torch", lambda r: f"{r['speed']['onnx_max_abs_diff_vs_torch']:.1e}")
    row("load average around timing", lambda r: f"{r['speed']['load_before'][0]:.1f} -> {r['speed']['load_after'][0]:.1f}")
    env = result["environment"]
    lines += ["", f"Machine: {env['cpu']}, {env['logical_cpus']} logical CPUs, {env['threads']} thread(s); "
              f"torch {env['versions']['torch']}, onnxruntime {env['versions']['onnxruntime']}.", NOTES.rstrip(), "",
              "Reproduce: `SLIMCART_DATA=/path/to/data python bench/ctr_baseline.py` (trains the default "
              "checkpoints under $SLIMCART_HOME/ctr/ when missing, exactly as `slimcart train --workload ctr "
              "[--data ctr-ipinyou]`)."]
    return "\n".join(lines) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--datasets", default=f"{DATASET},ctr-ipinyou")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--render", action="store_true", help="only rewrite docs/bench-ctr.md from the JSON")
    args = ap.parse_args()
    out, doc = ROOT / "bench" / "results" / "ctr_baseline.json", ROOT / "docs" / "bench-ctr.md"
    if not args.render:
        set_threads(args.threads)
        result = {"environment": environment(args.threads), "runs": {}}
        for name in args.datasets.split(","):
            result["runs"][name] = run(name, args.threads, args.repeats, lambda m: print(m, flush=True))
            print(json.dumps(result["runs"][name], indent=1), flush=True)
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp = out.with_suffix(".json.tmp")
        tmp.write_text(json.dumps(result, indent=1))
        tmp.rename(out)
        print(f"wrote {out}")
    doc.write_text(render(json.loads(out.read_text())))
    print(f"wrote {doc}")


if __name__ == "__main__":
    main()
