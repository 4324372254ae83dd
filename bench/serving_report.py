"""docs/bench-serving.md from the serving benchmarks' JSON: `bench/serving.py search|generate` and
`bench/batch_embed.py` (whichever results exist). Every figure is read from the JSON; nothing is typed in.

    python bench/serving_report.py [--search bench/results/serving_search.json] [--generate ...] [--embed ...]
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "bench" / "results"
BUSY_PER_CPU = 0.5  # load average per CPU (before the run) above which figures are marked not final


def _load_note(env: dict) -> str:
    before, after, cpus = env["loadavg_before"][0], env["loadavg_after"][0], env["cpu_count"]
    final = "" if before <= BUSY_PER_CPU * cpus else " **NOT FINAL: the machine was busy before the run.**"
    return f"load average {before:.2f} before / {after:.2f} after on {cpus} CPUs.{final}"


def _f(x, spec=".1f") -> str:
    return "–" if x is None else format(x, spec)


def search_md(r: dict) -> list[str]:
    s = r["settings"]
    lines = ["## Search encoder served by `slimcart serve` (`POST /embed`, one query per request)", "",
             f"`python bench/serving.py search --fp32 {s['fp32']} --compressed {s['compressed']}`: {s['threads']} model "
             f"thread(s) per server, micro-batching up to {s['max_batch']} with {s['max_wait_ms']:g} ms wait, p99 objective "
             f"{s['objective_ms']:g} ms"
             + (f", server deadline {s['deadline_ms']:g} ms (a request not answered by then gets 503)" if s.get("deadline_ms") else
                ", server deadline 10 s")
             + f", open-loop Poisson arrivals, {s['step_s']:g} s per rate step; queries from the "
             f"CrowdFlower test split; {_load_note(r['environment'])}", "",
             "| model | runtime | model only p50 ms | tokenizer + model p50 ms | HTTP end to end p50 / p99 ms (1 in flight) | "
             "sustainable req/s at p99 ≤ objective |", "|---|---|---|---|---|---|"]
    for side in ("fp32", "compressed"):
        x = r[side]
        e = x["end_to_end_batch1"]
        lines.append(f"| {side} (`{Path(str(x['model'])).name}`) | {x['runtime']} | {_f(x['model_p50_ms'], '.2f')} | "
                     f"{_f(x['tokenizer_model_p50_ms'], '.2f')} | {_f(e['p50_ms'], '.2f')} / {_f(e['p99_ms'], '.2f')} | "
                     f"{_f(x['sustainable_per_s'])} |")
    ratio = r.get("sustainable_ratio")
    lines += ["", f"Sustainable rate, compressed vs fp32 served the same way: **{_f(ratio, '.2f')}×**" +
              (" (fp32 never met the objective in the ladder)" if r["fp32"]["sustainable_per_s"] is None else ""), ""]
    for side in ("fp32", "compressed"):
        ladder = r[side]["ladder"]
        lines += [f"Rate ladder, {side}:", "", "| offered req/s | answered/s | p50 ms | p99 ms | refused | 5xx |",
                  "|---|---|---|---|---|---|"]
        lines += [f"| {x['offered_per_s']:.1f} | {x['throughput_per_s']:.1f} | {x['p50_ms']:.1f} | {x['p99_ms']:.1f} | "
                  f"{x['refused_share']:.1%} | {x['server_errors_5xx']} |" for x in ladder]
        lines.append("")
        for phase in ("overload_3x", "recovery_0.5x"):
            if phase in r[side]:
                x = r[side][phase]
                rss = (f", server RSS {x['server_rss_before_mb']:.0f} -> peak {x['server_rss_peak_mb']:.0f} MB"
                       if "server_rss_peak_mb" in x else "")
                lines.append(f"- {phase.replace('_', ' at ')}: offered {x['offered_per_s']:.1f}/s, answered "
                             f"{x['throughput_per_s']:.1f}/s, p99 of answered {x['p99_ms']:.1f} ms, refused "
                             f"{x['refused_share']:.1%}, 5xx {x['server_errors_5xx']}{rss}")
        lines.append("")
    return lines


def rerun_md(runs: list[tuple[Path, dict]]) -> list[str]:
    """Further runs of the same search benchmark, one line each, so one run's ladder is not read alone."""
    lines = ["Other runs of the same command (every one is listed, so one run's ladder is not read alone). The server "
             "freezes its warmed-up heap out of Python's garbage collector and the client collects before every "
             "timed step (both since 2026-12-01): the two runs before that change (in git history) each had one "
             "ladder step with a single ~250 ms p99 stall, which set their sustainable ratio (1.84× and 3.74×).", ""]
    for path, r in runs:
        o = {s: r[s].get("overload_3x", {}) for s in ("fp32", "compressed")}
        lines.append(f"- `{path.relative_to(ROOT)}` ({_load_note(r['environment']).rstrip('.')}): sustainable fp32 "
                     f"{_f(r['fp32']['sustainable_per_s'])} / compressed {_f(r['compressed']['sustainable_per_s'])} req/s "
                     f"= **{_f(r.get('sustainable_ratio'), '.2f')}×**; overload at 3x p99 of answered: fp32 "
                     f"{_f(o['fp32'].get('p99_ms'))} ms at {_f(o['fp32'].get('offered_per_s'))}/s, compressed "
                     f"{_f(o['compressed'].get('p99_ms'))} ms at {_f(o['compressed'].get('offered_per_s'))}/s")
    return lines + [""]


