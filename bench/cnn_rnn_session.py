"""The session (RNN) section of bench/cnn_rnn.py: GRU4Rec (trained by `slimcart train --workload session`)
on Diginetica. Quality: HR@20 and MRR@20 over ALL items on every one of the 60,858 TEST prefixes; each
recipe's change relative to fp32 with a 95% paired bootstrap interval over test rows
(`slimcart.bench.paired_bootstrap` on per-row hit indicators / reciprocal ranks). Every recipe is built
through `slimcart.api.build` (the path `slimcart compress` takes), saved with `ModelState.save`, loaded back
with `slimcart.api.load`, and only the reloaded copy is evaluated and timed. Bytes: weight files on disk
(`outputs.model_bytes`), the fp32 side its own checkpoint folder. Speed: every model in ONE interleaved
run (`slimcart.bench.measure_interleaved`): single-prefix latency and scoring throughput on batches of 256
test prefixes (every item scored), ratios = median of per-round ratios to fp32 with a bootstrap interval
over rounds. Distillation steps keep resumable checkpoints under $SLIMCART_HOME/distill: point
SLIMCART_HOME at an empty folder (and pass --session-model) for a run that must retrain."""
from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from slimcart import api, outputs  # noqa: E402
from slimcart.bench import (  # noqa: E402
    measure_interleaved,
    paired_bootstrap,
    ratio_stats,
    reliability,
)
from slimcart.recipe import load_recipe  # noqa: E402
from slimcart.workloads import get_workload  # noqa: E402
from slimcart.workloads.ranking import reciprocal_ranks  # noqa: E402

SESSION_RECIPES = ["gru-int8", "gru-emb-int4-int8", "gru-emb-mixed-int8", "gru-prune-units", "gru-distill-half",
                   "gru-distill-half-int8"]  # the last reuses gru-distill-half's student (api.PrefixCache)
TARGET = {"size_ratio": 4.0, "hr_rel_loss": 0.01}  # issue 15: >= 4x smaller at <= 1% relative HR@20 loss
LOADED = 1.25  # load average per CPU above which speed figures are not final (a 2-thread run on 2 CPUs shows ~1 by itself)


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')} load {os.getloadavg()[0]:.1f}] {msg}", flush=True)


# ---------------------------------------------------------------- session
def table_ram_bytes(table) -> int:
    """Bytes the loaded item table holds in memory: a compressed table's own count (stored rows plus any
    scoring copy it derives at load), else the float weight."""
    return int(table.nbytes()) if hasattr(table, "nbytes") else table.weight.numel() * table.weight.element_size()


def bench_session(args, work: Path) -> dict:
    """args: data, threads, repeats, session_model (alias or folder), session_recipes (comma-separated)."""
    args = argparse.Namespace(**{**vars(args), "model": args.session_model,
                                 "recipes": [r for r in args.session_recipes.split(",") if r]})
    wl = get_workload("session")
    data = wl.load_data(args.data)
    bundle = wl.load_model(args.model)
    base_runner, base_bundle = api.load(wl, bundle.source, args.threads)  # the fp32 side, read from its folder
    t0 = time.time()
    base = wl.evaluate(base_runner, base_bundle, data)
    log(f"fp32 (test) {base.quality} in {time.time() - t0:.0f}s")
    base_hits, base_rr = (base.outputs["ranks"] < 20).astype(float), reciprocal_ranks(base.outputs["ranks"], 20)
    base_bytes = outputs.model_bytes(bundle.source)
    res = {"data": wl.data_info(data).as_dict(), "model": str(bundle.source),
           "training": {k: v for k, v in bundle.extra["config"].get("training", {}).items() if k != "history"},
           "fp32": {"quality": base.quality, "bytes": base_bytes, "eval_seconds": round(time.time() - t0),
                    "item_table_ram_bytes": table_ram_bytes(base_bundle.module.item_emb)},
           "recipes": {}}
    sides, cache = {"fp32": base_runner}, api.PrefixCache()
    for name in args.recipes:
        rec = load_recipe(name)
        t0 = time.time()
        built = api.build(wl, args.model, rec, threads=args.threads, workdir=work / f"build-{name}", progress=log,
                          loaded=(bundle, data), cache=cache)
        build_s = time.time() - t0
        folder = work / name
        built.state.save(folder, wl)
        runner, rb = api.load(wl, folder, args.threads)  # only the reloaded copy is measured
        t0 = time.time()
        ev = wl.evaluate(runner, rb, data)
        ranks = ev.outputs["ranks"]
        size = outputs.model_bytes(folder)
        r = {"quality": ev.quality, "bytes": size, "size_ratio": base_bytes / size,
             "hr@20_rel": paired_bootstrap((ranks < 20).astype(float), base_hits),
             "mrr@20_rel": paired_bootstrap(reciprocal_ranks(ranks, 20), base_rr),
             "build_seconds": round(build_s), "eval_seconds": round(time.time() - t0),
             "format": built.state.artifact.describe() if built.state.artifact else "workload folder",
             "item_table_ram_bytes": table_ram_bytes(rb.module.item_emb),
             "kernels": built.state.kernels, "size_only": built.state.size_only, "notes": built.state.notes,
             "steps": [s.model_dump(mode="json") for s in rec.steps]}
        res["recipes"][name] = r
        sides[name] = runner
        log(f"{name} (reloaded, test) {ev.quality} HR@20 {r['hr@20_rel']} size x{r['size_ratio']:.2f}")
    inputs = wl.bench_inputs(base_bundle, data)
    load_before = os.getloadavg()
    timing = measure_interleaved(sides, inputs, repeats=args.repeats, progress=log)
    load_after = os.getloadavg()
    res["timing"] = {"load_before": load_before, "load_after": load_after, "repeats": args.repeats,
                     "serving_batch": inputs.items_per_serving_batch, "unit": inputs.unit, "sides": {}}
    ratios = {}
    for name, t in timing.items():
        s = t.summary()
        if name != "fp32":
            ratios[name] = ratio_stats(t.throughput_per_s, timing["fp32"].throughput_per_s)
            s["throughput_vs_fp32"] = ratios[name]
            s["latency_p50_vs_fp32"] = s["latency_ms"]["p50"] / timing["fp32"].summary()["latency_ms"]["p50"]
        res["timing"]["sides"][name] = s
    res["timing"]["reliability"] = reliability(load_before[0], load_after[0], os.cpu_count() or 1, ratios, args.threads)
    for name, r in res["recipes"].items():
        thr = ratios[name]["median"]
        r["meets_target"] = {"size": r["size_ratio"] >= TARGET["size_ratio"],
                             "hr@20": r["hr@20_rel"]["ci95"][0] >= -TARGET["hr_rel_loss"], "throughput": thr >= 1.0}
    return res


