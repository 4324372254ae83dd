"""Recovery and gradual pruning: training lowers the loss it optimises, sparsity masks survive it,
and the gradual (cubic) schedule ends at exactly the requested sparsity."""
from __future__ import annotations

import copy
from dataclasses import replace

import numpy as np
import pytest
import torch

from slimcart.compress.prune import RecoverConfig, StructuredConfig, prune, recover
from slimcart.contracts import ModelState, StepContext
from slimcart.recipe import parse_step
from slimcart.workloads import get_workload
from slimcart.contracts import ModelBundle


pytestmark = pytest.mark.usefixtures("one_thread")


def _ctx(tmp_path, tiny_encoder_dir):
    wl = get_workload("search")
    bundle = wl.load_model(str(tiny_encoder_dir))
    return wl, bundle, StepContext(workload=wl, data=wl.load_data(None), workdir=tmp_path, threads=1)


def test_distillation_recovers_toward_the_teacher(tmp_path, tiny_encoder_dir, synthetic_data):
    wl, bundle, ctx = _ctx(tmp_path, tiny_encoder_dir)
    batches = ctx.calibration(bundle, 4)
    teacher = copy.deepcopy(bundle.module)
    student = bundle.module
    prune(student, StructuredConfig(heads=0.5, ffn=0.5), batches)

    def gap():
        with torch.no_grad():
            return float(np.mean([(1 - torch.cosine_similarity(student(**{k: torch.as_tensor(v) for k, v in b.items()}),
                                                               teacher(**{k: torch.as_tensor(v) for k, v in b.items()}))).mean()
                                  for b in batches]))

    before = gap()
    rep = recover(student, batches, RecoverConfig(steps=40, lr=1e-3, calibration_batches=4), teacher=teacher)
    assert rep["steps"] == 40 and rep["loss_last_10pct"] < rep["loss_first_10pct"]
    assert gap() < 0.7 * before


def test_masks_survive_recovery_and_gradual_schedule_hits_target(tmp_path, tiny_encoder_dir, synthetic_data):
    wl, bundle, ctx = _ctx(tmp_path, tiny_encoder_dir)
    state = ModelState(bundle=bundle)
    step = parse_step({"kind": "prune", "sparsity": 0.6,
                       "gradual": {"steps": 12, "prune_every": 3, "lr": 1e-4, "calibration_batches": 2}})
    state = step.apply(state, ctx)
    lin = {n: m for n, m in bundle.module.named_modules() if isinstance(m, torch.nn.Linear)}
    zeros = sum(int((m.weight == 0).sum()) for m in lin.values())
    assert zeros == sum(round(0.6 * m.weight.numel()) for m in lin.values())
    assert any("gradual" in n for n in state.notes) and "gradual" in state.size_only[0]
    pattern = {n: (m.weight == 0).clone() for n, m in lin.items()}
    before = {n: m.weight.detach().clone() for n, m in lin.items()}
    state = parse_step({"kind": "recover", "steps": 5, "lr": 1e-3, "calibration_batches": 2}).apply(state, ctx)
    assert all(bool((lin[n].weight[z] == 0).all()) for n, z in pattern.items())  # pruned weights stay zero
    assert any(not torch.equal(lin[n].weight, before[n]) for n in lin)  # while the kept ones trained


def test_recsys_task_loss_goes_down():
    from slimcart.models.sasrec import SASRec, SASRecConfig

    torch.manual_seed(0)
    model = SASRec(SASRecConfig(n_items=30, max_len=8, hidden=16, heads=2, layers=1, dropout=0.0))
    bundle = ModelBundle(name="t", module=model, source=None, extra={"config": {"training": {"loss": "bce"}}})
    g = torch.Generator().manual_seed(0)
    seqs = torch.randint(1, 31, (16, 8), generator=g)
    seqs[:, 1::2] = seqs[:, ::2] % 30 + 1  # a learnable rule: item i is followed by item i + 1
    seqs[:3, :3] = 0
    batches = [{"seq": seqs}]
    loss = get_workload("recsys").task_loss(bundle)
    prune(model, StructuredConfig(hidden=0.25, ffn=0.5, criterion="magnitude"))
    rep = recover(model, batches, RecoverConfig(method="task", steps=60, lr=1e-2, calibration_batches=1), task=loss)
    assert rep["loss_last_10pct"] < 0.8 * rep["loss_first_10pct"]


def test_prune_keeps_a_dense_copy_only_when_a_later_step_can_use_it(tmp_path, tiny_encoder_dir, synthetic_data):
    wl, bundle, ctx = _ctx(tmp_path, tiny_encoder_dir)
    step = parse_step({"kind": "prune", "sparsity": 0.5})
    dense = {n: p.detach().clone() for n, p in bundle.module.named_parameters()}
    for later, kept in (((), False), (("export_onnx",), False), (("recover",), True), (("distill",), True), (None, True)):
        ctx.later_steps = later
        state = step.apply(ModelState(bundle=replace(bundle, module=copy.deepcopy(bundle.module))), ctx)
        assert (state.teacher is not None) is kept, later
        if kept:  # the copy is the model before pruning, not the pruned one
            got = dict(state.teacher.named_parameters())
            assert all(torch.equal(got[n], p) for n, p in dense.items())
