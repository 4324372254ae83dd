"""A compress killed with SIGKILL at random moments and rerun always finishes with the figures of an
uninterrupted run: the partial state is reused when complete, rebuilt when not, never stale or stuck."""
from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time

import pytest

pytestmark = pytest.mark.slow


def _compress(model, out, env) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "slimcart.cli", "compress", "-w", "search", "-m", str(model), "-r",
                             "int8-dynamic", "-o", str(out), "--repeats", "1", "--no-rss", "--threads", "1"],
                            env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)


def test_sigkill_at_six_random_moments(tmp_path, tiny_encoder_dir):
    env = {k: v for k, v in os.environ.items() if k != "SLIMCART_DATA"}
    t0 = time.monotonic()
    clean = _compress(tiny_encoder_dir, tmp_path / "clean", env)
    assert clean.wait(timeout=600) == 0, clean.stderr.read()
    duration = time.monotonic() - t0
    want = json.loads((tmp_path / "clean" / "metrics.json").read_text())
    rng = random.Random(0)
    for i in range(6):  # each kill + rerun is two interpreter starts (~10 s); six seeded moments span the run
        out = tmp_path / f"run{i}"
        victim = _compress(tiny_encoder_dir, out, env)
        time.sleep(rng.uniform(0.05, 1.0) * duration)
        victim.send_signal(signal.SIGKILL)
        victim.wait()
        if not out.exists():  # else the run (faster than the clean one: its prefix is cached) was already complete
            again = _compress(tiny_encoder_dir, out, env)
            err = again.stderr.read()
            assert again.wait(timeout=600) == 0, f"rerun {i} failed: {err}"
        got = json.loads((out / "metrics.json").read_text())
        assert got["compressed"]["quality"] == want["compressed"]["quality"], i
        assert got["baseline"]["quality"] == want["baseline"]["quality"], i
        assert got["compressed"]["size_bytes"] == want["compressed"]["size_bytes"], i
        assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(f".run{i}")) == []  # nothing left behind
