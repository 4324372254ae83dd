"""Benchmark: quantization recipes vs PyTorch fp32 and vs peers, every speed figure a same-run ratio.

search  MiniLM-L6 on CrowdFlower. Every search recipe (int8-dynamic, int8-static, w8a8-smoothquant,
        mixed-int8, qat-int8) built exactly as `slimcart compress` builds it, saved and RELOADED from
        disk; peers on the same data: ONNX Runtime `quantize_dynamic` (per-channel, fused graph) and
        OpenVINO + NNCF post-training int8 (if nncf is installed); reference runtimes ONNX Runtime fp32
        (fused) and OpenVINO fp32. All sides are timed in ONE interleaved run against PyTorch fp32 eager.
The llm half (weight-only int4/int8 recipes on SmolLM2) is `bench/quantization_llm.py`.

    SLIMCART_DATA=../shared/data python bench/quantization.py [--threads 2] [--timing-threads 1,2]

Writes bench/results/quantization.json and docs/bench-quantization.md.
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
from slimcart.bench import environment, measure_interleaved, paired_ratio, ratio_stats, set_threads  # noqa: E402
from slimcart.contracts import ModelState, StepContext  # noqa: E402
from slimcart.recipe import parse_step  # noqa: E402
from slimcart.workloads import get_workload  # noqa: E402

SEARCH_RECIPES = ["int8-dynamic", "int8-static", "w8a8-smoothquant", "mixed-int8", "qat-int8", "int8-static-nncf"]


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')} load {os.getloadavg()[0]:.1f}] {msg}", flush=True)


def nncf_peer(wl, bundle, data, work: Path, n_calib: int):
    """OpenVINO + NNCF post-training int8 (its transformer preset) on the same calibration batches."""
    import nncf
    import openvino as ov

    from slimcart.runtime.onnx_runtime import export_onnx
    from slimcart.runtime.openvino_runtime import save_openvino

    spec = wl.export_spec(bundle)  # the graph slimcart's steps export (token states; the runner pools)
    src = export_onnx(spec.get("module", bundle.module), spec["example"], work / "nncf-src.onnx", spec["dynamic_axes"],
                      spec["output_name"])
    calib = wl.calibration_batches(bundle, data, n_calib)
    q = nncf.quantize(ov.convert_model(str(src)), nncf.Dataset(calib), model_type=nncf.ModelType.TRANSFORMER,
                      subset_size=sum(b["input_ids"].shape[0] for b in calib))
    save_openvino(q, work / "nncf")
    wl.save_companions(bundle, work / "nncf")
    return work / "nncf", f"nncf {nncf.__version__}"


def ort_dynamic_peer(wl, bundle, work: Path):
    """ONNX Runtime's own quantize_dynamic, per-channel, on the ORT-fused graph (the usual recipe)."""
    import onnx
    from onnxruntime.quantization import QuantType, quantize_dynamic

    state = ModelState(bundle=bundle)
    ctx = StepContext(workload=wl, data=None, workdir=work / "ortdyn-src", threads=1, progress=log)
    ctx.workdir.mkdir(parents=True)
    state = parse_step({"kind": "export_onnx", "optimize": True}).apply(state, ctx)
    out = work / "ortdyn"
    out.mkdir()
    quantize_dynamic(str(state.artifact.path), str(out / "model.onnx"), weight_type=QuantType.QInt8, per_channel=True,
                     extra_options={"DefaultTensorType": onnx.TensorProto.FLOAT})
    wl.save_companions(bundle, out)
    return out, state.artifact.path


