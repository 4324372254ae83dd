"""Small C kernels compiled on first use and loaded through ctypes.

Why hand-rolled instead of torch.utils.cpp_extension: those kernels include no torch header, so a
build is one `cc` call of about a second (torch's extension headers take a minute to compile on two
cores and need ninja), and a call costs one ctypes dispatch (~1 us) instead of a Python op wrapper.

The shared object is cached under $SLIMCART_CACHE (default ~/.cache/slimcart) by a hash of the
source, the compiler's version, the flags and this CPU's model and features (-march=native code is
only valid where it was built); it is written to a temporary name and renamed into place, so parallel
first uses never load a half-written file. Where no C compiler works (or SLIMCART_NO_NATIVE is set),
`load` returns None and every caller keeps its pure-torch path.
"""
from __future__ import annotations

import ctypes
import hashlib
import os
import shutil
import subprocess
import tempfile
import threading
from pathlib import Path

FLAGS = ("-O3", "-march=native", "-shared", "-fPIC", "-fno-math-errno", "-std=c11")
_LOADED: dict[str, ctypes.CDLL | None] = {}
_LOCK = threading.Lock()


def cache_dir() -> Path:
    return Path(os.environ.get("SLIMCART_CACHE") or Path.home() / ".cache" / "slimcart") / "kernels"


def _compiler() -> str | None:
    return os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc") or shutil.which("clang")


def _cpu_key() -> str:
    try:
        text = Path("/proc/cpuinfo").read_text(errors="replace")
    except OSError:
        return os.uname().machine
    keep = [ln for ln in text.splitlines() if ln.startswith(("model name", "flags"))][:2]
    return "\n".join(keep)


def load(name: str, source: str) -> ctypes.CDLL | None:
    """The compiled library of `source` (built once per machine and source), or None without a compiler."""
    with _LOCK:
        if name in _LOADED:
            return _LOADED[name]
        lib = None
        if not os.environ.get("SLIMCART_NO_NATIVE"):
            try:
                lib = ctypes.CDLL(str(_build(name, source)))
            except (OSError, subprocess.SubprocessError, RuntimeError):
                lib = None  # no working compiler: the caller's torch path runs
        _LOADED[name] = lib
        return lib


def _build(name: str, source: str) -> Path:
    cc = _compiler()
    if cc is None:
        raise RuntimeError("no C compiler (cc, gcc or clang) on PATH")
    version = subprocess.run([cc, "--version"], capture_output=True, text=True, timeout=30).stdout.split("\n")[0]
    key = hashlib.sha256("\0".join([source, cc, version, " ".join(FLAGS), _cpu_key()]).encode()).hexdigest()[:20]
    target = cache_dir() / f"{name}-{key}.so"
    if target.is_file():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=target.parent) as tmp:
        src, out = Path(tmp) / f"{name}.c", Path(tmp) / f"{name}.so"
        src.write_text(source)
        done = subprocess.run([cc, *FLAGS, str(src), "-o", str(out), "-lm"], capture_output=True, text=True, timeout=300)
        if done.returncode != 0:
            raise RuntimeError(f"{cc} failed: {(done.stderr or done.stdout).strip().splitlines()[:1]}")
        os.replace(out, target)
    return target
