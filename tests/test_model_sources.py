"""Bring your own model: local folders, Hugging Face ids from the local cache (never a download), and
architectures outside what slimcart supports refused by name before any weights load."""
from __future__ import annotations

import json
import shutil

import pytest

from slimcart.errors import SlimcartError
from slimcart.workloads import get_workload


def _fake_hub_cache(root, repo_id: str, src) -> None:
    """The layout huggingface_hub writes: models--org--name/{refs/main, snapshots/<commit>/files}."""
    repo = root / ("models--" + repo_id.replace("/", "--"))
    commit = "0" * 40
    shutil.copytree(src, repo / "snapshots" / commit)
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(commit)


def test_a_hub_id_in_the_local_cache_loads(tmp_path, tiny_encoder_dir, monkeypatch):
    import huggingface_hub.constants as c

    _fake_hub_cache(tmp_path, "acme/tiny-encoder", tiny_encoder_dir)
    monkeypatch.setattr(c, "HF_HUB_CACHE", str(tmp_path))
    bundle = get_workload("search").load_model("acme/tiny-encoder")
    assert bundle.module.transformer.config.hidden_size == 64 and bundle.source.parent.name == "snapshots"


def test_a_hub_id_not_in_the_cache_says_how_to_get_it(tmp_path, monkeypatch):
    import huggingface_hub.constants as c

    monkeypatch.setattr(c, "HF_HUB_CACHE", str(tmp_path))
    with pytest.raises(SlimcartError, match="huggingface-cli download acme/absent"):
        get_workload("llm").load_model("acme/absent")


@pytest.mark.parametrize("workload, model_type, fragment", [
    ("search", "gpt2", "not a text encoder slimcart supports"),
    ("llm", "bert", "not a decoder LM slimcart supports"),
])
def test_unsupported_architectures_are_refused_by_name(tmp_path, tiny_encoder_dir, workload, model_type, fragment):
    folder = tmp_path / "m"
    shutil.copytree(tiny_encoder_dir, folder)
    cfg = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**cfg, "model_type": model_type}))
    with pytest.raises(SlimcartError, match=f"model type '{model_type}' is {fragment}"):
        get_workload(workload).load_model(str(folder))