def ort_static_peer(wl, bundle, data, work: Path, n_calib: int) -> Path:
    """ONNX Runtime's own quantize_static (QDQ, per-channel weights, MinMax calibration on the same
    calibration batches; its histogram calibrators need equal-length batches, so MinMax it is). It also
    quantizes the attention score MatMuls (activation x activation), which slimcart's static_int8 keeps float."""
    from onnxruntime.quantization import CalibrationDataReader, CalibrationMethod, QuantFormat, QuantType, quantize_static

    from slimcart.runtime.onnx_runtime import export_onnx

    spec = wl.export_spec(bundle)
    src = export_onnx(spec.get("module", bundle.module), spec["example"], work / "ortstatic-src.onnx", spec["dynamic_axes"],
                      spec["output_name"])
    calib = wl.calibration_batches(bundle, data, n_calib)

    class Reader(CalibrationDataReader):
        def __init__(self):
            self.it = iter(calib)

        def get_next(self):
            return next(self.it, None)

    out = work / "ortstatic"
    out.mkdir()
    # MatMul + Gather only: ORT's default (every supported op, Softmax / LayerNorm / Add included) drops the
    # embedding cosine to ~0.3 here, which would be a strawman for this peer.
    quantize_static(str(src), str(out / "model.onnx"), Reader(), quant_format=QuantFormat.QDQ, per_channel=True,
                    activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8, calibrate_method=CalibrationMethod.MinMax,
                    op_types_to_quantize=["MatMul", "Gather"])
    wl.save_companions(bundle, out)
    return out


