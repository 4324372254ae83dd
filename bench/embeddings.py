"""Benchmark: embedding-table compression on trained models, quality and speed in the same run.

Every compressed model is built by `slimcart.api.build` (recipes from slimcart/recipes or steps
written below), written by `ModelState.save`, reloaded by `slimcart.api.load` and evaluated through the
reloaded copy; timing is `slimcart.bench.measure_interleaved` (fp32 and compressed interleaved, round
by round); intervals are paired bootstraps over the workloads' per-row outputs (ctr: users resampled
for the DIN protocol, rows for iPinYou; recsys: per-user NDCG@10).

Sections
  ctr       DIN on Amazon Video Games (DIN protocol): the recipes on TEST, the 16x setting's selection
            grid on VALIDATION, scoring speed at batch 1 and 1,024.
  ipinyou   the same recipes on the iPinYou DIN (TEST; wide intervals: 50 clicks).
  sasrec    SASRec on Amazon Video Games: item table >= 8x; each candidate against the fp32 model given
            the same fine-tuning (the control of bench/pruning.py's recsys section); speed.
  compare   techniques at (roughly) equal bytes on both workloads; a plot of quality vs bytes.

    SLIMCART_DATA=/work/shared/data python bench/embeddings.py [--sections ctr,ipinyou,sasrec,compare] [--threads 1]

Writes bench/results/embeddings.json (sections merged into what is there), the sections of
docs/bench-embeddings.md (other sections, e.g. bench/embeddings_table.py's, are left alone) and
docs/img/embeddings-quality-vs-bytes.svg. `--render` only rewrites the doc from the JSON.
"""
from __future__ import annotations

import argparse
import gc
import json
import os
import shutil
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

import numpy as np  # noqa: E402
from embeddings_plot import quality_vs_bytes_svg  # noqa: E402
from embeddings_report import render_sections  # noqa: E402
from embeddings_table import write_section  # noqa: E402

from slimcart import api, outputs  # noqa: E402
from slimcart.bench import (  # noqa: E402
    environment,
    measure_interleaved,
    paired_bootstrap,
    ratio_stats,
    set_threads,
)
from slimcart.recipe import Recipe, load_recipe, parse_recipe  # noqa: E402
from slimcart.workloads import get_workload  # noqa: E402
from slimcart.workloads.ranking import ndcg_per_user  # noqa: E402
from slimcart.workloads.recsys import default_checkpoint_dir  # noqa: E402

RESULTS = ROOT / "bench" / "results" / "embeddings.json"
DOC = ROOT / "docs" / "bench-embeddings.md"
PLOT = ROOT / "docs" / "img" / "embeddings-quality-vs-bytes.svg"
CTR_RECIPES = ["emb-int8", "emb-int4", "emb-int2-mixed", "emb-pq", "ctr-int8", "emb-qr", "emb-mixed-dim", "emb-tt"]
CTR_TIMED = ["emb-int4", "emb-pq", "ctr-int8"]
# SASRec: fine-tuning on the task loss shared by every candidate and by the control (steps bind, not minutes)
FINETUNE = {"kind": "recover", "method": "task", "steps": 500, "max_minutes": 1e6, "lr": 1e-3, "calibration_batches": 500}


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] load {os.getloadavg()[0]:.1f} {msg}", flush=True)


def load() -> list[float]:
    return [round(x, 2) for x in os.getloadavg()]


def recipe_of(name: str, steps: list | None = None) -> Recipe:
    return load_recipe(name) if steps is None else parse_recipe({"name": name, "steps": steps})


def table_bytes(module) -> int:
    """fp32 bytes of every nn.Embedding / nn.EmbeddingBag of a model."""
    import torch

    return sum(m.weight.numel() * 4 for m in module.modules() if isinstance(m, (torch.nn.Embedding, torch.nn.EmbeddingBag)))


