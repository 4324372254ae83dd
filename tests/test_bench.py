"""Timing harness behaviour, checked with functions of known cost."""
import os
import time

import pytest

from slimcart.bench import (
    environment,
    measure_interleaved,
    paired_bootstrap,
    paired_ratio,
)
from slimcart.contracts import BenchInputs


def _sleeper(seconds):
    def fn(_batch):
        time.sleep(seconds)
    return fn


def test_interleaved_ratio_recovers_known_speedup():
    inputs = BenchInputs(single=[0] * 4, serving=[0] * 3, items_per_serving_batch=10, unit="items")
    calls = []
    sides = {"slow": _sleeper(0.004), "fast": _sleeper(0.002)}
    wrapped = {k: (lambda f, k: (lambda b: (calls.append(k), f(b))))(f, k) for k, f in sides.items()}
    res = measure_interleaved(wrapped, inputs, repeats=3, warmup=1, latency_samples=4, min_round_s=0)
    ratio = paired_ratio(res["fast"].throughput_per_s, res["slow"].throughput_per_s)
    assert 1.4 < ratio < 2.3  # 2x by construction; sleep overshoot makes it a little less
    s = res["slow"].summary()
    assert s["latency_ms"]["p50"] >= 4.0 and s["latency_ms"]["p99"] >= s["latency_ms"]["p50"]
    assert s["throughput_per_s"] <= 10 / 0.004 + 1e-9
    # interleaving: within the latency phase, consecutive calls alternate between the sides
    timed = calls[(1 * (2 + 4)) * 2:]  # skip warm-up calls (2 serving + 4 singles per side)
    assert timed[:4] in (["slow", "fast"] * 2, ["fast", "slow"] * 2)


def test_short_rounds_pass_over_the_batches_again():
    """A side faster than `min_round_s` per pass repeats its batches inside the round (3+ rounds only);
    throughput still counts every item it ran."""
    inputs = BenchInputs(single=[0], serving=[0] * 2, items_per_serving_batch=5, unit="items")
    for repeats, expect_passes in ((3, 5), (1, 1)):
        calls = []

        def side(batch, calls=calls):
            calls.append(batch)
            time.sleep(0.01)

        res = measure_interleaved({"a": side}, inputs, repeats=repeats, warmup=0, latency_samples=1, min_round_s=0.1)
        throughput_calls = len(calls) - repeats  # one latency call per round
        passes = throughput_calls / (2 * repeats)
        assert passes >= expect_passes and (repeats >= 3 or passes == 1)
        # 5 items per 10 ms call: at most 500 items/s whatever the number of passes
        assert 350 < res["a"].summary()["throughput_per_s"] <= 500
    calls = []  # a 10 s round asked of a no-op side stops at max_passes
    measure_interleaved({"a": calls.append}, inputs, repeats=3, warmup=0, latency_samples=1, min_round_s=10.0,
                        max_passes=4)
    assert len(calls) == 3 * (1 + 4 * 2)  # per round: one latency call, 4 passes over 2 batches


def test_extra_throughput_reported():
    inputs = BenchInputs(single=[0], serving=[0], items_per_serving_batch=1, unit="x", extra={"prefill": ([0, 0], 100)})
    res = measure_interleaved({"a": _sleeper(0.001)}, inputs, repeats=2, warmup=0)
    assert "prefill" in res["a"].summary()["extra_throughput_per_s"]
    assert res["a"].summary()["extra_throughput_per_s"]["prefill"] < 100 / 0.001


def test_paired_ratio_is_median_of_per_round_ratios():
    assert paired_ratio([2, 4, 30], [1, 2, 3]) == pytest.approx(2.0)


def test_environment():
    env = environment(2)
    assert env["threads"] == 2 and env["versions"]["torch"].startswith("2.")


def test_paired_bootstrap_point_and_interval():
    import numpy as np

    base = np.array([0.0, 1.0, 0.5, 0.25] * 50)
    assert paired_bootstrap(base, base) == {"rel_change": 0.0, "ci95": [0.0, 0.0]}  # same rows: no spread
    up = base * 1.1  # every user 10% better: the ratio is 1.1 whatever rows are drawn
    r = paired_bootstrap(up, base)
    assert r["rel_change"] == pytest.approx(0.1) and r["ci95"] == pytest.approx([0.1, 0.1])
    noisy = base + np.random.default_rng(1).normal(0, 0.2, len(base))
    r = paired_bootstrap(noisy, base)
    assert r["ci95"][0] < r["rel_change"] < r["ci95"][1]
    assert r["rel_change"] == pytest.approx(noisy.mean() / base.mean() - 1)
    with pytest.raises(ValueError):
        paired_bootstrap(base, base[:-1])


def test_ratio_stats_hand_computed():
    from slimcart.bench import ratio_stats

    r = ratio_stats([2.0, 4.0, 6.0], [1.0, 2.0, 2.0])  # per-round ratios 2, 2, 3
    assert r["rounds"] == [2.0, 2.0, 3.0] and r["median"] == 2.0
    assert 2.0 <= r["ci95"][0] <= r["median"] <= r["ci95"][1] <= 3.0


def test_reliability_marks_busy_machines_few_rounds_and_wide_spread():
    from slimcart.bench import reliability

    steady = {"throughput": {"median": 3.0, "ci95": [2.9, 3.1], "rounds": [3.0, 2.9, 3.1, 3.0, 3.0]}}
    assert reliability(1.9, 2.1, 2, steady, threads=2) == {"reliable": True, "reasons": []}  # the benchmark's own load
    busy = reliability(4.2, 4.4, 2, steady, threads=2)
    assert not busy["reliable"] and "load average 4.4 on 2 CPUs" in busy["reasons"][0]
    few = reliability(1.0, 1.0, 2, {"throughput": {"median": 3.0, "ci95": [3.0, 3.0], "rounds": [3.0]}}, threads=2)
    assert not few["reliable"] and "only 1 timing round" in few["reasons"][0]
    wide = reliability(1.0, 1.0, 2, {"throughput": {"median": 3.0, "ci95": [2.0, 12.0], "rounds": [2, 3, 12]}}, threads=2)
    assert not wide["reliable"] and "varies from round to round" in wide["reasons"][0]


def test_cpu_competition_sees_a_busy_process_started_seconds_ago():
    """The load average needs a minute to notice a competitor; the /proc/stat meter sees it at once."""
    import subprocess
    import sys
    import time

    from slimcart.bench import BUSY_OTHERS, CpuCompetition, reliability

    if not os.path.exists("/proc/stat"):
        pytest.skip("no /proc/stat")
    hog = subprocess.Popen([sys.executable, "-c", "import time\nt = time.time()\nwhile time.time() - t < 30: pass"])
    try:
        time.sleep(0.3)
        meter = CpuCompetition()
        time.sleep(1.5)  # this process idles; the hog spins one CPU
        others = meter.others_cpus()
    finally:
        hog.kill()
        hog.wait()
    assert 0.6 < others <= (os.cpu_count() or 1) + 0.1
    steady = {"throughput": {"median": 3.0, "ci95": [2.9, 3.1], "rounds": [3.0] * 5}}
    flagged = reliability(0.2, 0.3, 2, steady, threads=2, others_cpus=others)
    assert not flagged["reliable"] and "other processes kept" in flagged["reasons"][0]
    assert reliability(0.2, 0.3, 2, steady, threads=2, others_cpus=BUSY_OTHERS / 2)["reliable"]
