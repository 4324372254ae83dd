"""Knowledge distillation: student builders, one trainer (with data parallelism) and the `distill`
recipe step. The workload supplies the task (`Workload.distill_task`: what the teacher labels and
how the student is scored); losses live in slimcart.losses."""
from ...training import TrainConfig, TrainResult, fit
from .students import choose_layers, drop_layers, narrow_sasrec, uniform_layers

__all__ = ["choose_layers", "drop_layers", "narrow_sasrec", "uniform_layers", "TrainConfig", "TrainResult", "fit"]
