"""Scenario profiles: where a model must run (threads, batch), what the planner optimizes there, and what
the result may lose or use (constraints). Built-in YAML in `slimcart/plan/profiles/`, or a user's file;
every field can be overridden (`Profile.with_overrides`, the CLI's flags).

A constraint value is a number, or a mapping from workload name to number with an optional `default`
(`max_size_mb: {search: 10}` caps the search encoder only). `resolve(workload)` turns a profile into
plain numbers for one workload.

Objectives (what the trade-off is searched for; the Pareto front also spans quality, size and energy):
    latency_p50 / latency_p99   ms per request at batch 1, minimized
    throughput                  items/s at the profile's batch, maximized
    throughput_per_core         items/s per thread at the profile's batch, maximized
    size                        bytes on disk, minimized
    energy                      joules per item at the profile's batch, minimized
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Literal, Union

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from ..errors import SlimcartError

PROFILE_DIR = Path(__file__).parent / "profiles"
Objective = Literal["latency_p50", "latency_p99", "throughput", "throughput_per_core", "size", "energy"]
PerWorkload = Union[float, dict[str, float], None]
MINIMIZED = {"latency_p50": True, "latency_p99": True, "throughput": False, "throughput_per_core": False,
             "size": True, "energy": True}


class Constraints(BaseModel):
    """Every bound is optional (None = unconstrained). Quality loss is relative, on the workload's
    primary metric (e.g. 0.005 = at most 0.5% lower nDCG@10, or 0.5% higher perplexity)."""

    model_config = ConfigDict(extra="forbid")
    max_quality_loss: PerWorkload = 0.01
    max_latency_p50_ms: PerWorkload = None
    max_latency_p99_ms: PerWorkload = None
    max_size_mb: PerWorkload = None  # bytes on disk of the model's weight files, in MB (1e6 bytes)
    max_size_ratio: PerWorkload = None  # ... as a fraction of the fp32 baseline's bytes
    max_peak_rss_mb: PerWorkload = None  # peak resident memory of a process loading and running the model
    min_throughput: PerWorkload = None  # items/s at the profile's batch and threads
    max_energy_j_per_item: PerWorkload = None

    @field_validator("*")
    @classmethod
    def _positive(cls, v):
        values = v.values() if isinstance(v, dict) else [] if v is None else [v]
        if any(not isinstance(x, (int, float)) or isinstance(x, bool) or x < 0 for x in values):
            raise ValueError("must be a non-negative number or a {workload: number} mapping")
        return v


class Profile(BaseModel):
    model_config = ConfigDict(extra="forbid")
    name: str
    description: str = ""
    threads: Union[int, Literal["all"]] = "all"
    batch: int = Field(1, ge=1)  # throughput (and energy) is measured at this batch; latency always at batch 1
    objective: Objective = "latency_p99"
    constraints: Constraints = Constraints()
    # Quality counts as met when the one-sided upper confidence bound of the validation loss does (a
    # paired bootstrap over queries / users / sessions / photos, for metrics that are such means), not
    # only the point estimate: picking the fastest of many noisy trials otherwise favours the ones whose
    # loss was underestimated (a 50%-pruned encoder measured -0.50% on 51 validation queries, +1.62% on
    # test). 0 = the point estimate alone.
    quality_confidence: float = Field(0.9, ge=0.0, lt=1.0)
    report_cost: bool = False  # cost per million items in CPU-hours, artifact transfer size

    def with_overrides(self, **fields) -> "Profile":
        """A copy with top-level fields or constraints replaced (None values are ignored)."""
        data = self.model_dump()
        for k, v in fields.items():
            if v is None:
                continue
            if k in Constraints.model_fields:
                data["constraints"][k] = v
            elif k in Profile.model_fields:
                data[k] = v
            else:
                raise SlimcartError(f"unknown profile field '{k}'")
        return _validate(data, f"profile '{self.name}' with overrides")

    def resolve(self, workload: str) -> "Resolved":
        """Plain numbers for one workload; threads capped by this machine's CPUs (and labelled)."""
        cpus = os.cpu_count() or 1
        wanted = cpus if self.threads == "all" else int(self.threads)
        limits = {}
        for k in Constraints.model_fields:
            v = getattr(self.constraints, k)
            if isinstance(v, dict):
                v = v.get(workload, v.get("default"))
            if v is not None:
                limits[k] = float(v)
        return Resolved(profile=self, workload=workload, threads=max(1, min(wanted, cpus)), wanted_threads=wanted,
                        limits=limits)


class Resolved(BaseModel):
    """A profile for one workload on this machine."""

    model_config = ConfigDict(extra="forbid")
    profile: Profile
    workload: str
    threads: int
    wanted_threads: int
    limits: dict[str, float]

    @property
    def minimize(self) -> bool:
        return MINIMIZED[self.profile.objective]

    def label(self, cpu: str) -> str:
        """How the profile ran here: emulated when it uses fewer threads than the machine has."""
        cpus = os.cpu_count() or 1
        if self.wanted_threads > cpus:
            return f"{self.profile.name}: wants {self.wanted_threads} threads, this machine has {cpus} ({cpu})"
        if self.threads < cpus:
            return f"{self.profile.name}: emulated on {cpu} with {self.threads} of {cpus} threads"
        return f"{self.profile.name}: {self.threads} threads on {cpu}"


def builtin_profiles() -> list[str]:
    return sorted(p.stem for p in PROFILE_DIR.glob("*.yaml"))


def _validate(raw: dict, where: str) -> Profile:
    try:
        return Profile.model_validate(raw)
    except ValidationError as e:
        first = e.errors()[0]
        raise SlimcartError(f"{where}: {'.'.join(map(str, first['loc']))}: {first['msg']}") from None


def load_profile(name_or_path: str | Path) -> Profile:
    """A built-in profile by name, or a YAML file (same fields; unknown fields are errors)."""
    p = Path(name_or_path)
    if not p.suffix and (PROFILE_DIR / f"{name_or_path}.yaml").exists():
        p = PROFILE_DIR / f"{name_or_path}.yaml"
    elif not p.is_file():
        raise SlimcartError(f"unknown profile '{name_or_path}' (built-in: {', '.join(builtin_profiles())}; or a YAML file)")
    try:
        raw = yaml.safe_load(p.read_text(encoding="utf-8"))
    except (yaml.YAMLError, UnicodeDecodeError) as e:
        raise SlimcartError(f"profile file {p} is not valid YAML: {str(e).splitlines()[0]}") from None
    if not isinstance(raw, dict):
        raise SlimcartError(f"profile file {p} must be a mapping with 'name' and 'constraints'")
    raw.setdefault("name", p.stem)
    return _validate(raw, f"profile {p.name}")
