"""The quality-vs-bytes plot of bench/embeddings.py's `compare` section, written as a plain SVG.

Hand-written because a static image from plotly needs kaleido, whose current release drives a
separately installed Chrome (not available on the benchmark machines); an SVG is ~100 lines of text.
Two panels: DIN on Amazon Video Games (test AUC difference to fp32, 95% paired bootstrap interval)
and SASRec (NDCG@10 relative change to the fine-tuned fp32 control, 95% interval); x = embedding
bytes as a share of fp32, log scale.
"""
from __future__ import annotations

import math
from html import escape

COLORS = {"int (row-wise)": "#1f77b4", "int2-mixed": "#17becf", "qr": "#ff7f0e", "hash": "#d62728",
          "mixed-dim": "#9467bd", "tt": "#8c564b", "pq": "#2ca02c"}
W, H, LEFT, RIGHT, TOP, BOTTOM = 460, 330, 70, 20, 40, 50


def _panel(points: list[dict], title: str, ylabel: str, x0: float) -> list[str]:
    xs = [p["x"] for p in points]
    lo = [p["lo"] for p in points] + [p["y"] for p in points]
    hi = [p["hi"] for p in points] + [p["y"] for p in points]
    xmin, xmax = math.log10(min(xs) / 1.5), math.log10(max(max(xs) * 1.5, 1.0))
    ymin, ymax = min(min(lo), 0.0), max(max(hi), 0.0)
    pad = (ymax - ymin) * 0.08 or 1e-3
    ymin, ymax = ymin - pad, ymax + pad

    def px(x: float) -> float:
        return x0 + LEFT + (math.log10(x) - xmin) / (xmax - xmin) * (W - LEFT - RIGHT)

    def py(y: float) -> float:
        return TOP + (ymax - y) / (ymax - ymin) * (H - TOP - BOTTOM)

    out = [f'<text x="{x0 + W / 2}" y="20" text-anchor="middle" font-size="14">{escape(title)}</text>',
           f'<rect x="{x0 + LEFT}" y="{TOP}" width="{W - LEFT - RIGHT}" height="{H - TOP - BOTTOM}" fill="none" stroke="#999"/>',
           f'<line x1="{x0 + LEFT}" x2="{x0 + W - RIGHT}" y1="{py(0):.1f}" y2="{py(0):.1f}" stroke="#444" stroke-dasharray="4 3"/>']
    for e in range(math.floor(xmin), math.ceil(xmax) + 1):
        for m in (1, 2, 5):
            v = m * 10 ** e
            if xmin <= math.log10(v) <= xmax:
                out.append(f'<line x1="{px(v):.1f}" x2="{px(v):.1f}" y1="{H - BOTTOM}" y2="{H - BOTTOM + 4}" stroke="#444"/>')
                out.append(f'<text x="{px(v):.1f}" y="{H - BOTTOM + 16}" text-anchor="middle" font-size="10">{v * 100:g}%</text>')
    for i in range(6):
        v = ymin + (ymax - ymin) * i / 5
        out.append(f'<text x="{x0 + LEFT - 6}" y="{py(v) + 3:.1f}" text-anchor="end" font-size="10">{v:+.4g}</text>')
    out.append(f'<text x="{x0 + W / 2}" y="{H - 12}" text-anchor="middle" font-size="11">embedding bytes, share of fp32 (log)</text>')
    out.append(f'<text transform="translate({x0 + 16},{H / 2}) rotate(-90)" text-anchor="middle" font-size="11">{escape(ylabel)}</text>')
    by_family: dict[str, list[dict]] = {}
    for p in points:
        by_family.setdefault(p["family"], []).append(p)
    for fam, ps in by_family.items():
        c = COLORS.get(fam, "#333")
        ps = sorted(ps, key=lambda p: p["x"])
        if len(ps) > 1:
            path = " ".join(f"{px(p['x']):.1f},{py(p['y']):.1f}" for p in ps)
            out.append(f'<polyline points="{path}" fill="none" stroke="{c}" stroke-width="1.5"/>')
        for p in ps:
            out.append(f'<line x1="{px(p["x"]):.1f}" x2="{px(p["x"]):.1f}" y1="{py(p["lo"]):.1f}" y2="{py(p["hi"]):.1f}" '
                       f'stroke="{c}" stroke-width="1"/>')
            out.append(f'<circle cx="{px(p["x"]):.1f}" cy="{py(p["y"]):.1f}" r="3.5" fill="{c}">'
                       f'<title>{escape(p["label"])}: {p["y"]:+.5f}</title></circle>')
    return out


def quality_vs_bytes_svg(compare: dict) -> str:
    panels = []
    ctr = compare.get("ctr", {})
    fp32 = ctr.get("tables_fp32_bytes")
    if fp32:
        pts = [{"family": r["family"], "label": k, "x": r["tables_bytes"] / fp32, "y": r["delta_auc"]["delta"],
                "lo": r["delta_auc"]["ci95"][0], "hi": r["delta_auc"]["ci95"][1]}
               for k, r in ctr["points"].items() if "family" in r]
        panels.append((pts, "DIN, Amazon Video Games (test)", "AUC - fp32 AUC"))
    sas = compare.get("sasrec", {})
    fp32 = sas.get("tables_fp32_bytes")
    if fp32:
        pts = [{"family": r["family"], "label": k, "x": r["tables_bytes"] / fp32, "y": 100 * r["vs_control"]["rel_change"],
                "lo": 100 * r["vs_control"]["ci95"][0], "hi": 100 * r["vs_control"]["ci95"][1]}
               for k, r in sas["points"].items() if "family" in r]
        panels.append((pts, "SASRec, Amazon Video Games (test)", "NDCG@10 vs fine-tuned control, %"))
    body = []
    for i, (pts, title, ylabel) in enumerate(panels):
        body += _panel(pts, title, ylabel, i * W)
    legend_y = H + 8
    for j, (fam, c) in enumerate(COLORS.items()):
        x = 20 + j * 120
        body.append(f'<circle cx="{x}" cy="{legend_y + 6}" r="4" fill="{c}"/>')
        body.append(f'<text x="{x + 8}" y="{legend_y + 10}" font-size="11">{escape(fam)}</text>')
    width = max(1, len(panels)) * W
    return (f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{H + 30}" '
            f'font-family="sans-serif" viewBox="0 0 {width} {H + 30}">\n<rect width="100%" height="100%" fill="white"/>\n'
            + "\n".join(body) + "\n</svg>\n")
