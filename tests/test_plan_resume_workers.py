"""A plan killed with SIGKILL resumes the same study; two `--worker` processes share one study on a real
PostgreSQL server that this test starts itself (Debian's postgresql: initdb + pg_ctl, unix socket only),
and no recipe is measured twice."""
from __future__ import annotations

import glob
import os
import pwd
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow
ROOT = Path(__file__).resolve().parents[1]


def _env() -> dict:
    env = {k: v for k, v in os.environ.items() if k != "SLIMCART_DATA"}
    env.update(SLIMCART_PLAN_HEARTBEAT="1", PYTHONPATH=str(ROOT), SLIMCART_THREADS="1")
    return env


def _args(model: Path, out: Path, trials: int, *extra: str) -> list[str]:
    return [sys.executable, "-m", "slimcart.cli", "plan", "-w", "search", "-m", str(model), "-p", "realtime",
            "--time-budget", "30m", "--trials", str(trials), "--out", str(out), "--max-quality-loss", "0.05", *extra]


def _study(url: str, name: str | None = None):
    import optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    return optuna.load_study(study_name=name, storage=url)


def _complete_fingerprints(study) -> list[str]:
    return [t.user_attrs["fingerprint"] for t in study.trials if t.state.name == "COMPLETE"]


def test_killed_plan_resumes_the_same_study(tiny_encoder_dir, tmp_path):
    out = tmp_path / "plan"
    url = f"sqlite:///{out / 'study.db'}"
    proc = subprocess.Popen(_args(tiny_encoder_dir, out, 3), cwd=ROOT, env=_env(), stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    killed, deadline = None, time.time() + 600
    try:
        while time.time() < deadline and proc.poll() is None:
            time.sleep(1)
            if not (out / "study.db").exists():
                continue
            try:
                trials = _study(url).trials
            except Exception:  # the study is not created yet
                continue
            running = [t.number for t in trials if t.state.name == "RUNNING"]
            if running and any(t.state.name == "COMPLETE" for t in trials):
                killed = running[0]
                os.kill(proc.pid, signal.SIGKILL)
                break
    finally:
        if proc.poll() is None and killed is None:
            proc.kill()
        proc.wait()
    assert killed is not None, "the plan never had a running trial after a complete one"
    before = _study(url)
    assert not (out / "plan.json").exists()
    done = subprocess.run(_args(tiny_encoder_dir, out, 3), cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stderr[-3000:]
    after = _study(url)
    assert after.study_name == before.study_name and after._study_id == before._study_id
    states = {t.number: t.state.name for t in after.trials}
    assert states[killed] == "FAIL"  # heartbeat stopped: marked failed, re-enqueued once
    fps = _complete_fingerprints(after)
    assert len(fps) >= 3 and len(set(fps)) == len(fps)
    assert (out / "plan.json").exists() and (out / "model").is_dir()


# ---------------------------------------------------------------- PostgreSQL
def _pg_bin(name: str) -> str | None:
    found = shutil.which(name) or sorted(glob.glob(f"/usr/lib/postgresql/*/bin/{name}"))
    return found if isinstance(found, str) else (found[-1] if found else None)


@pytest.fixture
def postgres():
    """A throw-away PostgreSQL cluster on a unix socket (no TCP), stopped and deleted afterwards."""
    initdb, pg_ctl = _pg_bin("initdb"), _pg_bin("pg_ctl")
    if not initdb or not pg_ctl:
        pytest.skip("PostgreSQL server binaries not found (Debian: apt-get install -y postgresql)")
    as_user: list[str] = []
    if os.geteuid() == 0:  # the server refuses to run as root
        try:
            pwd.getpwnam("postgres")
        except KeyError:
            pytest.skip("running as root and there is no 'postgres' user to run the server")
        as_user = ["runuser", "-u", "postgres", "--"]
    root = Path(tempfile.mkdtemp(prefix="slimcart-pg-", dir="/tmp"))
    os.chmod(root, 0o755)
    if as_user:
        shutil.chown(root, "postgres", "postgres")
    data, port = root / "data", 54321 + os.getpid() % 1000
    subprocess.run(as_user + [initdb, "-D", str(data), "-A", "trust", "-U", "postgres", "--no-sync"], check=True,
                   capture_output=True)
    subprocess.run(as_user + [pg_ctl, "-D", str(data), "-w", "-l", str(root / "log"), "-o",
                              f"-k {root} -p {port} -c listen_addresses='' -c fsync=off", "start"], check=True,
                   capture_output=True)
    try:
        url = f"postgresql://postgres@/postgres?host={root}&port={port}"
        yield url
    finally:
        subprocess.run(as_user + [pg_ctl, "-D", str(data), "-m", "immediate", "stop"], capture_output=True)
        shutil.rmtree(root, ignore_errors=True)


def test_two_workers_share_one_study_on_postgresql(tiny_encoder_dir, tmp_path, postgres):
    study = "slimcart-test-two-workers"
    args = ["--storage", postgres, "--study", study]
    workers = [subprocess.Popen(_args(tiny_encoder_dir, tmp_path / f"w{i}", 5, "--worker", *args), cwd=ROOT, env=_env(),
                                stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True) for i in range(2)]
    errs = [w.communicate(timeout=1200)[1] for w in workers]
    for i, e in enumerate(errs):
        (tmp_path / f"worker{i}.stderr").write_text(e)
    assert all(w.returncode == 0 for w in workers), [e[-2000:] for e in errs]
    assert "Traceback" not in "".join(errs), "a trial failed: see worker*.stderr in " + str(tmp_path)
    final = subprocess.run(_args(tiny_encoder_dir, tmp_path / "main", 5, *args), cwd=ROOT, env=_env(),
                           capture_output=True, text=True, timeout=900)
    assert final.returncode == 0, final.stderr[-3000:]
    url = "postgresql+psycopg://" + postgres.split("://", 1)[1]
    s = _study(url, study)
    complete = [t for t in s.trials if t.state.name == "COMPLETE"]
    fps = _complete_fingerprints(s)
    assert len(fps) >= 5 and len(set(fps)) == len(fps)  # no recipe measured twice
    assert len({t.user_attrs["worker"] for t in complete}) == 2  # both workers measured trials
    assert (tmp_path / "main" / "plan.json").exists() and (tmp_path / "main" / "model").is_dir()
