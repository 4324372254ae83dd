"""The verb: table selection by pattern with per-table techniques, the bytes report, SASRec scoring
through a compressed item table, and bad input as one clear error that leaves the model untouched."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from slimcart.compress.embeddings import (
    EmbeddingCompressConfig,
    MixedPrecisionEmbedding,
    QREmbedding,
    RowwiseQuantEmbedding,
    compress_embeddings_,
    parse_embedding_config,
)
from slimcart.errors import SlimcartError
from slimcart.models.sasrec import SASRec, SASRecConfig

pytestmark = pytest.mark.usefixtures("one_thread")


class CTR(nn.Module):
    """Two sparse features (bags) and a dense head: the shape of a CTR model."""

    def __init__(self):
        super().__init__()
        self.user_table = nn.EmbeddingBag(300, 8, mode="sum")
        self.ad_table = nn.EmbeddingBag(120, 8, mode="mean")
        self.head = nn.Linear(16, 1)

    def forward(self, u, uo, a, ao):
        return self.head(torch.cat([self.user_table(u, uo), self.ad_table(a, ao)], 1))


def test_flat_and_nested_configs_are_the_same():
    flat = EmbeddingCompressConfig(method="rowwise", bits=4, tables=["*item*"])
    nested = parse_embedding_config({"tables": ["*item*"], "technique": {"method": "rowwise", "bits": 4}})
    assert flat == nested


def test_per_table_techniques_and_the_bytes_report():
    torch.manual_seed(0)
    model = CTR()
    counts = {"user_table": np.random.default_rng(0).zipf(1.5, 300).astype(float)}
    cfg = {"method": "rowwise", "bits": 8, "per_table": {"user_*": {"method": "mixed_precision", "tail_bits": 2}}}
    u, uo = torch.tensor([1, 2, 3, 250]), torch.tensor([0, 2])
    a, ao = torch.tensor([5, 6, 7]), torch.tensor([0, 1])
    before = model(u, uo, a, ao)
    report = compress_embeddings_(model, cfg, counts)
    assert isinstance(model.user_table, MixedPrecisionEmbedding) and isinstance(model.ad_table, RowwiseQuantEmbedding)
    assert model.ad_table.mode == "mean" and model.user_table.mode == "sum"
    t = report["tables"]
    assert t["ad_table"]["bytes_before"] == 120 * 8 * 4 and t["ad_table"]["bytes_after"] == 120 * (8 + 8)
    assert t["user_table"]["bytes_after"] == model.user_table.nbytes()
    assert report["bytes_before"] == 420 * 32 and report["bytes_after"] == sum(x["bytes_after"] for x in t.values())
    after = model(u, uo, a, ao)
    assert after.shape == before.shape and (after - before).abs().max() < 0.2  # int8 / int2-with-cache noise


def test_sasrec_scores_every_item_through_the_compressed_table():
    torch.manual_seed(0)
    model = SASRec(SASRecConfig(n_items=200, max_len=8, hidden=32, heads=2, layers=1, dropout=0.0)).eval()
    seq = torch.randint(0, 201, (3, 8))
    seq[:, :2] = 0  # left padding
    ref = model(seq)
    compress_embeddings_(model, EmbeddingCompressConfig(method="rowwise", bits=8, tables=["item_emb"]))
    with torch.no_grad():
        got = model(seq)
        # the same maths by hand: encode with the quantized rows, score against every quantized row
        h = model.encode(seq)[:, -1]
        want = h @ model.item_emb.dequantize().T
    assert isinstance(model.item_emb, RowwiseQuantEmbedding) and isinstance(model.pos_emb, nn.Embedding)
    np.testing.assert_allclose(got.numpy(), want.numpy(), rtol=1e-4, atol=1e-4)
    assert got[:, 0].abs().max() == 0  # the padding item's row is exactly zero
    assert (got - ref).abs().max() < 0.05 * ref.abs().max()  # int8 rows barely move the scores
    top_ref, top_got = ref.topk(10).indices, got.topk(10).indices
    assert np.mean([len(set(a.tolist()) & set(b.tolist())) for a, b in zip(top_ref, top_got)]) >= 8


def test_sasrec_with_qr_items_retrains():
    torch.manual_seed(0)
    model = SASRec(SASRecConfig(n_items=100, max_len=6, hidden=16, heads=2, layers=1, dropout=0.0))
    compress_embeddings_(model, {"method": "qr", "collisions": 4, "tables": ["item_emb"]})
    assert isinstance(model.item_emb, QREmbedding)
    seq = torch.randint(1, 101, (4, 6))
    model(seq).logsumexp(1).sum().backward()
    assert model.item_emb.Q.grad.abs().sum() > 0 and model.item_emb.R.grad.abs().sum() > 0


@pytest.mark.parametrize("cfg,freq,match", [
    ({"method": "rowwise", "bits": 3}, None, r"technique\.rowwise\.bits"),
    ({"method": "rowwise", "bogus": 1}, None, "bogus"),
    ({"method": "nope"}, None, "technique"),
    ({"tables": ["nothing*"]}, None, "no nn.Embedding"),
    ({"method": "mixed_precision"}, None, r"pass frequencies\['user_table'\]"),
    ({"method": "rowwise"}, {"usr_table": np.ones(300)}, "not tables chosen"),
    ({"method": "mixed_precision", "tables": ["user_table"]}, {"user_table": np.ones(5)}, "user_table: frequencies have 5"),
    ({"method": "tt", "dim_factors": [3, 3, 3]}, None, "user_table: TT width factors"),
    ({"method": "rowwise", "technique": {"method": "rowwise"}}, None, "not both"),
    ("rowwise", None, "must be a mapping"),
])
def test_bad_input_is_one_error_line_and_the_model_is_untouched(cfg, freq, match):
    model = CTR()
    state = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(SlimcartError, match=match) as e:
        compress_embeddings_(model, cfg, freq)
    assert "\n" not in str(e.value)
    assert isinstance(model.user_table, nn.EmbeddingBag) and isinstance(model.ad_table, nn.EmbeddingBag)
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in state.items())


def test_tied_tables_are_refused_and_shared_modules_swapped_everywhere():
    class Tied(nn.Module):
        def __init__(self):
            super().__init__()
            self.emb = nn.Embedding(10, 4)
            self.out = nn.Linear(4, 10, bias=False)
            self.out.weight = self.emb.weight

    with pytest.raises(SlimcartError, match="tied to out.weight"):
        compress_embeddings_(Tied(), {"method": "rowwise"})

    shared = nn.Module()
    shared.a = nn.Embedding(10, 4)
    shared.b = shared.a
    compress_embeddings_(shared, {"method": "rowwise", "bits": 8})
    assert shared.a is shared.b and isinstance(shared.b, RowwiseQuantEmbedding)


def test_per_table_alone_chooses_only_its_tables_and_weight_readers_get_a_clear_error():
    torch.manual_seed(0)
    model = SASRec(SASRecConfig(n_items=50, max_len=4, hidden=8, heads=2, layers=1))
    compress_embeddings_(model, {"per_table": {"item_emb": {"method": "rowwise", "bits": 8}}})
    assert isinstance(model.item_emb, RowwiseQuantEmbedding) and isinstance(model.pos_emb, nn.Embedding)
    everything = SASRec(SASRecConfig(n_items=50, max_len=4, hidden=8, heads=2, layers=1))
    compress_embeddings_(everything, {"method": "rowwise", "bits": 8})  # also pos_emb, whose .weight SASRec reads
    with pytest.raises(AttributeError, match="no float .weight"):
        everything(torch.randint(1, 51, (2, 4)))
