"""Output shards of a batch job: fixed row ranges, each written atomically, checked when reused.

Shard i holds input rows [i * shard_rows, min((i + 1) * shard_rows, n)) as `part-<i>.parquet`.
A shard file only ever appears complete: it is written to a hidden temporary name in the same
folder and renamed (atomic on POSIX). On a rerun a shard counts as finished when its Parquet footer
reads, its row count is right and its `row` column is exactly its range; anything else is redone.
"""
from __future__ import annotations

import os
import uuid
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from ..errors import SlimcartError


@dataclass(frozen=True)
class Shard:
    index: int
    start: int
    stop: int

    @property
    def rows(self) -> int:
        return self.stop - self.start

    @property
    def name(self) -> str:
        return f"part-{self.index:06d}.parquet"


def plan(n_rows: int, shard_rows: int) -> list[Shard]:
    if shard_rows < 1:
        raise SlimcartError(f"--shard-rows must be at least 1, got {shard_rows}")
    return [Shard(i, a, min(a + shard_rows, n_rows)) for i, a in enumerate(range(0, n_rows, shard_rows))]


def write_atomic(folder: Path, shard: Shard, table: pa.Table) -> None:
    rows = table.column("row").to_numpy()
    if len(rows) != shard.rows or not np.array_equal(rows, np.arange(shard.start, shard.stop)):
        raise RuntimeError(f"shard {shard.index}: computed rows do not match its input range")  # a bug, not input
    tmp = folder / f".{shard.name}.{uuid.uuid4().hex[:8]}.tmp"
    try:
        pq.write_table(table, tmp)
        with open(tmp, "rb") as f:  # on disk before the rename makes it visible
            os.fsync(f.fileno())
        os.replace(tmp, folder / shard.name)
    finally:
        tmp.unlink(missing_ok=True)


def is_finished(folder: Path, shard: Shard) -> bool:
    path = folder / shard.name
    if not path.is_file():
        return False
    try:
        if pq.read_metadata(path).num_rows != shard.rows:
            return False
        rows = pq.read_table(path, columns=["row"]).column("row").to_numpy()
    except Exception:  # noqa: BLE001 - an unreadable shard is simply redone
        return False
    return bool(np.array_equal(rows, np.arange(shard.start, shard.stop)))


def remove_temporaries(folder: Path) -> None:
    """Half-written shards of a killed run (only our own hidden `.part-*.tmp` names)."""
    for p in folder.glob(".part-*.parquet.*.tmp"):
        p.unlink(missing_ok=True)


def verify(folder: Path, shards: list[Shard], n_rows: int) -> None:
    """Every input row exactly once, in input order, across the shard files."""
    seen = 0
    for s in shards:
        rows = pq.read_table(folder / s.name, columns=["row"]).column("row").to_numpy()
        if not np.array_equal(rows, np.arange(seen, seen + len(rows))):
            raise SlimcartError(f"output shard {s.name} does not continue the input order at row {seen}")
        seen += len(rows)
    if seen != n_rows:
        raise SlimcartError(f"output has {seen} rows but the input has {n_rows}")
