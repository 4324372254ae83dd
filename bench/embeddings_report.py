"""Markdown sections of docs/bench-embeddings.md from bench/results/embeddings.json (bench/embeddings.py)."""
from __future__ import annotations

BUSY = 1.5  # load average per core above which speed figures are not final (slimcart.bench's threshold)


def _load_note(sec: dict, cores: int) -> str:
    before, after = sec.get("load_before", [0])[0], sec.get("load_after", [0])[0]
    busy = max(before, after) / cores > BUSY
    return (f"Load average {before:.2f} before, {after:.2f} after on {cores} cores"
            + (": **NOT FINAL (machine loaded)**." if busy else "."))


def _x(v: dict) -> str:
    return f"{v['median']:.2f} [{v['ci95'][0]:.2f}, {v['ci95'][1]:.2f}]"


def _ci(d: dict, scale: float = 1.0, fmt: str = "+.4f") -> str:
    return f"{d['delta'] * scale:{fmt}} [{d['ci95'][0] * scale:{fmt}}, {d['ci95'][1] * scale:{fmt}}]"


def _kb(n: float) -> str:
    return f"{n / 1e3:,.0f} KB" if n >= 1e4 else f"{n / 1e3:,.1f} KB"


def ctr_section(sec: dict, title: str, cores: int, targets: bool) -> str:
    fp = sec["fp32"]
    lines = [f"## {title}", "",
             f"Data: `{sec['data']['name']}`, {sec['data']['split']} Model `{sec['model']}`; every compressed model built by "
             "`api.build`, saved, reloaded by `api.load` and evaluated through the reloaded copy. ΔAUC: paired bootstrap "
             "(1,000 resamples of " + ("users" if "DIN protocol" in sec["data"]["split"] else "rows") + ", the same for "
             f"both models). `python bench/embeddings.py --sections {'ctr' if targets else 'ipinyou'}`, "
             f"{sec['threads']} thread(s), {sec['measured_at']}. {_load_note(sec, cores)}", "",
             f"fp32: test AUC {fp['test']['auc']:.4f} [{fp['test']['auc_ci95'][0]:.4f}, {fp['test']['auc_ci95'][1]:.4f}], "
             f"logloss {fp['test']['logloss']:.4f}, ECE {fp['test']['ece']:.4f}, predicted/observed CTR "
             f"{fp['test']['calibration']:.3f}; tables {_kb(sec['tables_fp32_bytes'])} fp32.", "",
             "| recipe | tables | x smaller | test ΔAUC [95% CI] | test Δlogloss | test ΔECE | pred/obs CTR | valid ΔAUC | valid Δlogloss | build s |",
             "|---|---:|---:|---|---:|---:|---:|---:|---:|---:|"]
    for name, r in sec["recipes"].items():
        t, v, q = r["delta"]["test"], r["delta"]["valid"], r["quality"]["test"]
        lines.append(f"| `{name}` | {_kb(r['tables_bytes'])} | {r['tables_x']:.2f} | {_ci(q['delta_auc'])} | "
                     f"{t['logloss']:+.4f} | {t['ece']:+.4f} | {q['calibration']:.3f} | {v['auc']:+.4f} | "
                     f"{v['logloss']:+.4f} | {r['build_seconds']:.0f} |")
    lines += ["", "Recovery (`emb-qr`, `emb-mixed-dim`, `emb-tt`): `recover` with method `task`, i.e. the ctr workload's "
              "BCE on 64 labelled batches of 256 training rows. It moves the Platt-calibrated output, hence the "
              "logloss column: those recipes retrain, the others do not.", ""]
    if "ctr-int8" in sec["recipes"]:
        r = sec["recipes"]["ctr-int8"]
        kinds: dict[str, int] = {}
        for k in r["kernels"]:
            k = k.split(": ", 1)[-1]
            kinds[k] = kinds.get(k, 0) + 1
        lines += [f"`ctr-int8`: on disk {r['disk_bytes'] / 1e3:,.0f} KB vs {r['fp32_disk_bytes'] / 1e3:,.0f} KB fp32 "
                  f"(tables int4 + int8 attention/MLP layers); kernels: "
                  + "; ".join(f"{k}" + (f" ({n} tables)" if n > 1 else "") for k, n in kinds.items()) + ".", ""]
    if targets:
        lines += ["How 16x is reached: 16x of fp32 is 8 bytes per 32-value row. Row-wise int2 needs 4 more bytes a row "
                  "for its float16 scale and offset (12 bytes: 10.7x at best), and dropping rows is costly here: DIN's "
                  "rows all carry signal (see the row-wise and QR/hash points under 'Techniques at equal bytes'). "
                  "`emb-pq` stores one 8-bit code per 4 values (product quantization; codebooks fitted by count-weighted "
                  "k-means after an OPQ rotation, faiss), keeps the 7% most frequent item rows int8, and gives the user "
                  "table, which carried little of the AUC on validation, 4-bit codes (16 centroids per 4 values). No "
                  "retraining: the fp32 model's calibration is kept.", ""]
    if "selection_valid" in sec:
        lines += ["Choosing the 16x setting (VALIDATION split only; the test column above was read once, afterwards):", "",
                  "| candidate | x smaller | valid ΔAUC [95% CI] | valid Δlogloss |", "|---|---:|---|---:|"]
        for label, s in sec["selection_valid"].items():
            lines.append(f"| {label} | {s['tables_x']:.2f} | {s['auc']:+.5f} [{s['delta_auc_ci95'][0]:+.5f}, "
                         f"{s['delta_auc_ci95'][1]:+.5f}] | {s['logloss']:+.5f} |")
        lines.append("")
    if "timing" in sec:
        tm = sec["timing"]
        lines += [f"Scoring speed, interleaved with fp32 ({tm['repeats']} rounds; rows/s; ratio = median of per-round "
                  "ratios [bootstrap 95% CI]):", "",
                  f"| model | rows/s batch 1 | x fp32 | rows/s batch {tm['serving_batch']:,} | x fp32 |", "|---|---:|---:|---:|---:|"]
        for name, s in tm["sides"].items():
            lines.append(f"| {name} | {s['batch1_per_s']:,.0f} | {_x(s['x_batch1'])} | {s['serving_per_s']:,.0f} | "
                         f"{_x(s['x_serving'])} |")
        lines.append("")
    if targets and "emb-pq" in sec["recipes"]:
        r = sec["recipes"]["emb-pq"]
        t = r["quality"]["test"]
        ok_q = r["tables_x"] >= 16 and abs(t["delta_auc"]["delta"]) <= 0.001 and abs(r["delta"]["test"]["logloss"]) <= 0.001
        sp = sec.get("timing", {}).get("sides", {}).get("emb-pq")
        ok_s = sp is not None and sp["x_batch1"]["median"] >= 1 and sp["x_serving"]["median"] >= 1
        lines += [f"Target (issue 12): tables >= 16x smaller at |ΔAUC| <= 0.001 and |Δlogloss| <= 0.001 (test): "
                  f"`emb-pq` {r['tables_x']:.2f}x, ΔAUC {t['delta_auc']['delta']:+.5f}, Δlogloss "
                  f"{r['delta']['test']['logloss']:+.5f}: **{'met' if ok_q else 'not met'}**. Throughput not below fp32 at "
                  f"batch 1 and 1,024: " + (f"{sp['x_batch1']['median']:.2f}x and {sp['x_serving']['median']:.2f}x: "
                                            f"**{'met' if ok_s else 'not met'}**" if sp else "not measured")
                  + " (speed figures final only on the idle machine).", ""]
    return "\n".join(lines)