def bench_search(args, work: Path) -> dict:
    import numpy as np

    from slimcart.runtime.openvino_runtime import save_openvino

    wl = get_workload("search")
    bundle, data = wl.load_model(args.model), wl.load_data(args.data)
    threads = int(args.timing_threads.split(",")[0])
    res: dict = {"model": args.model, "data": wl.data_info(data).as_dict(), "sides": {}}
    t0 = time.time()
    base = wl.evaluate(wl.torch_runner(bundle), bundle, data)
    log(f"fp32 {base.quality} ({time.time() - t0:.0f} s)")
    wl.save_model(bundle, work / "fp32")
    base_bytes = outputs.model_bytes(work / "fp32")
    res["baseline"] = {"quality": base.quality, "size_bytes": base_bytes, "eval_seconds": round(time.time() - t0)}
    runners = {"torch fp32 (baseline)": wl.torch_runner(bundle)}
    folders: dict[str, Path] = {}

    def add(name: str, folder: Path, kind: str, build_s: float | None = None, notes=(), kernels=()):
        runner, b2 = api.load(wl, folder, threads)  # reloaded from disk, as a user would
        t = time.time()
        if kind == "reference":  # an fp32 runtime: check it computes the same function, skip the full evaluation
            batches = wl.bench_inputs(bundle, data).serving[:4]
            diff = max(float(np.abs(runner(x) - wl.torch_runner(bundle)(x)).max()) for x in batches)
            q = {"ndcg@10": None, "recall@10": None, "cosine": None, "max_abs_diff_vs_torch": diff}
        else:
            q = wl.evaluate(runner, b2 or bundle, data, reference=base.outputs).quality
        side = {"kind": kind, "runtime": runner.runtime, "quality": q, "size_bytes": outputs.model_bytes(folder),
                "ndcg_rel": None if q["ndcg@10"] is None else q["ndcg@10"] / base.quality["ndcg@10"] - 1,
                "recall_rel": None if q["recall@10"] is None else q["recall@10"] / base.quality["recall@10"] - 1,
                "guard_rel": None if q.get("guard_mrr") is None else q["guard_mrr"] / base.quality["guard_mrr"] - 1,
                "build_seconds": None if build_s is None else round(build_s), "eval_seconds": round(time.time() - t),
                "notes": list(notes), "kernels": list(kernels)}
        side["size_ratio"] = side["size_bytes"] / base_bytes
        res["sides"][name] = side
        runners[name] = runner
        folders[name] = folder
        log(f"{name}: {q} size {side['size_ratio']:.2f}")

    if "peers" in args.include:  # reference fp32 runtimes and the peers' int8
        from slimcart.runtime.onnx_runtime import copy_onnx

        _, fused = ort_dynamic_peer(wl, bundle, work)
        copy_onnx(fused, work / "ortfp32")
        wl.save_companions(bundle, work / "ortfp32")
        add("ONNX Runtime fp32 (fused)", work / "ortfp32", "reference")
        add("peer: ORT quantize_dynamic per-channel", work / "ortdyn", "peer")
        t = time.time()
        add("peer: ORT quantize_static QDQ (MinMax, per-channel)", ort_static_peer(wl, bundle, data, work, args.calibration_batches),
            "peer", time.time() - t)
        save_openvino(fused, work / "ovfp32")
        wl.save_companions(bundle, work / "ovfp32")
        add("OpenVINO fp32", work / "ovfp32", "reference")
        try:
            t = time.time()
            folder, ver = nncf_peer(wl, bundle, data, work, args.calibration_batches)
            add(f"peer: OpenVINO + NNCF int8 PTQ ({ver})", folder, "peer", time.time() - t)
        except ImportError:
            res["nncf"] = "not installed (pip install nncf): peer skipped"
            log(res["nncf"])
    if "compile" in args.include:  # no-quantization speed baseline: torch.compile + bf16 autocast
        state = parse_step({"kind": "torch_compile", "bf16": True}).apply(
            ModelState(bundle=bundle), StepContext(workload=wl, data=None, workdir=work, threads=threads, progress=log))
        state.save(work / "compile-bf16", wl)
        add("torch.compile bf16 autocast (no quantization)", work / "compile-bf16", "baseline option", notes=state.notes,
            kernels=state.kernels)
    cache = api.PrefixCache()
    for name in args.recipes.split(","):
        built = api.build(wl, args.model, name, threads=threads, workdir=work / f"build-{name}", progress=log,
                          loaded=(bundle, data), cache=cache)
        state = built.state
        state.save(work / f"out-{name}", wl)
        add(f"slimcart {name}", work / f"out-{name}", "recipe", built.seconds, state.notes, state.kernels)
        res["sides"][f"slimcart {name}"]["extra"] = {k: v for k, v in state.reports.items()
                                                      if k in ("smoothquant", "static_int8", "runtime_timing_s")}
        mp = state.reports.get("mixed_precision")
        if mp:
            res["sides"][f"slimcart {name}"]["extra"]["mixed_precision"] = {k: mp[k] for k in ("keep_fp32", "drop", "drop_all_int8", "met")}
        del state, built
    inputs = wl.bench_inputs(bundle, data)
    base_name = "torch fp32 (baseline)"
    res["timing_by_threads"] = {}
    for th in [int(x) for x in args.timing_threads.split(",")]:
        set_threads(th)
        sides = {base_name: wl.torch_runner(bundle), **{n: api.load(wl, f, th)[0] for n, f in folders.items()}}
        log(f"timing {len(sides)} sides interleaved, {args.repeats} rounds, {th} thread(s)")
        t = measure_interleaved(sides, inputs, repeats=args.repeats, progress=log)
        res["timing_by_threads"][str(th)] = {
            name: {"throughput_per_s": t[name].summary()["throughput_per_s"],
                   "latency_p50_ms": t[name].summary()["latency_ms"]["p50"],
                   "throughput_ratio": paired_ratio(t[name].throughput_per_s, t[base_name].throughput_per_s),
                   "throughput_ratio_detail": ratio_stats(t[name].throughput_per_s, t[base_name].throughput_per_s),
                   "latency_ratio": t[name].summary()["latency_ms"]["p50"] / t[base_name].summary()["latency_ms"]["p50"]}
            for name in sides}
        del sides
    res["timing_threads"] = args.timing_threads
    res["timing"] = res["timing_by_threads"][args.timing_threads.split(",")[0]]
    res["targets"] = {"throughput_ratio": 2.5, "ndcg_rel": -0.005, "recall_rel": -0.01, "size_ratio": 0.30}
    return res


def _x(t: dict) -> str:
    """A throughput ratio with its 95% interval over rounds where the JSON has it (runs after 2026-11-30)."""
    d = t.get("throughput_ratio_detail")
    return f"{t['throughput_ratio']:.2f}x" + (f" [{d['ci95'][0]:.2f}, {d['ci95'][1]:.2f}]" if d else "")


def _pct(x: float) -> str:
    return f"{x * 100:+.2f}%"


