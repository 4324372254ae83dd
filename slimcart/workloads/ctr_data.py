"""CTR data: rows of (sparse ids, optional behaviour history, optional numeric features, click label).

Three sources, each split into train / validation (carved from the training data) / test:

- behaviour log, DIN protocol (Amazon Video Games `Video.txt`; any `user item` log): per user with
  n >= 3 interactions s_0..s_{n-1}, the positives are (history s_<t, target s_t) for t = 1..n-3
  (train), t = n-2 (validation) and t = n-1 (test); every positive is paired with one item the user
  never interacted with as a negative. Validation and test negatives are drawn once (seed 0);
  training negatives are redrawn for every training batch. Tables: `user`, `item` (the history looks up `item`).
  No item categories: the SOURCE of Video.txt has none, so DIN runs on item ids alone.
- libFM field data (iPinYou: train.fm.txt / test.fm.txt / featindex.fm.txt): one table per field
  (named from featindex), validation = a seeded, label-stratified 20% of train.fm.txt.
- Criteo layout (tab-separated `label, I1..I13, C1..C26`, no header): numeric I columns become
  sign(x) log(1 + |x|) (missing = 0), each C column a table; validation = dev.csv if present.

Field tables hold the values seen at least `MIN_COUNT` times in the training split, most frequent
first (row 1 = hottest), row 0 = every other value (rare or unseen): a test id never trained on
then meets a trained "rare value" row instead of a random one.
"""
from __future__ import annotations

from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np
import pandas as pd

from ..contracts import DataInfo
from ..errors import SlimcartError

MIN_COUNT = 2
VALID_SHARE = 0.2


@dataclass
class Rows:
    """N labelled rows. Behaviour rows point into the data's sequences: history = seq[user][:end]."""

    sparse: np.ndarray  # (N, F) int64 table rows per field
    label: np.ndarray  # (N,) float32
    dense: np.ndarray | None = None  # (N, n_dense) float32
    user: np.ndarray | None = None  # (N,) sequence index (behaviour data)
    end: np.ndarray | None = None  # (N,) history length before the target (behaviour data)

    def __len__(self) -> int:
        return len(self.label)

    def take(self, idx) -> "Rows":
        pick = lambda a: None if a is None else a[idx]  # noqa: E731
        return Rows(self.sparse[idx], self.label[idx], pick(self.dense), pick(self.user), pick(self.end))


@dataclass
class CTRData:
    name: str
    info: DataInfo
    tables: dict[str, int]  # table name -> rows
    fields: list[str]  # table looked up by each sparse column
    train: Rows
    valid: Rows
    test: Rows
    frequencies: dict[str, np.ndarray]  # table -> training-set count per row
    frequency_note: str
    history_table: str | None = None
    target_field: int | None = None
    n_dense: int = 0
    flat: np.ndarray | None = None  # behaviour data: every user's items, concatenated in time order
    offsets: np.ndarray | None = None  # start of each user's sequence in `flat`
    seen: np.ndarray | None = None  # sorted user * (n_items + 1) + item keys of all interactions
    extra: dict = field(default_factory=dict)

    @property
    def groups(self) -> np.ndarray | None:
        """Test rows grouped by user for the bootstrap (None: rows are independent)."""
        return self.test.user

    def batch(self, rows: Rows, idx, max_len: int, labels: bool = False) -> dict:
        """Model inputs for rows[idx] (history left-padded to the batch's longest, at most max_len)."""
        out = {"sparse": rows.sparse[idx]}
        if self.history_table:
            u, end = rows.user[idx], rows.end[idx]
            width = int(max(1, min(max_len, end.max(initial=1))))
            col = np.arange(width)
            pos = self.offsets[u][:, None] + end[:, None] - width + col
            valid = col >= width - np.minimum(end, width)[:, None]
            out["hist"] = np.where(valid, self.flat[np.clip(pos, 0, len(self.flat) - 1)], 0).astype(np.int64)
        if self.n_dense:
            out["dense"] = rows.dense[idx]
        if labels:
            out["label"] = rows.label[idx]
        return out

    def epoch_rows(self, rng: np.random.Generator, negatives: int = 1) -> Rows:
        """Training rows for one epoch: behaviour positives plus freshly drawn negatives."""
        if not self.history_table:
            return self.train
        return with_negatives(self, self.train, rng, negatives)