class Builder:
    """api.build -> state.save -> api.load for one workload, the fp32 model and data loaded once."""

    def __init__(self, wl, model: str, data, threads: int, work: Path):
        self.wl, self.model, self.data, self.threads, self.work = wl, model, data, threads, work
        self.bundle = wl.load_model(model)
        self.cache = api.PrefixCache()
        self.fp32_tables = table_bytes(self.bundle.module)
        self.fp32_folder = work / "fp32"
        wl.save_model(self.bundle, self.fp32_folder)

    def build(self, name: str, recipe: Recipe) -> tuple:
        t0 = time.perf_counter()
        built = api.build(self.wl, self.model, recipe, threads=self.threads, loaded=(self.bundle, self.data),
                          workdir=self.work / f"w-{name}", cache=self.cache, progress=lambda m: None)
        seconds = time.perf_counter() - t0
        folder = self.work / name
        built.state.save(folder, self.wl)
        rep = built.state.reports.get("compress_embeddings")
        info = {"recipe": [s.model_dump(mode="json") for s in recipe.steps], "build_seconds": round(seconds, 1),
                "notes": built.state.notes, "kernels": built.state.kernels, "disk_bytes": outputs.model_bytes(folder),
                "fp32_disk_bytes": outputs.model_bytes(self.fp32_folder), "tables_fp32_bytes": self.fp32_tables}
        if rep is not None:
            untouched = self.fp32_tables - rep["bytes_before"]
            info["tables_bytes"] = rep["bytes_after"] + untouched
            info["tables_x"] = self.fp32_tables / info["tables_bytes"]
            info["per_table"] = {n: {k: t[k] for k in ("method", "rows", "bytes_before", "bytes_after")}
                                 for n, t in rep["tables"].items()}
        for kind in ("recover", "distill"):
            if kind in built.state.reports:
                r = built.state.reports[kind]
                info[kind] = {k: r[k] for k in ("steps", "seconds", "loss_first_10pct", "loss_last_10pct") if k in r}
        del built
        gc.collect()
        runner, loaded = api.load(self.wl, folder, self.threads)  # every figure below comes from the reloaded copy
        return runner, loaded, info


# ---------------------------------------------------------------- ctr
def ctr_quality(wl, runner, bundle, data, base: dict) -> dict:
    """TEST and VALIDATION figures with the paired bootstrap of the AUC difference against `base`."""
    out = {}
    for split, view in (("test", data), ("valid", replace(data, test=data.valid))):
        r = wl.evaluate(runner, bundle, view, reference=base.get(split))
        out[split] = {**r.quality, "auc_ci95": r.outputs["auc_ci95"]}
        if "vs_reference" in r.outputs:
            out[split]["delta_auc"] = r.outputs["vs_reference"]
        out[split]["_outputs"] = r.outputs
    return out


def strip(q: dict) -> dict:
    return {s: {k: v for k, v in d.items() if k != "_outputs"} for s, d in q.items()}


def deltas(q: dict, base: dict) -> dict:
    return {s: {k: q[s][k] - base[s][k] for k in ("auc", "logloss", "ece", "calibration")} for s in q}


def timing(sides: dict, inputs, repeats: int, baseline: str, latency_samples: int = 32) -> dict:
    """rows/s at batch 1 (1 / median latency) and at the serving batch, each with the median per-round
    ratio to the baseline and its bootstrap interval."""
    t = measure_interleaved(sides, inputs, repeats=repeats, latency_samples=latency_samples)
    out = {}
    for name, st in t.items():
        lat = np.asarray(st.latency_ms).reshape(repeats, -1)
        per_round_b1 = list(1000.0 / np.median(lat, 1))
        out[name] = {"batch1_per_s": float(np.median(per_round_b1)), "serving_per_s": float(np.median(st.throughput_per_s)),
                     "_b1": per_round_b1, "_serving": list(st.throughput_per_s)}
    for name, o in out.items():
        o["x_batch1"] = ratio_stats(o["_b1"], out[baseline]["_b1"])
        o["x_serving"] = ratio_stats(o["_serving"], out[baseline]["_serving"])
    for o in out.values():
        o.pop("_b1"), o.pop("_serving")
    return {"sides": out, "serving_batch": inputs.items_per_serving_batch, "unit": inputs.unit, "repeats": repeats}


PQ_GRID = {  # the 16x setting was chosen among these on VALIDATION (same grid as the exploration)
    "pq int8-hot 7% / user 4-bit codes (emb-pq)": None,
    "pq int8-hot 8% / user 4-bit codes": {"hot": [{"bits": 8, "fraction": 0.08}]},
    "pq int4-hot 13% / user 4-bit codes": {"hot": [{"bits": 4, "fraction": 0.13}]},
    "pq no rotation, int8-hot 7%": {"rotate": False},
    "pq fp32-hot 1% + int8-hot 4%": {"hot": [{"bits": 32, "fraction": 0.01}, {"bits": 8, "fraction": 0.04}]},
}


