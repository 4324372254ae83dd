"""Reading a batch job's input into an Arrow table of rows (never writing to it).

embed: a catalogue (CSV / TSV / Parquet / JSONL) -> rows (row, [id], text)
score: an interaction log (the recsys workload's reader) -> one row per user (row, user, history)
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa

from ..errors import SlimcartError

TABLE_SUFFIXES = (".csv", ".tsv", ".parquet", ".pq", ".jsonl", ".ndjson")


def fingerprint(path: Path) -> dict:
    """Identifies the input for resuming: a changed file means a new job."""
    st = path.stat()
    return {"path": str(path.resolve()), "bytes": st.st_size, "mtime_ns": st.st_mtime_ns}


def _read(path: Path, header: bool) -> pd.DataFrame:
    suffix = path.suffix.lower()
    if suffix not in TABLE_SUFFIXES:
        raise SlimcartError(f"unsupported input file type '{suffix}' for {path} (use .csv, .tsv, .parquet or .jsonl)")
    try:
        if suffix in (".csv", ".tsv"):
            # Text as read: ids like "007" stay strings, nothing is parsed into numbers behind the user's back.
            df = pd.read_csv(path, sep="\t" if suffix == ".tsv" else ",", dtype=str, keep_default_na=False,
                             na_values=[""], header=0 if header else None)
            if not header:
                df.columns = [str(c) for c in df.columns]
        elif suffix in (".parquet", ".pq"):
            df = pd.read_parquet(path)
        else:
            df = pd.read_json(path, lines=True, dtype=False)
    except pd.errors.EmptyDataError:
        raise SlimcartError(f"input file {path} is empty") from None
    except Exception as e:  # noqa: BLE001 - any parser failure is a problem with the user's file
        raise SlimcartError(f"cannot read input file {path}: {(str(e).splitlines() or [type(e).__name__])[0]}") from None
    if df.empty:
        raise SlimcartError(f"input file {path} has no rows")
    return df


def _column(df: pd.DataFrame, name: str, path: Path, flag: str) -> pd.Series:
    if name not in df.columns:
        cols = ", ".join(map(str, df.columns[:20]))
        hint = " (a file without a header line: pass --no-header and a column number)" if name.isdigit() else ""
        raise SlimcartError(f"{path} has no column '{name}' for {flag}; it has: {cols}{hint}")
    return df[name]


def _ids(series: pd.Series) -> pa.Array:
    if pd.api.types.is_integer_dtype(series):
        return pa.array(series.to_numpy(np.int64))
    return pa.array(series.astype(str).tolist(), pa.string())


def read_catalogue(path: Path, column: str, id_column: str | None = None, header: bool = True) -> pa.Table:
    """(row, [id], text) for every input row, in input order; a missing text is an error naming its row."""
    df = _read(path, header)
    text = _column(df, column, path, "--column")
    missing = text.isna().to_numpy()
    if missing.any():
        first = int(np.flatnonzero(missing)[0])
        raise SlimcartError(f"{path}: column '{column}' is empty in {int(missing.sum())} row(s), first at row "
                            f"{first} (0-based, header excluded); fill or drop them first")
    cols = {"row": pa.array(np.arange(len(df), dtype=np.int64))}
    if id_column is not None:
        ids = _column(df, id_column, path, "--id-column")
        if ids.isna().any():
            raise SlimcartError(f"{path}: id column '{id_column}' has empty values")
        cols["id"] = _ids(ids)
    cols["text"] = pa.array(text.astype(str).tolist(), pa.string())
    return pa.table(cols)


def read_histories(path: Path) -> tuple[pa.Table, np.ndarray]:
    """One row per user (row, user, history of model item numbers 1..n in time order) and the item
    vocabulary (vocab[k - 1] = the log's id of model item k), numbered exactly as the recsys workload
    numbers them when it trains, so a model trained on this log scores these histories."""
    from ..workloads.recsys import group_histories, read_interactions

    df = read_interactions(Path(path))
    histories, n_items = group_histories(df)
    # group_histories numbers items by their sorted unique value (text for mixed ids) and orders users
    # the same way; it does not return the ids, so they are recovered here and checked against it below.
    as_key = {c: (df[c].astype(str) if df[c].dtype == object else df[c]) for c in ("user", "item")}
    users = np.unique(as_key["user"].to_numpy())
    vocab = np.unique(as_key["item"].to_numpy())
    counts = pd.Series(as_key["user"].to_numpy()).value_counts().reindex(users).to_numpy()
    if len(vocab) != n_items or len(users) != len(histories) or \
            not np.array_equal(counts, [len(h) for h in histories]):  # pragma: no cover - guards drift
        raise SlimcartError("internal: user/item numbering differs from the recsys workload's; please report")
    user_ids = pa.array(users.tolist()) if users.dtype.kind in "iu" else pa.array([str(u) for u in users], pa.string())
    table = pa.table({
        "row": pa.array(np.arange(len(histories), dtype=np.int64)),
        "user": user_ids,
        "history": pa.array([h.astype(np.int64) for h in histories], pa.list_(pa.int64())),
    })
    return table, vocab
