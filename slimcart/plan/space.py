"""The search space: compositions of slimcart's techniques, as parameters that build a `Recipe`.

A space is a list of categorical parameters, each asked only when its condition holds on the ones asked
before it (define-by-run, as Optuna samples them), and a `recipe(params)` that turns a parameter set into
the steps `slimcart compress` would run. Order of steps in every recipe:

    structure (distil to fewer layers | prune heads+FFN | low-rank)  ->  [low-rank word embeddings]
      -> [recovery distillation]  ->  [SmoothQuant] -> [layers kept fp32] -> int8 | export to a runtime

What is left out, and why, is part of the space (`excluded`): candidates the probed CPU cannot run fast
(bf16 without AVX512-BF16/AMX), techniques whose training costs more than a third of the time budget,
embedding factorization when the profile has no size cap.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any, Callable

from pydantic import BaseModel, ConfigDict, Field

from ..errors import SlimcartError
from ..recipe import Recipe, load_recipe


@dataclass
class Param:
    name: str
    options: list
    when: Callable[[dict], bool] = lambda p: True
    cond: str = ""  # the condition in words (dry run)
    what: str = ""


class Settings(BaseModel):
    """Budgets of the training steps at full fidelity (the screening fidelity scales them down)."""

    model_config = ConfigDict(extra="forbid")
    train_minutes: float = Field(10.0, gt=0)
    train_steps: int = Field(4000, ge=1)
    recover_steps: int = Field(800, ge=1)
    recover_minutes: float = Field(6.0, gt=0)
    calibration_batches: int = Field(32, ge=1)


@dataclass
class Space:
    workload: str
    params: list[Param]
    build: Callable[[dict], list[dict]]
    seeds: list[list[dict]] = field(default_factory=list)  # ladders: the next rung only if the last missed quality
    excluded: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    def sample(self, suggest: Callable[[str, list], Any]) -> dict:
        """Ask every parameter whose condition holds, in order (`suggest(name, options)`)."""
        params: dict = {}
        for p in self.params:
            if p.when(params):
                params[p.name] = suggest(p.name, p.options)
        return params

    def recipe(self, params: dict, name: str = "plan") -> Recipe | None:
        """The recipe of a parameter set; None when it leaves the model unchanged (the baseline itself)."""
        steps = self.build(params)
        if not steps:
            return None
        desc = "Chosen by `slimcart plan`: " + ", ".join(f"{k}={v}" for k, v in params.items())
        return Recipe(name=name, description=desc, workloads=[self.workload], steps=steps)

    def size(self) -> int:
        """How many distinct parameter sets the space holds (walking the conditions)."""
        def walk(i: int, params: dict) -> int:
            if i == len(self.params):
                return 1
            p = self.params[i]
            if not p.when(params):
                return walk(i + 1, params)
            return sum(walk(i + 1, {**params, p.name: o}) for o in p.options)
        return walk(0, {})

    def describe(self) -> list[str]:
        lines = [f"search space for {self.workload}: {self.size()} parameter sets"]
        for p in self.params:
            lines.append(f"  {p.name}: {p.options}" + (f"   when {p.cond}" if p.cond else "") + (f"   ({p.what})" if p.what else ""))
        if self.seeds:
            lines.append("seed trials (sensitivity-guided ladders; the next rung runs only while quality misses the bound):")
            for ladder in self.seeds:
                lines += [f"  {json.dumps(r)}" for r in ladder]
        lines += [f"left out: {x}" for x in self.excluded] + [f"note: {x}" for x in self.notes]
        return lines


def fingerprint(recipe: Recipe) -> str:
    """What makes two trials the same model: their steps (not the recipe's name or description)."""
    return json.dumps([s.model_dump(mode="json") for s in recipe.steps], sort_keys=True)


# ---------------------------------------------------------------- shared step builders
def _train(s: Settings, **kw) -> dict:
    return {"max_minutes": s.train_minutes, "max_steps": s.train_steps, **kw}


def _search_distill_current(s: Settings) -> dict:
    return {"kind": "distill", "student": {"type": "current"}, "freeze": ["*word_embeddings*"],
            "losses": {"embedding_cosine": 1.0, "listwise": 1.0}, "transfer": {"extra_titles": 20000},
            "train": _train(s, batch_size=32, lr=1.0e-4, eval_every=200, patience=5)}


def _runtime_steps(rt: str) -> list[dict]:
    return {"torch": [], "onnxruntime": [{"kind": "export_onnx", "optimize": True}],
            "openvino": [{"kind": "export_onnx", "optimize": False}, {"kind": "to_openvino"}],
            "torch_compile": [{"kind": "torch_compile", "bf16": False}],
            "torch_compile_bf16": [{"kind": "torch_compile", "bf16": True}]}[rt]


def _runtimes(hw: dict, excluded: list[str], workload: str) -> list[str]:
    """fp32 runtimes whose steps declare this workload (a step's `workloads`), bf16 only where the CPU has it."""
    from ..recipe import parse_step

    rts = ["torch", "onnxruntime", "openvino", "torch_compile"]
    if hw["features"].get("bf16"):
        rts.append("torch_compile_bf16")
    else:
        excluded.append("bf16 candidates (torch.compile with bf16 autocast): this CPU has neither AVX512-BF16 nor AMX-BF16")
    ok = []
    for rt in rts:
        kinds = [parse_step(d) for d in _runtime_steps(rt)]
        if all(k.workloads is None or workload in k.workloads for k in kinds):
            ok.append(rt)
        else:
            excluded.append(f"runtime {rt}: its step is declared for {', '.join(next(k.workloads for k in kinds if k.workloads))} only")
    return ok


def _affordable(cost_min: float, budget_s: float | None) -> bool:
    return budget_s is None or cost_min * 60 <= budget_s / 3


# ---------------------------------------------------------------- search (sentence encoder)
def search_space(hw: dict, budget_s: float | None, settings: Settings, sensitive: list[str], n_layers: int,
                 size_capped: bool) -> Space:
    excluded: list[str] = []
    train_cost = settings.train_minutes * 1.25 + 1  # screen (1/4) + full, plus teacher labelling
    structures = ["none"]
    for name, cost in (("distill", train_cost), ("prune", settings.recover_minutes * 1.25 + 1), ("lowrank", train_cost)):
        if _affordable(cost, budget_s):
            structures.append(name)
        else:
            excluded.append(f"structure={name}: ~{cost:.0f} min of training per trial is more than a third of the budget")
    depths = [d for d in (4, 3, 2) if d < n_layers]
    emb_ranks = [0]
    if size_capped and _affordable(train_cost, budget_s):
        emb_ranks += [128, 64]
    elif not size_capped:
        excluded.append("low-rank word embeddings: the profile caps no size (they cost quality and a training run)")
    else:
        excluded.append("low-rank word embeddings: their recovery training is more than a third of the budget")
    rts = _runtimes(hw, excluded, "search")
    quants = ["none", "int8_dynamic", "int8_static"]
    params = [
        Param("structure", structures, what="smaller network: distilled fewer layers / pruned heads+FFN / low-rank Linears"),
        Param("distill_layers", depths, lambda p: p["structure"] == "distill", "structure=distill",
              "student depth (teacher layers kept chosen by measurement)"),
        Param("prune_ratio", [0.25, 0.5], lambda p: p["structure"] == "prune", "structure=prune",
              "fraction of attention heads and FFN neurons removed, then recovery"),
        Param("lowrank_keep", [0.75, 0.5], lambda p: p["structure"] == "lowrank", "structure=lowrank",
              "fraction of the encoder Linears' weights kept (ranks by measured sensitivity)"),
        Param("embedding_rank", emb_ranks, what="rank of the factorized word-embedding table (0 = dense)"),
        Param("quant", quants, what="int8 scheme: none, ONNX Runtime dynamic, or static W8A8"),
        Param("runtime", rts, lambda p: p["quant"] == "none", "quant=none", "fp32 runtime"),
        Param("per_channel", [False, True], lambda p: p["quant"] == "int8_dynamic", "quant=int8_dynamic",
              "dynamic int8 weight granularity: per tensor or per output channel"),
        Param("smoothquant_alpha", [0.0, 0.5, 0.8], lambda p: p["quant"] == "int8_static", "quant=int8_static",
              "SmoothQuant migration strength (0 = off)"),
        Param("keep_fp32", [0, 1, 2, 4], lambda p: p["quant"] == "int8_static", "quant=int8_static",
              "most int8-sensitive Linears kept fp32 (measured on validation for the unchanged network, "
              "by the mixed_precision step for a reshaped one)"),
        Param("int8_runtime", ["onnxruntime", "openvino"], lambda p: p["quant"] == "int8_static", "quant=int8_static"),
    ]

    def build(p: dict) -> list[dict]:
        steps: list[dict] = []
        s = p["structure"]
        emb = p.get("embedding_rank", 0)
        if s == "distill":
            steps.append({"kind": "distill", "student": {"type": "layer_drop", "n_layers": p["distill_layers"],
                                                         "selection": "measured"},
                          "losses": {"embedding_cosine": 1.0, "listwise": 1.0}, "score_temperature": 0.05,
                          "freeze": ["*word_embeddings*"], "transfer": {"extra_titles": 20000},
                          "train": _train(settings, batch_size=32, lr=1.0e-4, eval_every=200, patience=5)})
        elif s == "prune":
            steps.append({"kind": "prune_structured", "heads": p["prune_ratio"], "ffn": p["prune_ratio"], "round_to": 16,
                          "criterion": "activation", "calibration_batches": settings.calibration_batches})
        lowrank = None
        if s == "lowrank":
            lowrank = {"kind": "lowrank", "targets": ["*encoder.layer.*"], "mode": "budget", "keep_params": p["lowrank_keep"],
                       "sensitivity": "measured"}
        if emb:
            lowrank = lowrank or {"kind": "lowrank", "targets": [], "mode": "budget"}
            lowrank["targets"] = lowrank["targets"] + ["*word_embeddings"]
            lowrank.update(embeddings=True, overrides={"*word_embeddings": {"rank": emb}})
        if lowrank:
            steps.append(lowrank)
            steps.append(_search_distill_current(settings))
        elif s == "prune":
            steps.append({"kind": "recover", "method": "distill", "steps": settings.recover_steps,
                          "max_minutes": settings.recover_minutes, "lr": 5.0e-5, "calibration_batches": 210})
        q = p["quant"]
        if q == "none":
            steps += _runtime_steps(p["runtime"])
        elif q == "int8_dynamic":
            steps += [{"kind": "export_onnx", "optimize": True}, {"kind": "ort_dynamic_int8", "per_channel": p["per_channel"]}]
        else:
            if p["smoothquant_alpha"] > 0:
                steps.append({"kind": "smoothquant", "alpha": p["smoothquant_alpha"],
                              "calibration_batches": settings.calibration_batches, "score_batches": 8})
            k, static = p["keep_fp32"], {"kind": "static_int8", "observer": "minmax", "runtime": p["int8_runtime"],
                                         "calibration_batches": settings.calibration_batches}
            if k and s == "none" and not emb:
                static["exclude"] = sensitive[:k]  # the planner's validation-measured ranking of this network
            elif k:  # a reshaped network: its own layers, ranked on calibration text by the mixed_precision step
                steps.append({"kind": "mixed_precision", "max_drop": 1e-9, "max_layers": k,
                              "calibration_batches": settings.calibration_batches, "score_batches": 8})
            steps.append(static)
        return steps

    ladder = [{"structure": "none", "embedding_rank": 0, "quant": "int8_static", "smoothquant_alpha": 0.8,
               "keep_fp32": k, "int8_runtime": "openvino"} for k in (0, 1, 2, 4)]
    seeds = [ladder, [{"structure": "none", "embedding_rank": 0, "quant": "int8_dynamic", "per_channel": True}]]
    if "distill" in structures and 3 in depths:
        seeds.append([{"structure": "distill", "distill_layers": d, "embedding_rank": 0, "quant": "int8_static",
                       "smoothquant_alpha": 0.8, "keep_fp32": 0, "int8_runtime": "openvino"} for d in (4, 3)])
    if size_capped and 64 in emb_ranks and "prune" in structures:
        # A size cap binds on the word-embedding table (half of MiniLM's weights) and the encoder together:
        # int8 alone is ~23 MB, so only factorized embeddings plus a smaller encoder reach 10 MB. This ladder
        # starts from the smallest such model (half the heads/FFN, rank-64 table, one training run) and
        # grows the table while quality misses; it goes first, since the other seeds cannot meet the cap.
        seeds.insert(0, [{"structure": "prune", "prune_ratio": 0.5, "embedding_rank": r, "quant": "int8_static",
                          "smoothquant_alpha": 0.8, "keep_fp32": 0, "int8_runtime": "openvino"} for r in (64, 128)])
    return Space("search", params, build, seeds, excluded)


# ---------------------------------------------------------------- llm (weight-only quantization)
def llm_space(hw: dict, budget_s: float | None, settings: Settings, sensitive: list[int], n_layers: int,
              size_capped: bool) -> Space:
    counts = sorted({k for k in (0, 1, 2, 4, 8, 16) if k < n_layers} | {n_layers})
    params = [
        Param("method", ["rtn", "gptq", "awq", "awq_gptq"], what="4-bit weight rounding: RTN, GPTQ, AWQ scales, AWQ then GPTQ"),
        Param("group_size", [32, 64, 128], what="input columns sharing one scale / zero point"),
        Param("layers_8bit", counts, what=f"most perplexity-sensitive decoder layers (of {n_layers}, measured on "
                                          "validation) kept at 8 bits; the rest 4 bits"),
    ]

    def build(p: dict) -> list[dict]:
        base = {"bits": 4, "group_size": p["group_size"], "symmetric": False, "partial_last_group": True,
                "overrides": {f"*layers.{i}.*": {"bits": 8} for i in sensitive[:p["layers_8bit"]]}}
        m = p["method"]
        if m == "rtn":
            return [{"kind": "weight_only_rtn", **base}]
        if m == "gptq":
            return [{"kind": "weight_only_gptq", **base, "act_order": True, "damp": 0.01, "calibration_windows": 32,
                     "clip_grid": 10}]
        return [{"kind": "weight_only_awq", **base, "grid": 20, "calibration_windows": 32,
                 **({"quantizer": "gptq", "clip_grid": 10} if m == "awq_gptq" else {})}]

    ladder = [{"method": "awq_gptq", "group_size": 128, "layers_8bit": k} for k in counts if k in (0, 2, 4, 8, 16)]
    excluded = ["layer-dropping distillation and pruning of the LLM: one recovery run takes longer than the whole "
                "quantization search (docs/bench-pruning.md); run the distill-llm-L24 recipe on its own"]
    notes = ["every candidate runs on ONNX Runtime MatMulNBits (int8 compute); mixed 4/8 bits per decoder layer"]
    return Space("llm", params, build, [ladder], excluded, notes)


# ---------------------------------------------------------------- recsys (SASRec)
def recsys_space(hw: dict, budget_s: float | None, settings: Settings, sensitive: list[str], n_layers: int,
                 size_capped: bool) -> Space:
    excluded: list[str] = []
    structures = ["none"]
    for name, cost in (("distill", settings.train_minutes * 1.25), ("prune", settings.recover_minutes * 1.25)):
        if _affordable(cost, budget_s):
            structures.append(name)
        else:
            excluded.append(f"structure={name}: ~{cost:.0f} min of training per trial is more than a third of the budget")
    rts = [r for r in _runtimes(hw, excluded, "recsys") if r != "openvino"]
    excluded.append("OpenVINO for SASRec: not validated on its graph here")
    params = [
        Param("structure", structures, what="narrower student distilled from SASRec / pruned hidden width"),
        Param("width", [0.5, 0.75], lambda p: p["structure"] == "distill", "structure=distill", "fraction of width kept"),
        Param("prune_hidden", [0.25, 0.5], lambda p: p["structure"] == "prune", "structure=prune",
              "fraction of the hidden width removed, then recovery"),
        Param("tables", list(TABLES), what="item-table compression (the table is most of SASRec's bytes; torch runtime)"),
        Param("dense_int8", [False, True], lambda p: p["tables"] != "none", "tables!=none",
              "attention and FFN Linear layers on torch's dynamic int8 kernels beside the compressed table"),
        Param("quant", ["none", "int8_dynamic"], lambda p: p["tables"] == "none", "tables=none"),
        Param("runtime", rts, lambda p: p.get("quant") == "none", "quant=none"),
        Param("per_channel", [False, True], lambda p: p.get("quant") == "int8_dynamic", "quant=int8_dynamic"),
    ]

    def build(p: dict) -> list[dict]:
        steps: list[dict] = []
        if p["structure"] == "distill":
            steps.append({"kind": "distill", "student": {"type": "narrow", "width": p["width"]},
                          "losses": {"logits_kl": 1.0, "task": 1.0}, "temperature": 1.0, "transfer": {"kd_positions": 4},
                          "train": {"max_minutes": settings.train_minutes, "max_steps": 20000, "batch_size": 128,
                                    "lr": 1.0e-3, "weight_decay": 0.0, "eval_every": 250, "patience": 4, "dropout": True}})
        elif p["structure"] == "prune":
            steps += [{"kind": "prune_structured", "hidden": p["prune_hidden"], "calibration_batches": 16},
                      {"kind": "recover", "method": "distill", "steps": settings.recover_steps,
                       "max_minutes": settings.recover_minutes, "calibration_batches": 64}]
        if p["tables"] != "none":  # compressed tables run in torch (their lookup kernels do not export)
            steps += [st.model_dump(mode="json") for st in load_recipe(TABLES[p["tables"]]).steps]
            if p["dense_int8"]:
                steps.append({"kind": "torch_dynamic_int8", "layers": ["linear"], "min_features": 2})
        elif p["quant"] == "none":
            steps += _runtime_steps(p["runtime"])
        else:
            steps += [{"kind": "export_onnx", "optimize": True}, {"kind": "ort_dynamic_int8", "per_channel": p["per_channel"]}]
        return steps

    seeds = [[{"structure": "none", "tables": "none", "quant": "int8_dynamic", "per_channel": pc} for pc in (False, True)]]
    if size_capped:  # the table dominates the bytes: start from the 8x recipe of docs/bench-embeddings.md
        seeds.append([{"structure": "none", "tables": "pq_hot_int4", "dense_int8": d} for d in (True, False)])
    if "distill" in structures:
        seeds.append([{"structure": "distill", "width": 0.5, "tables": "none", "quant": "int8_dynamic", "per_channel": True}])
    return Space("recsys", params, build, seeds, excluded)


# item-table compression = the steps of a built-in recipe (docs/bench-embeddings.md)
TABLES = {"none": None, "int8": "emb-int8", "int4": "emb-int4", "pq_hot_int4": "emb-pq-hot-int4"}


SPACES = {"search": search_space, "llm": llm_space, "recsys": recsys_space}


def space_for(workload: str, hw: dict, budget_s: float | None, settings: Settings, sensitive: list, n_layers: int,
              size_capped: bool) -> Space:
    if workload not in SPACES:
        raise SlimcartError(f"slimcart plan has no search space for workload '{workload}' (it has: {', '.join(SPACES)})")
    return SPACES[workload](hw, budget_s, settings, sensitive, n_layers, size_capped)
