"""Hardware probe: what this machine can run fast, recorded in every plan and report.

It decides which candidates the planner tries (no bf16 candidate without AVX512-BF16 or AMX-BF16: on
such a CPU bf16 is emulated and slower than fp32) and is compared with the probe stored in a study when
a saved plan is reused, since timings from another CPU do not compare with this one's.
"""
from __future__ import annotations

import os
import platform
import shutil
import subprocess
from pathlib import Path

FEATURES = {  # probe name -> /proc/cpuinfo flags (any of them)
    "avx2": ("avx2",),
    "avx512": ("avx512f",),
    "vnni": ("avx512_vnni", "avx_vnni"),
    "bf16": ("avx512_bf16", "amx_bf16"),
    "amx": ("amx_tile", "amx_int8", "amx_bf16"),
}
# Fields that must agree for timings of two machines to be compared (a different memory size does not matter).
IDENTITY = ("cpu", "logical_cpus", "features")


def _cpuinfo(path: Path) -> tuple[str, set[str], int | None]:
    model, flags, cores = "unknown", set(), None
    try:
        text = path.read_text()
    except OSError:
        return model, flags, cores
    physical = set()
    phys_id = "0"
    for line in text.splitlines():
        key, _, val = line.partition(":")
        key, val = key.strip(), val.strip()
        if key == "model name" and model == "unknown":
            model = val
        elif key == "flags" and not flags:
            flags = set(val.split())
        elif key == "physical id":
            phys_id = val
        elif key == "core id":
            physical.add((phys_id, val))
    return model, flags, (len(physical) or None)


def _memory_bytes(path: Path) -> int | None:
    try:
        for line in path.read_text().splitlines():
            if line.startswith("MemTotal:"):
                return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return None


def _gpus() -> list[str]:
    """GPU names from nvidia-smi when present (slimcart's runtimes here are CPU ones; recorded for the report)."""
    if shutil.which("nvidia-smi") is None:
        return []
    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=name", "--format=csv,noheader"], capture_output=True,
                             text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return []
    return [line.strip() for line in out.stdout.splitlines() if line.strip()] if out.returncode == 0 else []


def probe(cpuinfo: Path = Path("/proc/cpuinfo"), meminfo: Path = Path("/proc/meminfo")) -> dict:
    """CPU model, cores, ISA features, memory, GPUs. Paths are parameters so tests can feed other machines."""
    model, flags, cores = _cpuinfo(cpuinfo)
    if model == "unknown":
        model = platform.processor() or "unknown"
    return {
        "cpu": model,
        "arch": platform.machine(),
        "logical_cpus": os.cpu_count() or 1,
        "physical_cores": cores,
        "features": {name: any(f in flags for f in names) for name, names in FEATURES.items()},
        "memory_bytes": _memory_bytes(meminfo),
        "gpus": _gpus(),
    }


def describe(hw: dict) -> str:
    feats = ", ".join(k for k, v in hw["features"].items() if v) or "no AVX2"
    mem = f", {hw['memory_bytes'] / 2**30:.0f} GiB" if hw.get("memory_bytes") else ""
    gpu = f", GPU: {', '.join(hw['gpus'])}" if hw.get("gpus") else ", no GPU"
    return f"{hw['cpu']} ({hw['logical_cpus']} logical CPUs; {feats}{mem}{gpu})"


def differences(saved: dict, current: dict) -> list[str]:
    """What differs between a study's machine and this one, in the fields timings depend on."""
    return [f"{k}: study {saved.get(k)!r}, this machine {current.get(k)!r}" for k in IDENTITY
            if saved.get(k) != current.get(k)]
