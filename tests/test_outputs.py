"""Atomic output folders."""
import pytest

from slimcart.outputs import check_output_path, model_bytes, partial_dir, publish
from slimcart.errors import SlimcartError


def test_existing_output_refused_without_overwrite(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    with pytest.raises(SlimcartError, match="already exists"):
        check_output_path(out, overwrite=False)
    check_output_path(out, overwrite=True)


def test_output_that_is_a_file(tmp_path):
    f = tmp_path / "f"
    f.write_text("x")
    with pytest.raises(SlimcartError, match="not a folder"):
        check_output_path(f, overwrite=True)


def test_publish_replaces_only_when_complete(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "old.txt").write_text("old")
    tmp = partial_dir(out)
    tmp.mkdir()
    (tmp / "model.onnx").write_bytes(b"123")
    (tmp / "tokenizer.json").write_text("{}")
    publish(tmp, out)
    assert not tmp.exists() and not (out / "old.txt").exists()
    assert model_bytes(out) == 3  # tokenizer is not a weight file
    assert [p.name for p in tmp_path.iterdir()] == ["out"]


def test_parent_that_cannot_be_created(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    with pytest.raises(SlimcartError, match="cannot create output parent folder"):
        check_output_path(blocker / "sub" / "out", overwrite=False)
