"""How the session distillation recipes' KL was chosen: the same student (gru-distill-half's, or
gru-prune-units' pruned model) distilled for the same wall-clock budget with the full-softmax KL over
all 43k items and with sampled candidates (transfer.kd_negatives), scored by the trainer on 5,000
VALIDATION rows (HR@20, full ranking; never the test prefixes).

    SLIMCART_DATA=../shared/data SLIMCART_HOME=/tmp/x python bench/session_distill_choices.py [--minutes 5] [--model DIR]

(SLIMCART_HOME empty: distillation checkpoints of earlier runs are not reused.) Log: bench/results/session_distill_choices.log
"""
from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from slimcart import api  # noqa: E402
from slimcart.recipe import load_recipe, parse_recipe  # noqa: E402
from slimcart.workloads import get_workload  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--minutes", type=float, default=5.0)
    ap.add_argument("--model", default="gru4rec")
    ap.add_argument("--recipes", default="gru-distill-half,gru-prune-units")
    ap.add_argument("--negatives", default="none,2048")
    args = ap.parse_args()
    wl = get_workload("session")
    data, bundle = wl.load_data(None), wl.load_model(args.model)
    for name in args.recipes.split(","):
        for k in args.negatives.split(","):
            rec = load_recipe(name).to_dict()
            for s in rec["steps"]:
                if s["kind"] == "distill":
                    s["train"]["max_minutes"] = args.minutes
                    s["transfer"]["kd_negatives"] = None if k == "none" else int(k)
            load = os.getloadavg()[0]
            t0 = time.time()
            built = api.build(wl, args.model, parse_recipe(rec), threads=1, loaded=(bundle, data))
            r = built.state.reports["distill"]
            print(f"RESULT {name} kd_negatives={k}: {r['steps']} steps in {args.minutes} min, best validation HR@20 "
                  f"{r['best_score']:.4f} at step {r['best_step']}; history {[round(h['val'], 4) for h in r['history']]}; "
                  f"load {load:.1f} -> {os.getloadavg()[0]:.1f}; {time.time() - t0:.0f}s", flush=True)


if __name__ == "__main__":
    main()
