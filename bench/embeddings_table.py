"""Benchmark: embedding-table compression at table scale (SYNTHETIC table; only speed and bytes are read).

A 10M x 64 float32 table (seeded Gaussian rows) and each compressed form of it, looked up with
Zipf-distributed ids (rank r drawn with probability ~ 1/r^s from a truncated Zipf law, ranks scattered
over the ids by a seeded permutation so hot rows are not neighbours). Training-set frequencies for the
frequency-aware forms are counts of a separate draw of `--train-draws` ids; the timed ids are a third,
independent draw. Per form:
    bytes per row       every tensor the form holds, / rows
    lookups/s           batch 1 (one id per call) and batch 4,096 ids, timed interleaved with the fp32
                        nn.Embedding in the same run (slimcart.bench.measure_interleaved: every round
                        times every form back to back, in alternating order); x fp32 = median of per-round ratios
    peak RSS            of a fresh process that loads the saved form and runs the same lookups
Forms built by random initialisation (QR, hash, TT) are there for speed and bytes only: their values
need retraining (see docs/embeddings-at-scale.md).

    python bench/embeddings_table.py [--rows 10000000] [--dim 64] [--threads 1] [--forms fp32,int4,...]

Writes bench/results/embeddings_table.json and the "Table scale" section of docs/bench-embeddings.md,
with the load average before and after; a run on a loaded machine is marked not final.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from slimcart.bench import environment, measure_interleaved, paired_ratio, set_threads
from slimcart.compress.embeddings import (
    compress_embeddings_,
    load_table,
    parse_embedding_config,
)
from slimcart.contracts import BenchInputs
from slimcart.rss_probe import peak_rss_self

# Each form is one technique config (see slimcart/compress/embeddings/config.py).
FORMS = {
    "int8": {"method": "rowwise", "bits": 8},
    "int4": {"method": "rowwise", "bits": 4},
    "int2": {"method": "rowwise", "bits": 2},
    "int4+1%fp32": {"method": "mixed_precision", "tail_bits": 4, "tiers": [{"bits": 32, "fraction": 0.01}]},
    "int2+10%int8+1%fp32": {"method": "mixed_precision", "tail_bits": 2,
                            "tiers": [{"bits": 32, "fraction": 0.01}, {"bits": 8, "fraction": 0.10}]},
    "qr-mult-c4": {"method": "qr", "collisions": 4, "operation": "mult", "init": "random"},
    "hash-25%": {"method": "hash", "ratio": 0.25, "init": "random"},
    "mixed-dim-64/16/4": {"method": "mixed_dim", "blocks": [{"fraction": 0.01}, {"fraction": 0.09, "dim": 16},
                                                            {"fraction": 0.90, "dim": 4}]},
    "tt-r16": {"method": "tt", "rank": 16, "cores": 3, "init": "random"},
    "prune-unseen": {"method": "prune_rows", "min_count": 1, "bits": 32},
    "prune-unseen-int4": {"method": "prune_rows", "min_count": 1, "bits": 4},
}
SCORE_FORMS = {
    "int8 tiled": {"method": "rowwise", "bits": 8, "score_kernel": "tiled"},
    "int8 int_mm": {"method": "rowwise", "bits": 8, "score_kernel": "int_mm"},
    "int4 tiled": {"method": "rowwise", "bits": 4, "score_kernel": "tiled"},
    "int4 int_mm": {"method": "rowwise", "bits": 4, "score_kernel": "int_mm"},
    "int2 int_mm": {"method": "rowwise", "bits": 2, "score_kernel": "int_mm"},
    "pq 8-bit / 4 values (ADC)": {"method": "pq", "subvector_dim": 4, "code_bits": 8, "rotate": False, "weighting": "none"},
}
LOADED = 0.5  # 1-minute load average (beyond this run's own threads) above which a run is not final


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')} load {os.getloadavg()[0]:.1f}] {msg}", flush=True)


def synthetic_table(rows: int, dim: int, seed: int) -> torch.Tensor:
    """Seeded Gaussian rows (std 0.1), written chunk by chunk into one tensor."""
    w = torch.empty(rows, dim)
    g = torch.Generator().manual_seed(seed)
    for s in range(0, rows, 1 << 20):
        w[s: s + (1 << 20)].normal_(0, 0.1, generator=g)
    return w


class Zipf:
    """Truncated Zipf over N ids: P(rank r) ~ r^-s, ranks mapped to ids by a seeded permutation."""

    def __init__(self, n: int, s: float, seed: int):
        p = np.arange(1, n + 1, dtype=np.float64) ** -s
        self.cdf = np.cumsum(p / p.sum())
        self.perm = np.random.default_rng(seed).permutation(n)

    def draw(self, k: int, seed: int) -> np.ndarray:
        u = np.random.default_rng(seed).random(k)
        ranks = np.minimum(np.searchsorted(self.cdf, u), len(self.cdf) - 1)
        return self.perm[ranks]


def build(form: str, w: torch.Tensor, counts: np.ndarray):
    """(module, seconds to build) for a form of the table."""
    if form == "fp32":
        return torch.nn.Embedding.from_pretrained(w, freeze=True), 0.0  # shares w's storage
    return build_with(FORMS[form], w, counts)


def scoring(args) -> dict:
    """h E^T against every row of a SASRec-sized table (synthetic), per scoring kernel, interleaved with
    float32 `h @ W.T`; the error column is each kernel's max |score - exact score of its own dequantized
    rows| / max |exact score| (kernel rounding only, not quantization)."""
    w = synthetic_table(args.score_rows, args.dim, args.seed + 7)
    g = torch.Generator().manual_seed(args.seed + 8)
    users = [torch.randn(1, args.dim, generator=g) for _ in range(64)]
    batches = [torch.randn(256, args.dim, generator=g) for _ in range(4)]
    sides, out = {"fp32": lambda h: h @ w.t()}, {"fp32": {"bytes_per_row": 4.0 * args.dim, "rel_error": 0.0}}
    for name, tech in SCORE_FORMS.items():
        mod, _ = build_with(tech, w)
        with torch.no_grad():
            exact = batches[0] @ mod.dequantize().t()
            err = float((mod.scores(batches[0]) - exact).abs().max() / exact.abs().max())
        sides[name] = mod.scores
        out[name] = {"bytes_per_row": mod.nbytes() / args.score_rows, "rel_error": err}
    inputs = BenchInputs(single=users, serving=batches, items_per_serving_batch=256, unit="users",
                         extra={"batch1": (users, 1)})
    with torch.inference_mode():
        timing = measure_interleaved(sides, inputs, repeats=args.repeats, latency_samples=16, progress=log)
    for name, t in timing.items():
        s = t.summary()
        out[name].update({"users_per_s_batch1": s["extra_throughput_per_s"]["batch1"],
                          "users_per_s_batch256": s["throughput_per_s"],
                          "x_fp32_batch1": paired_ratio(t.extra_per_s["batch1"], timing["fp32"].extra_per_s["batch1"]),
                          "x_fp32_batch256": paired_ratio(t.throughput_per_s, timing["fp32"].throughput_per_s)})
    return {"rows": args.score_rows, "dim": args.dim, "synthetic": True, "forms": out}


def build_with(tech: dict, w: torch.Tensor, counts=None):
    holder = torch.nn.Module()
    holder.table = torch.nn.Embedding.from_pretrained(w, freeze=True)
    t0 = time.perf_counter()
    compress_embeddings_(holder, parse_embedding_config({"tables": ["table"], "technique": tech}),
                         None if counts is None else {"table": counts})
    return holder.table, time.perf_counter() - t0


def child(args) -> int:
    """Fresh process: load one form (or regenerate the fp32 table), run the timed lookups, print peak RSS."""
    set_threads(args.threads)
    ids = torch.from_numpy(np.load(args.ids, allow_pickle=False))
    base = peak_rss_self()
    if args.rss_child == "fp32":
        w = synthetic_table(args.rows, args.dim, args.seed)
        table = torch.nn.Embedding.from_pretrained(w, freeze=True)
    else:
        from safetensors.torch import load_file

        folder = Path(args.rss_child)
        meta = json.loads((folder / "table.json").read_text())
        table = load_table(load_file(str(folder / "table.safetensors")), meta)
        # Quantized rows stay memory-mapped after loading; read one byte per page of every tensor so
        # the whole form is resident, as the fp32 table is (a serving process cannot page-fault on hot paths).
        for t in table.state_for_save()[0].values():
            t.reshape(-1).view(torch.uint8)[::4096].sum()
    with torch.inference_mode():
        for s in range(0, len(ids), 4096):
            table(ids[s: s + 4096])
    print(json.dumps({"peak_rss_bytes": peak_rss_self(), "rss_before_table_bytes": base}))
    return 0


def peak_rss(form_dir: str, ids_file: Path, args) -> dict:
    cmd = [sys.executable, str(Path(__file__).resolve()), "--rss-child", form_dir, "--ids", str(ids_file),
           "--rows", str(args.rows), "--dim", str(args.dim), "--seed", str(args.seed), "--threads", str(args.threads)]
    out = subprocess.run(cmd, capture_output=True, text=True, check=True, cwd=str(ROOT))
    return json.loads(out.stdout.strip().splitlines()[-1])


def markdown(result: dict) -> str:
    r, t = result, result["table"]
    gb = lambda b: f"{b / 1e9:.2f} GB" if b >= 1e8 else f"{b / 1e6:.0f} MB"
    lines = [
        "## Table scale",
        "",
        f"SYNTHETIC table: {t['rows']:,} rows x {t['dim']} float32 ({gb(t['rows'] * t['dim'] * 4)}), Gaussian rows; "
        f"lookups Zipf(s={t['zipf_s']}) over a random permutation of the ids; training counts from "
        f"{t['train_draws']:,} separate draws ({t['seen_rows']:,} rows seen). Only speed and bytes are read from it.",
        f"Command: `{r['command']}`; {r['environment']['threads']} thread(s), {r['environment']['cpu']}; "
        f"{r['repeats']} interleaved rounds. Load average {r['loadavg_before'][0]:.2f} before, "
        f"{r['loadavg_after'][0]:.2f} after (this run's own {r['environment']['threads']} thread(s) included): **{'final' if r['final'] else 'NOT FINAL (machine loaded)'}**.",
        "",
        "| form | bytes/row | of fp32 | lookups/s, batch 1 | x fp32 | lookups/s, batch 4,096 | x fp32 | peak RSS | build s |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for name, f in r["forms"].items():
        rss = gb(f["peak_rss_bytes"]) if f.get("peak_rss_bytes") else "-"
        lines.append(
            f"| {name} | {f['bytes_per_row']:.1f} | {100 * f['fraction_of_fp32']:.1f}% | {f['lookups_per_s_batch1']:,.0f} | "
            f"{f['x_fp32_batch1']:.2f} | {f['lookups_per_s_batch4096']:,.0f} | {f['x_fp32_batch4096']:.2f} | {rss} | "
            f"{f['build_s']:.1f} |")
    tgt = r.get("target")
    if tgt:
        lines += ["", f"Target (issue 12): int4 row-wise at >= 0.9x fp32 lookups/s and <= 15% of its bytes. Measured: "
                  f"{tgt['x_fp32_batch4096']:.2f}x at batch 4,096, {tgt['x_fp32_batch1']:.2f}x at batch 1, "
                  f"{100 * tgt['fraction_of_fp32']:.1f}% of the bytes: **{'met' if tgt['met'] else 'not met'}**."]
    lines += ["", "Peak RSS: a fresh process that loads the saved form (the fp32 row: regenerates the table) and "
              f"runs the timed lookups; a bare process with torch imported peaks at {gb(r['rss_empty_bytes'])}.",
              "QR, hash and TT forms are randomly initialised (their values need retraining); mixed-dim projections "
              "come from the table's SVD. Bag mode and quality are not measured here; scoring is in the next section.", ""]
    return "\n".join(lines)


def scoring_markdown(result: dict) -> str:
    sc = result["scoring"]
    lines = [
        "## Scoring against all rows",
        "",
        f"SYNTHETIC table of {sc['rows']:,} rows x {sc['dim']} (a SASRec item table's shape): h E^T for every row, "
        "per scoring kernel, timed interleaved with float32 `h @ W.T` in the same run (same load note as above). "
        "Error: max |score - exact score of the kernel's own dequantized rows| / max |exact score| "
        "(kernel rounding only; quantization error is not in it).",
        "",
        "| kernel | bytes/row (incl. scoring copy) | users/s, batch 1 | x fp32 | users/s, batch 256 | x fp32 | error |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    for name, f in sc["forms"].items():
        lines.append(f"| {name} | {f['bytes_per_row']:.1f} | {f['users_per_s_batch1']:,.0f} | {f['x_fp32_batch1']:.2f} | "
                     f"{f['users_per_s_batch256']:,.0f} | {f['x_fp32_batch256']:.2f} | {f['rel_error']:.1e} |")
    return "\n".join(lines + [""])


def write_section(doc: Path, section: str) -> None:
    """Replace the section with the same "## " heading in the doc (or add it), leaving others alone."""
    text = doc.read_text() if doc.exists() else "# Embedding-table compression: measured results\n\n"
    start = text.find(section.splitlines()[0])
    section = section.rstrip("\n") + "\n\n"  # a blank line before the next heading
    if start >= 0:
        end = text.find("\n## ", start + 1)
        text = text[:start] + section + (text[end + 1:] if end >= 0 else "")
    else:
        text = text.rstrip("\n") + "\n\n" + section.rstrip("\n") + "\n"
    tmp = doc.with_suffix(".md.tmp")
    tmp.write_text(text)
    tmp.replace(doc)


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rows", type=int, default=10_000_000)
    ap.add_argument("--dim", type=int, default=64)
    ap.add_argument("--zipf", type=float, default=1.05)
    ap.add_argument("--train-draws", type=int, default=20_000_000)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--forms", default=",".join(["fp32", *FORMS]))
    ap.add_argument("--no-rss", action="store_true")
    ap.add_argument("--score-rows", type=int, default=50_000)
    ap.add_argument("--no-scoring", action="store_true")
    ap.add_argument("--out", default=str(ROOT / "bench" / "results" / "embeddings_table.json"))
    ap.add_argument("--doc", default=str(ROOT / "docs" / "bench-embeddings.md"))
    ap.add_argument("--rss-child")
    ap.add_argument("--ids")
    args = ap.parse_args()
    if args.rss_child:
        return child(args)
    forms = [f for f in args.forms.split(",") if f]
    unknown = [f for f in forms if f != "fp32" and f not in FORMS]
    if unknown or "fp32" not in forms:
        sys.exit(f"unknown forms {unknown} (known: fp32, {', '.join(FORMS)}); fp32 is the baseline and required")
    set_threads(args.threads)
    load_before = os.getloadavg()
    log(f"synthetic table {args.rows:,} x {args.dim}")
    w = synthetic_table(args.rows, args.dim, args.seed)
    zipf = Zipf(args.rows, args.zipf, args.seed + 1)
    counts = np.bincount(zipf.draw(args.train_draws, args.seed + 2), minlength=args.rows).astype(np.float64)
    timed = zipf.draw(4096 * 16 + 4000, args.seed + 3)
    serving = [torch.from_numpy(timed[i * 4096:(i + 1) * 4096].copy()) for i in range(16)]
    singles = [torch.from_numpy(timed[65536 + i: 65537 + i].copy()) for i in range(4000)]
    inputs = BenchInputs(single=singles[:64], serving=serving, items_per_serving_batch=4096, unit="lookups",
                         extra={"batch1": (singles, 1)})
    modules, results = {}, {}
    with tempfile.TemporaryDirectory(prefix="slimcart-emb-bench-") as tmp:
        ids_file = Path(tmp) / "ids.npy"
        np.save(ids_file, np.concatenate([timed[:65536]]), allow_pickle=False)
        for form in forms:
            log(f"build {form}")
            mod, secs = build(form, w, counts)
            modules[form] = mod
            nb = args.rows * args.dim * 4 if form == "fp32" else mod.nbytes()
            results[form] = {"config": FORMS.get(form, {"method": "none (nn.Embedding)"}), "bytes": nb,
                             "bytes_per_row": nb / args.rows, "fraction_of_fp32": nb / (args.rows * args.dim * 4),
                             "build_s": secs}
            if form != "fp32" and not args.no_rss:
                from safetensors.torch import save_file

                d = Path(tmp) / form.replace("%", "pct").replace("/", "-")
                d.mkdir()
                tensors, meta = mod.state_for_save()
                save_file({k: v.contiguous() for k, v in tensors.items()}, str(d / "table.safetensors"))
                (d / "table.json").write_text(json.dumps(meta))
                results[form]["saved_bytes"] = mod.saved_nbytes()
                results[form]["rss_dir"] = str(d)
        log(f"timing {len(forms)} forms, {args.repeats} interleaved rounds")
        with torch.inference_mode():
            timing = measure_interleaved({f: modules[f] for f in forms}, inputs, repeats=args.repeats,
                                         latency_samples=64, progress=log)
        base = timing["fp32"]
        for form in forms:
            t = timing[form]
            s = t.summary()
            results[form].update({
                "lookups_per_s_batch4096": s["throughput_per_s"],
                "lookups_per_s_batch1": s["extra_throughput_per_s"]["batch1"],
                "x_fp32_batch4096": paired_ratio(t.throughput_per_s, base.throughput_per_s),
                "x_fp32_batch1": paired_ratio(t.extra_per_s["batch1"], base.extra_per_s["batch1"]),
                "latency_ms_batch1": s["latency_ms"],
            })
        del modules
        rss_empty = None
        if not args.no_rss:
            log("peak RSS per form, each in a fresh process")
            rss_empty = None
            for form in forms:
                rd = "fp32" if form == "fp32" else results[form].pop("rss_dir")
                r = peak_rss(rd, ids_file, args)
                results[form]["peak_rss_bytes"] = r["peak_rss_bytes"]
                rss_empty = r["rss_before_table_bytes"] if rss_empty is None else min(rss_empty, r["rss_before_table_bytes"])
                log(f"  {form}: {r['peak_rss_bytes'] / 1e9:.2f} GB")
    del w
    score = None
    if not args.no_scoring:
        log(f"scoring section: {args.score_rows:,} rows")
        score = scoring(args)
    load_after = os.getloadavg()
    # the run itself keeps `threads` CPUs busy for minutes, so the load after counts them: judge the rest
    final = load_before[0] <= LOADED and load_after[0] - args.threads <= LOADED
    out = {
        "benchmark": "embeddings_table", "synthetic": True,
        "command": "python bench/embeddings_table.py " + " ".join(sys.argv[1:]),
        "table": {"rows": args.rows, "dim": args.dim, "dtype": "float32", "init": "gaussian std 0.1", "seed": args.seed,
                  "zipf_s": args.zipf, "train_draws": args.train_draws, "seen_rows": int((counts > 0).sum()),
                  "timed_ids": {"batch4096": 16 * 4096, "batch1": len(singles)}},
        "environment": environment(args.threads), "repeats": args.repeats,
        "loadavg_before": list(load_before), "loadavg_after": list(load_after), "final": final,
        "rss_empty_bytes": rss_empty or 0, "forms": results,
    }
    if score is not None:
        out["scoring"] = score
    if "int4" in results:
        f = results["int4"]
        out["target"] = {"x_fp32_batch4096": f["x_fp32_batch4096"], "x_fp32_batch1": f["x_fp32_batch1"],
                         "fraction_of_fp32": f["fraction_of_fp32"],
                         "met": min(f["x_fp32_batch4096"], f["x_fp32_batch1"]) >= 0.9 and f["fraction_of_fp32"] <= 0.15}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    tmp_out = Path(args.out).with_suffix(".json.tmp")
    tmp_out.write_text(json.dumps(out, indent=2))
    tmp_out.replace(args.out)
    if not args.no_rss:
        write_section(Path(args.doc), markdown(out))
    if score is not None:
        write_section(Path(args.doc), scoring_markdown(out))
    log(f"wrote {args.out}" + ("" if args.no_rss else f" and {args.doc}"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
