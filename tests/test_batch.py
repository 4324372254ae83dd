"""Batch jobs: `slimcart embed` / `slimcart score` / `slimcart index` on tiny models.

Checked against independently computed values: embeddings equal the workload's single-process
`embed` (1e-6), row order and count are the input's, a killed job resumes without recomputing its
finished shards, top-k per user equals a direct computation, the input is never written, and
bad input is one clear error. Ray Data gives the same vectors as local workers (slow test).
"""
from __future__ import annotations

import os

import numpy as np
import pandas as pd
import pyarrow.parquet as pq
import pytest
import torch

from slimcart.batch import job as batch_job
from slimcart.batch.inputs import read_histories
from slimcart.batch.job import JobOptions, embed, score
from slimcart.batch.tasks import EmbedTask
from slimcart.errors import SlimcartError
from slimcart.models.sasrec import SASRec, SASRecConfig, save_sasrec
from slimcart.workloads import get_workload
from slimcart.workloads.recsys import group_histories, left_pad, read_interactions

from conftest import tree_fingerprint

pytestmark = pytest.mark.usefixtures("one_thread")

WORDS = "acme globex wireless headphones espresso machine shoes red blue 4k tv usb cable mixer".split()


@pytest.fixture(scope="module")
def catalogue(tmp_path_factory):
    rng = np.random.default_rng(0)
    titles = [" ".join(rng.choice(WORDS, int(rng.integers(1, 12)))) for _ in range(70)]
    folder = tmp_path_factory.mktemp("in")
    path = folder / "catalogue.csv"
    pd.DataFrame({"sku": [f"00{i}" for i in range(70)], "title": titles}).to_csv(path, index=False)
    return path, titles


@pytest.fixture(scope="module")
def reference(tiny_encoder_dir, catalogue):
    wl = get_workload("search")
    bundle = wl.load_model(str(tiny_encoder_dir))
    return wl.embed(wl.torch_runner(bundle), bundle.tokenizer, catalogue[1])


def _vectors(out):
    t = pq.read_table(out)
    return t, np.stack(t.column("embedding").to_numpy(zero_copy_only=False))


@pytest.mark.parametrize("workers", [1, pytest.param(2, marks=pytest.mark.slow)])  # 2: spawned processes, ~10-40 s
def test_embed_equals_single_process_embeddings_in_input_order(tiny_encoder_dir, catalogue, reference, tmp_path,
                                                               workers):
    src, titles = catalogue
    before = tree_fingerprint(src.parent)
    out = tmp_path / "vectors"
    m = embed("search", str(tiny_encoder_dir), src, out, column="title", id_column="sku",
              opts=JobOptions(workers=workers, threads=1, shard_rows=16))
    t, vecs = _vectors(out)
    assert t.column("row").to_pylist() == list(range(70))
    assert t.column("id").to_pylist() == [f"00{i}" for i in range(70)]  # ids as written, not parsed to ints
    np.testing.assert_allclose(vecs, reference, atol=1e-6)
    assert m["shards"] == 5 and m["computed_shards"] == [0, 1, 2, 3, 4] and m["workers"] == workers
    assert sorted(p.name for p in out.iterdir()) == ["_manifest.json"] + [f"part-{i:06d}.parquet" for i in range(5)]
    assert not (tmp_path / ".vectors.partial").exists()
    assert tree_fingerprint(src.parent) == before  # input folder untouched


def test_killed_job_resumes_without_recomputing_finished_shards(tiny_encoder_dir, catalogue, reference, tmp_path,
                                                                monkeypatch):
    src, _ = catalogue
    out = tmp_path / "vectors"
    calls = []
    real = EmbedTask.compute

    def counting(self, state, shard):
        calls.append(shard.column("row")[0].as_py())
        return real(self, state, shard)

    monkeypatch.setattr(EmbedTask, "compute", counting)

    def kill_after_two(done, total):
        if done >= 32:
            raise KeyboardInterrupt

    opts = JobOptions(workers=1, threads=1, shard_rows=16)
    with pytest.raises(KeyboardInterrupt):
        embed("search", str(tiny_encoder_dir), src, out, column="title", opts=opts, progress=kill_after_two)
    partial = tmp_path / ".vectors.partial"
    assert not out.exists() and sorted(p.name for p in partial.glob("part-*")) == ["part-000000.parquet",
                                                                                   "part-000001.parquet"]
    kept = {p.name: p.stat().st_mtime_ns for p in partial.glob("part-*")}
    calls.clear()
    m = embed("search", str(tiny_encoder_dir), src, out, column="title", opts=opts)
    assert calls == [32, 48, 64]  # only the unfinished shards ran
    assert m["skipped_shards"] == [0, 1] and m["computed_shards"] == [2, 3, 4]
    assert {n: (out / n).stat().st_mtime_ns for n in kept} == kept  # finished shards kept as written
    t, vecs = _vectors(out)
    assert t.column("row").to_pylist() == list(range(70))
    np.testing.assert_allclose(vecs, reference, atol=1e-6)


