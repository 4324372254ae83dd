"""Pipeline (model) parallelism vs one process: SmolLM2 split by layers over two processes.

    SLIMCART_DATA=../shared/data python bench/pipeline.py [--threads 1] [--repeats 5]

Writes bench/results/pipeline.json and docs/parallelism.md's measured table. Both sides decode the same
review prompts greedily at batch 1 (32 new tokens), interleaved in one run; each stage gets `--threads`.
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

import numpy as np  # noqa: E402

from slimcart.bench import environment, measure_interleaved, ratio_stats, set_threads  # noqa: E402
from slimcart.runtime.pipeline import PipelineRunner  # noqa: E402
from slimcart.workloads import get_workload  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--repeats", type=int, default=5)
    a = ap.parse_args()
    set_threads(a.threads)
    wl = get_workload("llm")
    bundle, data = wl.load_model("smollm2"), wl.load_data(None)
    res = {"environment": environment(a.threads), "load_before": os.getloadavg()}
    with tempfile.TemporaryDirectory() as tmp:
        wl.save_model(bundle, Path(tmp))
        pipe = PipelineRunner(Path(tmp), a.threads)
        try:
            single = wl.torch_runner(bundle)
            window = wl.eval_windows_of(bundle, data)[0]
            diff = float(np.abs(pipe({"input_ids": window}) - single({"input_ids": window})).max())
            inputs = wl.bench_inputs(bundle, data)
            t = measure_interleaved({"one process": single, "two pipeline stages": pipe}, inputs, repeats=a.repeats)
        finally:
            pipe.close()
    res.update(max_abs_logit_diff=diff, decode=ratio_stats(t["two pipeline stages"].throughput_per_s,
                                                           t["one process"].throughput_per_s),
               tokens_per_s={k: v.summary()["throughput_per_s"] for k, v in t.items()}, load_after=os.getloadavg(),
               when=time.strftime("%Y-%m-%d %H:%M"))
    (ROOT / "bench" / "results").mkdir(exist_ok=True)
    (ROOT / "bench" / "results" / "pipeline.json").write_text(json.dumps(res, indent=2))
    print(json.dumps(res, indent=2))


if __name__ == "__main__":
    main()
