"""How the session model's training defaults were chosen: short runs scored on VALIDATION HR@20.

Each variant trains GRU4Rec for up to 4 epochs (12 min wall budget) from the same seed on the training
sessions and is scored after every epoch on the fixed 10,000-row validation sample (prefixes of the
newest 10% of the training sessions; the test prefixes are never touched). Variants change one setting
of the base below; the run recorded in bench/results/session_choices.log used exactly these (with the
training loop GRU4Rec had before it moved onto slimcart.training.fit: same loss and optimizer, another
batch order, and it also logged validation MRR@20).

    SLIMCART_DATA=../shared/data python bench/session_choices.py [variant ...]
"""
from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from slimcart.workloads import get_workload

BASE = {"tied": False, "alpha": 0.5, "dropout_emb": 0.0, "dropout_hidden": 0.0, "max_minutes": 12.0}
VARIANTS = {
    "untied": {},
    "tied": {"tied": True},
    "tied-uniform": {"tied": True, "alpha": 0.0},
    "tied-dropout": {"tied": True, "dropout_emb": 0.25, "dropout_hidden": 0.25},
}


def main() -> None:
    names = sys.argv[1:] or list(VARIANTS)
    wl = get_workload("session")
    data = wl.load_data(None)
    for name in names:
        hp = {**BASE, **VARIANTS[name]}
        load = os.getloadavg()
        out = wl.train(data, Path("/tmp/slimcart-session-choices") / name, epochs=4, seed=0, resume=False,
                       progress=lambda m, name=name: print(time.strftime("%H:%M:%S"), name, m, flush=True), **hp)
        t = json.loads((out / "config.json").read_text())["training"]
        print("RESULT", name, {k: t[k] for k in ("best_epoch", "val_hr@20", "seconds")},
              "load before/after", load, os.getloadavg(), flush=True)


if __name__ == "__main__":
    main()
