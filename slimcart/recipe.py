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
    old = STEP_TYPES.get(kind)
    if old is not None and (old.__module__, old.__qualname__) != (cls.__module__, cls.__qualname__):
        raise TypeError(f"step kind '{kind}' is defined twice: {old.__module__}.{old.__qualname__} and "
                        f"{cls.__module__}.{cls.__qualname__}")  # else the import order would pick one silently
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
    if not isinstance(raw, dict) or not isinstance(raw.get("kind"), str):
        raise SlimcartError(f"recipe step must be a mapping with a 'kind' name: {str(raw)[:200]}")
    load_plugins()
    cls = STEP_TYPES.get(raw["kind"])
    if cls is None:
        raise SlimcartError(f"unknown recipe step kind '{raw['kind']}' (known: {', '.join(sorted(STEP_TYPES))})")
    try:
        return cls.model_validate(raw)
    except ValidationError as e:
        first = e.errors()[0]
        loc = ".".join(str(x) for x in first["loc"])
        raise SlimcartError(f"recipe step '{raw['kind']}': {loc}: {first['msg']}"[:500]) from None


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


MAX_RECIPE_BYTES = 256 * 1024  # recipes are a few hundred bytes; refuse anything that could be a bomb


def _safe_yaml(text: str, where: str) -> Any:
    """YAML without anchors/aliases: a recipe has no use for them, and a few hundred bytes of nested
    aliases expand to gigabytes ("billion laughs")."""
    try:
        node = yaml.compose(text, Loader=yaml.SafeLoader)
    except yaml.YAMLError as e:
        raise SlimcartError(f"recipe {where} is not valid YAML: {str(e).splitlines()[0]}") from None
    seen, todo = set(), [node] if node is not None else []
    while todo:
        n = todo.pop()
        if id(n) in seen:
            raise SlimcartError(f"recipe {where} uses YAML anchors/aliases (& / *), which recipes may not contain")
        seen.add(id(n))
        if isinstance(n, yaml.SequenceNode):
            todo += n.value
        elif isinstance(n, yaml.MappingNode):
            todo += [x for pair in n.value for x in pair]
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError as e:  # e.g. a tag the safe loader does not construct (!!python/object)
        raise SlimcartError(f"recipe {where} is not valid YAML: {str(e).splitlines()[0]}") from None


def load_recipe(name_or_path: str | Path) -> Recipe:
    """A built-in recipe by name, or a YAML file path."""
    p = Path(name_or_path)
    if not p.suffix and (RECIPE_DIR / f"{name_or_path}.yaml").exists():
        p = RECIPE_DIR / f"{name_or_path}.yaml"
    elif not p.exists():
        raise SlimcartError(f"unknown recipe '{name_or_path}' (built-in: {', '.join(builtin_recipes())}; or a YAML file path)")
    if not p.is_file():
        raise SlimcartError(f"recipe {p} is not a file")
    if p.stat().st_size > MAX_RECIPE_BYTES:
        raise SlimcartError(f"recipe {p} is larger than {MAX_RECIPE_BYTES // 1024} KB: not a recipe")
    try:
        text = p.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise SlimcartError(f"recipe {p} is not UTF-8 text") from None
    except OSError as e:
        raise SlimcartError(f"cannot read recipe {p}: {e.strerror}") from None
    return parse_recipe(_safe_yaml(text, str(p)), p.stem, p.name)


def parse_recipe(raw: Any, default_name: str = "recipe", where: str = "recipe") -> Recipe:
    """A Recipe from its dict form (what YAML gives): every field checked before any model loads."""
    if not isinstance(raw, dict):
        raise SlimcartError(f"recipe {where} must be a mapping with 'name' and 'steps'")
    raw = {"name": default_name, **raw}
    try:
        return Recipe.model_validate(raw)
    except ValidationError as e:
        first = e.errors()[0]
        raise SlimcartError(f"recipe {where}: {'.'.join(map(str, first['loc']))}: {first['msg']}"[:500]) from None
