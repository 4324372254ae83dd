"""`plan()`: check the request, set up OUT and the study, measure the baseline and the per-layer
sensitivity, run the search, then (unless a worker) choose and publish. Bad input fails here, before
any model loads."""
from __future__ import annotations

import hashlib
import json
import shutil
import time
import warnings
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Literal

from pydantic import BaseModel, ConfigDict, Field

from .. import outputs
from ..bench import resolve_threads, set_threads
from ..errors import SlimcartError
from ..workloads import get_workload
from . import hardware
from .energy import EnergyMeter
from .profile import load_profile
from .space import SPACES, Settings, space_for
from .study import HEARTBEAT_S, Driver, objective_names
from .trial import Evaluator

Emit = Callable[[str, Any], None]
IDENTITY_FILE = "plan-identity.json"
SENSITIVITY_FRACTION = {"llm": 4 / 64, "search": 0.15, "recsys": 0.35}


class PlanOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")
    workload: str
    model: str
    profile: str
    out: Path
    data: str | None = None
    time_budget_s: float | None = Field(3600.0, gt=0)
    max_trials: int | None = Field(None, ge=1)
    storage: str | None = None
    study_name: str | None = None
    worker: bool = False
    sampler: Literal["tpe", "random"] = "tpe"
    seed: int = 0
    overrides: dict[str, Any] = {}
    settings: Settings = Settings()
    watts_per_core: float | None = None
    build_threads: int | None = None
    overwrite: bool = False
    accept_hardware: bool = False


@dataclass
class Context:
    """What the final phase needs (see final.py)."""

    wl: Any
    model: str
    data_arg: str | None
    ev: Evaluator
    resolved: Any
    study: Any
    space: Any
    hw: dict
    out: Path
    emit: Emit
    sensitivity: dict
    sampler: str
    budget_s: float | None
    spent_s: float
    reason: str
    setup_s: float | None = None  # loading, baseline and sensitivity (not counted in the budget)


def storage_url(opts: PlanOptions) -> str:
    if opts.storage is None:
        return f"sqlite:///{Path(opts.out).resolve() / 'study.db'}"
    url = opts.storage
    if url.startswith("postgresql://") or url.startswith("postgres://"):
        return "postgresql+psycopg://" + url.split("://", 1)[1]  # psycopg 3 (psycopg2 is not a dependency)
    if not (url.startswith("sqlite:///") or url.startswith("postgresql+")):
        raise SlimcartError(f"--storage must be a sqlite:/// or postgresql:// URL, got '{url.split('://')[0]}://...'")
    return url


def _check(opts: PlanOptions):
    wl = get_workload(opts.workload)
    if wl.name not in SPACES:
        raise SlimcartError(f"slimcart plan has no search space for workload '{wl.name}' (it has: {', '.join(SPACES)})")
    if not hasattr(wl, "validation_data"):
        raise SlimcartError(f"workload '{wl.name}' has no validation split (validation_data): the planner tunes on it")
    profile = load_profile(opts.profile).with_overrides(**opts.overrides)
    return wl, profile, profile.resolve(wl.name)


def _prepare_out(opts: PlanOptions) -> None:
    out = Path(opts.out)
    if opts.worker:
        out.mkdir(parents=True, exist_ok=True)
        return
    if out.exists() and opts.overwrite:
        shutil.rmtree(out)
    if out.exists() and not (out / IDENTITY_FILE).is_file():
        raise SlimcartError(f"{out} exists and is not a slimcart plan folder (pass --overwrite to replace it)")
    outputs.check_output_path(out, True)
    out.mkdir(parents=True, exist_ok=True)


