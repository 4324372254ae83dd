"""report.md: the before/after table, with what ran on which kernel and any caveats, and how to load
the result with the user's own stack."""
from __future__ import annotations

import json
from pathlib import Path

GUARD_LIMIT, PRIMARY_CLAIM = 0.015, 0.005  # a guard loss above 1.5% beside a primary loss within 0.5% is flagged
SLIMCART_ONLY = "runner, bundle = load(\"{wl}\", \"path/to/OUT/model\")  # runner(batch) -> outputs"
POOLING_NOTE = ("# last_hidden_state -> embedding: pool as 1_Pooling/config.json says (mean over attention_mask),\n"
                "# then L2-normalise when modules.json lists Normalize")


def fmt_bytes(n: int | None) -> str:
    if n is None:
        return "n/a"
    for unit in ("B", "KB", "MB", "GB"):
        if abs(n) < 1000 or unit == "GB":
            return f"{n:.1f} {unit}" if unit != "B" else f"{n} B"
        n /= 1000
    return str(n)


def comparison_rows(m: dict, higher_is_better: dict[str, bool]) -> list[tuple[str, str, str, str]]:
    """(metric, baseline, compressed, change) rows shared by the report and the CLI table. A metric the
    workload gives no direction (absent from `higher_is_better`, e.g. CTR's predicted/observed ratio,
    best at 1.0) gets its plain difference, said to be neither better nor worse."""
    b, c = m["baseline"], m["compressed"]
    rows = []
    for k, bv in b["quality"].items():
        cv = c["quality"].get(k)
        if cv is None:
            change = ""
        elif k not in higher_is_better:
            change = f"{cv - bv:+.4f} (no better direction)"
        else:
            change = f"{(cv - bv) / abs(bv) * 100:+.2f}%" if bv else ""
        rows.append((k, f"{bv:.4f}", f"{cv:.4f}" if cv is not None else "n/a", change))
    rows.append(("size on disk", fmt_bytes(b["size_bytes"]), fmt_bytes(c["size_bytes"]), f"{m['ratios']['size']:.2f}x"))
    rows.append(("latency p50 (batch 1)", f"{b['latency_ms']['p50']:.2f} ms", f"{c['latency_ms']['p50']:.2f} ms",
                 f"{m['ratios']['latency_p50']:.2f}x"))
    rows.append(("latency p99 (batch 1)", f"{b['latency_ms']['p99']:.2f} ms", f"{c['latency_ms']['p99']:.2f} ms", ""))
    bench = m.get("bench", {})
    unit, label = bench.get("unit", "items"), bench.get("throughput_label") or f"batch {bench.get('serving_batch', '')}"
    ci = m.get("ratio_detail", {}).get("throughput", {}).get("ci95")
    rows.append((f"throughput ({unit}/s, {label})", f"{b['throughput_per_s']:.1f}", f"{c['throughput_per_s']:.1f}",
                 f"{m['ratios']['throughput']:.2f}x" + (f" (95% CI {ci[0]:.2f}-{ci[1]:.2f}x)" if ci else "")))
    if b.get("cpu_ms_per_item") is not None and c.get("cpu_ms_per_item") is not None:
        rows.append((f"CPU time per item ({label})", f"{b['cpu_ms_per_item']:.2f} ms", f"{c['cpu_ms_per_item']:.2f} ms",
                     f"{c['cpu_ms_per_item'] / b['cpu_ms_per_item']:.2f}x"))
    same = m.get("baseline_same_runtime")
    if same:
        rows.append((f"uncompressed on {same['runtime']} ({unit}/s)", "", f"{same['throughput_per_s']:.1f}",
                     f"runtime alone {m['ratios']['runtime_gain']:.2f}x, compression on top "
                     f"{m['ratios']['compression_gain']:.2f}x"))
    for k, bv in b.get("extra_throughput_per_s", {}).items():
        cv = c.get("extra_throughput_per_s", {}).get(k, float("nan"))
        rows.append((f"{k}/s", f"{bv:.1f}", f"{cv:.1f}", f"{cv / bv:.2f}x" if bv else ""))
    rows.append(("peak RSS", fmt_bytes(b["peak_rss_bytes"]), fmt_bytes(c["peak_rss_bytes"]), ""))
    return rows


def guard_warning(m: dict, primary: str = "ndcg@10") -> str | None:
    """One loud line when the guard task lost much more than the primary metric suggests."""
    b, c = m["baseline"]["quality"], m["compressed"]["quality"]
    guard = [k for k in b if k.startswith("guard_") and k in c and b[k]]
    if not guard or primary not in c or not b.get(primary):
        return None
    worst = min(guard, key=lambda k: c[k] / b[k])
    g_loss, p_loss = 1 - c[worst] / b[worst], 1 - c[primary] / b[primary]
    if g_loss > GUARD_LIMIT and p_loss <= PRIMARY_CLAIM:
        return (f"**Guard task:** {worst} fell {g_loss:.1%} while {primary} fell only {p_loss:.1%}: the compressed "
                "model lost quality outside the evaluation domain (held-out PriceRunner product matching).")
    return None


