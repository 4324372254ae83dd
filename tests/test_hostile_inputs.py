"""Bad inputs and faults a user or an attacker could produce (the list of issue 16), each as a regression
test: one clear error line (exit 2) or a correct result, never a traceback, a wrong figure or a lost file."""
from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from typer.testing import CliRunner

from slimcart import api
from slimcart.cli import app
from slimcart.contracts import FORMAT_FILE, load_saved
from slimcart.errors import SlimcartError
from slimcart.recipe import load_plugins
from slimcart.workloads import get_workload

from conftest import tree_fingerprint

load_plugins()
pytestmark = pytest.mark.usefixtures("one_thread", "synthetic_data")


def cli(*args: str, cwd: Path | None = None):
    old = Path.cwd()
    if cwd is not None:
        os.chdir(cwd)
    try:
        res = CliRunner().invoke(app, list(args))
    finally:
        os.chdir(old)
    return res.exit_code, res.output


def one_error(code: int, out: str, fragment: str) -> None:
    lines = [ln for ln in out.strip().splitlines() if ln.strip()]
    assert code == 2 and "Traceback" not in out, out
    assert [ln for ln in lines if ln.startswith("error:")] == lines[-1:], out
    assert fragment in " ".join(out.split()), out


@pytest.fixture
def victim(tmp_path, tiny_encoder_dir) -> Path:
    """A user's model folder with a file of their own in it."""
    folder = tmp_path / "victim"
    shutil.copytree(tiny_encoder_dir, folder)
    (folder / "my-notes.txt").write_text("precious")
    return folder


# ---------------------------------------------------------------- data loss
@pytest.mark.parametrize("where", ["same", "parent", "inside"])
def test_output_never_overlaps_the_input_model(victim, where):
    out = {"same": victim, "parent": victim.parent, "inside": victim / "sub"}[where]
    before = tree_fingerprint(victim)
    code, msg = cli("compress", "-w", "search", "-m", str(victim), "-r", "int8-dynamic", "-o", str(out), "--overwrite")
    one_error(code, msg, "overlap the input")
    assert tree_fingerprint(victim) == before


@pytest.mark.parametrize("out", ["", "."])
def test_output_is_never_the_working_directory(tmp_path, victim, out):
    (tmp_path / "keep.txt").write_text("mine")
    code, msg = cli("compress", "-w", "search", "-m", str(victim), "-r", "int8-dynamic", "-o", out, "--overwrite", cwd=tmp_path)
    one_error(code, msg, "current folder")  # typer reads "" as "."
    assert (tmp_path / "keep.txt").read_text() == "mine"


def test_output_is_never_home_or_root(victim):
    for out in ("/", str(Path.home())):
        code, msg = cli("compress", "-w", "search", "-m", str(victim), "-r", "int8-dynamic", "-o", out, "--overwrite")
        one_error(code, msg, "root, home or current folder")


def test_demo_does_not_replace_an_existing_folder(tmp_path):
    out = tmp_path / "mine"
    out.mkdir()
    (out / "thesis.tex").write_text("years of work")
    code, msg = cli("demo", "-o", str(out))
    one_error(code, msg, "already exists")
    assert (out / "thesis.tex").read_text() == "years of work"


# ---------------------------------------------------------------- untrusted model folders
def test_a_model_folder_cannot_run_its_own_code(tmp_path, victim):
    marker = tmp_path / "pwned"
    (victim / "evil.py").write_text(f"open({str(marker)!r}, 'w').write('x')\nfrom transformers import BertModel as EvilModel\n")
    cfg = json.loads((victim / "config.json").read_text())
    cfg["auto_map"] = {"AutoModel": "evil.EvilModel", "AutoConfig": "evil.EvilModel"}
    (victim / "config.json").write_text(json.dumps(cfg))
    code, msg = cli("eval", "-w", "search", "-m", str(victim), "--json")
    assert not marker.exists()  # the folder's Python never ran
    assert code == 0 or "Traceback" not in msg, msg


