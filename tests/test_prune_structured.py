"""Structured pruning: the physically smaller model computes what the masked dense model computes
(output-projection slices of removed heads / neurons zeroed, or removed layers skipped), shapes and
configs follow, and impossible requests fail before anything changes."""
from __future__ import annotations

import copy

import pytest
import torch

from slimcart.compress.prune import StructuredConfig, prune
from slimcart.errors import SlimcartError


pytestmark = pytest.mark.usefixtures("one_thread")


def _bert(seed=0, layers=2):
    from transformers import BertConfig, BertModel

    from slimcart.workloads.search import SentenceEncoder

    torch.manual_seed(seed)
    cfg = BertConfig(vocab_size=120, hidden_size=32, num_hidden_layers=layers, num_attention_heads=4, intermediate_size=64,
                     max_position_embeddings=64, attn_implementation="eager")
    return SentenceEncoder(BertModel(cfg, add_pooling_layer=False).eval()).eval()


def _bert_batches(n=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        ids = torch.randint(1, 120, (4, 9), generator=g)
        am = torch.ones_like(ids)
        am[0, 6:] = 0
        out.append({"input_ids": ids, "attention_mask": am})
    return out


def _llama(seed=0, layers=3):
    from transformers import LlamaConfig, LlamaForCausalLM

    from slimcart.models.causal_lm import CausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=50, hidden_size=48, intermediate_size=64, num_hidden_layers=layers, num_attention_heads=6,
                      num_key_value_heads=2, tie_word_embeddings=False)
    return CausalLM(LlamaForCausalLM(cfg).eval()).eval()


def _zero_cols(lin, cols):
    with torch.no_grad():
        lin.weight[:, cols] = 0


@pytest.mark.parametrize("criterion", ["magnitude", "taylor", "activation"])
def test_bert_heads_ffn_equal_masked_dense(criterion):
    dense, batches = _bert(), _bert_batches()
    m = copy.deepcopy(dense)
    loss = (lambda mod, b: mod(**b).sum()) if criterion == "taylor" else None
    rep = prune(m, StructuredConfig(heads=0.5, ffn=0.5, criterion=criterion), batches, loss)
    ref = copy.deepcopy(dense)
    for li, layer in enumerate(ref.transformer.encoder.layer):
        gone = [h for h in range(4) if h not in rep["kept"]["heads"][li]]
        _zero_cols(layer.attention.output.dense, [c for h in gone for c in range(h * 8, h * 8 + 8)])
        _zero_cols(layer.output.dense, [j for j in range(64) if j not in rep["kept"]["ffn"][li]])
    for b in batches:
        with torch.no_grad():
            out, want, orig = m(**b), ref(**b), dense(**b)
        torch.testing.assert_close(out, want, rtol=1e-5, atol=1e-6)
        assert (out - orig).abs().max() > 1e-3  # the pruning did change the function
    layer = m.transformer.encoder.layer[0]
    assert layer.attention.self.query.weight.shape == (16, 32) and layer.attention.output.dense.weight.shape == (32, 16)
    assert layer.intermediate.dense.weight.shape == (32, 32) and layer.output.dense.weight.shape == (32, 32)
    assert rep["block_params_after"] < 0.55 * rep["block_params_before"]
    cfg = m.transformer.config
    assert cfg.intermediate_size == 32 and cfg.num_attention_heads == 2
    assert cfg.slimcart_structure == {"heads": [2, 2], "intermediate": [32, 32], "dense_heads": 4}


def test_bert_head_count_moves_to_a_divisor_of_hidden():
    """12 heads, hidden 48: removing 25% would leave 9, which does not divide 48; 8 does (nearest)."""
    from transformers import BertConfig, BertModel

    torch.manual_seed(0)
    m = BertModel(BertConfig(vocab_size=50, hidden_size=48, num_hidden_layers=1, num_attention_heads=12,
                             intermediate_size=32), add_pooling_layer=False).eval()
    rep = prune(m, StructuredConfig(heads=0.25, criterion="magnitude"))
    assert rep["shapes"]["heads"] == [8] and m.config.num_attention_heads == 8