def sasrec_section(sec: dict, cores: int) -> str:
    lines = ["## SASRec on Amazon Video Games", "",
             f"Data: {sec['data']['split']}. Item table {_kb(sec['tables_fp32_bytes'])} fp32 (the position table is "
             "left alone). Fine-tuning = `recover` method `task` (SASRec's sampled-softmax loss), "
             f"{sec['finetune']['steps']} steps at lr {sec['finetune']['lr']:g} on {sec['finetune']['calibration_batches']} "
             "batches of 64 training histories; the control is the fp32 model given exactly that fine-tuning "
             "(bench/pruning.py's recsys control). Intervals: paired bootstrap over the 5,000 users. "
             f"`python bench/embeddings.py --sections sasrec`, {sec['threads']} thread(s), {sec['measured_at']}. "
             f"{_load_note(sec, cores)}", "",
             f"fp32 (as trained): NDCG@10 {sec['fp32']['ndcg@10']:.4f}, HR@10 {sec['fp32']['hr@10']:.4f}.", "",
             "| model | item table | x smaller | NDCG@10 | vs fine-tuned control [95% CI] | vs fp32 as trained [95% CI] |",
             "|---|---:|---:|---:|---|---|"]
    for name, c in sec["candidates"].items():
        vc = c.get("vs_control")
        lines.append(f"| {name} | {_kb(c.get('tables_bytes', sec['tables_fp32_bytes']))} | {c.get('tables_x', 1.0):.2f} | "
                     f"{c['quality']['ndcg@10']:.4f} | "
                     + (f"{vc['rel_change'] * 100:+.2f}% [{vc['ci95'][0] * 100:+.2f}, {vc['ci95'][1] * 100:+.2f}]" if vc else "")
                     + f" | {c['vs_fp32']['rel_change'] * 100:+.2f}% [{c['vs_fp32']['ci95'][0] * 100:+.2f}, "
                       f"{c['vs_fp32']['ci95'][1] * 100:+.2f}] |")
    lines += ["", "Why fine-tune first: the compressed rows are not trainable, so fine-tuning after compression adapts "
              "only the transformer, while the control also trains every float item row; fine-tuning first and "
              "compressing the fine-tuned table leaves the compression's own loss.", ""]
    if "timing" in sec:
        tm = sec["timing"]
        lines += [f"Scoring speed (every item scored), interleaved ({tm['repeats']} rounds; users/s):", "",
                  f"| model | users/s batch 1 | x fp32 | users/s batch {tm['serving_batch']} | x fp32 |", "|---|---:|---:|---:|---:|"]
        for name, s in tm["sides"].items():
            lines.append(f"| {name} | {s['batch1_per_s']:,.0f} | {_x(s['x_batch1'])} | {s['serving_per_s']:,.0f} | "
                         f"{_x(s['x_serving'])} |")
        lines.append("")
    main = sec["candidates"].get("fine-tune -> emb-pq-hot-int4")
    if main:
        vc = main["vs_control"]
        ok = main["tables_x"] >= 8 and vc["rel_change"] >= -0.01
        lines += [f"Target (issue 12): item table >= 8x at <= 1% NDCG@10 loss against the control: "
                  f"{main['tables_x']:.2f}x, {vc['rel_change'] * 100:+.2f}% (interval {vc['ci95'][0] * 100:+.2f}% to "
                  f"{vc['ci95'][1] * 100:+.2f}%, wider than the 1% budget: 5,000 users cannot resolve 1%): "
                  f"**{'met on the point estimate' if ok else 'not met'}**.", ""]
    return "\n".join(lines)


