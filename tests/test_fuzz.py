"""Property-based fuzzing: whatever recipe, format file or data file a user hands slimcart, the answer is a
result or one SlimcartError — never another exception, never a write outside the folder it was given.
The fast suite runs a few hundred cases; the slow suite the thousands the robustness issue asks for."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from slimcart.contracts import FORMAT_FILE, load_saved
from slimcart.errors import SlimcartError
from slimcart.recipe import STEP_TYPES, builtin_recipes, load_plugins, load_recipe, parse_recipe
from slimcart.workloads import get_workload

load_plugins()
pytestmark = pytest.mark.usefixtures("one_thread")
SETTINGS = dict(deadline=None, suppress_health_check=list(HealthCheck), derandomize=True)

scalars = st.one_of(st.none(), st.booleans(), st.integers(-10**6, 10**6), st.floats(allow_nan=True, allow_infinity=True),
                    st.text(max_size=12), st.sampled_from(["auto", "2:4", "*", "minmax", "int8", "llm", "search"]))
values = st.recursive(scalars, lambda inner: st.one_of(st.lists(inner, max_size=4),
                                                       st.dictionaries(st.text(max_size=8), inner, max_size=4)), max_leaves=12)
BUILTIN = [load_recipe(n).to_dict() for n in builtin_recipes()]


@st.composite
def recipes(draw):
    """Built-in recipes with fields changed, added, removed or replaced, and wholly random documents."""
    if draw(st.integers(0, 9)) == 0:
        return draw(values)
    rec = json.loads(json.dumps(draw(st.sampled_from(BUILTIN))))
    for _ in range(draw(st.integers(1, 3))):
        steps = rec["steps"] if isinstance(rec["steps"], list) else []
        step = draw(st.sampled_from(steps)) if steps else {}
        step = step if isinstance(step, dict) else {}  # an earlier "steps" action may have left non-dict steps
        action = draw(st.sampled_from(["set", "add", "drop", "kind", "steps"]))
        keys = [k for k in step if k != "kind"]
        if action == "set" and keys:
            step[draw(st.sampled_from(keys))] = draw(values)
        elif action == "add":
            step[draw(st.text(max_size=10))] = draw(values)
        elif action == "drop" and keys:
            step.pop(draw(st.sampled_from(keys)))
        elif action == "kind":
            step["kind"] = draw(st.one_of(st.sampled_from(sorted(STEP_TYPES)), values))
        else:
            rec["steps"] = draw(st.one_of(values, st.just([])))
    return rec


def _recipe_case(raw) -> None:
    try:
        rec = parse_recipe(raw)
    except SlimcartError:
        return
    assert rec.steps
    parse_recipe(rec.to_dict())  # what slimcart writes as recipe.yaml reads back


def _yaml_case(tmp_path: Path, text: str) -> None:
    f = tmp_path / "r.yaml"
    f.write_text(text)
    try:
        load_recipe(f)
    except SlimcartError:
        pass


@pytest.mark.parametrize("n", [pytest.param(150, id="fast"), pytest.param(2000, id="slow", marks=pytest.mark.slow)])
def test_recipe_parser(n):
    settings(max_examples=n, **SETTINGS)(given(recipes())(_recipe_case))()


@pytest.mark.parametrize("n", [pytest.param(100, id="fast"), pytest.param(500, id="slow", marks=pytest.mark.slow)])
def test_recipe_files(tmp_path, n):
    texts = st.one_of(st.text(max_size=300), recipes().map(lambda r: yaml.safe_dump(r) if not isinstance(r, str) else r),
                      st.builds(lambda a, b: a + b, st.sampled_from(["name: x\nsteps: ", "&a [*a]", "- !!python/object:os.system\n"]),
                                st.text(max_size=50)))
    settings(max_examples=n, **SETTINGS)(given(texts)(lambda t: _yaml_case(tmp_path, t)))()


# ---------------------------------------------------------------- format files
@pytest.fixture(scope="module")
def saved_formats(tmp_path_factory, tiny_encoder_dir):
    """One real folder per format slimcart writes for the search workload (tiny encoder)."""
    from slimcart.compress.lowrank import LowRankFolder, factorize
    from slimcart.compress.prune.storage import SparseBitmask

    wl = get_workload("search")
    root = tmp_path_factory.mktemp("formats")
    out = {}
    for fmt in ("plain", "sparse", "lowrank"):
        bundle = wl.load_model(str(tiny_encoder_dir))
        folder = root / fmt
        folder.mkdir()
        if fmt == "lowrank":
            factorize(bundle.module, {"transformer.encoder.layer.0.intermediate.dense": 8})
            LowRankFolder().save(folder, wl, bundle)
        elif fmt == "sparse":
            SparseBitmask(None).save(folder, wl, bundle)
        else:
            wl.save_model(bundle, folder)
        out[fmt] = folder
    return out


format_meta = st.fixed_dictionaries(
    {"format": st.one_of(st.sampled_from(["", "onnx", "openvino-ir", "lowrank", "sparse-bitmask", "structured-hf",
                                          "slimcart-wq", "torch-compile"]), values)},
    optional={"files": values, "inner": values, "ranks": values, "prefix": values, "weights": values, "model": values,
              "structure": values, "linears": values, "bf16": values,
              "original": st.sampled_from(["/etc/passwd", "../x", "model.safetensors", "a/../../b"])})


def _format_case(folder: Path, sandbox: Path, meta, raw: bytes | None) -> None:
    work = sandbox / "case"
    shutil.rmtree(work, ignore_errors=True)
    shutil.copytree(folder, work)
    (work / FORMAT_FILE).write_bytes(raw if raw is not None else json.dumps(meta).encode())
    before = sorted(p for p in sandbox.parent.rglob("*") if not p.is_relative_to(work))
    try:
        load_saved(work, get_workload("search"), 1)
    except SlimcartError:
        pass
    after = sorted(p for p in sandbox.parent.rglob("*") if not p.is_relative_to(work))
    assert before == after  # nothing written (or removed) outside the folder under test


@pytest.mark.parametrize("n", [pytest.param(40, id="fast"), pytest.param(700, id="slow", marks=pytest.mark.slow)])
def test_format_files(saved_formats, tmp_path, n):
    sandbox = tmp_path / "sandbox"
    sandbox.mkdir()
    folders = st.sampled_from(sorted(saved_formats))
    raws = st.one_of(st.none(), st.binary(max_size=64))
    settings(max_examples=n, **SETTINGS)(given(folders, format_meta, raws)(
        lambda f, m, r: _format_case(saved_formats[f], sandbox, m, r)))()


# ---------------------------------------------------------------- data files
cells = st.one_of(st.integers(-5, 10), st.floats(allow_nan=True, allow_infinity=True), st.text(max_size=8), st.none())
SUFFIXES = [".csv", ".tsv", ".jsonl", ".txt", ".parquet", ".review"]
COLUMNS = ["query", "product_title", "median_relevance", "user_id", "item_id", "timestamp", "text", "label", "x"]


@st.composite
def data_files(draw):
    suffix = draw(st.sampled_from(SUFFIXES))
    if draw(st.booleans()):
        return suffix, draw(st.binary(max_size=200))
    cols = draw(st.lists(st.sampled_from(COLUMNS), min_size=1, max_size=4, unique=True))
    rows = draw(st.lists(st.lists(cells, min_size=len(cols), max_size=len(cols)), max_size=8))
    return suffix, (cols, rows)


def _data_case(tmp_path: Path, workload: str, case) -> None:
    import pandas as pd

    suffix, content = case
    f = tmp_path / f"d{suffix}"
    if isinstance(content, bytes):
        f.write_bytes(content)
    else:
        df = pd.DataFrame(content[1], columns=content[0])
        if suffix == ".parquet":
            try:
                df.astype(str).to_parquet(f)
            except Exception:  # noqa: BLE001 - pandas cannot write every generated frame; not what is tested
                return
        elif suffix == ".jsonl":
            df.to_json(f, orient="records", lines=True)
        else:
            df.to_csv(f, sep="\t" if suffix == ".tsv" else ",", index=False)
    try:
        get_workload(workload).load_data(str(f))
    except SlimcartError:
        pass


@pytest.mark.parametrize("workload", ["search", "recsys", "llm", "session", "ctr"])
@pytest.mark.parametrize("n", [pytest.param(40, id="fast"), pytest.param(200, id="slow", marks=pytest.mark.slow)])
def test_data_files(tmp_path, workload, n):
    settings(max_examples=n, **SETTINGS)(given(data_files())(lambda c: _data_case(tmp_path, workload, c)))()