def test_bert_layer_drop_equals_shallower_copy():
    from transformers import BertModel

    from slimcart.workloads.search import SentenceEncoder

    dense, batches = _bert(layers=3), _bert_batches()
    m = copy.deepcopy(dense)
    rep = prune(m, StructuredConfig(layers=[1]), batches)
    assert rep["dropped_layers"] == [1] and m.transformer.config.num_hidden_layers == 2
    cfg = copy.deepcopy(dense.transformer.config)
    cfg.num_hidden_layers = 2
    ref_bert = BertModel(cfg, add_pooling_layer=False).eval()  # built independently, then given layers 0 and 2
    state = {k: v for k, v in dense.transformer.state_dict().items() if ".layer.1." not in k}
    state = {k.replace(".layer.2.", ".layer.1."): v for k, v in state.items()}
    ref_bert.load_state_dict(state)
    ref = SentenceEncoder(ref_bert).eval()
    with torch.no_grad():
        torch.testing.assert_close(m(**batches[0]), ref(**batches[0]))
    assert not hasattr(m.transformer.config, "slimcart_structure")  # uniform shapes: a stock config


def test_layer_count_chosen_by_block_influence():
    m = _bert(layers=3)
    rep = prune(m, StructuredConfig(layers=1), _bert_batches())
    assert len(rep["dropped_layers"]) == 1 and len(m.transformer.encoder.layer) == 2


@pytest.mark.parametrize("gqa,heads,want", [("groups", 0.5, (3, 1)), ("queries", 1 / 3, (4, 2))])
def test_llama_gqa_and_layers_equal_masked_dense(gqa, heads, want):
    dense = _llama()
    ids = torch.randint(0, 50, (2, 11), generator=torch.Generator().manual_seed(1))
    m = copy.deepcopy(dense)
    rep = prune(m, StructuredConfig(heads=heads, gqa=gqa, ffn=0.25, layers=[1]), [{"input_ids": ids}])
    ref = copy.deepcopy(dense)
    del ref.model.model.layers[1]  # skipping a pre-norm decoder block = zeroing its o_proj and down_proj
    for i, layer in enumerate(ref.model.model.layers):
        layer.self_attn.layer_idx = i
        if gqa == "groups":  # a removed KV group takes its 3 query heads along
            gone = [h for g in range(2) if g not in rep["kept"]["heads"][i] for h in range(3 * g, 3 * g + 3)]
        else:
            gone = [h for h in range(6) if h not in rep["kept"]["heads"][i]]
        _zero_cols(layer.self_attn.o_proj, [c for h in gone for c in range(h * 8, h * 8 + 8)])
        _zero_cols(layer.mlp.down_proj, [j for j in range(64) if j not in rep["kept"]["ffn"][i]])
    with torch.no_grad():
        torch.testing.assert_close(m(ids), ref(ids), rtol=1e-5, atol=1e-5)
    c = m.model.config
    assert (c.num_attention_heads, c.num_key_value_heads) == want and c.num_hidden_layers == 2
    assert c.intermediate_size == 48 and c.head_dim == 8 and not hasattr(c, "slimcart_structure")
    out = m.model.generate(input_ids=ids[:1], attention_mask=torch.ones_like(ids[:1]), max_new_tokens=4, do_sample=False)
    assert out.shape == (1, 15)  # KV cache indices were renumbered after the layer drop


def _sasrec(seed=0):
    from slimcart.models.sasrec import SASRec, SASRecConfig

    torch.manual_seed(seed)
    return SASRec(SASRecConfig(n_items=40, max_len=10, hidden=16, heads=2, layers=2, dropout=0.0)).eval()


def _seqs(seed=0):
    g = torch.Generator().manual_seed(seed)
    s = torch.randint(1, 41, (6, 10), generator=g)
    s[0, :4] = 0
    return [{"seq": s}]


