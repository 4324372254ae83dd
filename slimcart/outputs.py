"""Output folders and files written atomically (temp + rename), output-path checks, bytes on disk."""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import uuid
from pathlib import Path
from typing import Callable

from .errors import SlimcartError

WEIGHT_SUFFIXES = (".safetensors", ".onnx", ".data", ".bin", ".gguf", ".xml", ".npz")


def model_bytes(folder: Path) -> int:
    """Bytes on disk of the weight-bearing files of a model folder (tokenizer and config excluded)."""
    folder = Path(folder)
    if folder.is_file():
        return folder.stat().st_size
    return sum(f.stat().st_size for f in folder.rglob("*") if f.is_file() and f.suffix in WEIGHT_SUFFIXES)


def check_output_path(out: Path, overwrite: bool, inputs: tuple[Path | None, ...] = ()) -> None:
    """Refuse an output that would lose the user's files: an existing folder without --overwrite; `/`,
    the home or working directory; anything that is, contains or lies inside one of `inputs` (the
    model folder, the data). Make sure the parent can be written."""
    out = Path(out)
    if str(out).strip() == "":
        raise SlimcartError("output path is empty")
    target = out.expanduser().resolve()
    if target in (Path("/"), Path.home().resolve(), Path.cwd().resolve()):
        raise SlimcartError(f"refusing to write the output into {target} (the root, home or current folder): "
                            "name a new folder for it")
    for src in inputs:
        if src is None:
            continue
        src = Path(src).expanduser().resolve()
        if target == src or src in target.parents or target in src.parents:
            raise SlimcartError(f"output {out} would overlap the input {src}: choose a folder outside it")
    if out.exists() and not out.is_dir():
        raise SlimcartError(f"output path {out} exists and is not a folder")
    if out.exists() and not overwrite:
        raise SlimcartError(f"output folder {out} already exists (pass --overwrite to replace it)")
    parent = target.parent
    try:
        parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise SlimcartError(f"cannot create output parent folder {parent}: {e.strerror}") from None
    if not os.access(parent, os.W_OK):
        raise SlimcartError(f"output folder {parent} is not writable")


def partial_dir(out: Path) -> Path:
    """Where an unfinished run writes; kept after an interruption so the run can resume."""
    out = Path(out).resolve()
    return out.parent / f".{out.name}.partial"


def publish(tmp: Path, out: Path) -> None:
    """Move a finished temp folder into place; an old output is only removed once the new one is complete."""
    out = Path(out).resolve()
    trash = None
    if out.exists():
        trash = out.parent / f".{out.name}.old-{uuid.uuid4().hex[:8]}"
        out.rename(trash)
    Path(tmp).rename(out)
    if trash is not None:
        shutil.rmtree(trash, ignore_errors=True)


def atomic_dir(final: Path, write: Callable[[Path], None]) -> None:
    """Write a folder under a temporary name beside `final`, then rename it into place: readers see
    the old folder or the complete new one, never a half-written one."""
    final = Path(final)
    tmp = final.with_name(f".{final.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        write(tmp)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    publish(tmp, final)


def atomic_write_text(path: Path, text: str) -> None:
    """Write a small file via a temporary file and rename (a crash leaves the old or the new file)."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_text(text)
    os.replace(tmp, path)


def copy_files(src: Path, dest: Path, keep: Callable[[Path], bool] = lambda rel: True) -> list[Path]:
    """Copy the regular files under `src` (relative paths `keep` accepts) to `dest`, keeping the layout.
    Links are never followed or copied: a link in a model folder cannot pull outside files into an output."""
    src, dest, done = Path(src), Path(dest), []
    if src.is_symlink() or not src.is_dir():
        return done
    for root, dirs, files in os.walk(src, followlinks=False):
        dirs[:] = [d for d in dirs if not (Path(root) / d).is_symlink()]
        for name in files:
            f = Path(root) / name
            rel = f.relative_to(src)
            if f.is_symlink() or not f.is_file() or not keep(rel):
                continue
            (dest / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(f, dest / rel)
            done.append(rel)
    return done


def tree_digest(path: Path | None) -> str | None:
    """SHA-1 over the relative names and contents of every regular file under `path` (or of the file):
    what a run's identity records, so a replaced model or data file is never mistaken for the old one."""
    if path is None:
        return None
    path = Path(path)
    files = [path] if path.is_file() else sorted(p for p in path.rglob("*") if p.is_file() and not p.is_symlink())
    h = hashlib.sha1()
    for f in files:
        h.update(str(f.relative_to(path) if f != path else f.name).encode() + b"\0")
        with open(f, "rb") as fh:
            for chunk in iter(lambda: fh.read(1 << 20), b""):
                h.update(chunk)
    return h.hexdigest()


class OutputLock:
    """An exclusive lock on an output folder for one run (`.OUT.lock` beside it, held with flock: the
    kernel drops it when the process dies, so a killed run never leaves a stale lock)."""

    def __init__(self, out: Path):
        out = Path(out).resolve()
        self.path = out.parent / f".{out.name}.lock"
        self.fh = None

    def __enter__(self) -> "OutputLock":
        import fcntl

        self.fh = open(self.path, "a+")
        try:
            fcntl.flock(self.fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            self.fh.seek(0)
            holder = self.fh.read().strip() or "another process"
            self.fh.close()
            raise SlimcartError(f"{self.path.parent / self.path.name[1:-5]} is being written by process {holder}; "
                                "wait for it to finish or choose another --out") from None
        self.fh.seek(0)
        self.fh.truncate()
        self.fh.write(str(os.getpid()))
        self.fh.flush()
        return self

    def __exit__(self, *exc) -> None:
        self.path.unlink(missing_ok=True)
        self.fh.close()


def write_json(path: Path, obj: dict) -> None:
    """Strict JSON (RFC 8259): a NaN or infinite figure is never published."""
    try:
        text = json.dumps(obj, indent=2, sort_keys=False, default=_json_default, allow_nan=False)
    except ValueError:
        raise SlimcartError(f"refusing to write {Path(path).name}: a figure in it is not a finite number") from None
    atomic_write_text(path, text + "\n")


def _json_default(o):
    if hasattr(o, "item"):
        return o.item()
    if isinstance(o, Path):
        return str(o)
    raise TypeError(f"not JSON serialisable: {type(o)}")
