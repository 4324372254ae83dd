"""Benchmark: batch-1 decode speed of SmolLM2-135M across runtimes, with perplexity beside every row.

One interleaved run (slimcart.bench.measure_interleaved: same 32-token review prompts, exactly 32
greedy new tokens, side order alternating per round) of
  fp32          PyTorch `generate` (the baseline)
  slimcart      the recipe's weight-only artifact, saved, reloaded, on ONNX Runtime MatMulNBits
  slimcart-gguf the same codes exported to GGUF, run by llama.cpp
  llama.cpp Q4_0 / Q8_0 / Q4_K_M  llama.cpp's own quantizer (llama_model_quantize) applied to an F32
                GGUF of the fp32 model that slimcart's exporter writes
Perplexity: the workload's held-out review windows through each side's own runtime. Peak RSS: each
side loaded and run in a fresh process (slimcart.rss_probe). Versions and load average recorded.

    SLIMCART_DATA=../shared/data python bench/llm_decode.py [--threads 2] [--repeats 5]
Writes bench/results/llm_decode.json and docs/bench-llm-decode.md.
"""
from __future__ import annotations

import argparse
import ctypes
import json
import os
import sys
import tempfile
import time
from importlib import metadata
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from slimcart import api, outputs  # noqa: E402
from slimcart.bench import environment, measure_interleaved, paired_ratio, set_threads  # noqa: E402
from slimcart.contracts import write_format  # noqa: E402
from slimcart.recipe import Recipe, load_recipe  # noqa: E402
from slimcart.runtime.gguf_llm import write_gguf, source_gguf_pre  # noqa: E402
from slimcart.runtime.packed_llm import pack_model  # noqa: E402
from slimcart.workloads import get_workload  # noqa: E402

LLAMA_TYPES = {"llama.cpp Q4_0": "Q4_0", "llama.cpp Q8_0": "Q8_0", "llama.cpp Q4_K_M": "Q4_K_M"}


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


def llama_quantize(src: Path, dst: Path, kind: str, threads: int) -> None:
    import llama_cpp

    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = getattr(llama_cpp, f"LLAMA_FTYPE_MOSTLY_{kind}")
    params.nthread = threads
    if llama_cpp.llama_model_quantize(str(src).encode(), str(dst).encode(), ctypes.byref(params)) != 0:
        raise RuntimeError(f"llama.cpp could not quantize {src} to {kind}")


def gguf_folder(folder: Path, bundle, wl, gguf: Path, method: str) -> Path:
    """A folder slimcart (and the RSS probe) loads as a GGUF model: the file plus tokenizer."""
    folder.mkdir(parents=True, exist_ok=True)
    os.replace(gguf, folder / "model.gguf")
    wl.save_companions(bundle, folder)
    write_format(folder, "gguf", file="model.gguf", method=method)
    return folder