def generate_md(r: dict) -> list[str]:
    lines = ["## LLM `POST /generate` (token streaming)", "",
             f"`python bench/serving.py generate --model {r['settings']['model']}`: greedy, {r['new_tokens']} new tokens, "
             f"{r['settings']['threads']} threads; {_load_note(r['environment'])} Server peak RSS "
             f"{r['server_rss_peak_mb']:.0f} MB.", "",
             "| concurrent streams | time to first token p50 ms | decode tokens/s per stream | aggregate tokens/s |",
             "|---|---|---|---|"]
    for n, x in r["streams"].items():
        lines.append(f"| {n} | {x['ttft_p50_ms']:.0f} | {x['decode_tokens_per_s_per_stream_median']:.1f} | "
                     f"{x['aggregate_tokens_per_s']:.1f} |")
    return lines + [""]


def embed_md(r: dict) -> list[str]:
    env = {"loadavg_before": r["loadavg_before"], "loadavg_after": r["loadavg_after"], "cpu_count": r["cpu_count"]}
    lines = ["## `slimcart embed`: data-parallel batch inference", "",
             f"`python bench/batch_embed.py` over `{Path(r['input']).name}`"
             + (f" (first {r['settings']['limit']} rows)" if r["settings"].get("limit") else "")
             + f", model `{r['model']}`, {r['settings']['cores']} cores in every configuration; {_load_note(env)}", "",
             "| engine | workers × threads | rows | wall s | rows/s |", "|---|---|---|---|---|"]
    for x in r["runs"].values():
        lines.append(f"| {x['engine']} | {x['workers']} × {x['threads_per_worker']} | {x['rows']} | {x['wall_s']:.1f} | "
                     f"{x['rows_per_s_wall']:.1f} |")
    res = r.get("resume", {})
    lines.append("")
    if "speedup_workers_vs_one_worker" in r:
        lines.append(f"- 2 single-threaded workers vs 1 single-threaded worker: **{r['speedup_workers_vs_one_worker']:.2f}×** "
                     f"(1 worker given 2 threads instead: {r['speedup_threads_vs_one_thread']:.2f}×)")
    lines += [f"- 2 workers vs 1 worker with both threads (the same total thread budget): "
              f"**{r['speedup_workers_vs_threads']:.2f}×**; vectors identical (max |diff| {r['max_abs_diff_1x_vs_workers']:.1e})"]
    if "speedup_threads_vs_one_thread" in r and r["speedup_threads_vs_one_thread"] >= 1.7:
        lines.append(f"- Why workers add nothing over threads here: PyTorch's intra-op threads already scale "
                     f"{r['speedup_threads_vs_one_thread']:.2f}× from 1 to 2 threads at this batch, so splitting the same "
                     "2 cores into processes can only match them; workers pay off where one process's threads scale "
                     "poorly (small batches, many cores, Python-bound pre-processing) and across machines (the Ray engine)")
    if "ray_overhead_vs_local_workers" in r:
        lines.append(f"- Ray Data engine vs local workers: wall-time overhead {r['ray_overhead_vs_local_workers']:+.1%}, "
                     f"max |diff| {r['max_abs_diff_ray_vs_local']:.1e}")
    if res:
        lines.append(f"- killed and rerun: {res['shards_on_disk_at_kill']} finished shards on disk, "
                     f"{res['skipped_on_rerun']} skipped, {res['recomputed']} computed; result vs uninterrupted max |diff| "
                     f"{res['max_abs_diff_vs_uninterrupted']:.1e}")
    return lines + [""]


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--search", type=Path, default=RESULTS / "serving_search.json")
    p.add_argument("--generate", type=Path, default=RESULTS / "serving_llm.json")
    p.add_argument("--embed", type=Path, default=RESULTS / "batch_embed.json")
    p.add_argument("--search-reruns", type=Path, nargs="*", default=sorted(RESULTS.glob("serving_search_run*.json")))
    args = p.parse_args()
    args.search, args.generate, args.embed = (x.resolve() for x in (args.search, args.generate, args.embed))
    lines = ["# Benchmark: serving and batch inference", "",
             "Generated by `bench/serving_report.py` from the JSON the benchmarks wrote (paths below); client and server on "
             "one 2-core machine over loopback.", ""]
    for path, fn in ((args.search, search_md), (args.generate, generate_md), (args.embed, embed_md)):
        if path.exists():
            lines += fn(json.loads(path.read_text())) + [f"Raw: `{path.relative_to(ROOT)}`.", ""]
            if fn is search_md and args.search_reruns:
                lines += rerun_md([(q.resolve(), json.loads(q.read_text())) for q in args.search_reruns])
        else:
            lines += [f"(`{path.relative_to(ROOT)}` not measured yet)", ""]
    (ROOT / "docs" / "bench-serving.md").write_text("\n".join(lines))


if __name__ == "__main__":
    main()