# ---------------------------------------------------------------- behaviour logs (DIN protocol)
def sample_unseen(data: CTRData, users: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """One item per row that the row's user never interacted with (uniform over the catalogue)."""
    n_items = data.tables["item"] - 1
    out = rng.integers(1, n_items + 1, len(users))
    for _ in range(100):
        bad = np.isin(users * (n_items + 1) + out, data.seen)
        if not bad.any():
            return out
        out[bad] = rng.integers(1, n_items + 1, int(bad.sum()))
    raise SlimcartError("cannot sample negative items: some user has interacted with (almost) every item")


def with_negatives(data: CTRData, pos: Rows, rng: np.random.Generator, k: int = 1) -> Rows:
    """pos followed by k negatives per positive (same user and history, another item, label 0)."""
    neg = [replace(pos, sparse=pos.sparse.copy(), label=np.zeros(len(pos), np.float32)) for _ in range(k)]
    for r in neg:
        r.sparse[:, data.target_field] = sample_unseen(data, pos.user, rng)
    cat = lambda xs: np.concatenate(xs)  # noqa: E731
    rows = [pos, *neg]
    return Rows(cat([r.sparse for r in rows]), cat([r.label for r in rows]), None, cat([r.user for r in rows]),
                cat([r.end for r in rows]))


def behaviour_data(histories: list[np.ndarray], n_items: int, name: str, synthetic: bool) -> CTRData:
    """DIN protocol over per-user item sequences (items 1..n_items, users numbered by list position)."""
    lens = np.array([len(h) for h in histories])
    users = np.arange(len(histories))
    has_eval = lens >= 3
    if not has_eval.any():
        raise SlimcartError(f"data {name}: no user has the 3+ interactions the DIN protocol needs")
    n_train = np.where(has_eval, lens - 3, np.maximum(lens - 1, 0))  # targets t = 1 .. n-3 (all for short users)
    u_train = np.repeat(users, n_train)
    t_train = np.concatenate([np.arange(1, k + 1) for k in n_train]) if n_train.sum() else np.zeros(0, np.int64)
    flat = np.concatenate(histories).astype(np.int64)
    offsets = np.r_[0, np.cumsum(lens)[:-1]]

    def positives(u, t):
        sparse = np.stack([u + 1, flat[offsets[u] + t]], 1).astype(np.int64)
        return Rows(sparse, np.ones(len(u), np.float32), None, u.astype(np.int64), t.astype(np.int64))

    ev = users[has_eval]
    seen = np.unique(np.repeat(users, lens) * (n_items + 1) + flat)
    tables = {"user": len(histories) + 1, "item": n_items + 1}
    train_items = np.concatenate([h[:-2] if len(h) >= 3 else h for h in histories])
    freq = {"emb_user": np.r_[0, n_train], "emb_item": np.bincount(train_items, minlength=n_items + 1)}
    data = CTRData(name, None, tables, ["user", "item"], positives(u_train, t_train), None, None, freq,
                   "user: training positives of the user; item: occurrences among training interactions",
                   history_table="item", target_field=1, flat=flat, offsets=offsets, seen=seen)
    rng = np.random.default_rng(0)
    data.valid = with_negatives(data, positives(ev, lens[ev] - 2), rng)
    data.test = with_negatives(data, positives(ev, lens[ev] - 1), rng)
    data.info = DataInfo(
        name=name, synthetic=synthetic, n=len(data.test),
        split=f"DIN protocol: each of {len(ev)} users' last item vs 1 sampled unseen item (test, seed 0); "
              f"second-last = validation; {len(u_train)} earlier positions train (negatives redrawn at every training step)")
    return data


# ---------------------------------------------------------------- field data
def encode_fields(train: pd.DataFrame, others: list[pd.DataFrame], min_count: int = MIN_COUNT):
    """Per column: rows for values seen >= min_count times in train (most frequent first), 0 for the rest."""
    tables, freqs, enc = {}, {}, [np.zeros((len(d), train.shape[1]), np.int64) for d in (train, *others)]
    for j, col in enumerate(train.columns):
        counts = train[col].value_counts(sort=False)
        kept = counts[counts >= min_count]
        kept = kept.iloc[np.lexsort((kept.index.astype(str), -kept.to_numpy()))]  # hot first, ties by value
        index = pd.Index(kept.index)
        for e, d in zip(enc, (train, *others)):
            e[:, j] = index.get_indexer(d[col]) + 1  # -1 (not kept) -> row 0
        tables[col] = len(kept) + 1
        freqs[f"emb_{col}"] = np.r_[counts.sum() - kept.sum(), kept.to_numpy()].astype(np.int64)
    return tables, freqs, enc


def stratified_holdout(labels: np.ndarray, share: float, seed: int = 0) -> np.ndarray:
    """Boolean mask of a seeded random `share` of rows, the same share of each label."""
    rng, mask = np.random.default_rng(seed), np.zeros(len(labels), bool)
    for v in np.unique(labels):
        idx = np.flatnonzero(labels == v)
        mask[rng.choice(idx, int(round(share * len(idx))), replace=False)] = True
    return mask


def field_data(name: str, frames: dict[str, pd.DataFrame], labels: dict[str, np.ndarray],
               dense: dict[str, np.ndarray] | None, split: str) -> CTRData:
    """Encode train/valid/test frames of categorical columns (+ numeric arrays) into CTRData."""
    tables, freqs, (tr, va, te) = encode_fields(frames["train"], [frames["valid"], frames["test"]])
    d = dense or {}
    rows = {k: Rows(e, labels[k].astype(np.float32), d.get(k)) for k, e in zip(("train", "valid", "test"), (tr, va, te))}
    for k, r in rows.items():
        if r.label.min() == r.label.max():
            raise SlimcartError(f"data {name}: the {k} split has only {'clicks' if r.label[0] else 'non-clicks'}")
    info = DataInfo(name=name, synthetic=False, n=len(te), split=split)
    return CTRData(name, info, tables, list(tables), rows["train"], rows["valid"], rows["test"], freqs,
                   f"training rows holding each value (row 0: values seen < {MIN_COUNT} times)",
                   n_dense=0 if dense is None else rows["train"].dense.shape[1])


def read_libfm(path: Path) -> tuple[np.ndarray, np.ndarray]:
    """`label idx:1 idx:1 ...` lines with the same number of features -> (labels, (N, F) feature ids)."""
    try:
        lines = path.read_text(encoding="utf-8").split("\n")
        parts = [ln.split() for ln in lines if ln.strip()]
        labels = np.array([int(p[0]) for p in parts])
        ids = np.array([[int(t.split(":")[0]) for t in p[1:]] for p in parts], np.int64)
    except (ValueError, UnicodeDecodeError, IndexError):
        raise SlimcartError(f"{path}: every line must be 'label id:value id:value ...' with integer ids") from None
    if not len(parts) or ids.ndim != 2 or not set(np.unique(labels)) <= {0, 1}:
        raise SlimcartError(f"{path}: needs rows with a 0/1 label and the same number of features on every line")
    return labels, ids


def libfm_data(folder: Path) -> CTRData:
    """train.fm.txt / test.fm.txt (+ featindex.fm.txt naming each feature's field)."""
    y_tr, x_tr = read_libfm(folder / "train.fm.txt")
    y_te, x_te = read_libfm(folder / "test.fm.txt")
    if x_tr.shape[1] != x_te.shape[1]:
        raise SlimcartError(f"{folder}: train and test rows have {x_tr.shape[1]} and {x_te.shape[1]} features")
    names = [f"f{j}" for j in range(x_tr.shape[1])]
    index = folder / "featindex.fm.txt"
    if index.exists():
        fi = pd.read_csv(index, sep="\t", header=None, names=["feature", "id"], dtype={"feature": str}, quoting=3)
        field_of = pd.Series(fi["feature"].str.split(":").str[0].str.lower().to_numpy(), index=fi["id"].to_numpy())
        names = list(field_of.reindex(x_tr[0]).fillna("?"))
        if not all(n.isidentifier() for n in names) or len(set(names)) != len(names):
            raise SlimcartError(f"{index}: the features of a row must come from distinct, named fields")
    mask = stratified_holdout(y_tr, VALID_SHARE)
    cols = lambda x: pd.DataFrame(x, columns=names)  # noqa: E731
    frames = {"train": cols(x_tr[~mask]), "valid": cols(x_tr[mask]), "test": cols(x_te)}
    labels = {"train": y_tr[~mask], "valid": y_tr[mask], "test": y_te}
    return field_data(folder.name, frames, labels, None,
                      f"test.fm.txt ({len(y_te)} rows, {int(y_te.sum())} clicks); validation = stratified 20% of "
                      f"train.fm.txt (seed 0, {int(labels['valid'].sum())} clicks)")


CRITEO_NUMERIC, CRITEO_CATEGORICAL = 13, 26


def read_criteo(path: Path) -> tuple[np.ndarray, pd.DataFrame, np.ndarray]:
    """Criteo layout (tab-separated label, I1..I13, C1..C26, no header) -> (labels, categoricals, numeric)."""
    try:
        df = pd.read_csv(path, sep="\t", header=None, dtype=str, keep_default_na=False, quoting=3)
    except pd.errors.EmptyDataError:
        raise SlimcartError(f"data file {path} is empty") from None
    except (pd.errors.ParserError, UnicodeDecodeError) as e:
        raise SlimcartError(f"cannot read {path}: {str(e).splitlines()[0]}") from None
    want = 1 + CRITEO_NUMERIC + CRITEO_CATEGORICAL
    if df.shape[1] != want or not df[0].isin(["0", "1"]).all():
        raise SlimcartError(f"{path}: Criteo layout needs {want} tab-separated columns "
                            f"(0/1 label, {CRITEO_NUMERIC} numeric, {CRITEO_CATEGORICAL} categorical); got {df.shape[1]}")
    num = df.iloc[:, 1:1 + CRITEO_NUMERIC].apply(pd.to_numeric, errors="coerce")
    bad = num.isna() & (df.iloc[:, 1:1 + CRITEO_NUMERIC] != "")
    if bad.any().any():
        r, c = np.argwhere(bad.to_numpy())[0]
        raise SlimcartError(f"{path}: row {r + 1} has a non-numeric value in numeric column I{c + 1}")
    x = num.to_numpy(np.float64)
    dense = np.nan_to_num(np.sign(x) * np.log1p(np.abs(x))).astype(np.float32)  # heavy-tailed counts
    cat = df.iloc[:, 1 + CRITEO_NUMERIC:].set_axis([f"c{j + 1}" for j in range(CRITEO_CATEGORICAL)], axis=1)
    return df[0].astype(int).to_numpy(), cat, dense


def criteo_data(path: Path) -> CTRData:
    """A folder with train/test(+dev) files in Criteo layout, or one such file split 80/10/10 (seed 0)."""
    if path.is_dir():
        files = {k: next((path / f"{k}{s}" for s in (".csv", ".tsv", ".txt") if (path / f"{k}{s}").exists()), None)
                 for k in ("train", "dev", "test")}
        if files["train"] is None or files["test"] is None:
            raise SlimcartError(f"{path}: a Criteo-layout folder needs train.csv and test.csv (dev.csv optional)")
        parts = {k: read_criteo(f) for k, f in files.items() if f is not None}
        if "dev" not in parts:
            y, c, d = parts["train"]
            m = stratified_holdout(y, 0.1)
            parts["train"], parts["dev"] = (y[~m], c[~m], d[~m]), (y[m], c[m], d[m])
        split = "test file; validation = dev file" if files["dev"] else "test file; validation = 10% of train (seed 0)"
    else:
        y, c, d = read_criteo(path)
        order = np.random.default_rng(0).permutation(len(y))
        cut = [order[: int(0.8 * len(y))], order[int(0.8 * len(y)): int(0.9 * len(y))], order[int(0.9 * len(y)):]]
        parts = {k: (y[i], c.iloc[i], d[i]) for k, i in zip(("train", "dev", "test"), cut)}
        split = "random 80/10/10 train/validation/test rows (seed 0)"
    keys = {"train": "train", "valid": "dev", "test": "test"}
    return field_data(path.name if path.is_dir() else path.stem,
                      {k: parts[v][1].reset_index(drop=True) for k, v in keys.items()},
                      {k: parts[v][0] for k, v in keys.items()}, {k: parts[v][2] for k, v in keys.items()},
                      f"{split}; {len(parts['test'][0])} test rows, {int(parts['test'][0].sum())} clicks")


def is_criteo_file(path: Path) -> bool:
    """Whether the first line looks like a click log in Criteo layout (20+ tab-separated columns; a
    `user item` log has 2-4): such files are then held to the exact layout, with one clear error."""
    try:
        with open(path, encoding="utf-8", errors="replace") as f:
            return f.readline().count("\t") >= 20
    except OSError:
        return False