def pq_variant(change: dict | None) -> Recipe:
    """emb-pq with some technique fields changed (`rotate` in the per-table override too)."""
    rec = load_recipe("emb-pq")
    if change is None:
        return rec
    step = rec.steps[0].model_dump(mode="json")
    step["technique"].update(change)
    if "rotate" in change:
        for o in step["overrides"].values():
            o["rotate"] = change["rotate"]
    return parse_recipe({"name": "emb-pq variant", "workloads": rec.workloads, "steps": [step]})


def bench_ctr(args, work: Path, dataset: str | None, model: str, recipes: list[str], timed: list[str],
              grid: bool) -> dict:
    wl = get_workload("ctr")
    res = {"load_before": load()}
    data = wl.load_data(dataset)
    b = Builder(wl, model, data, args.threads, work)
    res["data"] = wl.data_info(data).as_dict()
    res["model"] = model
    res["tables_fp32_bytes"] = b.fp32_tables
    base = ctr_quality(wl, wl.torch_runner(b.bundle), b.bundle, data, {})
    base_out = {s: base[s]["_outputs"] for s in base}
    res["fp32"] = strip(base)
    log(f"{model}: fp32 test AUC {base['test']['auc']:.4f}")
    res["recipes"], runners = {}, {}
    for name in recipes:
        runner, loaded, info = b.build(name, recipe_of(name))
        q = ctr_quality(wl, runner, loaded, data, base_out)
        res["recipes"][name] = {**info, "quality": strip(q), "delta": deltas(q, base)}
        log(f"{name}: {info.get('tables_x', 0):.2f}x tables, test dAUC {res['recipes'][name]['delta']['test']['auc']:+.5f} "
            f"dlogloss {res['recipes'][name]['delta']['test']['logloss']:+.5f}")
        if name in timed:
            runners[name] = runner
    if grid:
        res["selection_valid"] = {}
        for label, change in PQ_GRID.items():
            if change is None and "emb-pq" in res["recipes"]:
                r = res["recipes"]["emb-pq"]
                res["selection_valid"][label] = {"tables_x": r["tables_x"], **r["delta"]["valid"],
                                                 "delta_auc_ci95": r["quality"]["valid"]["delta_auc"]["ci95"]}
                continue
            runner, loaded, info = b.build("grid-" + str(len(res["selection_valid"])), pq_variant(change))
            r = wl.evaluate(runner, loaded, replace(data, test=data.valid), reference=base_out["valid"])
            d = {k: r.quality[k] - base["valid"][k] for k in ("auc", "logloss", "ece", "calibration")}
            res["selection_valid"][label] = {"tables_x": info["tables_x"], **d,
                                             "delta_auc_ci95": r.outputs["vs_reference"]["ci95"]}
            log(f"grid {label}: {res['selection_valid'][label]}")
    if timed and args.repeats:
        sides = {"fp32": wl.torch_runner(b.bundle), **runners}
        res["timing"] = timing(sides, wl.bench_inputs(b.bundle, data), args.repeats, "fp32")
        log(f"timing {json.dumps(res['timing']['sides'])[:400]}")
    res["load_after"] = load()
    return res


# ---------------------------------------------------------------- sasrec
def sasrec_eval(wl, runner, bundle, data) -> tuple[dict, np.ndarray]:
    r = wl.evaluate(runner, bundle, data)
    return r.quality, ndcg_per_user(r.outputs["ranks"])