def _open_study(opts, url: str, name: str, directions: list[str], seed: int):
    import optuna
    from optuna.storages import RDBStorage, RetryHeartbeatStaleTrialCallback

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    warnings.filterwarnings("ignore", category=optuna.exceptions.ExperimentalWarning)
    for attempt in range(5):
        try:
            storage = RDBStorage(url, heartbeat_interval=HEARTBEAT_S, grace_period=3 * HEARTBEAT_S,
                                 heartbeat_stale_trial_callback=RetryHeartbeatStaleTrialCallback(max_retry=1))
            break
        except Exception as e:  # SQLAlchemy: bad URL, refused connection, missing driver
            # two workers starting together race to create Optuna's tables: the loser retries
            if attempt < 4 and any(w in str(e) for w in ("already exists", "UniqueViolation", "duplicate key")):
                time.sleep(1 + attempt)
                continue
            raise SlimcartError(f"cannot open the study storage: {str(e).splitlines()[0][:300]}") from None
    if opts.sampler == "random":
        sampler = optuna.samplers.RandomSampler(seed=seed)
    else:
        sampler = optuna.samplers.TPESampler(seed=seed, multivariate=True, group=True, n_startup_trials=8)
    return optuna.create_study(storage=storage, study_name=name, directions=directions, sampler=sampler,
                               load_if_exists=True)


def _sensitivity(study, ev: Evaluator, wl, emit: Emit) -> dict:
    """The per-layer ranking, measured once per study (workers read the first one's, so every process
    builds the same recipes from the same parameters)."""
    if "sensitivity" in study.user_attrs:
        return study.user_attrs["sensitivity"]
    from . import sensitivity

    emit("msg", "measuring per-layer sensitivity on validation")
    # one evaluation per layer: a small validation subset (the LLM: 4 windows = 1,024 tokens; search: ~15% of
    # the validation queries, where the cosine drop orders the layers nDCG cannot tell apart)
    vdata = wl.validation_data(ev.data, SENSITIVITY_FRACTION.get(wl.name, 0.35))
    base_res = wl.evaluate(ev.base_runner, ev.bundle, vdata)
    base = base_res.quality[ev.primary]
    prog = lambda m: emit("msg", m)  # noqa: E731
    if wl.name == "llm":
        vals = sensitivity.decoder_4bit(wl, ev.bundle, vdata, base, prog)
        sens = {"method": "decoder layer alone at 4 bits (RTN g128)", "values": {str(k): v for k, v in vals.items()},
                "ranking": list(vals)}
    else:
        calib = wl.calibration_batches(ev.bundle, ev.data, 8)
        vals = sensitivity.linear_w8a8(wl, ev.bundle, vdata, calib, base, base_res.outputs, prog)
        sens = {"method": "Linear alone W8A8 (fake-quant)", "values": vals, "ranking": list(vals)}
    study.set_user_attr("sensitivity", sens)
    return sens


def plan(opts: PlanOptions, emit: Emit = lambda kind, x: None, dry_run: bool = False) -> dict:
    wl, profile, resolved = _check(opts)
    url = storage_url(opts)
    hw = hardware.probe()
    from ..arch import detect

    if dry_run:
        emit("msg", "loading the model to read its structure")
        bundle = wl.load_model(opts.model)
        n = len(detect(bundle.module).layers)
        space = space_for(wl.name, hw, opts.time_budget_s, opts.settings, [], n, _size_capped(resolved))
        return {"profile": resolved.model_dump(), "label": resolved.label(hw["cpu"]), "hardware": hw,
                "space": space.describe(), "objectives": objective_names(profile.objective)}
    _prepare_out(opts)
    out = Path(opts.out)
    with outputs.OutputLock(out):
        return _run(opts, wl, resolved, hw, url, out, emit)


def _size_capped(resolved) -> bool:
    return any(k in resolved.limits for k in ("max_size_mb", "max_size_ratio"))