def markdown_search(s: dict) -> list[str]:
    base, tm, tg = s["baseline"], s["timing"], s["targets"]
    lines = ["## search: all-MiniLM-L6-v2 on CrowdFlower", "",
             f"Data: {s['data']['name']}, {s['data']['split']} ({s['data']['n']} judged pairs). fp32 nDCG@10 "
             f"{base['quality']['ndcg@10']:.4f}, Recall@10 {base['quality']['recall@10']:.4f}, "
             f"{base['size_bytes'] / 1e6:.1f} MB. Targets: >= {tg['throughput_ratio']}x batch-32 throughput, nDCG@10 "
             f"loss <= {-tg['ndcg_rel']:.1%}, Recall@10 loss <= {-tg['recall_rel']:.0%}, size <= {tg['size_ratio']:.0%}.", "",
             "| model | runtime | batch-32 throughput vs torch fp32 | p50 latency (batch 1) | nDCG@10 (rel.) | Recall@10 (rel.) "
             "| guard MRR (rel.) | cosine to fp32 | size | meets all targets |",
             "|---|---|---|---|---|---|---|---|---|---|",
             f"| torch fp32 eager (baseline) | torch | 1.00x ({tm['torch fp32 (baseline)']['throughput_per_s']:.0f} texts/s) | "
             f"{tm['torch fp32 (baseline)']['latency_p50_ms']:.1f} ms | {base['quality']['ndcg@10']:.4f} | "
             f"{base['quality']['recall@10']:.4f} | {base['quality'].get('guard_mrr', float('nan')):.4f} | 1 | 100% | |"]
    for name, side in s["sides"].items():
        t, q = tm[name], side["quality"]
        if side["kind"] == "reference":
            lines.append(f"| {name} | {side['runtime']} | {_x(t)} | {t['latency_p50_ms']:.1f} ms | "
                         f"fp32: same function (max abs diff vs torch {q['max_abs_diff_vs_torch']:.1e}) | | | | "
                         f"{side['size_ratio']:.0%} | |")
            continue
        ok = (t["throughput_ratio"] >= tg["throughput_ratio"] and side["ndcg_rel"] >= tg["ndcg_rel"]
              and side["recall_rel"] >= tg["recall_rel"] and side["size_ratio"] <= tg["size_ratio"])
        label = f"**{name}**" if side["kind"] == "recipe" else name
        lines.append(f"| {label} | {side['runtime']} | {_x(t)} | {t['latency_p50_ms']:.1f} ms | "
                     f"{q['ndcg@10']:.4f} ({_pct(side['ndcg_rel'])}) | {q['recall@10']:.4f} ({_pct(side['recall_rel'])}) | "
                     + (f"{q['guard_mrr']:.4f} ({_pct(side['guard_rel'])})" if side.get("guard_rel") is not None else "n/a")
                     + f" | {q['cosine']:.4f} | {side['size_ratio']:.0%} | {'yes' if ok else 'no'} |")
    by = s.get("timing_by_threads", {})
    lines.insert(4, f"Speed columns: {s.get('timing_threads', '?').split(',')[0]} intra-op thread(s) per side (every runtime "
                    "pinned to the same count).")
    lines.insert(5, "")
    if len(by) > 1:
        ths = list(by)
        lines += ["", "Batch-32 throughput vs torch fp32 at each thread count (same build, timed again):", "",
                  "| model | " + " | ".join(f"{t} thread(s)" for t in ths) + " |", "|---|" + "---|" * len(ths)]
        for name in by[ths[0]]:
            lines.append(f"| {name} | " + " | ".join(f"{by[t][name]['throughput_ratio']:.2f}x" for t in ths) + " |")
    lines += ["", "What ran where (from each recipe's build notes):", ""]
    for name, side in s["sides"].items():
        if side["kind"] == "recipe":
            lines.append(f"- `{name.split()[-1]}` (built in {side['build_seconds']} s): " + "; ".join(side["kernels"] + side["notes"]))
    if "nncf" in s:
        lines.append(f"- NNCF: {s['nncf']}")
    lines += ["", "Notes:", "",
              "- Every int8 row runs real int8 kernels (ONNX Runtime QLinearMatMul / MatMulIntegerToFloat / MatMulInteger, "
              "or OpenVINO's int8 MatMul); fake-quant simulation is used only inside the recipes to choose alpha, "
              "the fp32 layers and the QAT weights.",
              "- Calibration, SmoothQuant statistics, sensitivity and QAT use only the calibration split (the other 30% "
              "of queries, by hash); the table is measured on the evaluation split.",
              "- SmoothQuant on a post-LN encoder: the LayerNorm output also feeds the residual, so the 1/s cannot be "
              "folded into it; it is an explicit per-channel multiply before each smoothed Linear (shared by Q/K/V), "
              "with power-of-two scales so the smoothed fp32 model is bit-identical to the original.",
              "- `size` counts the weight files on disk (ONNX / OpenVINO IR / safetensors) against the fp32 "
              "safetensors; int8 recipes also store the word and position embedding tables int8 per row.",
              ""]
    return lines + [""]