def _saved_search_model(tmp_path, tiny_encoder_dir, fmt: str) -> Path:
    """A real saved folder of the given format from the tiny encoder."""
    from slimcart.compress.lowrank import LowRankFolder, factorize
    from slimcart.compress.prune.storage import SparseBitmask

    wl = get_workload("search")
    bundle = wl.load_model(str(tiny_encoder_dir))
    folder = tmp_path / f"saved-{fmt}"
    folder.mkdir()
    if fmt == "lowrank":
        factorize(bundle.module, {"transformer.encoder.layer.0.intermediate.dense": 8})
        LowRankFolder().save(folder, wl, bundle)
    else:
        SparseBitmask(None).save(folder, wl, bundle)
    return folder


@pytest.mark.parametrize("fmt, key, value", [
    ("sparse-bitmask", "original", "/tmp/slimcart-overwritten"),
    ("sparse-bitmask", "original", "../../escaped.safetensors"),
    ("sparse-bitmask", "file", "../../../etc/passwd"),
    ("lowrank", "weights", "/etc/passwd"),
    ("lowrank", "weights", "../victim/model.safetensors"),
])
def test_format_files_cannot_point_outside_their_folder(tmp_path, tiny_encoder_dir, fmt, key, value):
    folder = _saved_search_model(tmp_path, tiny_encoder_dir, fmt)
    meta = json.loads((folder / FORMAT_FILE).read_text())
    if fmt == "sparse-bitmask" and key == "original":
        next(iter(meta["files"].values()))["original"] = value
    elif fmt == "sparse-bitmask":
        meta["files"] = {value: next(iter(meta["files"].values()))}
    else:
        meta[key] = value
    (folder / FORMAT_FILE).write_text(json.dumps(meta))
    before = {p: p.stat().st_mtime for p in tmp_path.rglob("*") if p.is_file()}
    with pytest.raises(SlimcartError, match="outside the model folder"):
        load_saved(folder, get_workload("search"), 1)
    assert not Path("/tmp/slimcart-overwritten").exists()
    assert {p: p.stat().st_mtime for p in tmp_path.rglob("*") if p.is_file()} == before


def test_openvino_format_file_cannot_name_a_file_outside(tmp_path):
    (tmp_path / "m").mkdir()
    (tmp_path / "m" / FORMAT_FILE).write_text(json.dumps({"format": "openvino-ir", "model": "/etc/passwd"}))
    with pytest.raises(SlimcartError, match="outside the model folder"):
        load_saved(tmp_path / "m", get_workload("search"), 1)


def test_structured_format_only_builds_allowed_classes(tmp_path, tiny_encoder_dir):
    folder = tmp_path / "s"
    shutil.copytree(tiny_encoder_dir, folder)
    cfg = json.loads((folder / "config.json").read_text())
    cfg["architectures"] = ["Pipeline"]  # any transformers attribute would have been instantiated before
    (folder / "config.json").write_text(json.dumps(cfg))
    (folder / FORMAT_FILE).write_text(json.dumps({"format": "structured-hf", "structure": {"heads": [4, 4],
                                                                                         "intermediate": [128, 128]}}))
    with pytest.raises(SlimcartError, match="structured-hf folders hold one of"):
        load_saved(folder, get_workload("search"), 1)


def test_links_in_a_model_folder_are_not_copied_into_the_output(tmp_path, victim):
    private = tmp_path / "private"
    private.mkdir()
    (private / "secret.txt").write_text("api key")
    shutil.rmtree(victim / "1_Pooling")
    (victim / "1_Pooling").symlink_to(private, target_is_directory=True)
    out = tmp_path / "out"
    api.compress("search", str(victim), "int8-dynamic", out, repeats=1, measure_rss=False)
    assert not list(out.rglob("secret.txt"))


