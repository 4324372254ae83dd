"""Catalogue index for `/search`: product vectors in FAISS, exact or approximate (HNSW).

Vectors come from the search workload's encoder, L2-normalised, so inner product = cosine.
  exact  IndexFlatIP: brute force, the true top-k (35k x 384 floats is ~13 M multiply-adds a query)
  hnsw   IndexHNSWFlat(M) with inner product: a graph search, sub-linear, recall < 1 (efSearch trades
         recall for time; `slimcart index` reports recall@10 against exact on sample queries)

Folder written by `slimcart index` (atomically, like every slimcart output):
  index.faiss   FAISS's own binary format (no pickle)
  items.parquet row -> product id (and title, returned with results)
  index.json    kind, dim, count, the encoder it was built with, and a probe: the encoder's vector of
                a fixed text, so serving can check it encodes queries in the same space
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from ..errors import SlimcartError

PROBE_TEXT = "stainless steel 2-slice toaster with defrost function"
MIN_PROBE_COSINE = 0.9  # a compressed encoder of the same model sits at ~0.99; another model near 0-0.5
INDEX_FILE, ITEMS_FILE, META_FILE = "index.faiss", "items.parquet", "index.json"
MAX_META_BYTES = 1 << 20


def build_faiss(vectors: np.ndarray, kind: str, hnsw_m: int = 32, ef_construction: int = 80):
    import faiss

    vectors = np.ascontiguousarray(vectors, dtype=np.float32)
    dim = vectors.shape[1]
    if kind == "exact":
        index = faiss.IndexFlatIP(dim)
    elif kind == "hnsw":
        index = faiss.IndexHNSWFlat(dim, hnsw_m, faiss.METRIC_INNER_PRODUCT)
        index.hnsw.efConstruction = ef_construction
    else:
        raise SlimcartError(f"unknown index kind '{kind}' (exact or hnsw)")
    index.add(vectors)
    return index


class CatalogueIndex:
    """A loaded index: `search(query_vectors, k) -> (ids per query, scores per query)`."""

    def __init__(self, index, ids: list, titles: list | None, meta: dict, ef_search: int = 64):
        self.index, self.ids, self.titles, self.meta = index, ids, titles, meta
        if meta["kind"] == "hnsw":
            index.hnsw.efSearch = ef_search
        self.dim, self.size = int(meta["dim"]), len(ids)

    @classmethod
    def load(cls, folder: Path, ef_search: int = 64) -> "CatalogueIndex":
        import faiss

        folder = Path(folder)
        meta_file = folder / META_FILE
        if not meta_file.is_file() or meta_file.stat().st_size > MAX_META_BYTES:
            raise SlimcartError(f"{folder} is not a slimcart index (no {META_FILE}); build one with `slimcart index`")
        try:
            meta = json.loads(meta_file.read_text())
            index = faiss.read_index(str(folder / INDEX_FILE))
            items = pq.read_table(folder / ITEMS_FILE)
        except Exception as e:  # noqa: BLE001 - a damaged index folder is one clear line
            raise SlimcartError(f"cannot read index {folder}: {(str(e).splitlines() or [type(e).__name__])[0]}") from None
        if index.ntotal != items.num_rows or index.d != meta.get("dim"):
            raise SlimcartError(f"index {folder} is inconsistent: {index.ntotal} vectors, {items.num_rows} items")
        titles = items.column("title").to_pylist() if "title" in items.column_names else None
        return cls(index, items.column("id").to_pylist(), titles, meta, ef_search)

    def check_encoder(self, probe: np.ndarray) -> float:
        """Cosine between the serving encoder's probe vector and the one the index was built with."""
        ref = np.asarray(self.meta["probe"], np.float32)
        probe = np.asarray(probe, np.float32).reshape(-1)
        if probe.shape != ref.shape:
            raise SlimcartError(f"the index holds {ref.shape[0]}-dim vectors but the model makes {probe.shape[0]}-dim ones")
        cos = float(probe @ ref / max(np.linalg.norm(probe) * np.linalg.norm(ref), 1e-12))
        if cos < MIN_PROBE_COSINE:
            raise SlimcartError(f"the index was built with another encoder ({self.meta.get('model')}): probe cosine "
                                f"{cos:.3f} < {MIN_PROBE_COSINE}; rebuild it with `slimcart index` for this model")
        return cos

    def search(self, queries: np.ndarray, k: int) -> tuple[list[list], list[list[float]], list[list[int]]]:
        k = min(k, self.size)
        scores, rows = self.index.search(np.ascontiguousarray(queries, dtype=np.float32), k)
        ids, out_scores, out_rows = [], [], []
        for srow, rrow in zip(scores, rows):
            keep = rrow >= 0  # HNSW may return fewer than k (-1 padding)
            out_rows.append(rrow[keep].tolist())
            ids.append([self.ids[r] for r in rrow[keep]])
            out_scores.append(srow[keep].astype(float).tolist())
        return ids, out_scores, out_rows


def write_index(folder: Path, vectors: np.ndarray, ids: pa.Array, titles: pa.Array | None, kind: str, meta: dict,
                hnsw_m: int = 32) -> None:
    import faiss

    index = build_faiss(vectors, kind, hnsw_m)
    faiss.write_index(index, str(folder / INDEX_FILE))
    cols = {"id": ids} if titles is None else {"id": ids, "title": titles}
    pq.write_table(pa.table(cols), folder / ITEMS_FILE)
    (folder / META_FILE).write_text(json.dumps({"kind": kind, "dim": int(vectors.shape[1]), "count": len(vectors),
                                                "hnsw_m": hnsw_m if kind == "hnsw" else None, **meta}, indent=2))


def recall_at_k(approx_rows: list[list[int]], exact_rows: list[list[int]], k: int) -> float:
    """Mean |approx top-k & exact top-k| / k."""
    return float(np.mean([len(set(a[:k]) & set(e[:k])) / max(1, min(k, len(e))) for a, e in zip(approx_rows, exact_rows)]))