def bench_sasrec(args, work: Path) -> dict:
    wl = get_workload("recsys")
    data = wl.load_data(None)
    res = {"load_before": load(), "data": wl.data_info(data).as_dict(), "finetune": FINETUNE}
    if not (default_checkpoint_dir() / "model.safetensors").exists():
        log("training SASRec (slimcart train --workload recsys)")
        wl.train(data, progress=log)
    b = Builder(wl, "sasrec", data, args.threads, work)
    res["tables_fp32_bytes"] = b.fp32_tables
    q0, pu0 = sasrec_eval(wl, wl.torch_runner(b.bundle), b.bundle, data)
    res["fp32"] = q0
    comp = {"int4-hot": load_recipe("emb-pq-hot-int4").steps[0].model_dump(mode="json")}
    candidates = {
        "control: fine-tuned fp32": [FINETUNE],
        "fine-tune -> emb-pq-hot-int4": [FINETUNE, comp["int4-hot"]],
        "emb-pq-hot-int4 -> fine-tune": [comp["int4-hot"], FINETUNE],
        "emb-pq-hot-int4 (no fine-tuning)": [comp["int4-hot"]],
        "emb-int4 (no fine-tuning)": None,
        "emb-int2-mixed (no fine-tuning)": None,
    }
    res["candidates"], per_user, runners = {}, {"fp32": pu0}, {}
    for name, steps in candidates.items():
        rec = recipe_of(name.split(" ")[0], None) if steps is None else recipe_of(name, steps)
        runner, loaded, info = b.build(f"sas-{len(res['candidates'])}", rec)
        q, pu = sasrec_eval(wl, runner, loaded, data)
        per_user[name] = pu
        res["candidates"][name] = {**info, "quality": q, "vs_fp32": paired_bootstrap(pu, pu0)}
        log(f"{name}: {info.get('tables_x', 1):.2f}x ndcg {q['ndcg@10']:.5f}")
        if name == "fine-tune -> emb-pq-hot-int4":
            runners["pq-hot-int4"] = runner
    control = per_user["control: fine-tuned fp32"]
    for name, c in res["candidates"].items():
        if "fine-tune" in name and not name.startswith("control"):
            c["vs_control"] = paired_bootstrap(per_user[name], control)
    if args.repeats:
        res["timing"] = timing({"fp32": wl.torch_runner(b.bundle), **runners}, wl.bench_inputs(b.bundle, data),
                               args.repeats, "fp32")
    res["load_after"] = load()
    return res


# ---------------------------------------------------------------- techniques at equal bytes
def tech(method: str, **kw) -> dict:
    return {"kind": "compress_embeddings", "exclude": ["*pos_emb*"], "method": method, **kw}


# DIN: the recipes' `recover` (BCE on 64 batches of training rows) over-fits and un-calibrates DIN (see the ctr
# section); distilling the fp32 model's probabilities over the whole training split, best validation AUC kept, does not.
RECOVER_CTR = {"kind": "distill", "student": {"type": "current"}, "losses": {"soft": 1.0}, "checkpoint": False,
               "train": {"max_steps": 2000, "batch_size": 256, "lr": 1e-3, "weight_decay": 0.0, "eval_every": 250,
                         "max_minutes": 1e6, "patience": 2, "warmup": 0.0, "schedule": "constant"}}
COMPARE = {  # technique -> [(label, steps)]: sizes around 3-4x, 8-10x and 16x+ of fp32
    "int (row-wise)": [("int8", [tech("rowwise", bits=8)]), ("int4", [tech("rowwise", bits=4, optimized_range=True)]),
                       ("int2", [tech("rowwise", bits=2, optimized_range=True)])],
    "int2-mixed": [("int2 + 10% int4 + 1% fp32", [tech("mixed_precision", tiers=[{"bits": 32, "fraction": 0.01},
                    {"bits": 4, "fraction": 0.1}], tail_bits=2, optimized_range=True)])],
    "qr": [(f"qr c={c}", [tech("qr", collisions=c), "recover"]) for c in (4, 8, 16)],
    "hash": [(f"hash 1/{k}", [tech("hash", ratio=1 / k), "recover"]) for k in (4, 8, 16)],
    "mixed-dim": [("5% full/25% x16/70% x4", [tech("mixed_dim"), "recover"]),
                  ("2% full/18% x8/80% x2", [tech("mixed_dim", blocks=[{"fraction": 0.02}, {"fraction": 0.18, "dim": 8},
                                                                     {"fraction": 0.8, "dim": 2}]), "recover"]),
                  ("1% full/9% x4/90% x1", [tech("mixed_dim", blocks=[{"fraction": 0.01}, {"fraction": 0.09, "dim": 4},
                                                                    {"fraction": 0.9, "dim": 1}]), "recover"])],
    "tt": [(f"tt rank {r}", [tech("tt", cores=3, rank=r), "recover"]) for r in (32, 16, 8)],
    "pq": [(f"pq {s} values/code", [tech("pq", subvector_dim=s, rotate=True)]) for s in (2, 4, 8)],
}