def test_yaml_alias_bomb_is_refused_at_once(tmp_path, victim):
    bomb = tmp_path / "bomb.yaml"
    lines = ["name: bomb", "steps: [{kind: static_int8, observer_args: {a: &a0 [x, x, x, x, x, x, x, x, x]}}]", "l:"]
    for i in range(1, 9):
        lines.append(f"  b{i}: &a{i} [*a{i - 1}, *a{i - 1}, *a{i - 1}, *a{i - 1}, *a{i - 1}, *a{i - 1}, *a{i - 1}, *a{i - 1}, *a{i - 1}]")
    bomb.write_text("\n".join(lines) + "\n")
    assert bomb.stat().st_size < 2000
    code, msg = cli("compress", "-w", "search", "-m", str(victim), "-r", str(bomb), "-o", str(tmp_path / "o"))
    one_error(code, msg, "anchors/aliases")


# ---------------------------------------------------------------- wrong results
def test_zero_repeats_is_refused(tmp_path, victim):
    code, msg = cli("compress", "-w", "search", "-m", str(victim), "-r", "int8-dynamic", "-o", str(tmp_path / "o"),
                    "--repeats", "0")
    one_error(code, msg, "repeats must be at least 1")


@pytest.mark.parametrize("labels, fragment", [
    ([1, 2, 1, 2], "Recall@10 is undefined"),
    ([1, 5000, 2, 3], "from 0 to 30"),
    ([-1, 2, 3, 4], "from 0 to 30"),
    ([1, 1, 1, 1], "nDCG@10 is undefined"),
])
def test_undefined_or_absurd_search_metrics_are_errors(tmp_path, victim, labels, fragment):
    data = tmp_path / "d.csv"
    rows = [f"red shoes,product {i},{lab}" for i, lab in enumerate(labels)]
    data.write_text("query,product_title,median_relevance\n" + "\n".join(rows) + "\n")
    code, msg = cli("eval", "-w", "search", "-m", str(victim), "--data", str(data), "--json")
    one_error(code, msg, fragment)


def test_metrics_json_is_strict_json(tmp_path):
    from slimcart.outputs import write_json

    with pytest.raises(SlimcartError, match="not a finite number"):
        write_json(tmp_path / "m.json", {"latency": float("nan")})
    assert not (tmp_path / "m.json").exists()


def test_a_quantizer_that_quantizes_nothing_is_refused(tmp_path, victim):
    rec = tmp_path / "r.yaml"
    rec.write_text("name: r\nsteps:\n  - kind: export_onnx\n  - kind: ort_dynamic_int8\n    op_types: [Bogus]\n")
    code, msg = cli("compress", "-w", "search", "-m", str(victim), "-r", str(rec), "-o", str(tmp_path / "o"))
    one_error(code, msg, "not ops ONNX Runtime quantizes")
    rec.write_text("name: r\nsteps:\n  - kind: export_onnx\n  - kind: ort_dynamic_int8\n    op_types: [LSTM]\n")
    code, msg = cli("compress", "-w", "search", "-m", str(victim), "-r", str(rec), "-o", str(tmp_path / "o"), "--repeats", "1",
                    "--no-rss")
    one_error(code, msg, "quantized nothing")
    assert not (tmp_path / "o").exists()


def test_resume_never_reuses_a_build_of_another_model_or_data(tmp_path, tiny_encoder_dir, monkeypatch):
    import slimcart.api as api_mod

    model = tmp_path / "model"
    shutil.copytree(tiny_encoder_dir, model)
    out = tmp_path / "out"

    def boom(*a, **k):
        raise KeyboardInterrupt

    monkeypatch.setattr(api_mod, "measure_interleaved", boom)
    with pytest.raises(KeyboardInterrupt):
        api.compress("search", str(model), "int8-dynamic", out, repeats=1, measure_rss=False)
    monkeypatch.undo()
    monkeypatch.delenv("SLIMCART_DATA", raising=False)
    import torch
    from safetensors.torch import load_file, save_file

    w = load_file(str(model / "model.safetensors"))  # the user replaces the model at the same path
    save_file({k: v + 0.01 * torch.randn_like(v) for k, v in w.items()}, str(model / "model.safetensors"))
    msgs: list[str] = []
    m = api.compress("search", str(model), "int8-dynamic", out, repeats=1, measure_rss=False, progress=msgs.append)
    assert not any(x.startswith("resuming") for x in msgs)  # rebuilt from the new weights
    assert m["compressed"]["quality"]["cosine"] > 0.9


