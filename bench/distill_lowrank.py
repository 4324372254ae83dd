"""Benchmark: knowledge distillation and low-rank factorization on the real workloads.

Each case is one `slimcart compress` run (api.compress): the recipe builds the model, it is saved,
reloaded from disk, and evaluated and timed interleaved against the uncompressed model in the same
process. Figures are same-run ratios. Wall times are honest wall-clock on this (shared) machine:
the load average is recorded next to them.

    SLIMCART_DATA=../shared/data python bench/distill_lowrank.py [--cases search-L3,...] [--threads 2]

Writes bench/results/distill_lowrank.json and docs/bench-distill-lowrank.md.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from slimcart import api  # noqa: E402
from slimcart.bench import environment  # noqa: E402
from slimcart.recipe import Recipe, load_recipe  # noqa: E402

# name -> (workload, model, recipe, targets: metric -> (kind, threshold))
CASES = {
    "search-L3": ("search", "minilm", "distill-L3",
                  {"ndcg@10": ("quality_ratio", 0.97), "recall@10": ("quality_ratio", 0.97), "throughput": ("ratio", 1.8)}),
    "search-L3-int8": ("search", "minilm", "distill-L3-int8",
                       {"ndcg@10": ("quality_ratio", 0.96), "throughput": ("ratio", 4.0)}),
    "search-lowrank50-norecovery": ("search", "minilm", "lowrank-50:norecovery", {}),
    "search-lowrank50": ("search", "minilm", "lowrank-50",
                         {"ndcg@10": ("quality_ratio", 0.97), "linear_params": ("max_ratio", 0.5)}),
    "recsys-half": ("recsys", "sasrec", "distill-recsys-half", {"ndcg@10": ("quality_ratio", 0.97)}),
    "llm-L24": ("llm", "smollm2", "distill-llm-L24", {}),
}
DEFAULT = ["search-L3", "search-L3-int8", "search-lowrank50-norecovery", "search-lowrank50", "recsys-half"]


def _recipe(name: str):
    if name.endswith(":norecovery"):  # the low-rank step alone: what recovery starts from
        base = load_recipe(name.split(":")[0])
        return Recipe(name=base.name + "-norecovery", description="lowrank-50 without the recovery step",
                      workloads=base.workloads, steps=[s for s in base.steps if s.kind == "lowrank"])
    return name


def _parse_notes(notes: list[str]) -> dict:
    out = {}
    for n in notes:
        m = re.search(r"(\d+) steps in ([\d.]+) min of training \(([^)]*)\).*?step total ([\d.]+) min wall clock, "
                      r"([\d.]+) CPU-min at (\d+) threads", n)
        if m:
            out.update(distill_steps=int(m[1]), train_minutes=float(m[2]), stopped=m[3], step_minutes=float(m[4]),
                       step_cpu_minutes=float(m[5]), step_cpu_minutes_per_thread=float(m[5]) / int(m[6]))
        m = re.search(r"their weights ([\d,]+) -> ([\d,]+)", n)
        if m:
            before, after = (int(x.replace(",", "")) for x in m.groups())
            out.update(linear_params_before=before, linear_params_after=after, linear_params_ratio=after / before)
    return out


def _ensure_recsys_teacher(progress) -> None:
    from slimcart.workloads import get_workload
    from slimcart.workloads.recsys import default_checkpoint_dir

    if not (default_checkpoint_dir() / "model.safetensors").exists():
        progress("no trained SASRec teacher: training one with the workload's defaults")
        get_workload("recsys").train(progress=progress)


def _reused(row: dict) -> bool:
    """The case's distill step reused an identical finished run (checkpoint fingerprint): no training time of its own."""
    return str(row.get("stopped", "")).startswith("reused")


