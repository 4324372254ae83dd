"""Photo data for the vision workload: the `split/CLASS/*.jpg` layout, decoding + resizing with
Pillow, the cost of that preprocessing measured apart from the model, and a synthetic stand-in.

Preprocessing (the same for training, evaluation and serving): decode the file, apply the EXIF
orientation (phone photos), flatten transparency onto white (cut-out product PNGs), squash to
size x size with Pillow's antialiased bilinear filter. Squashing rather than centre-cropping keeps
the whole garment (the photos are mostly 3:4 portrait; a square crop would cut off hems and
collars). For JPEGs, Pillow's `draft` lets libjpeg decode directly at 1/2, 1/4 or 1/8 scale when
that is still at least the target size, which is most of the decode cost saved at no visible loss.
"""
from __future__ import annotations

import io
import os
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from ..contracts import DataInfo
from ..errors import SlimcartError

SUFFIXES = (".jpg", ".jpeg", ".png", ".webp", ".bmp")
SPLITS = {"train": ("train",), "validation": ("validation", "val", "valid"), "test": ("test",)}
MAX_PIXELS = 100_000_000  # anything larger is not a product photo; refuse before decoding (memory)


def scan_split(folder: Path) -> dict[str, list[Path]]:
    """{class name: sorted image paths} for one split folder; a clear error for anything malformed."""
    classes = sorted(p for p in folder.iterdir() if p.is_dir() and not p.name.startswith("."))
    loose = [p.name for p in folder.iterdir() if p.is_file() and p.suffix.lower() in SUFFIXES]
    if loose:
        raise SlimcartError(f"{folder} holds images directly ({loose[0]}, ...): put each image in a folder named "
                            f"after its class ({folder.name}/CLASS/*.jpg)")
    if not classes:
        raise SlimcartError(f"{folder} has no class folders (expected {folder.name}/CLASS/*.jpg)")
    out = {}
    for c in classes:
        files = sorted(p for p in c.iterdir() if p.is_file() and p.suffix.lower() in SUFFIXES)
        if not files:
            raise SlimcartError(f"class folder {c} has no images ({', '.join(SUFFIXES)})")
        out[c.name] = files
    return out


def scan_folder(root: Path) -> dict[str, dict[str, list[Path]]]:
    """{split: {class: paths}} for a `train/ validation/ test/` folder; test is required."""
    if not root.is_dir():
        raise SlimcartError(f"vision data must be a folder with train/, validation/ and test/ subfolders "
                            f"of CLASS/*.jpg, not the file {root}")
    folders = {split: next((root / n for n in names if (root / n).is_dir()), None) for split, names in SPLITS.items()}
    if folders["test"] is None:
        raise SlimcartError(f"{root} has no test/ folder (expected {root}/test/CLASS/*.jpg, and train/, validation/ "
                            "to train or calibrate)")
    return {split: scan_split(folder) for split, folder in folders.items() if folder is not None}


def _open(source: Path | bytes):
    from PIL import Image

    return Image.open(io.BytesIO(source) if isinstance(source, bytes) else source)


def decode(source: Path | bytes, size: int, name: str | None = None) -> np.ndarray:
    """One image file (path or its bytes) -> uint8 (size, size, 3) RGB (see module doc)."""
    from PIL import Image, ImageOps

    try:
        with _open(source) as im:
            if im.width * im.height > MAX_PIXELS:
                raise SlimcartError(f"image {name or source} is {im.width}x{im.height}: too large for a product photo")
            if im.format == "JPEG":
                im.draft("RGB", (size, size))  # libjpeg DCT scaling: never below the requested size
            im = ImageOps.exif_transpose(im)
            if im.mode in ("RGBA", "LA", "PA") or (im.mode == "P" and "transparency" in im.info):
                rgba = im.convert("RGBA")
                im = Image.new("RGB", rgba.size, (255, 255, 255))
                im.paste(rgba, mask=rgba.getchannel("A"))
            im = im.convert("RGB").resize((size, size), Image.BILINEAR)
            return np.asarray(im, dtype=np.uint8)
    except SlimcartError:
        raise
    except Exception as e:  # Pillow raises several types (UnidentifiedImageError, OSError, SyntaxError, ...)
        raise SlimcartError(f"cannot read image {name or source}: {str(e).splitlines()[0] if str(e) else type(e).__name__}") from None


def decode_many(paths: list[Path], size: int) -> np.ndarray:
    """uint8 (N, size, size, 3) for a list of image files."""
    out = np.empty((len(paths), size, size, 3), np.uint8)
    for i, p in enumerate(paths):
        out[i] = decode(p, size)
    return out