def test_a_wrong_data_root_is_an_error_not_synthetic_data(tmp_path, victim, monkeypatch):
    monkeypatch.setenv("SLIMCART_DATA", str(tmp_path / "nowhere"))
    code, msg = cli("eval", "-w", "search", "-m", str(victim))
    one_error(code, msg, "SLIMCART_DATA=")


# ---------------------------------------------------------------- stuck or crashing
def test_a_truncated_build_state_is_discarded(tmp_path, victim):
    out = tmp_path / "out"
    partial = tmp_path / ".out.partial"
    (partial / "model").mkdir(parents=True)
    (partial / "build.json").write_text('{"identity": {"workl')  # what a crash mid-write used to leave
    msgs: list[str] = []
    api.compress("search", str(victim), "int8-dynamic", out, repeats=1, measure_rss=False, progress=msgs.append)
    assert any("discarding" in x for x in msgs) and (out / "metrics.json").exists()
    api.compress("search", str(victim), "int8-dynamic", out, repeats=1, measure_rss=False, overwrite=True)


def test_two_runs_on_one_output_do_not_mix(tmp_path, victim):
    from slimcart.outputs import OutputLock

    out = tmp_path / "out"
    with OutputLock(out):  # another run holds the output
        code, msg = cli("compress", "-w", "search", "-m", str(victim), "-r", "int8-dynamic", "-o", str(out))
    one_error(code, msg, f"is being written by process {os.getpid()}")
    assert not out.exists()


def test_disk_full_gives_one_line_and_leaves_no_partial_folder(tmp_path, victim):
    """A file-size limit makes writes fail with EFBIG, as a full disk fails them with ENOSPC."""
    code = textwrap.dedent(f"""
        import resource, signal
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (200_000, 200_000))
        from typer.testing import CliRunner
        from slimcart.cli import app
        r = CliRunner().invoke(app, ["compress", "-w", "search", "-m", {str(victim)!r}, "-r", "int8-dynamic",
                                     "-o", {str(tmp_path / "out")!r}, "--no-rss", "--repeats", "1", "--threads", "1"])
        print("EXIT", r.exit_code)
        print(r.output)
    """)
    env = {k: v for k, v in os.environ.items() if k != "SLIMCART_DATA"}
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=300)
    assert "EXIT 2" in proc.stdout, proc.stdout + proc.stderr
    assert "cannot write the output" in proc.stdout and "Traceback" not in proc.stdout
    assert not (tmp_path / ".out.partial").exists() and not (tmp_path / "out").exists()


@pytest.mark.parametrize("setup, fragment", [
    (lambda d: (d / "rec").mkdir(), "is not a file"),
    (lambda d: (d / "rec").write_bytes(b"name: x\nsteps: [{kind: \xff\xfe}]\n"), "not UTF-8"),
    (lambda d: (d / "rec").write_text("name: x\nsteps: [{kind: [x]}]\n"), "with a 'kind' name"),
    (lambda d: (d / "rec").write_text("name: x\nsteps: [{kind: static_int8, observer_args: {nope: 1}}]\n"), "has no setting nope"),
    (lambda d: (d / "rec").write_text("name: x\nsteps: [{kind: weight_only_rtn, bits: 0}]\n"), "bits must be one of"),
    (lambda d: (d / "rec").write_text("name: x\nsteps: [{kind: weight_only_gptq, group_size: 7}]\n"), "power of two"),
    (lambda d: (d / "rec").write_text("name: x\nsteps: [{kind: static_int8, calibration_batches: 0}]\n"), "greater than or equal to 1"),
])
def test_bad_recipes_fail_before_anything_loads(tmp_path, setup, fragment):
    setup(tmp_path)
    code, msg = cli("compress", "-w", "llm", "-m", "/nonexistent-model", "-r", str(tmp_path / "rec"), "-o", str(tmp_path / "o"))
    one_error(code, msg, fragment)  # the recipe is refused first: the missing model is never reached
    assert sorted(p.name for p in tmp_path.iterdir()) == ["rec"]


