"""Student builders: layer-dropped copies of a teacher, narrower students, and layer choice by measurement.

Layer stacks are found through slimcart.arch (BERT encoders, Llama decoders, SASRec). A layer-dropped
student is a deep copy whose stack keeps the chosen teacher layers (weights copied, order kept) and
whose config says the new depth, so it saves and reloads as an ordinary model of the same family.
"""
from __future__ import annotations

import copy
import itertools
from typing import Callable

import numpy as np
import torch
from torch import nn

from ...arch import detect
from ...errors import SlimcartError


def num_layers(module: nn.Module) -> int:
    return len(detect(module).layers)


def uniform_layers(n_teacher: int, n_student: int) -> list[int]:
    """Every k-th teacher layer starting at 0, e.g. 6 -> 3 keeps [0, 2, 4]."""
    return [int(i * n_teacher / n_student) for i in range(n_student)]


def drop_layers(teacher: nn.Module, keep: list[int]) -> nn.Module:
    """A deep copy of `teacher` with only the teacher layers `keep` (in that order) in its stack."""
    n = num_layers(teacher)
    if not keep:
        raise SlimcartError("a layer-dropped student needs at least one layer")
    bad = [i for i in keep if not 0 <= i < n]
    if bad or len(set(keep)) != len(keep):
        raise SlimcartError(f"student layers {keep} must be distinct teacher layers in 0..{n - 1}")
    student = copy.deepcopy(teacher)
    detect(student).set_layers(keep)
    return student


def choose_layers(teacher: nn.Module, n_student: int, score: Callable[[nn.Module], float],
                  progress: Callable[[str], None] = lambda m: None, exhaustive_limit: int = 40) -> tuple[list[int], dict]:
    """Pick which teacher layers to keep by measuring `score` (higher = closer to the teacher) of the
    undistilled layer-dropped model. Small stacks try every subset that keeps the first layer;
    larger ones drop layers greedily, one at a time, each time the one whose loss hurts least."""
    n = num_layers(teacher)
    if not 1 <= n_student < n:
        raise SlimcartError(f"student depth must be 1..{n - 1} for a {n}-layer teacher, got {n_student}")
    tried: dict[str, float] = {}

    def measure(keep: list[int]) -> float:
        key = ",".join(map(str, keep))
        if key not in tried:
            tried[key] = float(score(drop_layers(teacher, keep)))
        return tried[key]

    subsets = [list((0,) + c) for c in itertools.combinations(range(1, n), n_student - 1)]
    if len(subsets) <= exhaustive_limit:
        for i, keep in enumerate(subsets):
            progress(f"choosing student layers: subset {i + 1}/{len(subsets)}")
            measure(keep)
        best = max(subsets, key=measure)
    else:
        best = list(range(n))
        while len(best) > n_student:
            progress(f"choosing student layers: {len(best)} -> {len(best) - 1}")
            cands = [best[:j] + best[j + 1 :] for j in range(1, len(best))]  # layer 0 reads the embeddings: keep it
            best = max(cands, key=measure)
    return best, tried


def narrow_sasrec(teacher: nn.Module, width: float, seed: int = 0) -> nn.Module:
    """A SASRec with `width` × the hidden size (and FFN size). Item and position embeddings start as the
    teacher's projected on their top principal directions (so the student starts with the teacher's
    item geometry); attention and FFN weights start random: their inputs live in a new basis."""
    from ...models.sasrec import SASRec, actual_config

    if not isinstance(teacher, SASRec):
        raise SlimcartError(f"narrow students without structured pruning are only built for SASRec, not {type(teacher).__name__}")
    cfg = actual_config(teacher)
    hidden = int(round(cfg.hidden * width / cfg.heads)) * cfg.heads
    if not 0 < hidden < cfg.hidden:
        raise SlimcartError(f"width {width} gives hidden size {hidden}: it must be below the teacher's {cfg.hidden} "
                            f"and a positive multiple of its {cfg.heads} heads")
    torch.manual_seed(seed)
    new_cfg = copy.deepcopy(cfg)
    new_cfg.hidden = hidden
    new_cfg.ffn = [max(1, int(round(f * hidden / cfg.hidden))) for f in cfg.ffn_dims()]
    for name in ("emb_scale", "attn_scale"):  # the new width's own defaults
        if hasattr(new_cfg, name):
            setattr(new_cfg, name, None)
    student = SASRec(new_cfg)
    with torch.no_grad():
        emb = teacher.item_emb.weight[1:].double()
        _, _, vt = torch.linalg.svd(emb - emb.mean(0), full_matrices=False)
        basis = vt[:hidden].T  # (teacher hidden, student hidden)
        # Scale so the student's input (embedding × its scale) has the teacher's magnitudes
        scale = float(getattr(teacher, "emb_scale", cfg.hidden**0.5)) / float(getattr(student, "emb_scale", hidden**0.5))
        student.item_emb.weight.copy_((teacher.item_emb.weight.double() @ basis * scale).float())
        student.item_emb.weight[0].zero_()
        student.pos_emb.weight.copy_((teacher.pos_emb.weight.double() @ basis).float())
    return student.eval()


def narrow_structured(teacher: nn.Module, width: float, batches: list | None = None) -> nn.Module:
    """A narrower copy by structured pruning (slimcart.compress.prune): the teacher's most important
    heads / FFN neurons (and, for SASRec, hidden dimensions) kept, `width` of each, by activation."""
    try:
        from ..prune.config import StructuredConfig
        from ..prune.structured import prune_structured
    except ImportError:
        raise SlimcartError("narrow students of this model need slimcart.compress.prune (structured pruning), "
                            "which this install does not have") from None
    from ...models.sasrec import SASRec

    frac = round(1 - width, 6)
    fields = {"hidden": frac, "ffn": frac} if isinstance(teacher, SASRec) else {"heads": frac, "ffn": frac}
    cfg = StructuredConfig(**fields, criterion="activation" if batches else "magnitude")
    student = copy.deepcopy(teacher)
    prune_structured(student, cfg, batches)
    return student.eval()


def param_count(module: nn.Module) -> int:
    return int(sum(p.numel() for p in module.parameters()))


def score_summary(tried: dict[str, float]) -> list[tuple[str, float]]:
    """Measured subsets, best first (for notes and the benchmark)."""
    return sorted(tried.items(), key=lambda kv: -kv[1] if np.isfinite(kv[1]) else np.inf)