def markdown(r: dict) -> str:
    env = r.get("environment", {})
    lines = ["# Quantization benchmark", "",
             "Generated by `bench/quantization.py`; raw figures in `bench/results/quantization.json`. Every speed figure is",
             "the median of per-round ratios against PyTorch fp32 eager, all sides timed interleaved in one process",
             "(`slimcart.bench.measure_interleaved`); every model is saved and reloaded from disk before it is evaluated.",
             f"CPU: {env.get('cpu')} ({', '.join(env.get('cpu_flags', []))}), threads: {env.get('threads')}.", ""]
    if "search" in r:
        lines += markdown_search(r["search"])
    lines.append("The llm half (weight-only int4 on SmolLM2) is in `docs/bench-quantization-llm.md`.")
    lines.append("")
    for name in ("search",):
        if name in r:
            lines.append(f"- {name}: {r[name]['wall_seconds']} s wall clock, load average at start/end {r[name]['load_avg_start_end']}")
    return "\n".join(lines) + "\n"


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--sections", default="search", choices=["search"], help="llm: see bench/quantization_llm.py")
    p.add_argument("--data", default=None)
    p.add_argument("--model", default="minilm", help="search model (a tiny folder for a smoke run)")
    p.add_argument("--threads", type=int, default=2, help="threads while building and evaluating")
    p.add_argument("--timing-threads", default="2", help="comma list; the table uses the first, the JSON keeps all")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--recipes", default=",".join(SEARCH_RECIPES))
    p.add_argument("--include", default="peers", help="'peers' adds ORT fp32/dynamic/static, OpenVINO fp32 and NNCF; "
                   "'compile' adds torch.compile + bf16 autocast (slow to compile on a loaded machine)")
    p.add_argument("--calibration-batches", type=int, default=32)
    p.add_argument("--render", action="store_true", help="only rewrite the Markdown from the saved JSON")
    args = p.parse_args()
    if args.render:
        out = ROOT / "bench" / "results" / "quantization.json"
        (ROOT / "docs" / "bench-quantization.md").write_text(markdown(json.loads(out.read_text())))
        return
    set_threads(args.threads)
    out_json = ROOT / "bench" / "results" / "quantization.json"
    results = json.loads(out_json.read_text()) if out_json.exists() else {}
    results["environment"] = environment(args.threads)
    for section in args.sections.split(","):
        fn = {"search": bench_search}[section]
        t0, load0 = time.time(), os.getloadavg()[0]
        with tempfile.TemporaryDirectory() as tmp:
            r = fn(args, Path(tmp))
        r["wall_seconds"], r["load_avg_start_end"] = round(time.time() - t0), [load0, os.getloadavg()[0]]
        results[section] = r
        out_json.parent.mkdir(parents=True, exist_ok=True)
        out_json.write_text(json.dumps(results, indent=2, default=float))
        log(f"{section} done in {r['wall_seconds']} s")
    (ROOT / "docs" / "bench-quantization.md").write_text(markdown(results))


if __name__ == "__main__":
    main()
