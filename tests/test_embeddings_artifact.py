"""The "embeddings-compressed" saved format: a SASRec with a compressed item table saves without its
float table and reloads to the same scores, through a minimal workload (only the contract's methods)."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

from slimcart.compress.embeddings import (
    EmbeddingsCompressedArtifact,
    compress_embeddings_,
)
from slimcart.contracts import ModelBundle, load_saved
from slimcart.errors import SlimcartError
from slimcart.models.sasrec import (
    SASRec,
    SASRecConfig,
    actual_config,
    load_sasrec,
    save_sasrec,
)

pytestmark = pytest.mark.usefixtures("one_thread")


class TinyRecsys:
    """Just what an artifact may call: save_model, load_model, torch_runner."""

    name = "tiny-recsys"

    def save_model(self, bundle, folder):
        folder.mkdir(parents=True, exist_ok=True)
        save_sasrec(bundle.module, folder)

    def load_model(self, spec):
        module, cfg = load_sasrec(Path(spec))
        return ModelBundle(name=str(spec), module=module.eval(), source=spec, extra={"config": cfg})

    def torch_runner(self, bundle):
        def run(seq):
            with torch.no_grad():
                return bundle.module(seq)
        run.runtime = "torch"
        return run


@pytest.mark.parametrize("cfg", [{"method": "rowwise", "bits": 4, "tables": ["item_emb"]},
                                 {"method": "mixed_dim", "tables": ["item_emb"]}])
def test_saved_folder_holds_the_compressed_bytes_and_reloads_to_the_same_scores(tmp_path, cfg):
    torch.manual_seed(0)
    model = SASRec(SASRecConfig(n_items=500, max_len=8, hidden=32, heads=2, layers=1, dropout=0.0)).eval()
    freq = {"item_emb": torch.randint(0, 20, (501,)).numpy()} if cfg["method"] == "mixed_dim" else None
    compress_embeddings_(model, cfg, freq)
    seq = torch.randint(0, 501, (4, 8))
    with torch.no_grad():
        want = model(seq)
    wl, bundle = TinyRecsys(), ModelBundle(name="m", module=model, source=None)
    EmbeddingsCompressedArtifact().save(tmp_path / "out", wl, bundle)
    assert type(model.item_emb).__name__ != "Embedding"  # the stand-in was swapped back
    with safe_open(str(tmp_path / "out" / "model" / "model.safetensors"), "pt") as f:
        assert "item_emb.weight" not in f.keys() and "pos_emb.weight" in f.keys()
    meta = json.loads((tmp_path / "out" / "slimcart-format.json").read_text())
    assert meta["format"] == "embeddings-compressed" and meta["stand_ins"][0]["shape"] == [501, 32]
    runner, loaded = load_saved(tmp_path / "out", wl, threads=1)
    assert torch.equal(runner(seq), want)
    assert actual_config(loaded.module).n_items == 500 and loaded.source == tmp_path / "out"


def test_saving_a_model_without_compressed_tables_or_a_broken_format_file_is_refused(tmp_path):
    model = SASRec(SASRecConfig(n_items=20, max_len=4, hidden=8, heads=2, layers=1))
    with pytest.raises(SlimcartError, match="no compressed embedding table"):
        EmbeddingsCompressedArtifact().save(tmp_path / "a", TinyRecsys(), ModelBundle(name="m", module=model, source=None))
    (tmp_path / "b").mkdir()
    (tmp_path / "b" / "slimcart-format.json").write_text(json.dumps({"format": "embeddings-compressed", "tables": {}}))
    with pytest.raises(SlimcartError, match="lacks its tables"):
        load_saved(tmp_path / "b", TinyRecsys(), threads=1)
    (tmp_path / "b" / "slimcart-format.json").write_text(json.dumps(
        {"format": "embeddings-compressed", "tables": {"x": {}}, "stand_ins": [], "model_dir": "../.."}))
    with pytest.raises(SlimcartError, match="points outside"):
        load_saved(tmp_path / "b", TinyRecsys(), threads=1)