def run_case(name: str, out_root: Path, threads: int, repeats: int) -> dict:
    workload, model, recipe, targets = CASES[name]
    log = lambda m: print(f"[{name}] {m}", flush=True)  # noqa: E731
    if workload == "recsys":
        _ensure_recsys_teacher(log)
    load0, t0 = os.getloadavg()[0], time.perf_counter()
    m = api.compress(workload, model, _recipe(recipe), out_root / name, overwrite=True, threads=threads,
                     repeats=repeats, measure_rss=False, progress=log)
    wall = time.perf_counter() - t0
    q_base, q_comp = m["baseline"]["quality"], m["compressed"]["quality"]
    row = {
        "case": name, "workload": workload, "model": model, "recipe": m["recipe"], "data": m["data"],
        "baseline_quality": q_base, "compressed_quality": q_comp,
        "quality_ratio": {k: q_comp[k] / q_base[k] for k in q_base if q_base[k]},
        "throughput_ratio": m["ratios"]["throughput"], "latency_p50_ratio": m["ratios"]["latency_p50"],
        "size_ratio": m["ratios"]["size"], "runtime": m["compressed"]["runtime"], "kernels": m["kernels"],
        "notes": m["notes"], "compress_wall_minutes": wall / 60, "loadavg_start": load0, "loadavg_end": os.getloadavg()[0],
        **_parse_notes(m["notes"]),
    }
    checks = {}
    for metric, (kind, thr) in targets.items():
        if kind == "quality_ratio":
            val = row["quality_ratio"][metric]
            checks[metric] = {"value": val, "target": f">= {thr}", "met": val >= thr}
        elif kind == "ratio":
            checks[metric] = {"value": row["throughput_ratio"], "target": f">= {thr}", "met": row["throughput_ratio"] >= thr}
        elif kind == "max_ratio":
            val = row.get("linear_params_ratio", float("nan"))
            checks[metric] = {"value": val, "target": f"<= {thr}", "met": val <= thr}
    if "step_minutes" in row and workload == "search" and "L3" in name and not _reused(row):
        checks["distill wall min"] = {"value": row["step_minutes"], "target": "<= 20", "met": row["step_minutes"] <= 20}
        v = row["step_cpu_minutes_per_thread"]  # what the step would take with the cores to itself
        checks["distill CPU-min per thread"] = {"value": v, "target": "<= 20", "met": v <= 20}
    row["targets"] = checks
    return row


HOW = [
    "- **Transfer data.** Search: the workload's calibration split (dev-split queries and product texts; the "
    "evaluated test queries are never used) plus PriceRunner product titles, all embedded once by the teacher. "
    "Recsys: the users' training histories (validation and test items excluded). LLM: train-split review windows.",
    "- **Losses.** Search: embedding cosine + listwise KL of the student's vs the teacher's scores over a fixed bank "
    "of 1,024 teacher-embedded product texts (temperature 0.05). Recsys: soft-label KL over all items at each user's "
    "4 newest positions + the next-item sampled-softmax loss. LLM: token-level KL.",
    "- **Students.** `distill-L3`: 3 of MiniLM's 6 layers, the subset chosen by measuring each candidate's "
    "undistilled held-out ranking agreement; word embeddings frozen. `distill-recsys-half`: SASRec with half the "
    "hidden (embedding) size and half the FFN, initialised by structured pruning of the teacher.",
    "- **Low-rank.** Truncated SVD of every Linear in the encoder layers, ranks allocated under a 50% parameter "
    "budget by measured sensitivity; the factorized model is two nn.Linear per layer. A stock HF config cannot say "
    "that, so it is saved as the HF folder with factorized weight names plus `slimcart-format.json` "
    "(format `lowrank`, ranks per layer); slimcart's registered loader rebuilds it through "
    "`SearchWorkload.load_model` and swaps the factors back in. An `export_onnx` step after `lowrank` gives plain ONNX.",
    "- **Teacher (recsys).** The SASRec checkpoint slimcart trained and cached (`slimcart train --workload recsys`, "
    "bounded by wall-clock time); its quality is the baseline column, so rows with different baselines had different "
    "teachers: a teacher trained on a busy machine stops earlier (its epochs and stop reason are in the checkpoint's "
    "config.json under `training`).",
    "- **Time.** Each distillation is bounded by `train.max_minutes` (wall clock) and `max_steps`; the step's total "
    "(teacher labelling + layer choice + training) is reported as wall minutes and as CPU minutes per thread, "
    "which is what the step takes when the cores are not shared. The load average shows how shared they were.",
]


