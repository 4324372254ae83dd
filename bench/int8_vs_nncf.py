"""Benchmark: slimcart's static int8 (OpenVINO) against OpenVINO + NNCF int8 PTQ, same run, same graph.

Both start from the same exported graph (the encoder's transformer with a last_hidden_state output;
pooling applied by the runner for every side alike) and the same calibration batches; every model is
saved, reloaded from disk with slimcart.api.load and evaluated on the CrowdFlower test split and the
guard task; all sides are timed interleaved against PyTorch fp32 eager in one process.

    SLIMCART_DATA=../shared/data python bench/int8_vs_nncf.py [--threads 2] [--repeats 5]

Writes bench/results/int8_vs_nncf.json and prints a Markdown table (pasted into docs/bench-quantization.md).
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
from slimcart.bench import environment, measure_interleaved, paired_ratio, set_threads  # noqa: E402
from slimcart.workloads import get_workload  # noqa: E402

RECIPES = ["int8-static", "w8a8-smoothquant", "int8-static-nncf"]


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')} load {os.getloadavg()[0]:.1f}] {msg}", flush=True)


def nncf_side(wl, bundle, data, folder: Path, n_calib: int) -> str:
    """NNCF's transformer preset (its SmoothQuant included) on the graph slimcart exports, saved in the
    sentence-transformers OpenVINO layout with the same companions."""
    import nncf
    import openvino as ov

    from slimcart.runtime.onnx_runtime import export_onnx
    from slimcart.runtime.openvino_runtime import save_openvino

    spec = wl.export_spec(bundle)
    src = export_onnx(spec["module"], spec["example"], folder.parent / "nncf-src.onnx", spec["dynamic_axes"],
                      spec["output_name"])
    calib = wl.calibration_batches(bundle, data, n_calib)
    q = nncf.quantize(ov.convert_model(str(src)), nncf.Dataset(calib), model_type=nncf.ModelType.TRANSFORMER,
                      subset_size=sum(b["input_ids"].shape[0] for b in calib))
    save_openvino(q, folder, spec["layout"]["openvino"])
    wl.save_companions(bundle, folder)
    return nncf.__version__


def ir_summary(xml: Path) -> dict:
    """Op counts of an IR, and what feeds each MatMul (FakeQuantize'd activations, int8 weights, layout)."""
    import collections

    import openvino as ov

    model = ov.Core().read_model(str(xml))
    ops = collections.Counter(n.get_type_name() for n in model.get_ops())
    feeds = collections.Counter()
    for n in model.get_ops():
        if n.get_type_name() != "MatMul":
            continue
        src = [n.input_value(i).get_node() for i in range(2)]
        while src[1].get_type_name() in ("Convert", "Multiply", "Subtract", "Transpose"):
            src[1] = src[1].input_value(0).get_node()
        weight = f"{src[1].get_type_name()}:{src[1].get_element_type()}" if src[1].get_type_name() == "Constant" else "activation"
        feeds[(src[0].get_type_name(), weight, f"transpose_b={n.get_attributes()['transpose_b']}")] += 1
    return {"ops": dict(sorted(ops.items())), "matmul_inputs": {" / ".join(k): v for k, v in feeds.items()}}


def node_profile(xmls: dict[str, Path], batches: list, rounds: int = 3) -> dict:
    """OpenVINO per-node profiling (1 thread): share of time per (node type, kernel) for each IR."""
    import collections

    import openvino as ov

    out = {}
    for name, xml in xmls.items():
        compiled = ov.Core().compile_model(str(xml), "CPU", {"INFERENCE_NUM_THREADS": 1, "PERF_COUNT": True,
                                                             "INFERENCE_PRECISION_HINT": "f32"})
        req, names = compiled.create_infer_request(), {i.get_any_name() for i in compiled.inputs}
        agg = collections.Counter()
        for r in range(rounds):
            for b in batches:
                req.infer({k: v for k, v in b.items() if k in names})
                if r:
                    for pi in req.profiling_info:
                        agg[f"{pi.node_type} [{pi.exec_type}]"] += pi.real_time.total_seconds()
        total = sum(agg.values())
        out[name] = {k: round(v / total, 4) for k, v in agg.most_common(12)}
    return out


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--model", default="minilm")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--recipes", default=",".join(RECIPES))
    p.add_argument("--calibration-batches", type=int, default=32)
    p.add_argument("--analyse", action="store_true", help="also compare the IRs op by op and profile them per node")
    args = p.parse_args()
    set_threads(args.threads)
    load0, t0 = os.getloadavg(), time.time()
    wl = get_workload("search")
    bundle, data = wl.load_model(args.model), wl.load_data(None)
    res = {"model": args.model, "data": wl.data_info(data).as_dict(), "environment": environment(args.threads),
           "sides": {}}
    base = wl.evaluate(wl.torch_runner(bundle), bundle, data)
    res["baseline"] = base.quality
    log(f"fp32 {base.quality}")
    runners = {"torch fp32 (baseline)": wl.torch_runner(bundle)}
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        folders = {}
        t = time.time()
        ver = nncf_side(wl, bundle, data, tmp / "nncf", args.calibration_batches)
        folders[f"OpenVINO + NNCF {ver} int8 PTQ"] = (tmp / "nncf", time.time() - t, [])
        cache = api.PrefixCache()
        for name in args.recipes.split(","):
            built = api.build(wl, args.model, name, threads=args.threads, workdir=tmp / f"b-{name}", progress=log,
                              loaded=(bundle, data), cache=cache)
            built.state.save(tmp / name, wl)
            folders[f"slimcart {name}"] = (tmp / name, built.seconds, built.state.kernels + built.state.notes)
        for side, (folder, build_s, notes) in folders.items():
            runner, b2 = api.load(wl, folder, args.threads)
            q = wl.evaluate(runner, b2, data, reference=base.outputs).quality
            res["sides"][side] = {"runtime": runner.runtime, "quality": q, "build_seconds": round(build_s),
                                  "size_bytes": outputs.model_bytes(folder), "notes": notes,
                                  "rel": {k: q[k] / base.quality[k] - 1 for k in q if k in base.quality and k != "cosine"}}
            runners[side] = runner
            log(f"{side}: {q}")
        if args.analyse:
            xmls = {s: f / json.loads((f / "slimcart-format.json").read_text())["model"] for s, (f, _, _) in folders.items()
                    if json.loads((f / "slimcart-format.json").read_text())["format"] == "openvino-ir"}
            res["ir"] = {s: ir_summary(x) for s, x in xmls.items()}
            res["node_profile"] = node_profile(xmls, wl.bench_inputs(bundle, data).serving[:4])
        load_t = os.getloadavg()
        timing = measure_interleaved(runners, wl.bench_inputs(bundle, data), repeats=args.repeats, progress=log)
        bt = timing["torch fp32 (baseline)"]
        for side in res["sides"]:
            res["sides"][side]["throughput_ratio"] = paired_ratio(timing[side].throughput_per_s, bt.throughput_per_s)
            res["sides"][side]["latency_p50_ms"] = timing[side].summary()["latency_ms"]["p50"]
        nncf_name = next(s for s in res["sides"] if "NNCF" in s)
        nn = timing[nncf_name].throughput_per_s
        for side in res["sides"]:  # same-run ratio to NNCF, per round
            res["sides"][side]["throughput_vs_nncf"] = paired_ratio(timing[side].throughput_per_s, nn)
    res["load_avg"] = {"start": load0, "before_timing": load_t, "end": os.getloadavg()}
    res["wall_seconds"] = round(time.time() - t0)
    out = ROOT / "bench" / "results" / "int8_vs_nncf.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(res, indent=2, default=float))
    print(markdown(res))


