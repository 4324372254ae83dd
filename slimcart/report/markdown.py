"""report.md: the before/after table, with what ran on which kernel and any caveats."""
from __future__ import annotations


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


def render_report(m: dict, higher_is_better: dict[str, bool]) -> str:
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
    if m.get("kernels"):
        lines += ["## Kernels that ran", *[f"- {k}" for k in m["kernels"]], ""]
    if m.get("size_only"):
        lines += ["## Size-only techniques (no kernel here uses them for speed)", *[f"- {k}" for k in m["size_only"]], ""]
    if m.get("notes"):
        lines += ["## Notes", *[f"- {n}" for n in m["notes"]], ""]
    env = m["environment"]
    lines += ["## Environment", f"- CPU: {env['cpu']} ({', '.join(env['cpu_flags'])}), threads: {env['threads']}",
              "- " + ", ".join(f"{k} {v}" for k, v in env["versions"].items() if v), ""]
    return "\n".join(lines)