def session_markdown(res: dict, env: dict) -> str:
    t = res["timing"]
    loaded = max(t["load_before"][0], t["load_after"][0]) > LOADED * env["logical_cpus"]
    lines = [
        f"Model: `{res['model']}` ({res['training'].get('epochs', res['training'].get('epoch', '?'))} epochs, best "
        f"{res['training'].get('best_epoch', '?')}). Data: {res['data']['name']}, {res['data']['split']}.",
        "",
        f"fp32 on test: HR@20 **{res['fp32']['quality']['hr@20']:.4f}**, MRR@20 **{res['fp32']['quality']['mrr@20']:.4f}**, "
        f"{res['fp32']['bytes'] / 1e6:.2f} MB on disk (item table {res['fp32']['item_table_ram_bytes'] / 1e6:.2f} MB in RAM).",
        "",
        "| recipe | HR@20 | HR@20 vs fp32 (95% paired CI) | MRR@20 vs fp32 (95% CI) | MB on disk | smaller | "
        "item table in RAM, MB | throughput vs fp32 | p50 latency vs fp32 | format / kernels |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    sides = t["sides"]
    for name, r in res["recipes"].items():
        h, m, thr = r["hr@20_rel"], r["mrr@20_rel"], sides[name]["throughput_vs_fp32"]
        ram = r["item_table_ram_bytes"]
        lines.append(
            f"| `{name}` | {r['quality']['hr@20']:.4f} | {h['rel_change']:+.2%} [{h['ci95'][0]:+.2%}, {h['ci95'][1]:+.2%}] | "
            f"{m['rel_change']:+.2%} [{m['ci95'][0]:+.2%}, {m['ci95'][1]:+.2%}] | {r['bytes'] / 1e6:.2f} | "
            f"{r['size_ratio']:.2f}x | {ram / 1e6:.2f} | {thr['median']:.2f}x [{thr['ci95'][0]:.2f}, {thr['ci95'][1]:.2f}] | "
            f"{sides[name]['latency_p50_vs_fp32']:.2f}x | {r['format']}; {'; '.join(r['kernels']) or 'fp32 kernels'} |")
    fp = sides["fp32"]
    lines += [
        "",
        f"fp32: {fp['throughput_per_s']:.0f} {t['unit']}/s at batch {t['serving_batch']} (every item scored), "
        f"p50 latency {fp['latency_ms']['p50']:.2f} ms for one prefix; {t['repeats']} interleaved rounds, "
        f"{env['threads']} thread(s), load average {t['load_before'][0]:.1f} before / {t['load_after'][0]:.1f} after "
        f"on {env['logical_cpus']} CPUs.",
        "",
        "Target (issue 15): >= 4x smaller at <= 1% relative HR@20 loss (lower end of the paired interval), "
        "throughput not below fp32: " + "; ".join(
            f"`{n}` " + ("meets it" if all(r["meets_target"].values()) else
                         "misses " + ", ".join(k for k, ok in r["meets_target"].items() if not ok))
            for n, r in res["recipes"].items()) + ".",
    ]
    if loaded or not t["reliability"]["reliable"]:
        lines += ["", "**Not final: " + "; ".join(t["reliability"]["reasons"] or ["the machine was loaded"]) +
                  ". Rerun it on an idle machine.**"]
    for name, r in res["recipes"].items():
        lines += ["", f"`{name}` build notes: " + " / ".join(r["notes"])]
    return "\n".join(lines)