def markdown(r: dict) -> str:
    b = r["baseline"]
    lines = [f"fp32: nDCG@10 {b['ndcg@10']:.4f}, guard MRR {b.get('guard_mrr', float('nan')):.4f}; "
             f"{r['environment']['threads']} threads; load average {r['load_avg']}", "",
             "| model | runtime | throughput vs torch fp32 | vs NNCF (same run) | nDCG@10 (rel.) | Recall@10 (rel.) | "
             "guard MRR (rel.) | guard Recall@1 (rel.) | cosine |", "|---|---|---|---|---|---|---|---|---|"]
    for name, s in r["sides"].items():
        q, rel = s["quality"], s["rel"]
        g = (f"{q['guard_mrr']:.4f} ({rel['guard_mrr']:+.2%}) | {q['guard_recall@1']:.4f} ({rel['guard_recall@1']:+.2%})"
             if "guard_mrr" in q else "n/a | n/a")
        lines.append(f"| {name} | {s['runtime']} | {s['throughput_ratio']:.2f}x | {s['throughput_vs_nncf']:.3f}x | "
                     f"{q['ndcg@10']:.4f} ({rel['ndcg@10']:+.2%}) | {q['recall@10']:.4f} ({rel['recall@10']:+.2%}) | {g} | "
                     f"{q['cosine']:.4f} |")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