def test_a_damaged_shard_is_redone_and_other_settings_start_over(tiny_encoder_dir, catalogue, tmp_path, monkeypatch):
    src, _ = catalogue
    out = tmp_path / "v"
    opts = JobOptions(workers=1, threads=1, shard_rows=32)
    monkeypatch.setattr(batch_job, "verify", lambda *a: (_ for _ in ()).throw(KeyboardInterrupt))
    with pytest.raises(KeyboardInterrupt):  # stopped after computing every shard, before publishing
        embed("search", str(tiny_encoder_dir), src, out, column="title", opts=opts)
    monkeypatch.undo()
    partial = tmp_path / ".v.partial"
    (partial / "part-000001.parquet").write_bytes(b"truncated")
    m = embed("search", str(tiny_encoder_dir), src, out, column="title", opts=opts)
    assert m["skipped_shards"] == [0, 2] and m["computed_shards"] == [1]
    said = []
    # a different shard size is another job: the partial folder of the old one is not reused
    monkeypatch.setattr(batch_job, "verify", lambda *a: (_ for _ in ()).throw(KeyboardInterrupt))
    with pytest.raises(KeyboardInterrupt):
        embed("search", str(tiny_encoder_dir), src, tmp_path / "x", column="title", opts=opts)
    monkeypatch.undo()
    m = embed("search", str(tiny_encoder_dir), src, tmp_path / "x", column="title",
              opts=JobOptions(workers=1, threads=1, shard_rows=20), say=said.append)
    assert m["skipped_shards"] == [] and any("starting over" in s for s in said)


def test_headerless_csv_by_column_number(tiny_encoder_dir, catalogue, reference, tmp_path):
    src, titles = catalogue
    plain = tmp_path / "plain.csv"
    pd.read_csv(src, dtype=str).to_csv(plain, index=False, header=False)
    out = tmp_path / "o"
    embed("search", str(tiny_encoder_dir), plain, out, column="1", id_column="0", header=False,
          opts=JobOptions(workers=1, threads=1, shard_rows=50))
    t, vecs = _vectors(out)
    assert t.num_rows == 70 and t.column("id")[0].as_py() == "000"
    np.testing.assert_allclose(vecs, reference, atol=1e-6)


def test_bad_input_is_one_clear_error_and_nothing_is_written(tiny_encoder_dir, catalogue, tmp_path):
    src, _ = catalogue
    model = str(tiny_encoder_dir)
    cases = [
        (dict(src=src, out=tmp_path / "o", column="name"), "has no column 'name' for --column; it has: sku, title"),
        (dict(src=src, out=tmp_path / "o", column="title", id_column="id"), "no column 'id' for --id-column"),
        (dict(src=tmp_path / "missing.csv", out=tmp_path / "o", column="title"), "does not exist"),
        (dict(src=src, out=src, column="title"), "would overlap the input"),
        (dict(src=src, out=src.parent.parent, column="title"), "would overlap the input"),
        (dict(src=tmp_path, out=tmp_path / "o", column="title"), "must be a file"),
    ]
    before = tree_fingerprint(src.parent)
    for kw, msg in cases:
        with pytest.raises(SlimcartError, match=msg.replace("(", r"\(").replace(")", r"\)")):
            embed("search", model, kw["src"], kw["out"], kw["column"], kw.get("id_column"),
                  opts=JobOptions(workers=1, threads=1))
    assert tree_fingerprint(src.parent) == before and not (tmp_path / "o").exists()

    holes = tmp_path / "holes.csv"
    holes.write_text("sku,title\n1,first\n2,\n3,third\n")
    with pytest.raises(SlimcartError, match=r"column 'title' is empty in 1 row\(s\), first at row 1"):
        embed("search", model, holes, tmp_path / "o2", "title", opts=JobOptions(workers=1, threads=1))
    empty = tmp_path / "empty.csv"
    empty.write_text("")
    with pytest.raises(SlimcartError, match="is empty"):
        embed("search", model, empty, tmp_path / "o3", "title", opts=JobOptions(workers=1, threads=1))
    done = tmp_path / "done"
    done.mkdir()
    with pytest.raises(SlimcartError, match="already exists"):
        embed("search", model, src, done, "title", opts=JobOptions(workers=1, threads=1))
    foreign = tmp_path / ".mine.partial"
    foreign.mkdir()
    (foreign / "keep.txt").write_text("user file")
    with pytest.raises(SlimcartError, match="was not written by a slimcart batch job"):
        embed("search", model, src, tmp_path / "mine", "title", opts=JobOptions(workers=1, threads=1))
    assert (foreign / "keep.txt").read_text() == "user file"


