"""Every distillation loss against a value worked out by hand (derivations in the comments)."""
import math

import pytest
import torch

from slimcart import losses as L
from slimcart.errors import SlimcartError

LN3 = math.log(3.0)
# teacher p = softmax([0, ln 3]) = [1/4, 3/4]; student q = softmax([0, 0]) = [1/2, 1/2]
# KL(p||q) = 1/4 ln(1/2) + 3/4 ln(3/2)
KL_QUARTER = 0.25 * math.log(0.5) + 0.75 * math.log(1.5)  # 0.130812...


def test_soft_kl_hand_value_and_temperature_scaling():
    t, s = torch.tensor([[0.0, LN3]]), torch.tensor([[0.0, 0.0]])
    assert L.soft_kl(s, t, 1.0).item() == pytest.approx(KL_QUARTER, abs=1e-6)
    assert KL_QUARTER == pytest.approx(0.130812, abs=1e-6)
    # T=2 on doubled logits gives the same two distributions, and the loss is scaled by T² = 4
    assert L.soft_kl(2 * s, 2 * t, 2.0).item() == pytest.approx(4 * KL_QUARTER, abs=1e-6)
    assert L.soft_kl(t, t).item() == pytest.approx(0.0, abs=1e-7)


def test_token_kl_ignores_padding_and_needs_one_vocabulary():
    t = torch.tensor([[[0.0, LN3], [5.0, -5.0]]])  # second token is padding: its (large) KL must not count
    s = torch.tensor([[[0.0, 0.0], [-5.0, 5.0]]])
    mask = torch.tensor([[1, 0]])
    assert L.token_kl(s, t, 1.0, mask).item() == pytest.approx(KL_QUARTER, abs=1e-6)
    with pytest.raises(SlimcartError, match="vocabulary"):
        L.token_kl(torch.zeros(1, 2, 3), torch.zeros(1, 2, 4))


def test_listwise_kl_masks_padded_candidates():
    # candidate 3 is padding: with it masked, the lists are exactly the two distributions above
    t = torch.tensor([[0.0, LN3, 9.0]])
    s = torch.tensor([[1.0, 1.0, -9.0]])  # equal scores -> q = [1/2, 1/2]
    mask = torch.tensor([[True, True, False]])
    assert L.listwise_kl(s, t, 1.0, mask).item() == pytest.approx(KL_QUARTER, abs=1e-6)


def test_binary_kl_hand_value():
    # teacher σ(0) = 1/2, student σ(ln 3) = 3/4: KL = 1/2 ln(1/2 / 3/4) + 1/2 ln(1/2 / 1/4)
    expected = 0.5 * math.log(2 / 3) + 0.5 * math.log(2.0)  # 0.143841...
    got = L.binary_kl(torch.tensor([LN3]), torch.tensor([0.0])).item()
    assert got == pytest.approx(expected, abs=1e-6) and expected == pytest.approx(0.143841, abs=1e-6)
    # stable at extreme logits (no NaN / inf)
    assert math.isfinite(L.binary_kl(torch.tensor([80.0]), torch.tensor([-80.0])).item())


def test_embedding_cosine_and_mse():
    s = torch.tensor([[1.0, 0.0], [0.0, 2.0]])
    t = torch.tensor([[1.0, 1.0], [0.0, 5.0]])
    # row 1: cos = 1/sqrt 2; row 2: cos = 1 -> mean(1 - cos) = (1 - 0.7071068) / 2
    assert L.embedding_cosine(s, t).item() == pytest.approx((1 - 1 / math.sqrt(2)) / 2, abs=1e-6)
    # squared differences 0, 1, 0, 9 -> mean 2.5
    assert L.embedding_mse(s, t).item() == pytest.approx(2.5, abs=1e-6)
    with pytest.raises(SlimcartError, match="shape"):
        L.embedding_cosine(torch.zeros(2, 3), torch.zeros(2, 4))


def test_hidden_mse_with_projection_and_mask():
    proj = L.projection(1, 2)
    with torch.no_grad():
        proj.weight.copy_(torch.tensor([[2.0], [0.0]]))
    s = torch.tensor([[[1.0], [7.0]]])  # position 2 is padding
    t = torch.tensor([[[1.0, 1.0], [0.0, 0.0]]])
    # position 1: proj -> [2, 0] vs [1, 1]: squared errors 1, 1 -> mean 1
    assert L.hidden_mse(s, t, proj, torch.tensor([[1, 0]])).item() == pytest.approx(1.0, abs=1e-6)
    assert isinstance(L.projection(4, 4), torch.nn.Identity)
    with pytest.raises(SlimcartError, match="shape"):
        L.hidden_mse(s, t)  # widths differ and no projection


def test_attention_kl_hand_value():
    t = torch.tensor([0.5, 0.5]).reshape(1, 1, 1, 2).expand(1, 1, 2, 2).clone()
    s = torch.tensor([0.25, 0.75]).reshape(1, 1, 1, 2).expand(1, 1, 2, 2).clone()
    s[0, 0, 1] = torch.tensor([1.0, 0.0])  # query row 2 is padding: ignored
    expected = 0.5 * math.log(2.0) + 0.5 * math.log(2 / 3)
    got = L.attention_kl(s, t, torch.tensor([[1, 0]])).item()
    assert got == pytest.approx(expected, abs=1e-6)


def test_value_relation_hand_value():
    # student vectors e1, e2 (d=2, one relation head): scores x xᵀ/sqrt 2 -> row 1 = [1/sqrt 2, 0],
    # softmax = [a, 1-a] with a = σ(1/sqrt 2); teacher vectors zero -> uniform [1/2, 1/2]; both rows alike
    a = 1 / (1 + math.exp(-1 / math.sqrt(2)))
    expected = 0.5 * math.log(0.5 / a) + 0.5 * math.log(0.5 / (1 - a))  # 0.0612...
    s = torch.eye(2).unsqueeze(0)
    t = torch.zeros(1, 2, 3)  # the teacher may be wider: only the L×L relations are compared
    assert L.relation_kl(s, t, heads=1).item() == pytest.approx(expected, abs=1e-6)
    with pytest.raises(SlimcartError, match="divide"):
        L.relation_kl(torch.zeros(1, 2, 3), torch.zeros(1, 2, 4), heads=2)