def bench_compare(args, work: Path, previous: dict | None = None) -> dict:
    """Every model starts from its best fp32 state (DIN as trained; SASRec fine-tuned exactly as the control, so
    a table that is not retrained is compressed from the control's table); the techniques that need
    retraining (QR, hashing, mixed-dim, TT) get their recovery after compression. Quality only: every
    training is bounded by steps, so the machine's load does not change these figures."""
    previous = previous or {}
    res = {k: {"measured_at": previous.get("measured_at"), **v} for k, v in previous.items() if k in ("ctr", "sasrec")}
    res["load_before"] = load()
    models = [m for m in (("ctr", "ctr", "din"), ("sasrec", "recsys", "sasrec")) if m[0] in args.compare_models.split(",")]
    for section, wname, model in models:
        wl = get_workload(wname)
        data = wl.load_data(None)
        b = Builder(wl, model, data, args.threads, work / section)
        rows = {}
        if section == "ctr":
            base = wl.evaluate(wl.torch_runner(b.bundle), b.bundle, data)
            fp32, rec = base.quality, RECOVER_CTR
        else:
            _, pu_fp32 = sasrec_eval(wl, wl.torch_runner(b.bundle), b.bundle, data)
            runner, loaded, _ = b.build("control", recipe_of("control", [FINETUNE]))
            fp32, control = sasrec_eval(wl, runner, loaded, data)
            rows["control"] = {"quality": fp32, "vs_fp32": paired_bootstrap(control, pu_fp32)}
            rec = FINETUNE
        for family, points in COMPARE.items():
            for label, steps in points:
                steps = [rec if s == "recover" else s for s in steps]
                if section == "sasrec":  # from the control's fine-tuned model; retrained techniques fine-tune again
                    steps = [FINETUNE] + steps
                runner, loaded, info = b.build(f"{family}-{label}".replace(" ", "_").replace("/", "-"),
                                               recipe_of(label, steps))
                row = {"family": family, "tables_bytes": info["tables_bytes"], "tables_x": info["tables_x"],
                       "build_seconds": info["build_seconds"], "recipe": info["recipe"]}
                if section == "ctr":
                    r = wl.evaluate(runner, loaded, data, reference=base.outputs)
                    row.update(quality=r.quality, delta_auc=r.outputs["vs_reference"],
                               delta_logloss=r.quality["logloss"] - fp32["logloss"])
                else:
                    q, pu = sasrec_eval(wl, runner, loaded, data)
                    row.update(quality=q, vs_control=paired_bootstrap(pu, control))
                rows[label] = row
                log(f"compare {section} {label}: {row['tables_x']:.2f}x "
                    f"{row.get('delta_auc', row.get('vs_control'))}")
                shutil.rmtree(b.work / f"{family}-{label}".replace(" ", "_").replace("/", "-"), ignore_errors=True)
        res[section] = {"fp32" if section == "ctr" else "control_quality": fp32, "tables_fp32_bytes": b.fp32_tables,
                        "points": rows, "data": wl.data_info(data).as_dict(), "measured_at": time.strftime("%Y-%m-%d %H:%M"),
                        "load_before_after": [res["load_before"][0], load()[0]]}
    res["load_after"] = load()
    return res


# ---------------------------------------------------------------- main
def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--sections", default="ctr,ipinyou,sasrec,compare")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--compare-models", default="ctr,sasrec", help="the compare section's models (others kept)")
    ap.add_argument("--render", action="store_true", help="only rewrite the doc and the plot from the JSON")
    args = ap.parse_args()
    results = json.loads(RESULTS.read_text()) if RESULTS.exists() else {}
    if not args.render:
        set_threads(args.threads)
        results["environment"] = environment(args.threads)
        for section in [s for s in args.sections.split(",") if s]:
            with tempfile.TemporaryDirectory(prefix=f"slimcart-bench-emb-{section}-") as tmp:
                work = Path(tmp)
                log(f"section {section}")
                if section == "ctr":
                    out = bench_ctr(args, work, None, "din", CTR_RECIPES, CTR_TIMED, grid=True)
                elif section == "ipinyou":
                    out = bench_ctr(args, work, "ctr-ipinyou", "din@ctr-ipinyou", CTR_RECIPES, [], grid=False)
                elif section == "sasrec":
                    out = bench_sasrec(args, work)
                elif section == "compare":
                    out = bench_compare(args, work, results.get("compare"))
                else:
                    raise SystemExit(f"unknown section {section}")
            out["threads"], out["measured_at"] = args.threads, time.strftime("%Y-%m-%d %H:%M")
            results[section] = out
            RESULTS.parent.mkdir(parents=True, exist_ok=True)
            tmp_json = RESULTS.with_suffix(".json.tmp")
            tmp_json.write_text(json.dumps(results, indent=1, default=float))
            tmp_json.replace(RESULTS)
    if "compare" in results:
        PLOT.parent.mkdir(parents=True, exist_ok=True)
        PLOT.write_text(quality_vs_bytes_svg(results["compare"]))
    for section in render_sections(results, PLOT.relative_to(DOC.parent)):
        write_section(DOC, section)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
