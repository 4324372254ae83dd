"""Benchmark: weight-only quantization of SmolLM2-135M (llm workload) against the fp32 baseline.

Every variant is built by its recipe's steps, saved in the packed slimcart-wq format, RELOADED
from disk and evaluated through the runner that loader returns (ONNX Runtime MatMulNBits), on the
workload's fixed held-out review windows. Decode tokens/s (batch 1, greedy, 32 new tokens after a
32-token review prompt) and prefill tokens/s (256-token windows) are timed interleaved, round by
round, against PyTorch fp32 `generate` in the same process; ratios are medians of per-round ratios.
Two extra timing sides separate what the runtime buys from what the bits buy: the same ORT decoder
graph with the fp32 weights, and the w4-gptq weights on torch's CPU int4 kernel under HF `generate`.

    SLIMCART_DATA=../shared/data python bench/quantization_llm.py [--threads 2] [--repeats 3]

Writes bench/results/quantization_llm.json and docs/bench-quantization-llm.md.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


from slimcart import api, outputs  # noqa: E402
from slimcart.contracts import FORMAT_FILE  # noqa: E402
from slimcart.api import baseline_size_bytes  # noqa: E402
from slimcart.bench import environment, measure_interleaved, paired_ratio, set_threads  # noqa: E402
from slimcart.runtime.llm_kernels import PackedLLMFolder, make_runner  # noqa: E402
from slimcart.runtime.packed_llm import load_packed  # noqa: E402
from slimcart.recipe import Recipe, load_recipe  # noqa: E402
from slimcart.workloads import get_workload  # noqa: E402

G32 = Recipe(name="w4-rtn-g32-float", description="RTN int4, groups of 32, float16 min offset (GGUF Q4_1's layout)",
             workloads=["llm"], steps=[{"kind": "weight_only_rtn", "bits": 4, "group_size": 32, "zero_point": "float"}])
VARIANTS = {"w8-rtn": "w8-rtn", "w4-rtn": "w4-rtn", "w4-gptq": "w4-gptq", "w4-awq": "w4-awq", "w4-awq-gptq": "w4-awq-gptq",
            "w4-rtn-g32-float": G32, "kmeans-w4": "kmeans-w4"}
DEFAULT = ["w8-rtn", "w4-rtn", "w4-gptq", "w4-awq", "w4-awq-gptq", "w4-rtn-g32-float"]


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


def build(wl, bundle, data, recipe, folder: Path, calib: int | None, threads: int) -> dict:
    rec = recipe if isinstance(recipe, Recipe) else load_recipe(recipe)
    if calib:  # the same recipe with another number of calibration windows
        steps = [s.model_copy(update={"calibration_windows": calib}) if "calibration_windows" in type(s).model_fields else s
                 for s in rec.steps]
        rec = rec.model_copy(update={"steps": steps})
    built = api.build(wl, str(bundle.source), rec, threads=threads, workdir=folder.parent / f".{folder.name}-work",
                      loaded=(bundle, data))
    built.state.save(folder, wl)
    return {"recipe": rec.name, "steps": [s.model_dump(mode="json") for s in rec.steps], "build_s": built.seconds}


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="smollm2")
    ap.add_argument("--data", default=None)
    ap.add_argument("--variants", default=",".join(DEFAULT))
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--calibration-windows", type=int, default=None, help="override the recipes' calibration size")
    ap.add_argument("--no-extra-sides", action="store_true", help="skip the ORT-fp32 and torch-int4 timing sides")
    ap.add_argument("--fp32-compute", default="w4-gptq,w4-awq-gptq",
                    help="variants also evaluated and timed with MatMulNBits computing in fp32 (same saved weights)")
    ap.add_argument("--json", default=str(ROOT / "bench/results/quantization_llm.json"))
    ap.add_argument("--md", default=str(ROOT / "docs/bench-quantization-llm.md"))
    a = ap.parse_args()
    set_threads(a.threads)
    t_start = time.time()
    wl = get_workload("llm")
    log("loading model and data")
    bundle = wl.load_model(a.model)
    data = wl.load_data(a.data)
    info = wl.data_info(data)
    tmp = Path(tempfile.mkdtemp(prefix="bench-wq-"))
    res: dict = {"model": a.model, "data": info.as_dict(), "environment": environment(a.threads),
                 "load_avg_start": os.getloadavg(), "variants": {}}

    base_runner = wl.torch_runner(bundle)
    log("evaluating fp32 baseline")
    base_q = wl.evaluate(base_runner, bundle, data).quality
    base_bytes = baseline_size_bytes(bundle.module, tmp)
    res["baseline"] = {"runtime": "torch-fp32-eager (HF generate)", "quality": base_q, "bytes": base_bytes}
    runners = {"fp32": base_runner}
    bundles = {}
    for name in a.variants.split(","):
        log(f"building {name}")
        folder = tmp / name
        v = build(wl, bundle, data, VARIANTS[name], folder, a.calibration_windows, a.threads)
        meta = json.loads((folder / FORMAT_FILE).read_text())
        runner, cbundle = api.load(wl, folder, a.threads)  # reloaded from disk
        bundles[name] = cbundle
        log(f"evaluating {name} (built in {v['build_s']:.0f}s)")
        v.update(runtime=runner.runtime, quality=wl.evaluate(runner, cbundle, data).quality,
                 bytes=outputs.model_bytes(folder), method=meta["method"], embedding_bits=meta["embedding_bits"])
        v["size_ratio"] = v["bytes"] / base_bytes
        v["perplexity_ratio"] = v["quality"]["perplexity"] / base_q["perplexity"]
        res["variants"][name] = v
        runners[name] = runner
        log(f"{name}: {v['quality']} bytes {v['size_ratio']:.3f} of fp32")
    for name in [n for n in a.fp32_compute.split(",") if n in res["variants"]]:
        # The same saved weights with MatMulNBits computing in fp32: what the int8 activation blocks cost.
        key = f"{name}@fp32-compute"
        runner = make_runner(load_packed(tmp / name), a.threads, "onnxruntime", pad_token_id=bundle.tokenizer.eos_token_id,
                             compute="fp32")
        v = {**res["variants"][name], "runtime": "onnxruntime-matmulnbits-fp32", "build_s": 0.0}
        v["quality"] = wl.evaluate(runner, bundles[name], data).quality
        v["perplexity_ratio"] = v["quality"]["perplexity"] / base_q["perplexity"]
        res["variants"][key], runners[key] = v, runner
        log(f"{key}: {v['quality']}")
    extra_sides = {}
    if not a.no_extra_sides:
        extra_sides["ort-fp32-graph"] = PackedLLMFolder.reference(wl, bundle, tmp, a.threads)
        if "w4-gptq" in res["variants"]:
            extra_sides["w4-gptq@torch-int4pack"] = make_runner(load_packed(tmp / "w4-gptq"), a.threads, "torch",
                                                                pad_token_id=bundle.tokenizer.eos_token_id)
    runners.update(extra_sides)
    log(f"timing {len(runners)} sides interleaved, {a.repeats} rounds")
    inputs = wl.bench_inputs(bundle, data)
    timing = measure_interleaved(runners, inputs, repeats=a.repeats, progress=log)
    base_t = timing["fp32"]
    res["timing"] = {}
    for name, t in timing.items():
        s = t.summary()
        res["timing"][name] = {
            "runtime": runners[name].runtime,
            "decode_tokens_per_s": s["throughput_per_s"],
            "prefill_tokens_per_s": s["extra_throughput_per_s"]["prefill_tokens"],
            "request_latency_ms_p50": s["latency_ms"]["p50"],
            "decode_ratio": paired_ratio(t.throughput_per_s, base_t.throughput_per_s),
            "prefill_ratio": paired_ratio(t.extra_per_s["prefill_tokens"], base_t.extra_per_s["prefill_tokens"]),
        }
    rtn = res["variants"].get("w4-rtn")
    for name, v in res["variants"].items():
        v.update(res["timing"][name])
        if rtn and name != "w4-rtn" and "@" not in name and rtn["quality"]["perplexity"] > base_q["perplexity"]:
            inc = rtn["quality"]["perplexity"] - base_q["perplexity"]
            v["recovered_of_rtn_increase"] = (rtn["quality"]["perplexity"] - v["quality"]["perplexity"]) / inc
    res["bench"] = {"repeats": a.repeats, "decode_requests_per_round": len(inputs.serving), "new_tokens": inputs.items_per_serving_batch,
                    "eval_windows": wl.eval_windows, "eval_window": wl.eval_window, "wall_s": time.time() - t_start,
                    "load_avg_end": os.getloadavg()}
    Path(a.json).parent.mkdir(parents=True, exist_ok=True)
    Path(a.json).write_text(json.dumps(res, indent=2, default=str) + "\n")
    write_md(res, Path(a.md))
    log(f"wrote {a.json} and {a.md} in {res['bench']['wall_s'] / 60:.1f} min")
    return 0


def write_md(res: dict, path: Path) -> None:
    b, t = res["baseline"], res["timing"]
    env = res["environment"]
    lines = [
        "# Benchmark: weight-only quantization of SmolLM2-135M (llm workload)",
        "",
        f"Generated by `bench/quantization_llm.py`. Data: {res['data']['name']} ({res['data']['split']}, "
        f"{res['bench']['eval_windows']} windows x {res['bench']['eval_window']} tokens). CPU: {env['cpu']}, "
        f"{env['threads']} threads; load average {res['load_avg_start'][0]:.1f} at start, "
        f"{res['bench']['load_avg_end'][0]:.1f} at end (shared machine). Every model was saved, reloaded from disk and "
        "evaluated through the runner its loader returns. Speed: medians over "
        f"{res['bench']['repeats']} interleaved rounds, ratios = median of per-round ratios vs fp32 PyTorch `generate`.",
        "",
        "| variant | runtime | perplexity | ppl ratio | recovered of RTN g128 increase | next-token acc | decode tok/s | decode ratio | prefill tok/s | prefill ratio | bytes | size ratio |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
        f"| fp32 baseline | {b['runtime']} | {b['quality']['perplexity']:.2f} | 1.000 | | {b['quality']['next_token_acc']:.4f} | "
        f"{t['fp32']['decode_tokens_per_s']:.1f} | 1.00 | {t['fp32']['prefill_tokens_per_s']:.0f} | 1.00 | {b['bytes'] / 1e6:.1f} MB | 1.000 |",
    ]
    for name, v in res["variants"].items():
        rec = v.get("recovered_of_rtn_increase")
        lines.append(
            f"| {name} | {v['runtime']} | {v['quality']['perplexity']:.2f} | {v['perplexity_ratio']:.3f} | "
            f"{'' if rec is None else f'{rec:.0%}'} | {v['quality']['next_token_acc']:.4f} | {v['decode_tokens_per_s']:.1f} | "
            f"{v['decode_ratio']:.2f} | {v['prefill_tokens_per_s']:.0f} | {v['prefill_ratio']:.2f} | {v['bytes'] / 1e6:.1f} MB | {v['size_ratio']:.3f} |")
    extra = [k for k in t if k != "fp32" and k not in res["variants"]]
    if extra:
        lines += ["", "Timing-only sides (same rounds):", "",
                  "| side | runtime | decode tok/s | decode ratio | prefill tok/s | prefill ratio |", "|---|---|---|---|---|---|"]
        for k in extra:
            lines.append(f"| {k} | {t[k]['runtime']} | {t[k]['decode_tokens_per_s']:.1f} | {t[k]['decode_ratio']:.2f} | "
                         f"{t[k]['prefill_tokens_per_s']:.0f} | {t[k]['prefill_ratio']:.2f} |")
    lines += ["", "Build times (s): " + ", ".join(f"{k} {v['build_s']:.0f}" for k, v in res["variants"].items()),
              f"Total wall time: {res['bench']['wall_s'] / 60:.1f} min.", ""]
    old = path.read_text() if path.exists() else ""
    notes = old.split("<!-- notes -->", 1)[1] if "<!-- notes -->" in old else ""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(lines) + "\n<!-- notes -->" + (notes or "\n"))


if __name__ == "__main__":
    sys.exit(main())