@pytest.mark.parametrize("file, content, fragment", [
    ("1_Pooling/config.json", "{not json", "is not readable JSON"),
    ("modules.json", '{"a": 1}', "must be a JSON list"),
    ("1_Pooling/config.json", '{"pooling_mode_weightedmean_tokens": true}', "is not supported"),
])
def test_corrupt_sentence_transformers_files(victim, file, content, fragment):
    (victim / file).write_text(content)
    code, msg = cli("eval", "-w", "search", "-m", str(victim))
    one_error(code, msg, fragment)


@pytest.mark.parametrize("meta, fragment", [
    ({"format": "lowrank"}, "'ranks' must map"),
    ({"format": "sparse-bitmask"}, "no 'files' table"),
    ({"format": "structured-hf"}, "'structure' needs"),
    ({"format": "slimcart-wq"}, "no 'linears' table"),
    ({"format": 7}, "string 'format'"),
    ({"format": "nope"}, "unknown slimcart model format"),
])
def test_format_files_missing_keys(tmp_path, tiny_encoder_dir, meta, fragment):
    folder = tmp_path / "m"
    shutil.copytree(tiny_encoder_dir, folder)
    (folder / FORMAT_FILE).write_text(json.dumps(meta))
    wl = get_workload("llm" if meta["format"] == "slimcart-wq" else "search")
    with pytest.raises(SlimcartError, match=re.escape(fragment)):
        load_saved(folder, wl, 1)


@pytest.mark.parametrize("threads", ["-1", "0", "100000"])
def test_thread_counts_outside_the_machine(tmp_path, victim, threads):
    code, msg = cli("compress", "-w", "search", "-m", str(victim), "-r", "int8-dynamic", "-o", str(tmp_path / "o"),
                    "--threads", threads)
    one_error(code, msg, "threads must be a whole number from 1 to")


def test_unwritable_output_parent_even_as_root(tmp_path):
    """Root may write into any folder, so the folder is made unwritable for root too: a read-only tmpfs
    (or an immutable folder where mounting is not allowed)."""
    from slimcart.outputs import check_output_path

    ro = tmp_path / "ro"
    ro.mkdir()
    how = None
    if os.geteuid() != 0:
        ro.chmod(0o500)
        how = "chmod"
    elif subprocess.run(["mount", "-t", "tmpfs", "-o", "ro,size=1m", "tmpfs", str(ro)], capture_output=True).returncode == 0:
        how = "mount"
    elif subprocess.run(["chattr", "+i", str(ro)], capture_output=True).returncode == 0:
        how = "chattr"
    if how is None:
        pytest.skip("cannot make a folder unwritable for root here (no mount, no chattr)")
    try:
        with pytest.raises(SlimcartError, match="not writable"):
            check_output_path(ro / "out", overwrite=False)
        code, msg = cli("compress", "-w", "search", "-m", "minilm", "-r", "int8-dynamic", "-o", str(ro / "out"))
        one_error(code, msg, "not writable")
    finally:
        {"mount": lambda: subprocess.run(["umount", str(ro)]), "chattr": lambda: subprocess.run(["chattr", "-i", str(ro)]),
         "chmod": lambda: ro.chmod(0o700)}[how]()