def render(rows: list[dict], env: dict) -> str:
    lines = ["# Benchmark: distillation and low-rank factorization", "",
             "Generated by `bench/distill_lowrank.py` (do not edit by hand). Every ratio is compressed ÷ uncompressed "
             "measured in the same `slimcart compress` run (baseline = torch fp32 eager); quality on the workload's "
             "evaluation split, which distillation never sees.", "",
             f"Machine: {env['cpu']}, {env['threads']} threads, flags {', '.join(env['cpu_flags'])}; torch "
             f"{env['versions']['torch']}, onnxruntime {env['versions']['onnxruntime']}.", "",
             "| case | recipe | baseline quality | compressed quality | quality ratio | throughput × | size × | "
             "distill steps / train min / step wall min / step CPU-min per thread | compress wall min (load avg) |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        keys = [k for k in ("ndcg@10", "recall@10", "perplexity") if k in r["baseline_quality"]]
        fmt = lambda q: ", ".join(f"{k} {q[k]:.4f}" for k in keys)  # noqa: E731
        ratio = ", ".join(f"{k} {r['quality_ratio'][k]:.3f}" for k in keys if k in r["quality_ratio"])
        dist = (f"{r['distill_steps']} / {r['train_minutes']:.1f} / {r['step_minutes']:.1f} / "
                f"{r['step_cpu_minutes_per_thread']:.1f}" if "distill_steps" in r else "—")
        lines.append(f"| {r['case']} | {r['recipe']} | {fmt(r['baseline_quality'])} | {fmt(r['compressed_quality'])} | "
                     f"{ratio} | {r['throughput_ratio']:.2f} ({r['runtime']}) | {r['size_ratio']:.2f} | {dist} | "
                     f"{r['compress_wall_minutes']:.1f} ({r['loadavg_start']:.1f}→{r['loadavg_end']:.1f}) |")
    lines += ["", "## Targets", "", "| case | metric | value | target | met |", "|---|---|---|---|---|"]
    for r in rows:
        targets = r["targets"]
        if _reused(r):  # rows saved before run_case skipped these checks carry a meaningless 0-minute time
            targets = {k: v for k, v in targets.items() if not k.startswith("distill ")}
            lines.append(f"| {r['case']} | distillation time | reused the identical distill step's finished run "
                         "(same config, teacher and data: checkpoint fingerprint) | | |")
        for metric, c in targets.items():
            lines.append(f"| {r['case']} | {metric} | {c['value']:.3f} | {c['target']} | {'yes' if c['met'] else '**no**'} |")
    lines += ["", "## How the cases are built", "", *HOW, "", "## Notes from each run", ""]
    for r in rows:
        lines.append(f"- **{r['case']}**: " + " · ".join(r["notes"]))
    return "\n".join(lines) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--cases", default=",".join(DEFAULT), help=f"comma-separated, from: {', '.join(CASES)}")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--out", type=Path, default=ROOT / "runs" / "bench-distill-lowrank")
    ap.add_argument("--render", action="store_true", help="only rewrite the Markdown from the saved JSON")
    args = ap.parse_args()
    results_path = ROOT / "bench" / "results" / "distill_lowrank.json"
    if args.render:
        saved = json.loads(results_path.read_text())
        (ROOT / "docs" / "bench-distill-lowrank.md").write_text(render(saved["rows"], saved["environment"]))
        return
    previous = json.loads(results_path.read_text())["rows"] if results_path.exists() else []
    rows = {r["case"]: r for r in previous}  # rerunning some cases keeps the others' last results
    for name in args.cases.split(","):
        rows[name] = run_case(name, args.out, args.threads, args.repeats)
        ordered = [rows[c] for c in CASES if c in rows]
        env = environment(args.threads)
        results_path.parent.mkdir(parents=True, exist_ok=True)
        results_path.write_text(json.dumps({"environment": env, "rows": ordered}, indent=2))
        (ROOT / "docs" / "bench-distill-lowrank.md").write_text(render(ordered, env))
    print((ROOT / "docs" / "bench-distill-lowrank.md").read_text())


if __name__ == "__main__":
    main()
