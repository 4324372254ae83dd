"""slimcart plan, piece by piece: profiles, hardware probe, energy meter, search spaces, constraints,
Pareto front and choice, end-to-end request adapters. Every check against hand-computed or brute-force
values; no model is trained here."""
from __future__ import annotations

import fnmatch
import itertools
import os
import random
import time

import numpy as np
import pytest

from slimcart.errors import SlimcartError
from slimcart.plan import energy, hardware
from slimcart.plan.final import choose, explain, pareto
from slimcart.plan.profile import builtin_profiles, load_profile
from slimcart.plan.space import Settings, fingerprint, space_for
from slimcart.plan.study import clearly_behind, constraints_of
from slimcart.plan.trial import quality_loss, quality_loss_bound, scaled
from slimcart.recipe import Recipe

pytestmark = pytest.mark.usefixtures("one_thread")

HW_BF16 = {"features": {"avx2": True, "avx512": True, "vnni": True, "bf16": True, "amx": False}, "cpu": "x"}
HW_PLAIN = {"features": {"avx2": True, "avx512": False, "vnni": False, "bf16": False, "amx": False}, "cpu": "y"}


# ---------------------------------------------------------------- profiles
def test_builtin_profiles_match_the_issue():
    assert set(builtin_profiles()) >= {"realtime", "cloud-batch", "edge", "mobile"}
    rt = load_profile("realtime").resolve("search")
    assert (rt.threads, rt.profile.batch, rt.profile.objective) == (1, 1, "latency_p99")
    assert rt.limits == {"max_quality_loss": 0.005}
    cb = load_profile("cloud-batch").resolve("search")
    assert cb.threads == os.cpu_count() and cb.profile.objective == "throughput_per_core" and cb.profile.report_cost
    edge = load_profile("edge").resolve("llm")
    assert edge.limits["max_quality_loss"] == 0.01 and "max_peak_rss_mb" in edge.limits and "max_size_ratio" in edge.limits
    mob = load_profile("mobile")
    assert mob.resolve("search").limits["max_size_mb"] == 10  # per-workload cap
    assert "max_size_mb" not in mob.resolve("llm").limits and mob.resolve("llm").limits["max_quality_loss"] == 0.03


def test_profile_overrides_and_labels():
    p = load_profile("realtime").with_overrides(max_quality_loss=0.02, threads=2, batch=None)
    r = p.resolve("search")
    assert r.limits["max_quality_loss"] == 0.02 and r.profile.batch == 1
    assert r.threads == min(2, os.cpu_count())
    one = load_profile("realtime").resolve("search")
    if os.cpu_count() > 1:
        assert "emulated on TestCPU with 1 of" in one.label("TestCPU")
    with pytest.raises(SlimcartError, match="unknown profile field"):
        load_profile("realtime").with_overrides(colour="red")


@pytest.mark.parametrize("text, match", [
    ("name: x\nthreads: 1\nconstraints: {max_quality_loss: -1}\n", "non-negative"),
    ("name: x\nobjective: fastest\n", "objective"),
    ("name: x\nconstraints: {max_speed: 3}\n", "max_speed"),
    ("- a\n- b\n", "must be a mapping"),
    ("name: [unclosed\n", "not valid YAML"),
])
def test_bad_profile_files_are_one_clear_error(tmp_path, text, match):
    f = tmp_path / "p.yaml"
    f.write_text(text)
    with pytest.raises(SlimcartError, match=match):
        load_profile(f)


def test_user_profile_file(tmp_path):
    f = tmp_path / "kiosk.yaml"
    f.write_text("threads: 1\nbatch: 4\nobjective: throughput\nconstraints:\n  max_quality_loss: 0.02\n"
                 "  max_size_mb: {search: 12, default: 50}\n")
    p = load_profile(f)
    assert p.name == "kiosk" and p.resolve("search").limits["max_size_mb"] == 12
    assert p.resolve("recsys").limits["max_size_mb"] == 50
    with pytest.raises(SlimcartError, match="unknown profile"):
        load_profile("no-such-profile")


