"""Bad input: one clear error line, exit code 2, nothing written, the input untouched."""
import re
from pathlib import Path

import pytest
from typer.testing import CliRunner

from slimcart.cli import app

from conftest import tree_fingerprint

runner = CliRunner()


def _run(args):
    res = runner.invoke(app, args)
    return res.exit_code, res.output


def _assert_one_error(code, output, fragment):
    """Exit 2, exactly one error line, no traceback; any other line is a timestamped progress line
    (printed when output is not a terminal) that came before the error."""
    assert code == 2, output
    lines = [ln for ln in output.strip().splitlines() if ln.strip()]
    errors = [ln for ln in lines if ln.startswith("error:")]
    assert len(errors) == 1 and lines[-1].startswith("error:"), output
    assert all(re.match(r"^\[\d\d:\d\d:\d\d \+\d+s\] ", ln) for ln in lines[:-1]), output
    assert "Traceback" not in output
    assert fragment in " ".join(output.split()), output


def test_unknown_workload(tmp_path):
    code, out = _run(["compress", "-w", "video", "-m", "minilm", "-r", "int8-dynamic", "-o", str(tmp_path / "o")])
    _assert_one_error(code, out, "unknown workload 'video'")
    assert not (tmp_path / "o").exists()


def test_unknown_alias(tmp_path, synthetic_data):
    code, out = _run(["compress", "-w", "search", "-m", "nosuchmodel", "-r", "int8-dynamic", "-o", str(tmp_path / "o")])
    _assert_one_error(code, out, "unknown model 'nosuchmodel'")
    assert list(tmp_path.iterdir()) == []


def test_unknown_recipe(tmp_path):
    code, out = _run(["compress", "-w", "search", "-m", "minilm", "-r", "int7-magic", "-o", str(tmp_path / "o")])
    _assert_one_error(code, out, "unknown recipe 'int7-magic'")


def test_recipe_for_other_workload(tmp_path):
    code, out = _run(["compress", "-w", "recsys", "-m", "x", "-r", "int8-static", "-o", str(tmp_path / "o")])
    _assert_one_error(code, out, "does not apply to workload 'recsys'")


def test_existing_output_refused(tmp_path, tiny_encoder_dir):
    out = tmp_path / "o"
    out.mkdir()
    (out / "keep.txt").write_text("precious")
    code, msg = _run(["compress", "-w", "search", "-m", str(tiny_encoder_dir), "-r", "int8-dynamic", "-o", str(out)])
    _assert_one_error(code, msg, "already exists")
    assert (out / "keep.txt").read_text() == "precious"


def test_folder_without_config(tmp_path, synthetic_data):
    model = tmp_path / "m"
    model.mkdir()
    (model / "model.safetensors").write_bytes(b"")
    code, out = _run(["eval", "-w", "search", "-m", str(model)])
    _assert_one_error(code, out, "has no config.json")


def test_corrupt_weights(tmp_path, tiny_encoder_dir, synthetic_data):
    import shutil

    model = tmp_path / "corrupt"
    shutil.copytree(tiny_encoder_dir, model)
    (model / "model.safetensors").write_bytes(b"\x00garbage" * 10)
    before = tree_fingerprint(model)
    code, out = _run(["compress", "-w", "search", "-m", str(model), "-r", "int8-dynamic", "-o", str(tmp_path / "o")])
    _assert_one_error(code, out, "cannot load model from")
    assert tree_fingerprint(model) == before
    assert not (tmp_path / "o").exists()


@pytest.mark.parametrize(
    "content, fragment",
    [
        ("query,title,wrong\nshoes,red shoe,3\n", "missing column(s): label"),
        ("query,product_title,median_relevance\n", "has no rows"),
        ("", "is empty"),
        ("query,product_title,median_relevance\nshoes,,x\n", "no usable rows"),
    ],
)
def test_bad_search_data(tmp_path, tiny_encoder_dir, content, fragment):
    data = tmp_path / "d.csv"
    data.write_text(content)
    code, out = _run(["eval", "-w", "search", "-m", str(tiny_encoder_dir), "--data", str(data)])
    _assert_one_error(code, out, fragment)


def test_missing_data_path(tmp_path, tiny_encoder_dir):
    code, out = _run(["eval", "-w", "search", "-m", str(tiny_encoder_dir), "--data", str(tmp_path / "nope.csv")])
    _assert_one_error(code, out, "data path does not exist")


def test_unsupported_data_type(tmp_path, tiny_encoder_dir):
    f = tmp_path / "d.xlsx"
    f.write_text("x")
    code, out = _run(["eval", "-w", "search", "-m", str(tiny_encoder_dir), "--data", str(f)])
    _assert_one_error(code, out, "unsupported data file type")