def test_sasrec_ffn_equals_masked_dense_and_hidden_keeps_shapes_consistent():
    dense, batches = _sasrec(), _seqs()
    m = copy.deepcopy(dense)
    rep = prune(m, StructuredConfig(ffn=0.5), batches)
    ref = copy.deepcopy(dense)
    for i, blk in enumerate(ref.blocks):
        _zero_cols(blk.fc2, [j for j in range(16) if j not in rep["kept"]["ffn"][i]])
    with torch.no_grad():
        torch.testing.assert_close(m(batches[0]["seq"]), ref(batches[0]["seq"]))
    prune(m, StructuredConfig(hidden=0.5, round_to=8), batches)
    assert m.item_emb.weight.shape == (41, 8) and m.config.hidden == 8 and m.config.ffn == [8, 8]
    assert m(batches[0]["seq"]).shape == (6, 41)


def test_sasrec_hidden_pruning_keeps_kept_dims_intact():
    """Block 0 must see the same values on the kept dims, and each kept dim must contribute the same
    to the scores (final LayerNorm scale x item table) as before. Dims 8..15 are silenced in the
    residual stream, so the activation criterion must keep exactly dims 0..7."""
    m = _sasrec()
    with torch.no_grad():
        m.item_emb.weight[:, 8:] = 0
        m.pos_emb.weight[:, 8:] = 0
        for blk in m.blocks:
            for lin in (blk.attn.o, blk.fc2):
                lin.weight[8:] = 0
                lin.bias[8:] = 0
    seq = _seqs()[0]["seq"]
    seen = []
    hook = m.blocks[0].register_forward_pre_hook(lambda _m, args: seen.append(args[0].detach().clone()))
    m(seq)
    out_w = (m.ln.weight[:8, None] * m.item_emb.weight[:, :8].T).detach().clone()
    out_b = (m.ln.bias[:8, None] * m.item_emb.weight[:, :8].T).detach().clone()
    rep = prune(m, StructuredConfig(hidden=0.5, criterion="activation"), _seqs())
    m(seq)
    hook.remove()
    assert rep["kept"]["hidden"][0] == list(range(8)) and m.item_emb.weight.shape[1] == 8
    torch.testing.assert_close(seen[-1], seen[0][..., :8])
    torch.testing.assert_close(m.ln.weight[:, None] * m.item_emb.weight.T, out_w)
    torch.testing.assert_close(m.ln.bias[:, None] * m.item_emb.weight.T, out_b)


def test_removing_every_head_raises_before_any_change():
    m = _bert()
    before = {k: v.clone() for k, v in m.state_dict().items()}
    with pytest.raises(SlimcartError, match="every head of layer 0"):
        prune(m, StructuredConfig(heads=0.9, ffn=0.5), _bert_batches())
    assert all(torch.equal(before[k], v) for k, v in m.state_dict().items())


@pytest.mark.parametrize("kw,msg", [
    ({"layers": [0, 1]}, "every layer"), ({"layers": [5]}, "out of range"), ({"layers": 2}, "at least one"),
    ({"hidden": 0.5}, "SASRec only"),
])
def test_bad_structured_requests(kw, msg):
    m = _bert()
    before = {k: v.clone() for k, v in m.state_dict().items()}
    with pytest.raises(SlimcartError, match=msg):
        prune(m, StructuredConfig(**kw), _bert_batches())
    assert all(torch.equal(before[k], v) for k, v in m.state_dict().items())


def test_llama_queries_must_split_evenly():
    with pytest.raises(SlimcartError, match="same number of query heads"):
        prune(_llama(), StructuredConfig(heads=0.5, gqa="queries"), [{"input_ids": torch.zeros(1, 4, dtype=torch.long)}])


def test_rounding_to_multiples():
    m = _bert()
    prune(m, StructuredConfig(ffn=0.3, round_to=16, criterion="magnitude"))
    assert [layer.intermediate.dense.out_features for layer in m.transformer.encoder.layer] == [48, 48]
