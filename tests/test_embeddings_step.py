"""The compress_embeddings recipe step end to end on a SASRec: built, saved, reloaded, evaluated."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from slimcart import api
from slimcart.models.sasrec import SASRec, SASRecConfig, save_sasrec
from slimcart.workloads import get_workload

pytestmark = pytest.mark.usefixtures("one_thread", "synthetic_data")


@pytest.fixture
def sasrec_dir(tmp_path):
    data = get_workload("recsys").load_data(None)
    torch.manual_seed(0)
    model = SASRec(SASRecConfig(n_items=data.n_items, max_len=12, hidden=32, heads=2, layers=1, dropout=0.0)).eval()
    (tmp_path / "sasrec").mkdir()
    save_sasrec(model, tmp_path / "sasrec", {"training": {"loss": "sampled_softmax", "negatives": 32}})
    return tmp_path / "sasrec"


# bytes per row at 32 dims: int8 = 32 codes + fp32 scale and offset; int4 = 16 + fp16 scale and offset
@pytest.mark.parametrize("recipe, row_bytes, agreement", [("emb-int8", 32 + 8, 0.99), ("emb-int4", 16 + 4, 0.95),
                                                          ("emb-int2-mixed", None, 0.85)])
def test_quantized_item_table_recipes(tmp_path, sasrec_dir, recipe, row_bytes, agreement):
    m = api.compress("recsys", str(sasrec_dir), recipe, tmp_path / "out", repeats=1, measure_rss=False)
    rep = [n for n in m["notes"] if n.startswith("embedding tables")]
    assert rep and "item_emb" in rep[0] and "pos_emb" not in rep[0]
    wl = get_workload("recsys")
    runner, bundle = api.load(wl, tmp_path / "out", threads=1)
    from slimcart.compress.embeddings import CompressedEmbedding

    assert isinstance(bundle.module.item_emb, CompressedEmbedding)  # reloaded compressed, not dequantized
    rows = bundle.module.item_emb.num_embeddings
    if row_bytes is not None:
        assert bundle.module.item_emb.nbytes() == rows * row_bytes
    else:  # 1% fp32 rows (here: 1 of 121), 10% int4 rows, the rest int2 (8 code bytes + 4 for scale/offset)
        assert bundle.module.item_emb.nbytes() < 0.25 * rows * 32 * 4
    # the compressed model ranks like the float one (a random model: agreement, not quality)
    base = wl.load_model(str(sasrec_dir))
    seq = {"seq": np.array([[0] * 6 + [3, 4, 5, 6, 7, 8]])}
    a, b = runner(seq)[0, 1:], wl.torch_runner(base)(seq)[0, 1:]
    assert np.corrcoef(a, b)[0, 1] > agreement
    assert m["compressed"]["quality"]["ndcg@10"] == pytest.approx(
        wl.evaluate(runner, bundle, wl.load_data(None)).quality["ndcg@10"], abs=1e-9)


def test_trainable_table_recipe_with_recovery(tmp_path, sasrec_dir):
    from slimcart.recipe import Recipe, load_recipe

    base = load_recipe("emb-qr")
    steps = [base.steps[0].model_copy(update={"min_rows": 0}),  # the tiny fixture's tables are under the recipe's 1,024 rows
             base.steps[1].model_copy(update={"steps": 5, "calibration_batches": 2})]
    m = api.compress("recsys", str(sasrec_dir), Recipe(name="qr", steps=steps), tmp_path / "out", repeats=1,
                     measure_rss=False)
    assert any("recovery (task)" in n for n in m["notes"]) and any("qr" in n for n in m["notes"])
