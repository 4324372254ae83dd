"""SparseGPT and Wanda: checked against closed forms (least squares, hand-computed Wanda scores) and
against magnitude pruning on the same calibration inputs; layer-by-layer runs on a tiny Llama."""
from __future__ import annotations

import copy

import numpy as np
import pytest
import torch

from slimcart.compress.prune import SparsityConfig, prune
from slimcart.compress.prune.masks import nm_mask, unstructured_mask
from slimcart.compress.prune.sparsegpt import HessianStats, sparsegpt_prune
from slimcart.compress.prune.wanda import WandaStats, wanda_mask


pytestmark = pytest.mark.usefixtures("one_thread")


def _correlated_inputs(n=3000, d=64, seed=0):
    g = torch.Generator().manual_seed(seed)
    mix = torch.randn(d, d, generator=g) * 0.4 + torch.eye(d)
    scale = torch.linspace(0.2, 3.0, d)  # unequal input energies: where Hessian-aware pruning matters
    return (torch.randn(n, d, generator=g) @ mix) * scale + 0.5


@pytest.mark.parametrize("nm", [None, (2, 4)])
def test_sparsegpt_beats_magnitude_on_calibration_inputs(nm):
    x = _correlated_inputs()
    w = torch.randn(48, 64, generator=torch.Generator().manual_seed(1))
    stats = HessianStats(64)
    stats.add(x)
    new, keep = sparsegpt_prune(w, stats, 0.5, nm, block_size=16)
    mag = w * (nm_mask(w.abs(), *nm) if nm else unstructured_mask(w.abs(), 0.5))
    assert int((new == 0).sum()) >= w.numel() // 2 and int((~keep).sum()) == w.numel() // 2
    assert torch.equal(new == 0, ~keep) or bool(((new == 0) | keep).all())
    if nm:
        assert bool((keep.reshape(-1, 4).sum(1) == 2).all())
    e_gpt, e_mag = reconstruction_error(w, new, x), reconstruction_error(w, mag, x)
    assert e_gpt < 0.9 * e_mag, (e_gpt, e_mag)  # measured ~0.8 here; real LLM layers gain far more


def reconstruction_error(w_old, w_new, x) -> float:
    """||X W_old^T - X W_new^T||_F^2 / ||X W_old^T||_F^2 on inputs x (tokens, in)."""
    ref = x @ w_old.T
    return float(((ref - x @ w_new.T) ** 2).sum() / (ref**2).sum().clamp_min(1e-30))


def test_single_removal_matches_least_squares():
    """Pruning one weight, SparseGPT's OBS update is the least-squares refit of the others."""
    x = _correlated_inputs(n=500, d=12, seed=2).double()
    w = torch.randn(1, 12, dtype=torch.float64, generator=torch.Generator().manual_seed(3))
    w[0, 0] = 1e-3  # clearly the cheapest weight to remove
    stats = HessianStats(12)
    stats.add(x)
    new, keep = sparsegpt_prune(w, stats, 1 / 12, None, block_size=12, damp=0.0)
    assert not keep[0, 0] and int((~keep).sum()) == 1
    target = (x.numpy() @ w.numpy().T).ravel()
    sol, *_ = np.linalg.lstsq(x.numpy()[:, 1:], target, rcond=None)
    np.testing.assert_allclose(new[0, 1:].numpy(), sol, rtol=1e-4, atol=1e-6)


def test_wanda_mask_is_hand_computed_rule():
    x = _correlated_inputs(n=200, d=8, seed=4)
    w = torch.randn(3, 8, generator=torch.Generator().manual_seed(5))
    stats = WandaStats(8)
    stats.add(x[:120])
    stats.add(x[120:])
    norms = np.sqrt((x.numpy().astype(np.float64) ** 2).sum(0))
    score = np.abs(w.numpy()) * norms
    keep = wanda_mask(w, stats, 0.5, None).numpy()
    for r in range(3):
        assert set(np.flatnonzero(~keep[r])) == set(np.argsort(score[r])[:4])


def _tiny_llama(seed=0):
    from transformers import LlamaConfig, LlamaForCausalLM

    from slimcart.models.causal_lm import CausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, tie_word_embeddings=False)
    return CausalLM(LlamaForCausalLM(cfg).eval()).eval()


@pytest.mark.parametrize("method", ["wanda", "sparsegpt"])
@pytest.mark.parametrize("pattern", ["unstructured", "2:4"])
def test_layerwise_methods_on_tiny_llama(method, pattern):
    dense = _tiny_llama()
    g = torch.Generator().manual_seed(0)
    batches = [{"input_ids": torch.randint(0, 64, (1, 24), generator=g)} for _ in range(4)]
    m = copy.deepcopy(dense)
    masks = prune(m, SparsityConfig(method=method, pattern=pattern, calibration_batches=4), batches)
    lin = dict(m.named_modules())
    assert len(masks) == 14 and not any("lm_head" in n for n in masks)  # 7 Linears per block, head excluded
    for name, keep in masks.items():
        w = lin[name].weight
        assert int((~keep).sum()) == w.numel() // 2
        assert bool((w[~keep] == 0).all())
        if pattern == "2:4":
            assert bool((keep.reshape(-1, 4).sum(1) == 2).all())
    mag = copy.deepcopy(dense)
    prune(mag, SparsityConfig(method="magnitude", pattern=pattern))
    ids = torch.cat([b["input_ids"] for b in batches])
    with torch.no_grad():
        ref = dense(ids)
        err = ((m(ids) - ref) ** 2).mean().item()
        err_mag = ((mag(ids) - ref) ** 2).mean().item()
    assert 0 < err and (method == "wanda" or err < err_mag)  # SparseGPT reconstructs; Wanda is reported
