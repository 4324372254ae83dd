"""Benchmark: is slimcart's PyTorch fp32 baseline what a competent user runs?

Every search latency ratio divides by the PyTorch fp32 side, so a baseline slower than it need be
inflates them all. Here, on raw text (tokenization included on every side, one query per call and
batches of 32 mixed queries/titles), in one interleaved run per thread count:
  slimcart-torch   the baseline `slimcart compress` times (workload tokenizer + TorchRunner)
  st-torch         sentence-transformers' own `encode` on the same model folder (torch backend)
  slimcart-ort     ONNX Runtime fp32 of the same function (the same-runtime reference side)
Reported: p50/p99 latency, CPU milliseconds per call (all threads: spin-waiting shows up here) and
batch-32 throughput, with the ratio of each side to st-torch.

    SLIMCART_DATA=../shared/data python bench/baseline_latency.py [--threads 1,2] [--repeats 7]

Writes bench/results/baseline_latency.json and docs/bench-baseline-latency.md. Run on an idle machine.
"""
from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import numpy as np  # noqa: E402

from slimcart import outputs  # noqa: E402
from slimcart.bench import (  # noqa: E402
    CpuCompetition,
    environment,
    measure_interleaved,
    ratio_stats,
    set_threads,
)
from slimcart.contracts import BenchInputs  # noqa: E402
from slimcart.runtime.onnx_runtime import OnnxFile  # noqa: E402
from slimcart.workloads import get_workload  # noqa: E402


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')} load {os.getloadavg()[0]:.1f}] {msg}", flush=True)


def texts_of(data, n_single: int = 64, n_batches: int = 8, batch: int = 32) -> tuple[list[str], list[list[str]]]:
    rng = np.random.default_rng(0)
    texts = list(dict.fromkeys(data.pairs["query"])) + list(dict.fromkeys(data.pairs["product"].str.split(". ").str[0]))
    order = rng.permutation(len(texts))
    single = [texts[i] for i in order[:n_single]]
    pool = [texts[i] for i in rng.permutation(len(texts))[: n_batches * batch]]
    return single, [pool[i:i + batch] for i in range(0, len(pool), batch)]


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--model", default="minilm")
    p.add_argument("--threads", default="1,2")
    p.add_argument("--repeats", type=int, default=7)
    args = p.parse_args()
    from sentence_transformers import SentenceTransformer

    wl = get_workload("search")
    data = wl.load_data(None)
    bundle = wl.load_model(args.model)
    single, batches = texts_of(data)
    res = {"environment": environment(), "model": str(bundle.source), "split": "evaluation split texts (queries + titles)",
           "measured_at": time.strftime("%Y-%m-%d %H:%M"), "runs": {}}
    with tempfile.TemporaryDirectory(prefix="slimcart-baseline-") as tmp:
        for threads in [int(t) for t in args.threads.split(",")]:
            set_threads(threads)
            st = SentenceTransformer(str(bundle.source), device="cpu")
            torch_run = wl.torch_runner(bundle)
            ort_run = OnnxFile.reference(wl, bundle, Path(tmp) / f"ort{threads}", threads)  # what compress times

            def via(runner):
                return lambda xs: runner(wl.tokenize(bundle.tokenizer, xs if isinstance(xs, list) else [xs]))

            sides = {"st-torch": lambda xs: st.encode(xs if isinstance(xs, list) else [xs], batch_size=32,
                                                      normalize_embeddings=True, convert_to_numpy=True),
                     "slimcart-torch": via(torch_run), "slimcart-ort": via(ort_run)}
            a = sides["st-torch"](single[:4])
            b = sides["slimcart-torch"](single[:4])
            agree = float(np.min(np.sum(np.asarray(a) * np.asarray(b), 1)))
            inputs = BenchInputs(single=single, serving=batches, items_per_serving_batch=32, unit="texts")
            load0, comp = os.getloadavg()[0], CpuCompetition()
            t = measure_interleaved(sides, inputs, repeats=args.repeats, progress=log)
            run = {"load_before": load0, "load_after": os.getloadavg()[0], "others_cpus": comp.others_cpus(),
                   "cosine_st_vs_slimcart_min": agree, "sides": {}}
            for name, s in t.items():
                lat = np.asarray(s.latency_ms)
                run["sides"][name] = {"p50_ms": float(np.percentile(lat, 50)), "p99_ms": float(np.percentile(lat, 99)),
                                      "throughput_per_s": float(np.median(s.throughput_per_s)),
                                      "cpu_ms_per_item_batch32": float(np.median(s.cpu_ms_per_item)),
                                      "throughput_vs_st": ratio_stats(s.throughput_per_s, t["st-torch"].throughput_per_s)}
            res["runs"][str(threads)] = run
            log(f"{threads} thread(s): " + ", ".join(f"{n} p50 {v['p50_ms']:.1f} ms" for n, v in run["sides"].items()))
    outputs.write_json(ROOT / "bench" / "results" / "baseline_latency.json", res)
    (ROOT / "docs" / "bench-baseline-latency.md").write_text(markdown(res))


def markdown(r: dict) -> str:
    lines = ["# Benchmark: the PyTorch fp32 baseline against sentence-transformers", "",
             f"Generated by `bench/baseline_latency.py` ({r['measured_at']}), model `{Path(r['model']).name}`, texts from the "
             f"{r['split']}; tokenization included on every side; interleaved rounds per thread count.", "",
             "| threads | side | p50 ms (1 text) | p99 ms | batch-32 texts/s | x st-torch [95% CI] | CPU ms per text (batch 32) |",
             "|---|---|---|---|---|---|---|"]
    for th, run in r["runs"].items():
        for name, s in run["sides"].items():
            x = s["throughput_vs_st"]
            lines.append(f"| {th} | {name} | {s['p50_ms']:.2f} | {s['p99_ms']:.2f} | {s['throughput_per_s']:.0f} | "
                         f"{x['median']:.2f} [{x['ci95'][0]:.2f}, {x['ci95'][1]:.2f}] | {s['cpu_ms_per_item_batch32']:.2f} |")
    lines += [""] + [f"- {th} thread(s): load average {run['load_before']:.2f} -> {run['load_after']:.2f}, other processes "
                     f"used {run['others_cpus'] or 0:.2f} CPUs while timing; min cosine slimcart vs sentence-transformers "
                     f"{run['cosine_st_vs_slimcart_min']:.6f}" for th, run in r["runs"].items()]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