@pytest.mark.slow
def test_bad_model_in_a_worker_process_is_one_clear_error(catalogue, tmp_path):
    src, _ = catalogue
    with pytest.raises(SlimcartError, match="unknown model 'nope'"):
        embed("search", "nope", src, tmp_path / "o", "title", opts=JobOptions(workers=2, threads=1, shard_rows=16))


def test_default_workers_and_threads_fit_the_cores(monkeypatch):
    monkeypatch.setattr(os, "cpu_count", lambda: 8)
    assert JobOptions().resolved() == (8, 1)
    assert JobOptions(workers=2).resolved() == (2, 4)
    assert JobOptions(threads=4).resolved() == (2, 4)


# ---------------------------------------------------------------- score (recsys)
@pytest.fixture(scope="module")
def recsys_case(tmp_path_factory):
    """An interaction log with string user/item ids and timestamps, and a tiny SASRec over its items."""
    rng = np.random.default_rng(3)
    rows = []
    for u in range(23):
        for t in range(int(rng.integers(2, 9))):
            rows.append((f"user{u:02d}", f"sku-{int(rng.integers(0, 15)):02d}", int(rng.integers(0, 1000))))
    folder = tmp_path_factory.mktemp("log")
    log = folder / "log.csv"
    pd.DataFrame(rows, columns=["user_id", "item_id", "timestamp"]).to_csv(log, index=False)
    n_items = len({r[1] for r in rows})
    torch.manual_seed(0)
    model_dir = folder / "sasrec"
    model_dir.mkdir()
    save_sasrec(SASRec(SASRecConfig(n_items=n_items, max_len=6, hidden=16, heads=2, layers=1, dropout=0.1)).eval(),
                model_dir)
    return log, model_dir


def test_read_histories_numbers_items_like_the_workload(recsys_case):
    log, _ = recsys_case
    table, vocab = read_histories(log)
    histories, n_items = group_histories(read_interactions(log))
    assert len(vocab) == n_items
    assert [np.asarray(h).tolist() for h in table.column("history").to_pylist()] == [h.tolist() for h in histories]
    df = pd.read_csv(log).sort_values(["user_id", "timestamp"], kind="stable")
    for user, h in zip(table.column("user").to_pylist(), table.column("history").to_pylist()):
        assert vocab[np.asarray(h) - 1].tolist() == df.loc[df.user_id == user, "item_id"].tolist()


def test_score_top_k_per_user(recsys_case, tmp_path):
    log, model_dir = recsys_case
    out = tmp_path / "recs"
    score("recsys", str(model_dir), log, out, k=4, opts=JobOptions(workers=1, threads=1, shard_rows=5))
    got = pq.read_table(out).to_pandas()
    table, vocab = read_histories(log)
    wl = get_workload("recsys")
    bundle = wl.load_model(str(model_dir))
    runner = wl.torch_runner(bundle)
    assert got["row"].tolist() == list(range(table.num_rows)) and got["user"].tolist() == table.column("user").to_pylist()
    for h, items, scores in zip(table.column("history").to_pylist(), got["items"], got["scores"]):
        s = np.asarray(runner({"seq": left_pad([np.array(h)], 6)}))[0]
        s[0] = -np.inf
        s[h] = -np.inf
        top = np.argsort(-s, kind="stable")[:4]
        assert list(items) == vocab[top - 1].tolist()
        np.testing.assert_allclose(scores, s[top], rtol=1e-5)
        assert not set(items) & set(vocab[np.asarray(h) - 1])


def test_score_refuses_a_log_the_model_was_not_trained_on(recsys_case, tmp_path):
    log, model_dir = recsys_case
    other = tmp_path / "other.csv"
    other.write_text("user_id,item_id\na,x\na,y\nb,z\n")
    with pytest.raises(SlimcartError, match="the model scores 15 items but the log has 3"):
        score("recsys", str(model_dir), other, tmp_path / "o", opts=JobOptions(workers=1, threads=1))


# ---------------------------------------------------------------- Ray Data
@pytest.mark.slow
def test_ray_engine_gives_the_same_vectors_as_local_workers(tiny_encoder_dir, catalogue, reference, tmp_path):
    pytest.importorskip("ray")
    src, _ = catalogue
    local, ray_out = tmp_path / "local", tmp_path / "ray"
    embed("search", str(tiny_encoder_dir), src, local, "title", opts=JobOptions(workers=1, threads=1, shard_rows=16))
    m = embed("search", str(tiny_encoder_dir), src, ray_out, "title",
              opts=JobOptions(engine="ray", workers=2, threads=1, shard_rows=16))
    t_local, v_local = _vectors(local)
    t_ray, v_ray = _vectors(ray_out)
    assert m["engine"] == "ray" and t_ray.column("row").to_pylist() == list(range(70))
    np.testing.assert_allclose(v_ray, v_local, atol=1e-6)
    np.testing.assert_allclose(v_ray, reference, atol=1e-6)