def preprocess_cost(blobs: list[tuple[str, bytes]], size: int, repeats: int = 3) -> dict:
    """Time decode + resize + conversion to the model's float input, per image, apart from the model.

    `blobs` are (name, file bytes): files are read into memory first, so disk speed is not part of the figure; each image is
    processed `repeats` times and the median of its times is kept. One thread (Pillow decodes on
    the calling thread); `images_per_s_1_thread` is the preprocessing throughput of one core.
    """
    if not blobs:
        raise SlimcartError("no images to time preprocessing on")
    load = os.getloadavg()
    per_image = []
    for p, blob in blobs:
        times = []
        for _ in range(repeats):
            t0 = time.perf_counter()
            arr = decode(blob, size, name=p)
            pixels = arr.transpose(2, 0, 1).astype(np.float32) * (1 / 255.0)
            times.append(time.perf_counter() - t0)
        per_image.append(float(np.median(times)))
    ms = np.array(per_image) * 1e3
    return {"images": len(blobs), "size": size, "ms_per_image_p50": float(np.median(ms)),
            "ms_per_image_p90": float(np.percentile(ms, 90)), "ms_per_image_mean": float(ms.mean()),
            "images_per_s_1_thread": float(1e3 / ms.mean()), "input_shape": list(pixels.shape),
            "what": "JPEG/PNG bytes in memory -> decode (libjpeg draft scaling) -> EXIF orientation -> RGB -> "
                    f"bilinear resize to {size}x{size} -> float32 CHW in [0, 1]",
            "loadavg_before": list(load), "loadavg_after": list(os.getloadavg())}


# ---------------------------------------------------------------- datasets
SYNTHETIC_CLASSES = ["synthetic-disc", "synthetic-square", "synthetic-hstripes", "synthetic-vstripes", "synthetic-ring"]
SYNTHETIC_SIZES = {"train": 60, "validation": 12, "test": 20}  # per class


def synthetic_split(split: str, size: int = 64) -> tuple[np.ndarray, np.ndarray]:
    """Deterministic coloured shapes on noisy backgrounds, one shape per class: (uint8 images, labels)."""
    rng = np.random.default_rng(["train", "validation", "test"].index(split) + 11)
    n = SYNTHETIC_SIZES[split]
    yy, xx = np.mgrid[-1:1:size * 1j, -1:1:size * 1j]
    out, labels = [], []
    for k in range(len(SYNTHETIC_CLASSES)):
        for _ in range(n):
            cx, cy, r = rng.uniform(-0.3, 0.3), rng.uniform(-0.3, 0.3), rng.uniform(0.35, 0.6)
            dx, dy = xx - cx, yy - cy
            d = np.hypot(dx, dy)
            mask = [d < r, np.maximum(abs(dx), abs(dy)) < r, (d < r) & (np.sin(9 * dy) > 0),
                    (d < r) & (np.sin(9 * dx) > 0), (d < r) & (d > 0.6 * r)][k]
            fg, bg = rng.uniform(0, 255, 3), rng.uniform(0, 255, 3)
            im = np.where(mask[..., None], fg, bg) + rng.normal(0, 12, (size, size, 3))
            out.append(np.clip(im, 0, 255).astype(np.uint8))
            labels.append(k)
    return np.stack(out), np.array(labels, np.int64)


@dataclass
class VisionData:
    """Photos by split: file paths (real folders) or arrays (synthetic); decoded lazily per input size."""

    name: str
    classes: list[str]
    files: dict[str, list[Path]]
    labels_by_split: dict[str, np.ndarray]
    info: DataInfo
    arrays: dict[str, np.ndarray] = field(default_factory=dict)  # synthetic photos
    _decoded: dict = field(default_factory=dict, repr=False)

    def has(self, split: str) -> bool:
        return split in self.labels_by_split

    def labels(self, split: str) -> np.ndarray:
        if not self.has(split):
            raise SlimcartError(f"the data {self.name} has no {split} split (expected a {split}/CLASS/*.jpg folder)")
        return self.labels_by_split[split]

    def images(self, split: str, size: int) -> np.ndarray:
        """uint8 (N, size, size, 3) photos of a split, decoded and resized once per size."""
        self.labels(split)
        if (split, size) not in self._decoded:
            if split in self.arrays:
                self._decoded[split, size] = np.stack([decode(png_bytes(a), size) for a in self.arrays[split]])
            else:
                self._decoded[split, size] = decode_many(self.files[split], size)
        return self._decoded[split, size]


def png_bytes(array: np.ndarray) -> bytes:
    """A synthetic photo as PNG bytes, so it goes through the same decode + resize as a real file."""
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(array).save(buf, format="PNG")
    return buf.getvalue()


def load_folder(root: Path) -> VisionData:
    splits = scan_folder(root)
    classes = sorted({c for by_class in splits.values() for c in by_class})
    files, labels = {}, {}
    for split, by_class in splits.items():
        files[split] = [p for c in sorted(by_class) for p in by_class[c]]
        labels[split] = np.array([classes.index(c) for c in sorted(by_class) for _ in by_class[c]], np.int64)
    n = len(labels["test"])
    info = DataInfo(name=root.name, synthetic=False, n=n, source=root,
                    split=f"test split ({n} photos, {len(classes)} classes; splits present: {', '.join(splits)})")
    return VisionData(root.name, classes, files, labels, info)


def load_synthetic() -> VisionData:
    arrays, labels = {}, {}
    for split in SYNTHETIC_SIZES:
        arrays[split], labels[split] = synthetic_split(split)
    n = len(labels["test"])
    info = DataInfo(name="synthetic", synthetic=True, n=n,
                    split=f"SYNTHETIC shapes, test split ({n} images, {len(SYNTHETIC_CLASSES)} classes)")
    return VisionData("synthetic", list(SYNTHETIC_CLASSES), {}, labels, info, arrays)
