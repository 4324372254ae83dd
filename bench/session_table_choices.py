"""How the session recipes' item-table settings were chosen: VALIDATION HR@20 on 20,000 fixed validation
rows (prefixes of the newest 10% of the training sessions; never the test prefixes), each table form
alone and with the int8 GRU, relative to fp32 with a paired bootstrap interval over rows.

    SLIMCART_DATA=../shared/data python bench/session_table_choices.py   (log: bench/results/session_table_choices.log)
"""
from __future__ import annotations

import copy
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from slimcart.bench import paired_bootstrap  # noqa: E402
from slimcart.compress.embeddings import compress_embeddings_  # noqa: E402
from slimcart.compress.quantize.dynamic_int8 import quantize_module  # noqa: E402
from slimcart.workloads import get_workload  # noqa: E402
from slimcart.workloads.session_data import quality, rank_rows  # noqa: E402

FORMS = {
    "int8": {"method": "rowwise", "bits": 8},
    "int4": {"method": "rowwise", "bits": 4},
    "int4-opt": {"method": "rowwise", "bits": 4, "optimized_range": True},
    "int4-opt+10%int8": {"method": "mixed_precision", "tail_bits": 4, "optimized_range": True, "tiers": [{"bits": 8, "fraction": 0.1}]},
    "int4-opt+20%int8": {"method": "mixed_precision", "tail_bits": 4, "optimized_range": True, "tiers": [{"bits": 8, "fraction": 0.2}]},
}
# The same tables scored on the FBGEMM int8 GEMM copy (int8_gemm.py), always with the int8 GRU
FORMS_INT8_GEMM = {
    "int8 int8_gemm": {"method": "rowwise", "bits": 8, "score_kernel": "int8_gemm"},
    "int4 int8_gemm": {"method": "rowwise", "bits": 4, "score_kernel": "int8_gemm"},
    "int4-opt+10%int8 int8_gemm": {"method": "mixed_precision", "tail_bits": 4, "optimized_range": True,
                                   "tiers": [{"bits": 8, "fraction": 0.1}], "score_kernel": "int8_gemm"},
}


def main() -> None:
    torch.set_num_threads(1)
    wl = get_workload("session")
    data = wl.load_data(None)
    b = wl.load_model("gru4rec")
    freqs = wl.table_frequencies(b, data)
    vin, vt = data.validation_rows(20000)

    def ranks(m):
        with torch.inference_mode():
            return rank_rows(lambda x: m(torch.from_numpy(x)).numpy(), vin, vt, m.config.max_len, data.n_items)

    base = ranks(b.module)
    print("fp32", quality(base), flush=True)
    runs = [(n, c, g) for n, c in FORMS.items() for g in (False, True)] + [(n, c, True) for n, c in FORMS_INT8_GEMM.items()]
    for name, cfg, gru in runs:
        m = copy.deepcopy(b.module)
        rep = compress_embeddings_(m, {"tables": ["item_emb"], **cfg}, freqs if cfg["method"] != "rowwise" else None)
        if gru:
            for i in range(len(m.grus)):
                m.grus[i] = quantize_module(m.grus[i], True)
        r = ranks(m)
        pb = paired_bootstrap((r < 20).astype(float), (base < 20).astype(float))
        print(name, "int8 GRU" if gru else "", quality(r), "table MB", rep["bytes_after"] / 1e6, "rel HR", pb, flush=True)


if __name__ == "__main__":
    main()
