"""CLI wrappers: `slimcart embed / index / score / serve` — one error line for bad input, a working
end-to-end path, and `slimcart serve` as a real process that exits cleanly on SIGTERM."""
from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pandas as pd
import pyarrow.parquet as pq
import pytest
from typer.testing import CliRunner

from slimcart.cli import app

from conftest import tree_fingerprint

pytestmark = pytest.mark.usefixtures("one_thread")
runner = CliRunner()
ROOT = Path(__file__).resolve().parents[1]


def _one_error(res, fragment):
    assert res.exit_code == 2, res.output
    lines = [ln for ln in res.output.strip().splitlines() if ln.strip()]
    assert lines[-1].startswith("error:") and fragment in " ".join(res.output.split()), res.output


@pytest.fixture
def catalogue(tmp_path):
    path = tmp_path / "in" / "cat.csv"
    path.parent.mkdir()
    pd.DataFrame({"sku": ["a1", "b2", "c3"], "title": ["red shoes", "usb cable", "espresso machine"]}).to_csv(path, index=False)
    return path


def test_embed_cli_writes_vectors(tiny_encoder_dir, catalogue, tmp_path):
    out = tmp_path / "vec"
    res = runner.invoke(app, ["embed", "-m", str(tiny_encoder_dir), "-i", str(catalogue), "-o", str(out),
                              "--column", "title", "--id-column", "sku", "--workers", "1", "--threads", "1"])
    assert res.exit_code == 0, res.output
    assert "3 rows" in res.output
    t = pq.read_table(out)
    assert t.column("id").to_pylist() == ["a1", "b2", "c3"]


@pytest.mark.parametrize("args,fragment", [
    (["--column", "name"], "has no column 'name'"),
    (["--column", "title", "--workers", "0"], "--workers: Input should be greater than or equal to 1"),
    (["--column", "title", "--shard-rows", "0"], "--shard-rows: Input should be greater than or equal to 1"),
    (["--column", "title", "--engine", "spark"], "--engine: Input should be 'local' or 'ray'"),
])
def test_embed_cli_bad_input(tiny_encoder_dir, catalogue, tmp_path, args, fragment):
    before = tree_fingerprint(catalogue.parent)
    res = runner.invoke(app, ["embed", "-m", str(tiny_encoder_dir), "-i", str(catalogue), "-o", str(tmp_path / "o"),
                              "--workers", "1", *args] if "--workers" not in args else
                        ["embed", "-m", str(tiny_encoder_dir), "-i", str(catalogue), "-o", str(tmp_path / "o"), *args])
    _one_error(res, fragment)
    assert tree_fingerprint(catalogue.parent) == before and not (tmp_path / "o").exists()


def test_index_cli_bad_kind(tiny_encoder_dir, catalogue, tmp_path):
    res = runner.invoke(app, ["index", "-m", str(tiny_encoder_dir), "-i", str(catalogue), "-o", str(tmp_path / "ix"),
                              "--column", "title", "--kind", "ivf", "--workers", "1"])
    _one_error(res, "--kind must be exact or hnsw")


def test_serve_cli_bad_options(tmp_path):
    _one_error(runner.invoke(app, ["serve", "minilm", "--max-batch", "0"]), "--max-batch: Input should be greater")
    _one_error(runner.invoke(app, ["serve", "minilm", "--index", str(tmp_path)]), "not a slimcart index")
    _one_error(runner.invoke(app, ["serve", "nosuchmodel", "--port", "0"]), "unknown model 'nosuchmodel'")
    _one_error(runner.invoke(app, ["serve", "minilm", "-w", "vision"]), "unknown workload 'vision'")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_serve_process_answers_and_exits_cleanly_on_sigterm(tiny_encoder_dir):
    port = _free_port()
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.Popen([sys.executable, "-m", "slimcart.cli", "serve", str(tiny_encoder_dir), "--port", str(port)],
                            cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        end = time.monotonic() + 90
        while True:
            assert proc.poll() is None, proc.stdout.read()
            try:
                if httpx.get(f"http://127.0.0.1:{port}/ready", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            assert time.monotonic() < end, "server did not become ready"
            time.sleep(0.3)
        r = httpx.post(f"http://127.0.0.1:{port}/embed", json={"texts": ["red shoes"]})
        assert r.status_code == 200 and len(r.json()["vectors"][0]) == 64
        proc.send_signal(signal.SIGTERM)
        # uvicorn shuts down gracefully, then re-raises the signal so the exit status says SIGTERM
        assert proc.wait(30) in (0, -signal.SIGTERM)
        assert "stopped: requests in flight finished" in proc.stdout.read()
    finally:
        if proc.poll() is None:
            proc.kill()
