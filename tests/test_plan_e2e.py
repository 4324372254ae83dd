"""slimcart plan end to end on a tiny encoder and synthetic data: the output is a normal slimcart OUT whose
recipe.yaml rebuilds the same model, the figures are the test split's, and report.html renders in a real
headless Chromium with its plots and no console errors (screenshot kept as a test artefact)."""
from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest

from slimcart import api
from slimcart.plan.run import PlanOptions, plan
from slimcart.workloads import get_workload

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("one_thread")]
ARTIFACTS = Path(os.environ.get("SLIMCART_TEST_ARTIFACTS", Path(__file__).resolve().parents[1] / "test-artifacts"))


@pytest.fixture(scope="module")
def planned(tiny_encoder_dir, tmp_path_factory):
    mp = pytest.MonkeyPatch()
    mp.delenv("SLIMCART_DATA", raising=False)
    out = tmp_path_factory.mktemp("plan") / "out"
    events = []
    opts = PlanOptions(workload="search", model=str(tiny_encoder_dir), profile="realtime", out=out, time_budget_s=900,
                       max_trials=3, overrides={"max_quality_loss": 0.05})
    result = plan(opts, lambda kind, x: events.append((kind, x)))
    yield out, result, events
    mp.undo()


def test_out_is_a_slimcart_output_with_every_trial(planned):
    out, result, events = planned
    for name in ("model", "metrics.json", "recipe.yaml", "report.md", "plan.json", "report.html", "study.db", "best"):
        assert (out / name).exists(), name
    p = json.loads((out / "plan.json").read_text())
    complete = [t for t in p["trials"] if t["state"] == "COMPLETE"]
    assert len(complete) >= 3 and all(t["figures"] and t["feasible"] is not None for t in complete)
    for t in complete:
        f = t["figures"]
        assert {"quality_loss", "latency_p50_ms", "latency_p99_ms", "throughput", "energy_j_per_item", "size_bytes"} <= set(f)
        assert f["size_bytes"] == pytest.approx(f["ratios"]["size"] * p["baseline_validation"]["size_bytes"])
        if f["fidelity"] == "full":  # (screening scores one synthetic validation query: no interval)
            # quality feasibility is judged by the paired-bootstrap upper bound of the validation loss
            assert f["quality_loss_bound"] is not None and f["quality_confidence"] == 0.9
            assert t["constraints"]["max_quality_loss"] == pytest.approx((f["quality_loss_bound"] - 0.05) / 0.05)
    assert p["hardware"]["cpu"] and p["energy_method"]["method"] in ("measured", "estimate")
    assert "emulated" in p["label"] or os.cpu_count() == 1
    assert sum(1 for k, _ in events if k == "trial") >= 3  # one terminal line per trial
    assert p["chosen"]["feasible_on_validation"] and p["chosen"]["meets_every_limit_on_test"]
    assert p["validation"]["split"].startswith("validation") and p["data"]["split"].startswith("test")


def test_chosen_test_figures_match_an_independent_evaluation(planned):
    out, _, _ = planned
    p = json.loads((out / "plan.json").read_text())
    m = api.evaluate("search", str(out), threads=1)  # OUT loads like any slimcart output
    base = api.evaluate("search", p["model"], threads=1)
    assert m["quality"]["ndcg@10"] == pytest.approx(p["test"][str(p["chosen"]["number"])]["quality"]["ndcg@10"], abs=1e-9)
    loss = (base["quality"]["ndcg@10"] - m["quality"]["ndcg@10"]) / base["quality"]["ndcg@10"]
    assert p["chosen"]["test_figures"]["quality_loss"] == pytest.approx(loss, abs=1e-9)
    boot = p["test"][str(p["chosen"]["number"])]["ndcg@10_paired_bootstrap"]  # over test queries
    assert boot["rel_change"] == pytest.approx(-loss, abs=1e-9) and boot["ci95"][0] <= boot["rel_change"] <= boot["ci95"][1]
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["compressed"]["quality"]["ndcg@10"] == pytest.approx(m["quality"]["ndcg@10"], abs=1e-9)


def test_recipe_yaml_rebuilds_the_same_model(planned, tmp_path):
    out, _, _ = planned
    p = json.loads((out / "plan.json").read_text())
    api.compress("search", p["model"], out / "recipe.yaml", tmp_path / "again", repeats=1, measure_rss=False)
    wl = get_workload("search")
    r1, b1 = api.load(wl, out, threads=1)
    r2, _ = api.load(wl, tmp_path / "again", threads=1)
    batch = wl.tokenize(b1.tokenizer, ["red running shoes", "usb c charger 65w", "Acme coffee maker 12-cup"])
    np.testing.assert_allclose(r1(batch), r2(batch), atol=1e-5)


CONSOLE_ERROR = re.compile(r"CONSOLE.*(Uncaught|Error)|:ERROR:CONSOLE", re.I)


def _chromium() -> str | None:
    return shutil.which("chromium") or shutil.which("chromium-browser")


def _render(html: Path, png: Path) -> tuple[str, str]:
    """(DOM after scripts ran, console log) from headless Chromium; screenshot to png."""
    base = [_chromium(), "--headless=new", "--no-sandbox", "--disable-gpu", "--virtual-time-budget=8000",
            "--enable-logging=stderr", "--v=0", "--log-level=0", "--window-size=1280,2600"]
    dom = subprocess.run(base + ["--dump-dom", html.as_uri()], capture_output=True, text=True, timeout=180)
    shot = subprocess.run(base + [f"--screenshot={png}", html.as_uri()], capture_output=True, text=True, timeout=180)
    return dom.stdout, dom.stderr + shot.stderr


@pytest.mark.skipif(_chromium() is None, reason="Debian's chromium is not installed (apt-get install -y chromium)")
def test_console_error_detector_catches_a_broken_page(tmp_path):
    page = tmp_path / "broken.html"
    page.write_text("<html><body><script>undefinedFunction();</script></body></html>")
    _, log = _render(page, tmp_path / "broken.png")
    assert CONSOLE_ERROR.search(log)


@pytest.mark.skipif(_chromium() is None, reason="Debian's chromium is not installed (apt-get install -y chromium)")
def test_report_renders_in_headless_chromium(planned):
    out, _, _ = planned
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    png = ARTIFACTS / "plan-report.png"
    dom, log = _render(out / "report.html", png)
    assert "<script src=" not in (out / "report.html").read_text()[:5000]  # nothing fetched: plotly is inline
    assert dom.count('class="main-svg"') >= 2 * 4  # plotly draws two svg layers per plot: 3 fronts + sensitivity
    assert "Chosen: trial" in dom and "Hardware probe" in dom
    assert not CONSOLE_ERROR.search(log), log[-2000:]
    assert png.stat().st_size > 20_000
