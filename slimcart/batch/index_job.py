"""`slimcart index`: embed a catalogue with the batch job (resumable, parallel) and build a FAISS index.

The embedding shards live in the index's hidden partial folder while it is built, so a killed build
resumes without re-embedding finished shards; the published index folder holds only the index.
"""
from __future__ import annotations

import shutil
from pathlib import Path
from typing import Callable

import numpy as np
import pyarrow.parquet as pq

from .. import artifacts
from ..errors import SlimcartError
from ..serve.index import PROBE_TEXT, recall_at_k, write_index
from . import inputs
from .job import JOB_FILE, MANIFEST, JobOptions, check_paths, run_job
from .tasks import EmbedTask

RECALL_QUERIES = 200


def build_index(workload: str, model: str, src: str | Path, out: str | Path, column: str, id_column: str | None = None,
                header: bool = True, kind: str = "exact", hnsw_m: int = 32, batch_size: int = 64,
                opts: JobOptions | None = None, progress=None, say: Callable[[str], None] = lambda m: None) -> dict:
    from ..serve.index import CatalogueIndex, build_faiss

    opts = opts or JobOptions()
    src, out = Path(src).expanduser(), Path(out).expanduser()
    if kind not in ("exact", "hnsw"):
        raise SlimcartError(f"--kind must be exact or hnsw, got '{kind}'")
    if workload != "search":
        raise SlimcartError("slimcart index builds a catalogue index for the search workload")
    check_paths(src, out, opts.overwrite)
    rows = inputs.read_catalogue(src, column, id_column, header)
    task = EmbedTask(workload, model, threads=1, batch_size=batch_size)
    identity = {"input": inputs.fingerprint(src), "column": column, "id_column": id_column, "header": header}
    manifest = run_job(task, rows, identity, out, opts, progress, say, publish=False)
    folder = Path(manifest["folder"])
    shard_files = sorted(folder.glob("part-*.parquet"))
    vectors = np.concatenate([np.stack(pq.read_table(f, columns=["embedding"]).column("embedding").to_numpy(
        zero_copy_only=False)) for f in shard_files]).astype(np.float32)
    say("encoding the probe text")
    wl, runner, bundle = EmbedTask(workload, model, threads=manifest["threads_per_worker"] * manifest["workers"]).load()
    probe = wl.embed(runner, bundle.tokenizer, [PROBE_TEXT])[0]
    ids = rows.column("id") if "id" in rows.column_names else rows.column("row")
    meta = {"model": model, "input": identity["input"], "column": column, "probe": probe.astype(float).tolist()}
    say(f"building the {kind} index over {len(vectors)} vectors")
    if kind == "hnsw":  # how approximate: recall@10 vs exact on catalogue items as queries (self excluded)
        rng = np.random.default_rng(0)
        q = rng.choice(len(vectors), min(RECALL_QUERIES, len(vectors)), replace=False)
        approx = CatalogueIndex(build_faiss(vectors, "hnsw", hnsw_m), list(range(len(vectors))), None,
                                {"kind": "hnsw", "dim": vectors.shape[1]})
        exact = CatalogueIndex(build_faiss(vectors, "exact"), list(range(len(vectors))), None,
                               {"kind": "exact", "dim": vectors.shape[1]})
        drop_self = lambda rows_, qi: [[r for r in row if r != i] for row, i in zip(rows_, qi)]  # noqa: E731
        a = drop_self(approx.search(vectors[q], 11)[2], q)
        e = drop_self(exact.search(vectors[q], 11)[2], q)
        meta["recall@10_vs_exact"] = recall_at_k(a, e, 10)
        meta["recall_queries"] = len(q)
    write_index(folder, vectors, ids.combine_chunks(), rows.column("text").combine_chunks(), kind, meta, hnsw_m)
    for f in shard_files:  # only now: a build killed before this point resumes from the shards
        f.unlink()
    shutil.move(folder / MANIFEST, folder / "embed_manifest.json")
    (folder / JOB_FILE).unlink()
    artifacts.publish(folder, out)
    say(f"wrote {out}")
    return {k: v for k, v in meta.items() if k != "probe"} | {"kind": kind, "count": len(vectors)}