def _when(model_sec: dict) -> str:
    return f", measured {model_sec['measured_at']}" if "measured_at" in model_sec else ""


def compare_section(sec: dict, plot: str, cores: int) -> str:
    lines = ["## Techniques at equal bytes", "",
             f"![quality vs bytes]({plot})", "",
             "Each technique at two or three sizes on both models (TEST split; settings fixed before measuring, "
             "not tuned). Row-wise int, int2-mixed and PQ are not retrained; QR, hashing, mixed dimensions and TT are "
             "followed by a recovery: DIN distils the fp32 model's probabilities over the training split (at most "
             "2,000 steps, best validation AUC kept); SASRec gets the control's fine-tuning again. SASRec: every "
             "point starts from the control (the fp32 model given the fine-tuning) and is compared with it. Quality "
             "only, every training bounded by steps, so the load average does not change these figures. "
             f"`python bench/embeddings.py --sections compare`, {sec.get('threads', 1)} thread(s), "
             f"{sec.get('measured_at', '')}; load average {sec.get('load_before', [0])[0]:.2f} before, "
             f"{sec.get('load_after', [0])[0]:.2f} after.", ""]
    ctr = sec.get("ctr")
    if ctr:
        lines += [f"DIN on Amazon Video Games (both tables){_when(ctr)}:", "",
                  "| technique | setting | tables | x smaller | test ΔAUC [95% CI] | test Δlogloss |", "|---|---|---:|---:|---|---:|"]
        for label, r in sorted(ctr["points"].items(), key=lambda kv: -kv[1]["tables_bytes"]):
            lines.append(f"| {r['family']} | {label} | {_kb(r['tables_bytes'])} | {r['tables_x']:.1f} | {_ci(r['delta_auc'])} | "
                         f"{r['delta_logloss']:+.4f} |")
        lines.append("")
    sas = sec.get("sasrec")
    if sas:
        c = sas["points"].get("control")
        lines += ["SASRec on Amazon Video Games (item table), NDCG@10 against the fine-tuned fp32 control"
                  + (f" (control {c['quality']['ndcg@10']:.4f}, {c['vs_fp32']['rel_change'] * 100:+.2f}% vs fp32 as trained)"
                     if c else "") + f"{_when(sas)}:", "",
                  "| technique | setting | item table | x smaller | NDCG@10 | vs control [95% CI] |", "|---|---|---:|---:|---:|---|"]
        for label, r in sorted(((k, v) for k, v in sas["points"].items() if "family" in v), key=lambda kv: -kv[1]["tables_bytes"]):
            v = r["vs_control"]
            lines.append(f"| {r['family']} | {label} | {_kb(r['tables_bytes'])} | {r['tables_x']:.1f} | "
                         f"{r['quality']['ndcg@10']:.4f} | {v['rel_change'] * 100:+.2f}% [{v['ci95'][0] * 100:+.2f}, "
                         f"{v['ci95'][1] * 100:+.2f}] |")
        lines.append("")
    return "\n".join(lines)


def render_sections(results: dict, plot) -> list[str]:
    cores = 2
    env = results.get("environment", {})
    cores = int(env.get("logical_cpus") or env.get("cpus") or cores)
    out = []
    if "ctr" in results:
        out.append(ctr_section(results["ctr"], "CTR: DIN on Amazon Video Games (DIN protocol)", cores, True))
    if "ipinyou" in results:
        out.append(ctr_section(results["ipinyou"], "CTR: DIN on iPinYou", cores, False))
    if "sasrec" in results:
        out.append(sasrec_section(results["sasrec"], cores))
    if "compare" in results:
        out.append(compare_section(results["compare"], str(plot), cores))
    return out
