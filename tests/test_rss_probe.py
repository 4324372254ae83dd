"""Peak-memory probe: its own reading, and the probe process compress runs for each side."""
from __future__ import annotations

import json
import os
import subprocess
import sys


def test_peak_rss_self_sees_a_large_allocation_in_a_fresh_process():
    code = ("import numpy as np; from slimcart.rss_probe import peak_rss_self; before = peak_rss_self(); "
            "a = np.ones(300 * 2**20 // 8); print(before, peak_rss_self())")
    before, after = map(int, subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                                            check=True).stdout.split())
    assert after - before >= 290 * 2**20  # the 300 MiB array was touched, so it is resident


def test_probe_reports_one_json_line_for_a_model(tiny_encoder_dir):
    env = {k: v for k, v in os.environ.items() if k != "SLIMCART_DATA"}  # synthetic data: fast
    proc = subprocess.run([sys.executable, "-m", "slimcart.rss_probe", "--workload", "search", "--threads", "1",
                           "--model", str(tiny_encoder_dir)], capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr
    peak = json.loads(proc.stdout.strip().splitlines()[-1])["peak_rss_bytes"]
    weights = (tiny_encoder_dir / "model.safetensors").stat().st_size
    assert weights < peak < 4 * 2**30  # at least the weights it loaded, and a sane bound for a tiny model
