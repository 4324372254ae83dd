"""report.html: one self-contained page (plotly's JavaScript inlined, so it opens offline) with the
Pareto fronts (quality vs the profile's objective, vs size, vs energy), per-layer sensitivity, the
hardware probe, the profile, the chosen point and why it won, and every trial."""
from __future__ import annotations

import html
import json

from .study import FIG

COLORS = {"chosen": "#d62728", "feasible": "#2ca02c", "infeasible": "#ff7f0e", "screened": "#9e9e9e"}
AXIS = {"latency_p50": "p50 latency, batch 1 (ms)", "latency_p99": "p99 latency, batch 1 (ms)",
        "throughput": "throughput (items/s)", "throughput_per_core": "throughput per core (items/s)",
        "size": "size on disk (MB)", "energy": "energy per item (J)"}


def _value(fig: dict, name: str) -> float:
    v = fig[FIG[name]]
    return v / 1e6 if name == "size" else v


def _scatter(plan: dict, x_name: str):
    import plotly.graph_objects as go

    chosen = plan["chosen"]["number"]
    front = set(plan["pareto_front"])
    groups: dict[str, list[dict]] = {"screened": [], "infeasible": [], "feasible": [], "chosen": []}
    for r in plan["trials"]:
        if r["state"] != "COMPLETE" or not r["figures"]:
            continue
        kind = ("chosen" if r["number"] == chosen else "screened" if r["fidelity"] != "full"
                else "feasible" if r["feasible"] else "infeasible")
        groups[kind].append(r)
    fig = go.Figure()
    for kind, rows in groups.items():
        if not rows:
            continue
        fig.add_trace(go.Scatter(
            x=[_value(r["figures"], x_name) for r in rows], y=[100 * r["figures"]["quality_loss"] for r in rows],
            mode="markers", name={"screened": "screened only", "feasible": "meets every limit",
                                  "infeasible": "misses a limit", "chosen": "chosen"}[kind],
            marker={"color": COLORS[kind], "size": [16 if kind == "chosen" else 12 if r["number"] in front else 8 for r in rows],
                    "symbol": ["star" if kind == "chosen" else "diamond" if r["number"] in front else "circle" for r in rows]},
            text=[f"trial {r['number']}: " + ", ".join(f"{k}={v}" for k, v in r["params"].items()) for r in rows],
            hovertemplate="%{text}<br>x=%{x:.4g}<br>quality loss=%{y:.3f}%<extra></extra>"))
    lim = plan["limits"].get("max_quality_loss")
    if lim is not None:
        fig.add_hline(y=100 * lim, line_dash="dash", annotation_text="quality bound")
    fig.update_layout(title=f"quality loss vs {AXIS[x_name]} (validation split; diamonds = Pareto front)",
                      xaxis_title=AXIS[x_name], yaxis_title="relative quality loss (%)", height=420,
                      margin={"l": 60, "r": 20, "t": 50, "b": 50})
    return fig


def _sensitivity(plan: dict):
    import plotly.graph_objects as go

    sens = plan.get("sensitivity") or {}
    items = list(sens.get("values", {}).items())
    fig = go.Figure(go.Bar(x=[str(k) for k, _ in items], y=[100 * v for _, v in items], marker_color="#1f77b4"))
    fig.update_layout(title=f"per-layer sensitivity: {sens.get('method', 'n/a')} (validation split)",
                      yaxis_title="relative quality loss (%)", height=380, margin={"l": 60, "r": 20, "t": 50, "b": 120})
    return fig


def _table(rows: list[tuple], head: tuple | None = None) -> str:
    def cell(x):
        return html.escape(x if isinstance(x, str) else json.dumps(x, default=str))

    h = "<tr>" + "".join(f"<th>{cell(c)}</th>" for c in head) + "</tr>" if head else ""
    return "<table>" + h + "".join("<tr>" + "".join(f"<td>{cell(c)}</td>" for c in r) + "</tr>" for r in rows) + "</table>"


def _fmt(fig: dict | None, key: str, scale: float = 1, unit: str = "") -> str:
    if not fig or fig.get(key) is None:
        return ""
    return f"{fig[key] * scale:.4g}{unit}"


def _num(v) -> str:
    return "" if v is None else f"{v:.4g}"


LIMIT_OF = {"quality_loss": "max_quality_loss", "latency_p50_ms": "max_latency_p50_ms",
            "latency_p99_ms": "max_latency_p99_ms", "throughput": "min_throughput",
            "energy_j_per_item": "max_energy_j_per_item"}


def _limit(plan: dict, key: str):
    lim = plan["limits"]
    if key == "size_bytes":
        caps = [lim["max_size_mb"] * 1e6] if "max_size_mb" in lim else []
        if "max_size_ratio" in lim:
            caps.append(lim["max_size_ratio"] * plan["baseline_validation"]["size_bytes"])
        return min(caps) if caps else None
    if key == "peak_rss_bytes":
        return lim["max_peak_rss_mb"] * 1e6 if "max_peak_rss_mb" in lim else None
    return lim.get(LIMIT_OF.get(key, ""))


