"""Knowledge distillation: losses, student builders, one trainer (with data parallelism) and the
`distill` recipe step. Workload tasks (search / recsys / llm) say what the teacher labels and how
the student is scored; everything else is shared."""
from . import losses
from .students import choose_layers, drop_layers, narrow_sasrec, uniform_layers
from .trainer import DistillTask, TrainConfig, TrainResult, fit

__all__ = ["losses", "choose_layers", "drop_layers", "narrow_sasrec", "uniform_layers", "DistillTask", "TrainConfig",
           "TrainResult", "fit"]
