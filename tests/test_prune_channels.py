"""Channel pruning (torch-pruning's dependency graph) on slimcart's ResNet: the pruned network computes
exactly what the dense one computes with the removed channels' outgoing connections cut (BN and
residual coupling), parameter counts match a hand formula, ratio 0 changes nothing, each importance
removes channels that carry nothing, pruned models round-trip through safetensors, and BatchNorm
recalibration gives the batch statistics computed directly."""
from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from slimcart.compress.prune.channels import prune_channels, recalibrate_batchnorm
from slimcart.errors import SlimcartError
from slimcart.models.cnn import CNNConfig, ResNet, count_params, load_cnn, save_cnn

pytestmark = pytest.mark.usefixtures("one_thread")

CLASSES = list("abcd")


def resnet(seed: int = 0) -> ResNet:
    """stem 16, stage widths 16/32/32/64 (2, 1, 1, 1 blocks); every BN gamma a distinct value so kept
    channels can be identified after pruning, and non-trivial BN statistics."""
    torch.manual_seed(seed)
    model = ResNet(CNNConfig(classes=CLASSES, image_size=32, stem=16, widths=[16, 32, 32, 64], blocks=[2, 1, 1, 1]))
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.weight.copy_(0.5 + torch.randperm(m.num_features) / m.num_features + torch.rand(1) * 1e-3)
                m.bias.normal_(0, 0.2), m.running_mean.normal_(0, 0.2), m.running_var.uniform_(0.5, 1.5)
    return model.eval()


def pixels(n: int = 4, seed: int = 0) -> torch.Tensor:
    return torch.rand(n, 3, 32, 32, generator=torch.Generator().manual_seed(seed))


def kept(original: nn.BatchNorm2d, pruned: nn.BatchNorm2d) -> torch.Tensor:
    """Indices of the original channels a pruned BN still has (found by their distinct gammas)."""
    idx = torch.tensor([int((original.weight == w).nonzero()) for w in pruned.weight])
    assert torch.equal(idx, idx.sort().values)  # order preserved
    return idx


def removed(n: int, keep: torch.Tensor) -> torch.Tensor:
    return torch.tensor([i for i in range(n) if i not in set(keep.tolist())], dtype=torch.long)


def test_pruned_model_equals_dense_model_with_removed_channels_cut():
    dense = resnet()
    x = pixels()
    pruned = copy.deepcopy(dense)
    report = prune_channels(pruned, 0.5, {"pixels": x}, importance="l2", round_to=8)
    b, pb = dense.blocks, pruned.blocks
    # residual coupling: every producer writing one stream keeps the same channels
    s1 = kept(dense.stem[1], pruned.stem[1])
    assert torch.equal(s1, kept(b[0].conv2[1], pb[0].conv2[1])) and torch.equal(s1, kept(b[1].conv2[1], pb[1].conv2[1]))
    streams = [s1]
    for i in (2, 3, 4):
        s = kept(b[i].conv2[1], pb[i].conv2[1])
        assert torch.equal(s, kept(b[i].shortcut[1], pb[i].shortcut[1]))
        streams.append(s)
    inner = [kept(b[i].conv1[1], pb[i].conv1[1]) for i in range(5)]
    assert [len(s) for s in streams] == [8, 16, 16, 32] and [len(s) for s in inner] == [8, 8, 16, 16, 32]
    # reference: the dense model with every consumer's input slice of a removed channel zeroed
    cut = copy.deepcopy(dense)
    c = cut.blocks
    consumers = [(streams[0], [c[0].conv1[0], c[1].conv1[0], c[2].conv1[0], c[2].shortcut[0]]),
                 (streams[1], [c[3].conv1[0], c[3].shortcut[0]]), (streams[2], [c[4].conv1[0], c[4].shortcut[0]]),
                 (streams[3], [cut.head])] + [(inner[i], [c[i].conv2[0]]) for i in range(5)]
    with torch.no_grad():
        for keep, layers in consumers:
            for layer in layers:
                layer.weight[:, removed(layer.weight.shape[1], keep)] = 0
    assert torch.allclose(pruned(x), cut(x), atol=1e-5)
    assert not torch.allclose(pruned(x), dense(x), atol=1e-3)  # the cut did change the function
    # the surviving weights are the original ones, sliced
    assert torch.equal(pb[2].conv1[0].weight, b[2].conv1[0].weight[inner[2]][:, streams[0]])
    assert torch.equal(pruned.head.weight, dense.head.weight[:, streams[3]]) and report["ignored"] == ["head"]


def hand_param_count(stem: int, inner: list[int], widths: list[int], blocks: list[int], classes: int) -> int:
    """conv k x k: out * in * k^2 (no bias); BN: 2 * out; linear: out * in + out."""
    conv = lambda cin, cout, k: cout * cin * k * k + 2 * cout
    total, cin, i = conv(3, stem, 3), stem, 0
    for s, (w, n) in enumerate(zip(widths, blocks)):
        for j in range(n):
            total += conv(cin, inner[i], 3) + conv(inner[i], w, 3)
            if (s > 0 and j == 0) or cin != w:
                total += conv(cin, w, 1)
            cin, i = w, i + 1
    return total + classes * cin + classes