def versions() -> dict:
    out = {}
    for pkg in ("torch", "transformers", "onnxruntime", "onnxruntime-genai", "llama_cpp_python", "gguf", "numpy"):
        try:
            out[pkg] = metadata.version(pkg)
        except metadata.PackageNotFoundError:
            out[pkg] = None
    return out


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="smollm2")
    ap.add_argument("--data", default=None)
    ap.add_argument("--recipe", default="w4-gptq-q4_0", help="slimcart's weight-only recipe (its export step is dropped "
                    "for the ONNX Runtime side and kept for the GGUF side)")
    ap.add_argument("--embedding-bits", type=int, default=4, choices=(4, 8, 16))
    ap.add_argument("--calibration-windows", type=int, default=None)
    ap.add_argument("--eval-windows", type=int, default=None, help="override the workload's 64 evaluation windows")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--no-rss", action="store_true")
    ap.add_argument("--json", default=str(ROOT / "bench/results/llm_decode.json"))
    ap.add_argument("--md", default=str(ROOT / "docs/bench-llm-decode.md"))
    a = ap.parse_args()
    set_threads(a.threads)
    t0 = time.time()
    res = {"model": a.model, "environment": environment(a.threads), "versions": versions(), "load_avg_start": os.getloadavg()}
    wl = get_workload("llm")
    if a.eval_windows:
        wl.eval_windows = a.eval_windows
    bundle, data = wl.load_model(a.model), wl.load_data(a.data)
    res["data"] = wl.data_info(data).as_dict() | {"eval_windows": wl.eval_windows, "eval_window": wl.eval_window}
    tmp = Path(tempfile.mkdtemp(prefix="bench-decode-"))
    folders: dict[str, Path | str] = {"fp32": a.model}

    rec = load_recipe(a.recipe)
    quant = [s.model_copy(update={"embedding_bits": a.embedding_bits, **({"calibration_windows": a.calibration_windows}
             if a.calibration_windows and "calibration_windows" in type(s).model_fields else {})})
             for s in rec.steps if s.kind.startswith("weight_only")]
    log(f"building {a.recipe} (embedding {a.embedding_bits}-bit)")
    built = api.build(wl, a.model, Recipe(name=rec.name, workloads=["llm"], steps=quant), threads=a.threads,
                      workdir=tmp / "work", loaded=(bundle, data))
    built.state.save(tmp / "slimcart", wl)
    folders["slimcart"] = tmp / "slimcart"
    art = built.state.artifact
    packed = pack_model(art.lm, art.qweights, art.embedding_bits, art.embed_q)
    pre = source_gguf_pre(bundle)
    report = write_gguf(tmp / "s.gguf", packed, bundle.tokenizer, pre=pre)
    folders["slimcart-gguf"] = gguf_folder(tmp / "slimcart-gguf", bundle, wl, tmp / "s.gguf", a.recipe)
    res["slimcart"] = {"recipe": a.recipe, "steps": [s.model_dump(mode="json") for s in quant], "build_s": built.seconds,
                       "gguf_types": sorted({r["type"] for r in report.values()}),
                       "gguf_requantized": sorted(k for k, r in report.items() if not r["exact"])}
    del built, packed, art
    log("writing the fp32 model as F32 GGUF and quantizing it with llama.cpp")
    write_gguf(tmp / "f32.gguf", pack_model(bundle.module.model, {}, 32), bundle.tokenizer, pre=pre, float_type="F32")
    for side, kind in LLAMA_TYPES.items():
        llama_quantize(tmp / "f32.gguf", tmp / f"{kind}.gguf", kind, a.threads)
        folders[side] = gguf_folder(tmp / kind, bundle, wl, tmp / f"{kind}.gguf", f"llama.cpp {kind}")
    (tmp / "f32.gguf").unlink()

    sides, rows = {}, {}
    for side, folder in folders.items():
        runner, b = (wl.torch_runner(bundle), bundle) if side == "fp32" else api.load(wl, folder, a.threads)
        log(f"evaluating {side}")
        rows[side] = {"runtime": runner.runtime, "quality": wl.evaluate(runner, b, data).quality,
                      "bytes": None if side == "fp32" else outputs.model_bytes(Path(folder))}
        sides[side] = runner
    log(f"timing {len(sides)} sides interleaved, {a.repeats} rounds")
    inputs = wl.bench_inputs(bundle, data)
    timing = measure_interleaved(sides, inputs, repeats=a.repeats, progress=log)
    q4 = timing["llama.cpp Q4_0"].throughput_per_s
    base_ppl = rows["fp32"]["quality"]["perplexity"]
    for side, t in timing.items():
        rows[side].update(decode_tokens_per_s=t.summary()["throughput_per_s"], ratio_to_llama_q4_0=paired_ratio(t.throughput_per_s, q4),
                          ratio_to_fp32=paired_ratio(t.throughput_per_s, timing["fp32"].throughput_per_s),
                          perplexity_ratio=rows[side]["quality"]["perplexity"] / base_ppl)
    del sides
    if not a.no_rss:
        for side, folder in folders.items():
            log(f"peak RSS of {side} in a fresh process")
            rows[side]["peak_rss_bytes"] = api.peak_rss("llm", a.data, a.threads, folder)
    res.update(rows=rows, bench={"repeats": a.repeats, "requests_per_round": len(inputs.serving), "new_tokens": inputs.items_per_serving_batch,
                                 "wall_s": time.time() - t0, "load_avg_end": os.getloadavg()})
    Path(a.json).parent.mkdir(parents=True, exist_ok=True)
    Path(a.json).write_text(json.dumps(res, indent=2, default=str) + "\n")
    write_md(res, Path(a.md))
    log(f"wrote {a.json} and {a.md}")
    return 0


def write_md(res: dict, path: Path) -> None:
    v = res["versions"]
    lines = ["# Benchmark: SmolLM2-135M batch-1 decode across runtimes (llm workload)", "",
             f"Generated by `bench/llm_decode.py`. Data: {res['data']['name']} ({res['data']['split']}, "
             f"{res['data']['eval_windows']} windows x {res['data']['eval_window']} tokens for perplexity). CPU: "
             f"{res['environment']['cpu']}, {res['environment']['threads']} threads; load average "
             f"{res['load_avg_start'][0]:.1f} at start, {res['bench']['load_avg_end'][0]:.1f} at end. Decode: "
             f"{res['bench']['requests_per_round']} prompts x {res['bench']['new_tokens']} greedy tokens per round, "
             f"{res['bench']['repeats']} interleaved rounds; ratios are medians of per-round ratios.", "",
             "Versions: " + ", ".join(f"{k} {x}" for k, x in v.items() if x), "",
             f"slimcart side: recipe `{res['slimcart']['recipe']}` weight-only step(s) with the embedding at "
             f"{res['slimcart']['steps'][0].get('embedding_bits')} bits; GGUF export types {res['slimcart']['gguf_types']}, "
             f"requantized tensors: {res['slimcart']['gguf_requantized'] or 'none'}.", "",
             "| side | runtime | decode tok/s | vs llama.cpp Q4_0 | vs fp32 | perplexity | ppl ratio | bytes | peak RSS |",
             "|---|---|---|---|---|---|---|---|---|"]
    for side, r in res["rows"].items():
        rss = r.get("peak_rss_bytes")
        size = "" if r["bytes"] is None else f"{r['bytes'] / 1e6:.1f} MB"
        rss = "" if not rss else f"{rss / 1e6:.0f} MB"
        lines.append(f"| {side} | {r['runtime']} | {r['decode_tokens_per_s']:.1f} | {r['ratio_to_llama_q4_0']:.2f} | "
                     f"{r['ratio_to_fp32']:.2f} | {r['quality']['perplexity']:.2f} | {r['perplexity_ratio']:.3f} | "
                     f"{size} | {rss} |")
    lines += ["", f"Total wall time: {res['bench']['wall_s'] / 60:.1f} min.", ""]
    old = path.read_text() if path.exists() else ""
    notes = old.split("<!-- notes -->", 1)[1] if "<!-- notes -->" in old else ""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(lines) + "\n<!-- notes -->" + (notes or "\n"))


if __name__ == "__main__":
    sys.exit(main())