def _banner(plan: dict) -> str:
    if not plan["data"].get("synthetic"):
        return ""
    return ("<p style='background:#fff3cd;padding:8px'><b>SYNTHETIC DATA</b>: no real dataset was found; quality "
            "figures only show the pipeline works.</p>")


def render_html(plan: dict) -> str:
    import plotly.offline

    objective = plan["profile"]["objective"]
    plots = [_scatter(plan, objective)] + [_scatter(plan, x) for x in ("size", "energy") if x != objective]
    plots.append(_sensitivity(plan))
    divs = "\n".join(f'<div class="plot">{p.to_html(full_html=False, include_plotlyjs=False)}</div>' for p in plots)
    c = plan["chosen"]
    hw = plan["hardware"]
    trials = [(r["number"], r["state"], r["fidelity"] or "", ", ".join(f"{k}={v}" for k, v in r["params"].items()),
               _fmt(r["figures"], "quality_loss", 100, "%"), _fmt(r["figures"], "quality_loss_bound", 100, "%"),
               _fmt(r["figures"], FIG[objective]),
               _fmt(r["figures"], "size_bytes", 1e-6, " MB"), _fmt(r["figures"], "energy_j_per_item", 1, " J"),
               "yes" if r["feasible"] else "no" if r["feasible"] is False else "",
               r["error"] or r["not_promoted"] or (f"duplicate of {r['duplicate_of']}" if r["duplicate_of"] is not None else "")
               or r["skipped"] or "")
              for r in plan["trials"]]
    boot = next((k for v in plan["test"].values() for k in v if k.endswith("_paired_bootstrap")), None)
    test = [(k, _fmt(v, "quality_loss", 100, "%"), json.dumps(v.get("quality")),
             json.dumps(v[boot]) if boot and v.get(boot) else "")
            for k, v in plan["test"].items() if k != "baseline"]
    boot_head = f"{boot.rsplit('_paired', 1)[0] if boot else 'primary metric'} paired bootstrap (rel. change, 95% CI)"
    body = f"""
<h1>slimcart plan: {html.escape(plan['workload'])} / {html.escape(plan['model'])} on profile {html.escape(plan['profile']['name'])}</h1>
{_banner(plan)}<p class="label">{html.escape(plan['label'])}. Tuned on the validation split; the chosen model and the Pareto front were
evaluated once on the test split at the end.</p>
<h2>Chosen: trial {c['number']} {'(meets every limit on validation)' if c['feasible_on_validation'] else '(NO trial met every limit: nearest point)'}</h2>
<ul>{''.join(f'<li>{html.escape(w)}</li>' for w in c['why'])}</ul>
<p>On the test split: {'meets every limit' if c['meets_every_limit_on_test'] else 'misses: ' +
    html.escape(', '.join(k for k, v in c['test_constraints'].items() if v > 0))}.</p>
{_table([(k, _num(c.get('validation_figures', {}).get(k)), _num(v), _num(_limit(plan, k))) for k, v in c['test_figures'].items()],
         ('figure', 'validation (tuning)', 'test (once, at the end)', 'limit'))}
<h2>Trade-off (validation split)</h2>
{divs}
<h2>Test split: chosen and Pareto-front models</h2>
{_table(test, ('trial', 'quality loss', 'quality', boot_head))}
<h2>Profile</h2>
{_table([(k, v) for k, v in plan['profile'].items() if k != 'constraints'] + [(k, v) for k, v in plan['limits'].items()], ('field', 'value'))}
<h2>Hardware probe</h2>
{_table([('CPU', hw['cpu']), ('logical CPUs', hw['logical_cpus']), ('physical cores', hw['physical_cores']),
          ('ISA features', ', '.join(k for k, v in hw['features'].items() if v) or 'none'),
          ('memory', f"{(hw['memory_bytes'] or 0) / 2**30:.1f} GiB"), ('GPU', ', '.join(hw['gpus']) or 'none'),
          ('energy', f"{plan['energy_method']['method']}: {plan['energy_method']['detail']}"),
          ('timing', plan['timing'])])}
<h2>Search space</h2>
<pre>{html.escape(chr(10).join(plan['space']))}</pre>
<h2>Every trial</h2>
{_table(trials, ('#', 'state', 'fidelity', 'parameters', 'quality loss', 'loss upper bound (limit checked)', objective, 'size', 'energy/item', 'feasible', 'note'))}
"""
    style = ("body{font-family:system-ui,sans-serif;margin:24px;max-width:1200px}table{border-collapse:collapse;margin:8px 0}"
             "td,th{border:1px solid #ccc;padding:3px 8px;font-size:13px;text-align:left}.plot{margin:12px 0}"
             ".label{color:#555}pre{background:#f6f6f6;padding:8px;overflow-x:auto}")
    return (f"<!DOCTYPE html><html><head><meta charset='utf-8'><title>slimcart plan</title><style>{style}</style>"
            f"<script type='text/javascript'>{plotly.offline.get_plotlyjs()}</script></head><body>{body}</body></html>")