def test_parameter_counts_match_a_hand_formula():
    model = resnet()
    before = count_params(model)
    assert before == hand_param_count(16, [16, 16, 32, 32, 64], [16, 32, 32, 64], [2, 1, 1, 1], 4)
    report = prune_channels(model, 0.5, {"pixels": pixels()}, round_to=8)
    # half of every prunable group: widths 16 -> 8, 32 -> 16, 64 -> 32
    expected = hand_param_count(8, [8, 8, 16, 16, 32], [8, 16, 16, 32], [2, 1, 1, 1], 4)
    assert report["params_before"] == before and report["params_after"] == expected == count_params(model)
    assert report["layers"]["blocks.4.conv2.0"] == {"before": [64, 64], "after": [32, 32]}
    assert report["layers"]["head"] == {"before": [4, 64], "after": [4, 32]}
    # conv work scales with in x out channels: about a quarter is left (the RGB stem and head less so)
    assert 0.2 < report["macs_after"] / report["macs_before"] < 0.35


def test_round_to_keeps_multiples_of_eight():
    model = resnet()
    report = prune_channels(model, 0.3, {"pixels": pixels()}, round_to=8)
    for name, layer in report["layers"].items():
        out, cin = layer["after"]
        assert name == "head" or out % 8 == 0
        assert name == "stem.0" or cin % 8 == 0
    assert model(pixels()).shape == (4, 4)


def test_ratio_zero_changes_nothing():
    model = resnet()
    x = pixels()
    ref, before = model(x), copy.deepcopy(model.state_dict())
    report = prune_channels(model, 0.0, {"pixels": x})
    assert report["params_after"] == report["params_before"] and torch.equal(model(x), ref)
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())


@pytest.mark.parametrize("importance", ["l1", "l2", "bn_scale", "taylor"])
def test_each_importance_removes_the_channels_that_carry_nothing(importance):
    model = resnet()
    dead = torch.tensor([0, 2, 3, 6, 9, 10, 13, 15])  # 8 of block 0's 16 inner channels
    with torch.no_grad():
        block = model.blocks[0]
        block.conv1[0].weight[dead] = 0
        block.conv1[1].weight[dead], block.conv1[1].bias[dead] = 0, 0
        block.conv2[0].weight[:, dead] = 0
    x = pixels()
    ref = model(x)
    # only block 0's inner group may change: every other conv is ignored
    others = [m for n, m in model.named_modules() if isinstance(m, nn.Conv2d) and n != "blocks.0.conv1.0"]
    labelled = [{"pixels": pixels(8, s), "labels": torch.arange(8) % 4} for s in range(2)]
    loss = lambda m, b: F.cross_entropy(m(b["pixels"]), b["labels"])
    original = copy.deepcopy(model)
    report = prune_channels(model, 0.5, {"pixels": x}, importance=importance, ignored_layers=others,
                            batches=labelled, loss_fn=loss)
    alive = removed(16, dead)
    assert torch.equal(kept(original.blocks[0].conv1[1], model.blocks[0].conv1[1]), alive)
    assert torch.allclose(model(x), ref, atol=1e-6)  # removing what carried nothing leaves the function
    changed = {n for n, v in report["layers"].items() if v["before"] != v["after"]}
    assert changed == {"blocks.0.conv1.0", "blocks.0.conv2.0"}
    assert all(p.grad is None for p in model.parameters())  # taylor's gradients are not left behind


def test_pruned_model_round_trips_through_safetensors(tmp_path):
    model = resnet()
    prune_channels(model, 0.5, {"pixels": pixels()}, importance="fpgm")
    x = pixels(3, 1)
    save_cnn(model, tmp_path)
    loaded, cfg = load_cnn(tmp_path)
    assert torch.equal(loaded(x), model(x))
    assert cfg["model"]["widths"] == [8, 16, 16, 32] and cfg["model"]["inner"] == [8, 8, 16, 16, 32]


def test_recalibrated_batchnorm_holds_the_batch_statistics():
    model = resnet()
    batches = [{"pixels": pixels(8, s), "labels": torch.zeros(8, dtype=torch.long)} for s in range(3)]
    with torch.no_grad():  # reference: the stem conv's outputs, each batch's channel mean / unbiased variance
        outs = [model.stem[0]((b["pixels"] - model.mean) / model.std) for b in batches]
    means = torch.stack([o.mean((0, 2, 3)) for o in outs]).mean(0)
    variances = torch.stack([o.transpose(0, 1).reshape(o.shape[1], -1).var(1, unbiased=True) for o in outs]).mean(0)
    assert recalibrate_batchnorm(model, batches) == 1 + 2 * 5 + 3  # stem, 5 blocks, 3 shortcuts (labels left out)
    bn = model.stem[1]
    assert torch.allclose(bn.running_mean, means, atol=1e-5) and torch.allclose(bn.running_var, variances, rtol=1e-4)
    assert not model.training and bn.momentum == 0.1 and int(bn.num_batches_tracked) == 3


def test_bad_requests_are_one_line_errors():
    model = resnet()
    for kwargs, match in [({"ratio": 1.0}, "ratio"), ({"ratio": -0.1}, "ratio"), ({"importance": "biggest"}, "unknown"),
                          ({"importance": "taylor"}, "needs calibration batches"), ({"round_to": 0}, "round_to")]:
        args = {"ratio": 0.5, **kwargs}
        with pytest.raises(SlimcartError, match=match) as e:
            prune_channels(model, example_inputs={"pixels": pixels()}, **args)
        assert "\n" not in str(e.value)
    assert count_params(model) == count_params(resnet())  # nothing changed


def test_numpy_example_inputs_are_accepted():
    model = resnet()
    report = prune_channels(model, 0.25, {"pixels": pixels().numpy()}, round_to=None)
    assert report["layers"]["stem.0"]["after"] == [12, 3] and np.isfinite(model(pixels()).detach().numpy()).all()