def how_to_load(workload: str, model_dir: Path) -> list[str]:
    """A snippet that loads the saved model with the standard loader of its format (slimcart.load for
    formats no stock loader can hold)."""
    meta_file = Path(model_dir) / "slimcart-format.json"
    meta = json.loads(meta_file.read_text()) if meta_file.is_file() else {}
    fmt, lines = meta.get("format"), ["## How to load", ""]
    if workload == "search" and fmt is None:
        return lines + ["A sentence-transformers folder (also a stock Hugging Face folder: `AutoModel.from_pretrained`):", "",
                        "```python", "from sentence_transformers import SentenceTransformer",
                        "model = SentenceTransformer(\"path/to/OUT/model\")",
                        "emb = model.encode([\"red running shoes\"])", "```", ""]
    if fmt == "onnx":
        graph = meta.get("model", "model.onnx")
        ort_only = meta.get("runs_on") == ["onnxruntime"]
        lines += ["```python", "import onnxruntime as ort",
                  f"session = ort.InferenceSession(\"path/to/OUT/model/{graph}\")",
                  "outputs = session.run(None, tokenizer_outputs)  # tokenizer: AutoTokenizer.from_pretrained(\"path/to/OUT/model\")"]
        if workload == "search":
            lines += [POOLING_NOTE, "# or: SentenceTransformer(\"path/to/OUT/model\", backend=\"onnx\")  (needs optimum-onnx)"]
        lines += ["```"]
        if ort_only:
            lines += ["", f"Uses ONNX Runtime's own ops ({', '.join(meta.get('ort_only_ops', []))}): runs on ONNX Runtime only."]
        return lines + [""]
    if fmt == "openvino-ir":
        xml = meta.get("model", "model.xml")
        lines += ["```python", "import openvino as ov",
                  f"compiled = ov.Core().compile_model(\"path/to/OUT/model/{xml}\", \"CPU\")",
                  "outputs = compiled(tokenizer_outputs)"]
        if workload == "search":
            lines += [POOLING_NOTE, "# or: SentenceTransformer(\"path/to/OUT/model\", backend=\"openvino\")  (needs optimum-intel)"]
        return lines + ["```", ""]
    if fmt is None:
        return lines + [f"The {workload} workload's own folder: see its README; or load with slimcart.load(...):", "",
                        "```python", "from slimcart.api import load", SLIMCART_ONLY.format(wl=workload), "```", ""]
    return lines + [f"Format `{fmt}`: stock loaders refuse this folder; load with slimcart.load(...):", "",
                    "```python", "from slimcart.api import load", SLIMCART_ONLY.format(wl=workload), "```", ""]


def render_report(m: dict, higher_is_better: dict[str, bool], model_dir: Path | None = None) -> str:
    lines = [f"# slimcart: {m['recipe']} on {m['workload']} / {m['model']}", ""]
    d = m["data"]
    if d["synthetic"]:
        lines += ["> **SYNTHETIC DATA** — no real dataset was found, so slimcart generated one. Quality figures",
                  "> below only show the pipeline works; they say nothing about real-world quality.", ""]
    lines += [f"Data: `{d['name']}`, split {d['split']}, n={d['n']}.  ",
              f"Baseline: PyTorch fp32 eager. Compressed runtime: `{m['compressed']['runtime']}`.", "",
              "| metric | baseline | compressed | change |", "|---|---|---|---|"]
    lines += [f"| {a} | {b} | {c} | {e} |" for a, b, c, e in comparison_rows(m, higher_is_better)]
    lines += ["", "Ratios are compressed / baseline, timed interleaved in the same process run "
              f"({m['bench']['repeats']} rounds, medians of per-round ratios, bootstrap intervals over rounds).", ""]
    trust = m.get("speed_reliability")
    if trust and not trust["reliable"]:
        lines += ["> **Speed figures unreliable**: " + "; ".join(trust["reasons"]) + ". Quality and size figures are",
                  "> unaffected; rerun on an idle machine for speed.", ""]
    if any(k.startswith("guard_") for k in m["baseline"]["quality"]):
        lines += ["`guard_*`: the guard task, same-product matching on held-out PriceRunner clusters that no step trains, "
                  "distils or calibrates on (see the data split above).", ""]
    warning = guard_warning(m)
    if warning:
        lines += [warning, ""]
    if m.get("kernels"):
        lines += ["## Kernels that ran", *[f"- {k}" for k in m["kernels"]], ""]
    if m.get("size_only"):
        lines += ["## Size-only techniques (no kernel here uses them for speed)", *[f"- {k}" for k in m["size_only"]], ""]
    if m.get("notes"):
        lines += ["## Notes", *[f"- {n}" for n in m["notes"]], ""]
    if model_dir is not None:
        lines += how_to_load(m["workload"], model_dir)
    env = m["environment"]
    lines += ["## Environment", f"- CPU: {env['cpu']} ({', '.join(env['cpu_flags'])}), threads: {env['threads']}",
              "- " + ", ".join(f"{k} {v}" for k, v in env["versions"].items() if v), ""]
    return "\n".join(lines)
