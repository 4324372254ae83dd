"""Recipes: an ordered list of typed steps, the same in Python and YAML.

Each step is a small pydantic config with a `kind` and an `apply(state, ctx)` method. Technique
modules register their step types here; unknown kinds and unknown fields are errors.

    steps:
      - kind: export_onnx
        optimize: true
      - kind: ort_dynamic_int8
"""
from __future__ import annotations

import importlib
from pathlib import Path
from typing import Any, ClassVar

import yaml
from pydantic import BaseModel, ConfigDict, ValidationError, field_validator

from .errors import SlimcartError

STEP_TYPES: dict[str, type["Step"]] = {}
# Packages whose modules define steps; imported lazily (on first recipe parse) so `slimcart --help` stays fast.
STEP_PACKAGES = ["slimcart.runtime", "slimcart.compress"]
RECIPE_DIR = Path(__file__).parent / "recipes"


class Step(BaseModel):
    """Base class of every recipe step. Subclasses set `kind` and implement `apply`."""

    model_config = ConfigDict(extra="forbid")
    kind: str
    workloads: ClassVar[tuple[str, ...] | None] = None  # None: applies to every workload

    def apply(self, state: Any, ctx: Any) -> Any:  # pragma: no cover - abstract
        raise NotImplementedError


def register_step(cls: type[Step]) -> type[Step]:
    """Class decorator: make a step kind available to recipes."""
    kind = cls.model_fields["kind"].default
    if not isinstance(kind, str):
        raise TypeError(f"{cls.__name__} needs a default string `kind`")
    STEP_TYPES[kind] = cls
    return cls


def load_plugins() -> None:
    """Import every module of the technique and runtime packages so their steps (@register_step) and
    saved-model formats (@register_artifact) exist."""
    import pkgutil

    for pkg_name in STEP_PACKAGES:
        pkg = importlib.import_module(pkg_name)
        for info in pkgutil.walk_packages(pkg.__path__, prefix=pkg_name + "."):
            importlib.import_module(info.name)


def parse_step(raw: Any) -> Step:
    if isinstance(raw, Step):
        return raw
    if not isinstance(raw, dict) or "kind" not in raw:
        raise SlimcartError(f"recipe step must be a mapping with a 'kind': {raw!r}")
    load_plugins()
    cls = STEP_TYPES.get(raw["kind"])
    if cls is None:
        raise SlimcartError(f"unknown recipe step kind '{raw['kind']}' (known: {', '.join(sorted(STEP_TYPES))})")
    try:
        return cls.model_validate(raw)
    except ValidationError as e:
        first = e.errors()[0]
        loc = ".".join(str(x) for x in first["loc"])
        raise SlimcartError(f"recipe step '{raw['kind']}': {loc}: {first['msg']}") from None


class Recipe(BaseModel):
    """A named, ordered list of steps, optionally restricted to some workloads."""

    model_config = ConfigDict(extra="forbid")
    name: str
    description: str = ""
    workloads: list[str] | None = None
    steps: list[Step]

    @field_validator("steps", mode="before")
    @classmethod
    def _parse_steps(cls, v: Any) -> list[Step]:
        if not isinstance(v, list) or not v:
            raise SlimcartError("recipe needs a non-empty list of steps")
        return [parse_step(s) for s in v]

    def check_workload(self, workload: str) -> None:
        """Refuse a recipe (or one of its steps) that does not apply to this workload."""
        if self.workloads is not None and workload not in self.workloads:
            raise SlimcartError(
                f"recipe '{self.name}' does not apply to workload '{workload}' (it is for: {', '.join(self.workloads)})"
            )
        for s in self.steps:
            if s.workloads is not None and workload not in s.workloads:
                raise SlimcartError(f"recipe step '{s.kind}' does not apply to workload '{workload}'")

    def to_dict(self) -> dict:
        return {
            "name": self.name,
            "description": self.description,
            "workloads": self.workloads,
            "steps": [s.model_dump(mode="json") for s in self.steps],
        }

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=False)


def builtin_recipes() -> list[str]:
    return sorted(p.stem for p in RECIPE_DIR.glob("*.yaml"))


def load_recipe(name_or_path: str | Path) -> Recipe:
    """A built-in recipe by name, or a YAML file path."""
    p = Path(name_or_path)
    if not p.suffix and (RECIPE_DIR / f"{name_or_path}.yaml").exists():
        p = RECIPE_DIR / f"{name_or_path}.yaml"
    elif not p.exists():
        raise SlimcartError(f"unknown recipe '{name_or_path}' (built-in: {', '.join(builtin_recipes())}; or a YAML file path)")
    try:
        raw = yaml.safe_load(p.read_text())
    except yaml.YAMLError as e:
        raise SlimcartError(f"recipe file {p} is not valid YAML: {str(e).splitlines()[0]}") from None
    if not isinstance(raw, dict):
        raise SlimcartError(f"recipe file {p} must be a mapping with 'name' and 'steps'")
    raw.setdefault("name", p.stem)
    try:
        return Recipe.model_validate(raw)
    except ValidationError as e:
        first = e.errors()[0]
        raise SlimcartError(f"recipe {p.name}: {'.'.join(map(str, first['loc']))}: {first['msg']}") from None