# ---------------------------------------------------------------- hardware probe
def test_probe_reads_features_cores_and_memory(tmp_path):
    cpu = tmp_path / "cpuinfo"
    block = ("processor\t: {i}\nmodel name\t: Fake Xeon 9999\nphysical id\t: 0\ncore id\t\t: {c}\n"
             "flags\t\t: fpu avx2 avx512f avx512_vnni amx_tile amx_bf16\n\n")
    cpu.write_text("".join(block.format(i=i, c=i // 2) for i in range(8)))  # 8 threads on 4 cores
    mem = tmp_path / "meminfo"
    mem.write_text("MemTotal:       16384000 kB\nMemFree: 1 kB\n")
    hw = hardware.probe(cpu, mem)
    assert hw["cpu"] == "Fake Xeon 9999" and hw["physical_cores"] == 4 and hw["memory_bytes"] == 16384000 * 1024
    assert hw["features"] == {"avx2": True, "avx512": True, "vnni": True, "bf16": True, "amx": True}
    other = {**hw, "features": {**hw["features"], "bf16": False}}
    assert hardware.differences(hw, other) and not hardware.differences(hw, dict(hw))
    assert "Fake Xeon 9999" in hardware.describe(hw)


def test_bf16_candidates_only_where_the_cpu_has_bf16():
    with_bf16 = space_for("search", HW_BF16, None, Settings(), [], 6, False)
    without = space_for("search", HW_PLAIN, None, Settings(), [], 6, False)
    rt = lambda s: next(p.options for p in s.params if p.name == "runtime")  # noqa: E731
    assert "torch_compile_bf16" in rt(with_bf16) and "torch_compile_bf16" not in rt(without)
    assert any("bf16" in x for x in without.excluded)


# ---------------------------------------------------------------- energy
def test_rapl_counter_is_read_and_wraps(tmp_path):
    d = tmp_path / "intel-rapl:0"
    d.mkdir()
    (tmp_path / "intel-rapl:0:0").mkdir()  # a sub-domain: must not be counted twice
    (d / "energy_uj").write_text("999000000")
    (d / "max_energy_range_uj").write_text("1000000000")
    meter = energy.EnergyMeter.create("any", root=tmp_path)
    assert meter.method == "measured" and len(meter.domains) == 1

    def work():  # 3 J spent, across the wrap at 1000 J
        (d / "energy_uj").write_text(str(999000000 + 3000000 - 1000000000))

    _, joules = meter.joules(work)
    assert joules == pytest.approx(3.0)


def test_estimate_is_cpu_time_times_watts(tmp_path, monkeypatch):
    monkeypatch.delenv("SLIMCART_WATTS_PER_CORE", raising=False)
    meter = energy.EnergyMeter.create("AMD EPYC 7763", root=tmp_path / "none")
    assert meter.method == "estimate" and meter.watts == 4.4

    def busy():
        t0 = time.process_time()
        while time.process_time() - t0 < 0.2:
            pass
        return time.process_time() - t0

    cpu, joules = meter.joules(busy)
    assert joules == pytest.approx(cpu * 4.4, rel=0.05)
    assert energy.EnergyMeter.create("Unknown CPU", override=7.0).watts == 7.0
    monkeypatch.setenv("SLIMCART_WATTS_PER_CORE", "2.5")
    assert energy.EnergyMeter.create("AMD EPYC", root=tmp_path / "none").watts == 2.5
    monkeypatch.setenv("SLIMCART_WATTS_PER_CORE", "lots")
    with pytest.raises(SlimcartError, match="not a number"):
        energy.EnergyMeter.create("AMD EPYC", root=tmp_path / "none")


def test_energy_per_item_divides_by_items_and_rounds():
    class Fake:
        method, calls = "estimate", 0

        def joules(self, fn):
            fn()
            return None, 12.0  # 12 J per pass over the batches

    per = energy.energy_per_item(Fake(), {"a": lambda b: b, "b": lambda b: b}, [1, 2, 3], items=4, rounds=2)
    assert per == {"a": pytest.approx(12 / (3 * 4)), "b": pytest.approx(12 / (3 * 4))}


# ---------------------------------------------------------------- search spaces
def _brute_force_size(space) -> int:
    """Enumerate the full product of every parameter's options, keep the distinct parameter sets the
    conditions allow: an independent count of the space."""
    seen = set()
    for combo in itertools.product(*[p.options for p in space.params]):
        params = {}
        for p, v in zip(space.params, combo):
            if p.when(params):
                params[p.name] = v
        seen.add(tuple(sorted(params.items())))
    return len(seen)


@pytest.mark.parametrize("workload, capped", [("search", False), ("search", True), ("llm", True), ("recsys", True)])
def test_space_size_and_every_seed_builds_a_valid_recipe(workload, capped):
    sens = list(range(30)) if workload == "llm" else [f"layer{i}" for i in range(8)]
    space = space_for(workload, HW_BF16, None, Settings(), sens, 30 if workload == "llm" else 6, capped)
    assert space.size() == _brute_force_size(space)
    for ladder in space.seeds:
        for rung in ladder:
            full = space.sample(lambda name, options, r=rung: r[name] if name in r else options[0])
            assert set(rung) <= set(full)
            rec = space.recipe(full)
            assert isinstance(rec, Recipe) and rec.workloads == [workload]
    assert "\n".join(space.describe()).count("seed") >= 1


def test_budget_leaves_out_long_training_and_says_so():
    small = space_for("search", HW_PLAIN, 600, Settings(), [], 6, True)
    structure = next(p for p in small.params if p.name == "structure")
    assert structure.options == ["none"] and sum("structure=" in x for x in small.excluded) == 3
    big = space_for("search", HW_PLAIN, 5400, Settings(), [], 6, True)
    assert next(p for p in big.params if p.name == "structure").options == ["none", "distill", "prune", "lowrank"]


def test_search_recipes_compose_in_order_and_keep_sensitive_layers():
    space = space_for("search", HW_PLAIN, None, Settings(), ["a.dense", "b.dense", "c.dense"], 6, True)
    p = {"structure": "none", "embedding_rank": 0, "quant": "int8_static", "smoothquant_alpha": 0.8, "keep_fp32": 2,
         "int8_runtime": "openvino"}
    kinds = [s.kind for s in space.recipe(p).steps]
    assert kinds == ["smoothquant", "static_int8"]
    assert space.recipe(p).steps[-1].exclude == ["a.dense", "b.dense"]
    p2 = {**p, "structure": "distill", "distill_layers": 3, "embedding_rank": 64}
    kinds = [s.kind for s in space.recipe(p2).steps]
    assert kinds == ["distill", "lowrank", "distill", "smoothquant", "mixed_precision", "static_int8"]
    assert space.recipe({"structure": "none", "embedding_rank": 0, "quant": "none", "runtime": "torch"}) is None
    a = space.recipe(p, name="one")
    b = space.recipe(p, name="two")
    assert fingerprint(a) == fingerprint(b) and fingerprint(a) != fingerprint(space.recipe(p2))


def test_llm_8bit_layers_match_exactly_the_chosen_decoder_layers():
    space = space_for("llm", HW_PLAIN, None, Settings(), [1, 11, 3], 30, False)
    rec = space.recipe({"method": "rtn", "group_size": 64, "layers_8bit": 2})
    over = rec.steps[0].overrides
    names = [f"model.model.layers.{i}.mlp.up_proj" for i in range(30)]
    eight = [n for n in names if any(fnmatch.fnmatchcase(n, pat) for pat in over)]
    assert eight == ["model.model.layers.1.mlp.up_proj", "model.model.layers.11.mlp.up_proj"]
    assert rec.steps[0].spec_for(eight[0]).bits == 8 and rec.steps[0].spec_for(names[3]).bits == 4


# ---------------------------------------------------------------- scoring helpers
def test_quality_loss_sign_and_scaled_training_budgets():
    assert quality_loss(0.80, 0.79, True) == pytest.approx(0.0125)
    assert quality_loss(50.0, 52.5, False) == pytest.approx(0.05)
    assert quality_loss(50.0, 49.0, False) < 0
    space = space_for("search", HW_PLAIN, None, Settings(train_minutes=8, train_steps=1000), [], 6, False)
    rec = space.recipe({"structure": "distill", "distill_layers": 3, "embedding_rank": 0, "quant": "none",
                        "runtime": "onnxruntime"})
    short = scaled(rec, 0.25)
    assert short.steps[0].train.max_steps == 250 and short.steps[0].train.max_minutes == pytest.approx(2.0)
    assert scaled(rec, 1.0) is rec and rec.steps[0].train.max_steps == 1000


def test_constraints_by_hand():
    fig = {"quality_loss": 0.006, "latency_p50_ms": 5.0, "latency_p99_ms": 12.0, "size_bytes": 15_000_000,
           "peak_rss_bytes": None, "throughput": 80.0, "energy_j_per_item": 0.2}
    limits = {"max_quality_loss": 0.005, "max_latency_p99_ms": 10.0, "max_size_mb": 20, "max_size_ratio": 0.1,
              "max_peak_rss_mb": 100, "min_throughput": 100, "max_energy_j_per_item": 0.25}
    c = constraints_of(fig, limits, base_size=90_000_000)
    assert c["max_quality_loss"] == pytest.approx(0.2)  # 0.6% vs 0.5%: 20% over
    assert c["max_latency_p99_ms"] == pytest.approx(0.2)
    assert c["max_size_mb"] == pytest.approx(-0.25)
    assert c["max_size_ratio"] == pytest.approx((15 / 90 - 0.1) / 0.1)
    assert c["max_peak_rss_mb"] == 0.0  # not measured at screening: not counted against the trial
    assert c["min_throughput"] == pytest.approx(0.2)
    assert c["max_energy_j_per_item"] == pytest.approx(-0.2)


def test_quality_limit_is_checked_against_the_upper_bound_where_there_is_one():
    limits = {"max_quality_loss": 0.005}
    point = {"quality_loss": 0.001, "quality_loss_bound": None}
    assert constraints_of(point, limits, 1)["max_quality_loss"] == pytest.approx(-0.8)
    noisy = {"quality_loss": 0.001, "quality_loss_bound": 0.012}  # a good point estimate, a wide interval
    assert constraints_of(noisy, limits, 1)["max_quality_loss"] == pytest.approx(1.4)


def test_quality_loss_bound_matches_a_direct_bootstrap_and_widens_with_disagreement():
    rng = np.random.default_rng(3)
    base = rng.uniform(0.2, 1.0, 60)
    close = base + rng.normal(0, 0.01, 60)
    far = base + rng.normal(0, 0.15, 60)
    # independent computation: the same resample indices, loss of each resample, its 90% quantile
    idx = np.random.default_rng(0).integers(0, 60, (4000, 60))
    direct = np.quantile((base[idx].mean(1) - far[idx].mean(1)) / base[idx].mean(1), 0.9)
    assert quality_loss_bound(base, far, True, 0.9) == pytest.approx(direct)
    loss_far = quality_loss(base.mean(), far.mean(), True)
    assert quality_loss_bound(base, far, True, 0.9) > loss_far  # an upper bound lies above the point
    assert quality_loss_bound(base, far, True, 0.9) - loss_far > 5 * (quality_loss_bound(base, close, True, 0.9)
                                                                      - quality_loss(base.mean(), close.mean(), True))
    # lower is better (e.g. an error rate): a higher candidate is a loss
    assert quality_loss_bound(base, base * 1.1, False, 0.5) == pytest.approx(0.1, abs=1e-9)
    assert quality_loss_bound(base, base, True, 0.0) is None and quality_loss_bound(None, base, True, 0.9) is None
    assert quality_loss_bound(base, base[:-1], True, 0.9) is None


def test_screened_trial_is_only_dropped_when_clearly_behind_the_best_full_trial():
    # a screened trial that looks better than the best full one is always promoted
    assert not clearly_behind({"latency_p99_ms": 1.431}, {"latency_p99_ms": 1.456}, "latency_p99")
    assert not clearly_behind({"throughput_per_core": 1424.0}, {"throughput_per_core": 1335.0}, "throughput_per_core")
    # within the 15% benefit of the doubt: promoted; beyond it: dropped
    assert not clearly_behind({"latency_p99_ms": 1.6}, {"latency_p99_ms": 1.456}, "latency_p99")
    assert clearly_behind({"latency_p99_ms": 1.8}, {"latency_p99_ms": 1.456}, "latency_p99")
    assert not clearly_behind({"throughput": 1200.0}, {"throughput": 1335.0}, "throughput")
    assert clearly_behind({"throughput": 1100.0}, {"throughput": 1335.0}, "throughput")
    assert not clearly_behind({"energy_j_per_item": 0.011}, {"energy_j_per_item": 0.01}, "energy")
    assert clearly_behind({"energy_j_per_item": 0.013}, {"energy_j_per_item": 0.01}, "energy")


def _row(n, loss, lat, size, energy_, cons, fid="full", state="COMPLETE"):
    return {"number": n, "state": state, "fidelity": fid, "params": {}, "feasible": all(v <= 0 for v in cons.values()),
            "constraints": cons, "figures": {"quality_loss": loss, "latency_p99_ms": lat, "size_bytes": size,
                                             "energy_j_per_item": energy_}}


def test_pareto_front_equals_brute_force():
    rng = random.Random(0)
    rows = [_row(i, rng.random(), rng.random(), rng.random(), rng.random(), {}) for i in range(40)]
    names = ["quality_loss", "latency_p99", "size", "energy"]
    keys = ["quality_loss", "latency_p99_ms", "size_bytes", "energy_j_per_item"]
    expected = []
    for r in rows:
        dominated = any(all(o["figures"][k] <= r["figures"][k] for k in keys) and
                        any(o["figures"][k] < r["figures"][k] for k in keys) for o in rows)
        if not dominated:
            expected.append(r["number"])
    assert sorted(pareto(rows, names)) == sorted(expected)
    # throughput is maximised: a faster point dominates
    tp = [{"number": 0, "figures": {"quality_loss": 0.1, "throughput": 10.0}},
          {"number": 1, "figures": {"quality_loss": 0.1, "throughput": 20.0}}]
    assert pareto(tp, ["quality_loss", "throughput"]) == [1]


def test_choose_best_feasible_else_nearest_with_binding_constraint():
    rows = [_row(0, 0.001, 9.0, 1, 1, {"max_quality_loss": -0.8}),
            _row(1, 0.004, 5.0, 1, 1, {"max_quality_loss": -0.2}),
            _row(2, 0.020, 2.0, 1, 1, {"max_quality_loss": 3.0}),
            _row(3, 0.001, 1.0, 1, 1, {"max_quality_loss": -0.8}, fid="screen")]  # screened only: never chosen
    chosen, ok = choose(rows, "latency_p99")
    assert ok and chosen["number"] == 1
    why, binding = explain(chosen, rows, "latency_p99", ok)
    assert binding is None and "trial 0" in why[1] and "miss max_quality_loss" in why[2]
    bad = [_row(0, 0.02, 2.0, 1, 1, {"max_quality_loss": 3.0, "max_size_mb": -0.5}),
           _row(1, 0.01, 3.0, 1, 1, {"max_quality_loss": 1.0, "max_size_mb": 0.2})]
    chosen, ok = choose(bad, "latency_p99")
    assert not ok and chosen["number"] == 1  # total violation 1.2 < 3.0
    why, binding = explain(chosen, bad, "latency_p99", ok)
    assert binding["constraint"] == "max_quality_loss" and binding["trials_missing_it"] == {"max_quality_loss": 2, "max_size_mb": 1}


# ---------------------------------------------------------------- end-to-end requests
def test_search_requests_reproduce_the_workloads_tokenization(tiny_encoder_dir, synthetic_data):
    from slimcart.plan.requests import requests_for
    from slimcart.workloads import get_workload

    wl = get_workload("search")
    bundle, data = wl.load_model(str(tiny_encoder_dir)), wl.load_data(None)
    base = wl.bench_inputs(bundle, data)
    req = requests_for(wl, bundle, data, batch=8)
    assert req.end_to_end and req.batch == 8 and req.inputs.items_per_serving_batch == 8
    assert all(len(b) == 8 for b in req.inputs.serving)
    same = sum(np.array_equal(req.prepare(raw)["input_ids"], b["input_ids"]) for raw, b in zip(req.inputs.single, base.single))
    assert same >= 0.9 * len(base.single)  # decode -> re-tokenize gives the same ids (lower-cased WordPiece)


def test_recsys_requests_pad_back_to_the_same_batches(synthetic_data):
    from slimcart.plan.requests import requests_for
    from slimcart.workloads import get_workload

    from test_recsys_workload import tiny_bundle

    wl = get_workload("recsys")
    data = wl.load_data(None)
    bundle = tiny_bundle(data.n_items)
    base = wl.bench_inputs(bundle, data)
    req = requests_for(wl, bundle, data, batch=base.items_per_serving_batch)
    for raw, b in zip(req.inputs.single, base.single):
        assert np.array_equal(req.prepare(raw)["seq"], b["seq"])
    assert np.array_equal(req.prepare(req.inputs.serving[0])["seq"], base.serving[0]["seq"])


# ---------------------------------------------------------------- sensitivity
def test_w8a8_sensitivity_of_one_layer_matches_quantizing_it_alone(synthetic_data):
    """The scan's figure for a layer = the loss of a model where only that Linear is W8A8 fake-quantized,
    built here independently (fresh copy, only that layer wrapped and calibrated)."""
    import copy
    from dataclasses import replace

    from slimcart.arch import run_batch
    from slimcart.compress.quantize.fake_quant import calibrate_, quantize_
    from slimcart.compress.quantize.mixed_precision import MixedPrecisionConfig
    from slimcart.plan.sensitivity import linear_w8a8
    from slimcart.workloads import get_workload

    from test_recsys_workload import tiny_bundle

    wl = get_workload("recsys")
    data = wl.load_data(None)
    val = wl.validation_data(data, 0.2)
    bundle = tiny_bundle(data.n_items)
    calib = wl.calibration_batches(bundle, data, 4)
    base = wl.evaluate(wl.torch_runner(bundle), bundle, val).quality["ndcg@10"]
    sens = linear_w8a8(wl, bundle, val, calib, base)
    names = [n for n, m in bundle.module.named_modules() if type(m).__name__ == "Linear"]
    assert sorted(sens) == sorted(names) and list(sens.values()) == sorted(sens.values(), reverse=True)
    name = names[0]
    alone = copy.deepcopy(bundle.module)
    quantize_(alone, MixedPrecisionConfig().w8a8, filter_fn=lambda n, m: n == name)
    calibrate_(alone, lambda: [run_batch(alone, b) for b in calib])
    q = wl.evaluate(wl.torch_runner(replace(bundle, module=alone)), bundle, val).quality["ndcg@10"]
    assert sens[name] == pytest.approx(quality_loss(base, q, True), abs=1e-12)


@pytest.mark.parametrize("args, match", [
    (["-p", "nope"], "unknown profile 'nope'"),
    (["-p", "realtime", "--time-budget", "soon"], "not a duration"),
    (["-p", "realtime", "--storage", "mysql://x/y"], "sqlite:/// or postgresql://"),
    (["-p", "realtime", "--max-quality-loss", "-1"], "non-negative"),
    (["-w", "nope", "-p", "realtime"], "unknown workload"),
])
def test_plan_cli_refuses_bad_input_in_one_line_before_loading(tmp_path, args, match):
    from typer.testing import CliRunner

    from slimcart.cli import app

    base = ["plan", "-m", "/nonexistent-model", "--out", str(tmp_path / "o")]
    res = CliRunner().invoke(app, base + (args if args[0] == "-w" else ["-w", "search"] + args))
    assert res.exit_code == 2 and match in " ".join(res.output.split()) and "Traceback" not in res.output
    assert not (tmp_path / "o").exists()


def test_a_size_capped_search_plan_starts_from_the_ladder_that_can_meet_the_cap():
    capped = space_for("search", HW_PLAIN, None, Settings(), [], 6, True)
    first = capped.seeds[0]
    assert [r["embedding_rank"] for r in first] == [64, 128] and {r["structure"] for r in first} == {"prune"}
    kinds = [s.kind for s in capped.recipe(capped.sample(lambda n, o, r=first[0]: r.get(n, o[0]))).steps]
    assert kinds == ["prune_structured", "lowrank", "distill", "smoothquant", "static_int8"]
    uncapped = space_for("search", HW_PLAIN, None, Settings(), [], 6, False)
    assert all(r["embedding_rank"] == 0 for ladder in uncapped.seeds for r in ladder)
