"""Recipes: YAML <-> Python identity, validation errors, workload applicability."""
import pytest

from slimcart.errors import SlimcartError
from slimcart.recipe import Recipe, builtin_recipes, load_recipe


def test_builtin_int8_dynamic_roundtrips_through_yaml(tmp_path):
    r = load_recipe("int8-dynamic")
    assert [s.kind for s in r.steps] == ["export_onnx", "ort_dynamic_int8"]
    path = tmp_path / "r.yaml"
    path.write_text(r.to_yaml())
    assert load_recipe(path).to_dict() == r.to_dict()


def test_python_and_yaml_are_the_same_object():
    r = Recipe.model_validate({"name": "x", "steps": [{"kind": "export_onnx", "optimize": False}]})
    assert r.steps[0].optimize is False
    assert "int8-dynamic" in builtin_recipes()


@pytest.mark.parametrize(
    "text, fragment",
    [
        ("name: x\nsteps:\n  - kind: no_such_step\n", "unknown recipe step kind"),
        ("name: x\nsteps:\n  - kind: export_onnx\n    bogus: 1\n", "bogus"),
        ("name: x\nsteps: []\n", "non-empty"),
        ("name: x\nsteps: [\n", "not valid YAML"),
        ("- just a list\n", "must be a mapping"),
    ],
)
def test_bad_recipe_files(tmp_path, text, fragment):
    p = tmp_path / "bad.yaml"
    p.write_text(text)
    with pytest.raises(SlimcartError, match=fragment):
        load_recipe(p)


def test_unknown_recipe_name():
    with pytest.raises(SlimcartError, match="unknown recipe 'nope'"):
        load_recipe("nope")


def test_recipe_refuses_other_workload():
    with pytest.raises(SlimcartError, match="does not apply to workload 'llm'"):
        load_recipe("int8-static").check_workload("llm")