def _run(opts, wl, resolved, hw, url, out: Path, emit: Emit) -> dict:
    from ..arch import detect
    from ..outputs import tree_digest

    t_setup = time.time()
    meter = EnergyMeter.create(hw["cpu"], opts.watts_per_core)
    set_threads(resolve_threads(opts.build_threads))
    emit("msg", "loading model and data")
    bundle, data = wl.load_model(opts.model), wl.load_data(opts.data)
    info = wl.data_info(data)
    if info.synthetic:
        emit("warning", "no real data found — using slimcart's SYNTHETIC data; quality figures are not meaningful")
    n_layers = len(detect(bundle.module).layers)
    options = space_for(wl.name, hw, opts.time_budget_s, opts.settings, [], n_layers, _size_capped(resolved))
    identity = {"workload": wl.name, "model": opts.model, "model_digest": tree_digest(bundle.source),
                "data": info.as_dict(), "data_digest": tree_digest(info.source), "profile": resolved.model_dump(),
                "settings": opts.settings.model_dump(), "sampler": opts.sampler,
                "space": [(p.name, p.options) for p in options.params]}
    identity = json.loads(json.dumps(identity, default=str))  # as the study stores it (tuples become lists)
    digest = hashlib.sha1(json.dumps(identity, sort_keys=True, default=str).encode()).hexdigest()[:10]
    idf = out / IDENTITY_FILE
    if not opts.worker:
        if idf.is_file() and json.loads(idf.read_text()).get("identity") != identity:
            raise SlimcartError(f"{out} holds a plan of another model, data, profile or settings "
                                "(pass --overwrite to start afresh)")
        outputs.write_json(idf, {"identity": identity, "digest": digest})
    name = opts.study_name or f"slimcart-plan-{wl.name}-{resolved.profile.name}-{digest}"
    ev = Evaluator(wl, opts.model, opts.data, bundle, data, resolved, meter, out / "work",
                   resolve_threads(opts.build_threads), lambda m: emit("msg", m))
    (out / "work").mkdir(exist_ok=True)
    directions = ["minimize" if (n not in ("throughput", "throughput_per_core")) else "maximize"
                  for n in objective_names(resolved.profile.objective)]
    seed = opts.seed + (zlib.crc32(f"{time.time()}".encode()) if opts.worker else 0)
    study = _open_study(opts, url, name, directions, seed)
    saved = study.user_attrs.get("identity")
    if saved is not None and saved != identity:
        raise SlimcartError(f"study '{name}' in {url.split('@')[-1]} belongs to another plan (model, data, profile or settings differ)")
    if saved is None:
        study.set_user_attr("identity", identity)
        study.set_user_attr("hardware", hw)
    diff = hardware.differences(study.user_attrs["hardware"], hw)
    if diff and not opts.accept_hardware:
        raise SlimcartError("this study was measured on another machine (" + "; ".join(diff) +
                            "): its timings do not compare with this one's; pass --accept-hardware to continue anyway")
    emit("msg", resolved.label(hw["cpu"]))
    emit("msg", "measuring the fp32 baseline on validation")
    ev.measure_baseline()
    sens = _sensitivity(study, ev, wl, emit)
    ranking = [int(x) for x in sens["ranking"]] if wl.name == "llm" else sens["ranking"]
    space = space_for(wl.name, hw, opts.time_budget_s, opts.settings, ranking, n_layers, _size_capped(resolved))
    setup_s = time.time() - t_setup
    emit("msg", f"set-up took {setup_s / 60:.1f} min; searching")
    driver = Driver(study, space, ev, resolved.profile.objective, resolved.limits, out, opts.time_budget_s,
                    opts.max_trials, opts.sampler == "random", emit)
    reason = driver.run()
    emit("msg", f"search stopped: {reason}")
    if opts.worker:
        return {"status": "worker finished", "reason": reason, "study": name, "trials": len(study.trials)}
    from .final import finalize

    ctx = Context(wl, opts.model, opts.data, ev, resolved, study, space, hw, out, emit, sens, opts.sampler,
                  opts.time_budget_s, driver.spent(), reason, setup_s)
    result = finalize(ctx)
    shutil.rmtree(out / "work", ignore_errors=True)
    return result
