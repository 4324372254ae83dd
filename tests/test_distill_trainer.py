"""The distillation trainer: data parallel == single process, exact resume, early stopping, budgets."""
import pytest
import torch
from torch import nn

from slimcart.compress.distill import TrainConfig, fit
from slimcart.compress.distill.steps import train_task
from slimcart.errors import SlimcartError


pytestmark = pytest.mark.usefixtures("one_thread")


class ToyTask:
    """Student Linear regresses a fixed random teacher Linear on fixed inputs (module level: picklable)."""

    def __init__(self, n=48, seed=0, fail_at=None):
        g = torch.Generator().manual_seed(seed)
        self.x = torch.randn(n, 6, generator=g)
        torch.manual_seed(seed + 1)
        self.teacher = nn.Linear(6, 3)
        self.student = nn.Sequential(nn.Linear(6, 8), nn.Tanh(), nn.Linear(8, 3))
        self.calls, self.fail_at, self.scores = 0, fail_at, None

    def trainable(self):
        return self.student

    def n_examples(self):
        return len(self.x)

    def fingerprint(self):
        return {"toy": len(self.x)}

    def loss(self, idx):
        self.calls += 1
        if self.fail_at is not None and self.calls == self.fail_at:
            raise KeyboardInterrupt
        x = self.x[torch.as_tensor(idx)]
        with torch.no_grad():
            y = self.teacher(x)
        loss = ((self.student(x) - y) ** 2).mean()
        return loss, {"mse": loss.item()}

    def validate(self):
        if self.scores is not None:
            return self.scores.pop(0)
        with torch.no_grad():
            return -float(((self.student(self.x) - self.teacher(self.x)) ** 2).mean())


CFG = dict(max_steps=12, max_minutes=None, batch_size=8, lr=0.05, warmup=0.0, eval_every=4, patience=100,
           weight_decay=0.0, grad_clip=None)


def _weights(module):
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


def test_two_processes_match_one(tmp_path):
    one = ToyTask()
    res1 = train_task(one, TrainConfig(**CFG), None, tmp_path / "a", print)
    two = ToyTask()
    res2 = train_task(two, TrainConfig(**CFG, world_size=2), None, tmp_path / "b", print)
    assert res1["steps"] == res2["steps"] == 12
    for k, v in _weights(one.student).items():
        torch.testing.assert_close(two.student.state_dict()[k], v, atol=1e-5, rtol=1e-4)
    assert res2["best_score"] == pytest.approx(res1["best_score"], rel=1e-4)
    assert res1["best_score"] > res1["history"][0]["val"]  # it did learn something


def test_interrupted_run_resumes_exactly(tmp_path):
    ref = ToyTask()
    fit(ref, TrainConfig(**CFG))
    broken = ToyTask(fail_at=7)  # dies during step 7; the last checkpoint is after step 4
    with pytest.raises(KeyboardInterrupt):
        fit(broken, TrainConfig(**CFG), tmp_path / "ckpt")
    again = ToyTask()
    msgs = []
    res = fit(again, TrainConfig(**CFG), tmp_path / "ckpt", progress=msgs.append)
    assert res.resumed_at_step == 4 and res.steps == 12
    assert any("resuming" in m for m in msgs)
    for k, v in _weights(ref.student).items():
        torch.testing.assert_close(again.student.state_dict()[k], v)
    # a finished run is reused without training
    reused = ToyTask()
    res = fit(reused, TrainConfig(**CFG), tmp_path / "ckpt")
    assert res.stopped.startswith("reused") and reused.calls == 0
    for k, v in _weights(ref.student).items():
        torch.testing.assert_close(reused.student.state_dict()[k], v)
    # another config does not pick up this checkpoint
    other = ToyTask()
    assert fit(other, TrainConfig(**{**CFG, "lr": 0.01}), tmp_path / "ckpt").resumed_at_step == 0


def test_early_stopping_keeps_the_best_weights():
    task = ToyTask()
    init = _weights(task.student)
    task.scores = [1.0, 0.5, 0.4, 0.3, 0.2]  # only the initial student is best
    res = fit(task, TrainConfig(**{**CFG, "patience": 2, "eval_every": 1}))
    assert res.stopped.startswith("early stop") and res.steps == 2 and res.best_step == 0
    for k, v in init.items():
        torch.testing.assert_close(task.student.state_dict()[k], v)


def test_time_budget_stops_training():
    task = ToyTask()
    res = fit(task, TrainConfig(**{**CFG, "max_minutes": 1e-6, "max_steps": 1000}))
    assert res.stopped == "time budget" and res.steps < 1000


def test_empty_transfer_data_is_an_error():
    with pytest.raises(SlimcartError, match="empty"):
        fit(ToyTask(n=0), TrainConfig(**CFG))
