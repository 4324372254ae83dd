"""Sparsity masks: exact counts, the right weights kept (checked against numpy sorts), N:M patterns,
schedule values computed by hand, per-layer overrides, and bad input refused before any change."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from slimcart.compress.prune import SparsityConfig, prune
from slimcart.compress.prune.masks import global_masks, nm_mask, row_mask, unstructured_mask
from slimcart.compress.prune.schedule import cubic_sparsity, prune_points
from slimcart.errors import SlimcartError
from slimcart.recipe import parse_step


def _scores(*shape, seed=0):
    return torch.from_numpy(np.random.default_rng(seed).standard_normal(shape).astype(np.float32)).abs()


@pytest.mark.parametrize("s", [0.0, 0.1, 0.5, 0.73, 0.999])
def test_unstructured_exact_count_and_largest_kept(s):
    w = _scores(37, 53)
    keep = unstructured_mask(w, s)
    k = int(round(s * w.numel()))
    assert int((~keep).sum()) == k
    if 0 < k < w.numel():
        ordered = np.sort(w.numpy().ravel())  # independent: the k smallest values are the pruned ones
        assert w[~keep].max().item() == pytest.approx(ordered[k - 1])
        assert w[keep].min().item() == pytest.approx(ordered[k])


def test_ties_still_give_exact_count():
    w = torch.ones(10, 10)
    assert int((~unstructured_mask(w, 0.5)).sum()) == 50


def test_row_mask_exact_per_row():
    w = _scores(8, 30, seed=1)
    keep = row_mask(w, 0.4)
    assert all(int((~r).sum()) == 12 for r in keep)
    for r in range(8):
        assert w[r][~keep[r]].max() <= w[r][keep[r]].min()


@pytest.mark.parametrize("n,m", [(2, 4), (4, 8), (1, 4)])
def test_nm_pattern(n, m):
    w = _scores(16, 32, seed=2)
    keep = nm_mask(w, n, m)
    groups = keep.reshape(-1, m)
    assert bool((groups.sum(1) == n).all())
    vals = w.reshape(-1, m).numpy()
    top = np.sort(vals, axis=1)[:, -n:]  # the n largest of each group, computed independently
    np.testing.assert_allclose(np.sort(vals[groups.numpy()].reshape(-1, n), axis=1), top)
    assert (~keep).float().mean().item() == pytest.approx(1 - n / m)


def test_nm_must_divide_input_dim():
    with pytest.raises(SlimcartError, match="multiple of 4"):
        nm_mask(_scores(4, 6), 2, 4)


def test_global_masks_one_threshold():
    a, b = _scores(10, 10, seed=3), _scores(5, 20, seed=4) * 3
    masks = global_masks({"a": a, "b": b}, 0.6)
    assert int((~masks["a"]).sum() + (~masks["b"]).sum()) == 120
    pruned = torch.cat([a[~masks["a"]], b[~masks["b"]]])
    kept = torch.cat([a[masks["a"]], b[masks["b"]]])
    assert pruned.max() <= kept.min()
    assert (~masks["a"]).sum() > (~masks["b"]).sum()  # b is 3x larger, so it loses fewer


@pytest.mark.parametrize("bad", [1.0, -0.1, 1.5])
def test_bad_sparsity_raises(bad):
    with pytest.raises(SlimcartError, match=r"\[0, 1\)"):
        unstructured_mask(_scores(4, 4), bad)
    with pytest.raises(SlimcartError, match=r"\[0, 1\)"):
        parse_step({"kind": "prune", "sparsity": bad})


def test_cubic_schedule_by_hand():
    assert cubic_sparsity(0, 100, 0.8, 0.1) == pytest.approx(0.1)
    assert cubic_sparsity(50, 100, 0.8, 0.1) == pytest.approx(0.8 + (0.1 - 0.8) * 0.125)
    assert cubic_sparsity(100, 100, 0.8) == 0.8 and cubic_sparsity(250, 100, 0.8) == 0.8
    s = [cubic_sparsity(t, 100, 0.8) for t in range(0, 101, 10)]
    assert all(b >= a for a, b in zip(s, s[1:]))  # monotone
    assert prune_points(100, 25, 0.75) == [0, 25, 50, 75]


class _Toy(nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.a, self.b, self.lm_head = nn.Linear(16, 24), nn.Linear(24, 8), nn.Linear(8, 8)

    def forward(self, x):
        return self.lm_head(self.b(self.a(x)))


def test_layerwise_overrides_and_excludes():
    m = _Toy()
    head = m.lm_head.weight.clone()
    prune(m, SparsityConfig(sparsity=0.5, overrides={"b": 0.25}))
    assert (m.a.weight == 0).sum().item() == round(0.5 * 16 * 24)
    assert (m.b.weight == 0).sum().item() == round(0.25 * 24 * 8)
    assert torch.equal(m.lm_head.weight, head)  # excluded by default (tied output heads)


def test_nm_not_dividing_raises_before_anything_changes():
    m = _Toy()
    m.a = nn.Linear(6, 24)  # 6 inputs: 2:4 cannot tile them
    before = {k: v.clone() for k, v in m.state_dict().items()}
    with pytest.raises(SlimcartError, match="multiple of 4"):
        prune(m, SparsityConfig(pattern="2:4"))
    assert all(torch.equal(before[k], v) for k, v in m.state_dict().items())


def test_bad_patterns():
    for bad in ("4:2", "2-4", "0:4"):
        with pytest.raises(SlimcartError):
            parse_step({"kind": "prune", "pattern": bad})
    with pytest.raises(SlimcartError, match="global"):
        parse_step({"kind": "prune", "method": "sparsegpt", "scope": "global"})
