"""Session data for the session workload: reading Diginetica-format files, the time-ordered
train / validation / test split, synthetic sessions, padding/checking model inputs, and ranking rows.

Files: `train_sessions.txt` (one session a line, item ids >= 1 in click order, sessions in time
order) and `test_prefixes.tsv` (header `prefix<TAB>target`, each row a prefix and its next click).
Split: test = the test prefixes (or, without that file, every prefix of the newest 10% of the
sessions); validation = every prefix of the newest 10% of the remaining sessions; training = the rest.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np

from ..contracts import DataInfo
from ..errors import SlimcartError
from ..paths import resolve_dataset
from .ranking import SERVING_BATCH, hit_rate, mrr_at, target_ranks

DATASET = "sessions-diginetica"
TRAIN_FILE, TEST_FILE = "train_sessions.txt", "test_prefixes.tsv"
VAL_FRACTION = 0.1  # newest share of training sessions held out for early stopping
TEST_FRACTION = 0.1  # newest share of a sessions file that has no test file
K = 20  # HR@20 / MRR@20


def dataset_name(path: Path | None) -> str:
    return "synthetic" if path is None else (path.name if path.is_dir() else path.stem)


# ---------------------------------------------------------------- reading
def _ids(tokens: list[str], where: str) -> np.ndarray:
    if not tokens or not all(t.isdigit() for t in tokens):
        raise SlimcartError(f"{where}: expected item ids (integers >= 1) separated by spaces")
    ids = np.array(tokens, np.int64)
    if ids.min() < 1:
        raise SlimcartError(f"{where}: item id 0 is reserved for padding (ids start at 1)")
    return ids


def _lines(path: Path) -> list[str]:
    try:
        return path.read_text(encoding="utf-8").splitlines()
    except UnicodeDecodeError:
        raise SlimcartError(f"{path} is not UTF-8 text") from None
    except OSError as e:
        raise SlimcartError(f"cannot read {path}: {e.strerror}") from None


def read_sessions(path: Path) -> list[np.ndarray]:
    """One session a line (item ids in click order); blank lines are skipped."""
    sessions = [_ids(line.split(), f"{path} line {i + 1}") for i, line in enumerate(_lines(path)) if line.strip()]
    if not sessions:
        raise SlimcartError(f"{path} has no sessions")
    return sessions


def read_prefixes(path: Path) -> tuple[list[np.ndarray], np.ndarray]:
    """`prefix<TAB>target` rows after a header line -> (prefixes, targets)."""
    lines = _lines(path)
    if not lines or lines[0].strip().split("\t") != ["prefix", "target"]:
        raise SlimcartError(f"{path}: the first line must be the header 'prefix<TAB>target'")
    prefixes, targets = [], []
    for i, line in enumerate(lines[1:], start=2):
        if not line.strip():
            continue
        parts = line.split("\t")
        if len(parts) != 2:
            raise SlimcartError(f"{path} line {i}: expected 'prefix<TAB>target'")
        prefixes.append(_ids(parts[0].split(), f"{path} line {i}"))
        targets.append(_ids(parts[1].split(), f"{path} line {i} (target)"))
        if len(targets[-1]) != 1:
            raise SlimcartError(f"{path} line {i}: the target must be one item id")
    if not prefixes:
        raise SlimcartError(f"{path} has no rows")
    return prefixes, np.concatenate(targets)


def all_prefixes(sessions: list[np.ndarray]) -> tuple[list[np.ndarray], np.ndarray]:
    """Every (first k clicks, click k+1) of every session, k = 1..len-1."""
    prefixes = [s[:k] for s in sessions for k in range(1, len(s))]
    targets = np.array([s[k] for s in sessions for k in range(1, len(s))], np.int64)
    return prefixes, targets


def synthetic_sessions(seed: int = 0, n_sessions: int = 3000, n_items: int = 240, series_len: int = 8) -> list[np.ndarray]:
    """Sessions with learnable order: items form series of `series_len` consecutive ids; a session
    starts somewhere in a series (popular series more often) and mostly clicks the next item of it,
    sometimes another item of the same series, rarely a random item."""
    rng = np.random.default_rng(seed)
    n_series = n_items // series_len
    pop = 1.0 / np.arange(1, n_series + 1)
    out = []
    for _ in range(n_sessions):
        series, step = int(rng.choice(n_series, p=pop / pop.sum())), int(rng.integers(series_len))
        clicks = []
        for _ in range(int(rng.integers(2, 10))):
            r = rng.random()
            if r < 0.1:
                clicks.append(int(rng.integers(1, n_items + 1)))
                continue
            step = (step + 1) % series_len if r < 0.8 else int(rng.integers(series_len))
            clicks.append(series * series_len + step + 1)
        out.append(np.array(clicks, np.int64))
    return out


# ---------------------------------------------------------------- data
@dataclass
class SessionData:
    train: list[np.ndarray]  # training sessions without the validation ones
    valid: list[np.ndarray]  # newest training sessions (early stopping, distillation validation)
    test_prefixes: list[np.ndarray]
    test_targets: np.ndarray
    n_items: int
    name: str
    info: DataInfo

    def validation_rows(self, limit: int | None = None, seed: int = 0) -> tuple[list[np.ndarray], np.ndarray]:
        """Every prefix -> next click of the validation sessions, or a fixed sample of `limit` of them."""
        prefixes, targets = all_prefixes(self.valid)
        if limit is not None and len(prefixes) > limit:
            keep = np.sort(np.random.default_rng(seed).choice(len(prefixes), limit, replace=False))
            prefixes, targets = [prefixes[i] for i in keep], targets[keep]
        return prefixes, targets


def split_sessions(sessions: list[np.ndarray], prefixes, targets, name: str, synthetic: bool, source: str,
                   path: Path | None = None) -> SessionData:
    """Hold out the newest VAL_FRACTION of the training sessions; test = the given prefixes, or the
    newest TEST_FRACTION of the sessions cut into prefixes when none are given."""
    if prefixes is None:
        n_test = max(1, int(round(len(sessions) * TEST_FRACTION)))
        sessions, test_sessions = sessions[:-n_test], sessions[-n_test:]
        prefixes, targets = all_prefixes(test_sessions)
        source += f"; test = every prefix of the newest {n_test} sessions"
    usable = [s for s in sessions if len(s) >= 2]
    n_val = int(round(len(usable) * VAL_FRACTION))
    if n_val < 1 or len(usable) - n_val < 1 or not len(prefixes):
        raise SlimcartError(f"{name}: too few sessions of 2+ clicks to hold out validation and test data")
    train, valid = usable[:-n_val], usable[-n_val:]
    n_items = int(max(max(int(s.max()) for s in sessions), int(targets.max()), max(int(p.max()) for p in prefixes)))
    info = DataInfo(name=name, synthetic=synthetic, n=len(prefixes), source=path,
                    split=f"test: {len(prefixes)} prefix -> next-click rows ({source}), all rows scored; ranking over "
                          f"all {n_items} items, session's own clicks kept; validation: every prefix of the newest "
                          f"{n_val} training sessions; training: the other {len(train)} sessions")
    return SessionData(train, valid, prefixes, np.asarray(targets, np.int64), n_items, name, info)


def load_sessions(data: str | None) -> SessionData:
    path = resolve_dataset(data, DATASET)
    if path is None:
        return split_sessions(synthetic_sessions(0), None, None, "synthetic", True, "SYNTHETIC sessions")
    if path.is_dir():
        if not (path / TRAIN_FILE).is_file():
            raise SlimcartError(f"no {TRAIN_FILE} in {path} (one session a line, item ids separated by spaces)")
        sessions = read_sessions(path / TRAIN_FILE)
        test = read_prefixes(path / TEST_FILE) if (path / TEST_FILE).is_file() else (None, None)
        return split_sessions(sessions, *test, dataset_name(path), False,
                              TEST_FILE if test[0] is not None else TRAIN_FILE, path)
    if path.suffix.lower() != ".txt":
        raise SlimcartError(f"{path}: session data is a folder with {TRAIN_FILE} (+ {TEST_FILE}) or one sessions .txt file")
    return split_sessions(read_sessions(path), None, None, dataset_name(path), False, path.name, path)


# ---------------------------------------------------------------- inputs and metrics
def pad_right(prefixes: list[np.ndarray], max_len: int) -> np.ndarray:
    """(B, longest) int64: each prefix's newest `max_len` clicks at the start of its row, zeros after."""
    rows = [p[-max_len:] for p in prefixes]
    out = np.zeros((len(rows), max(1, max(len(r) for r in rows))), np.int64)
    for i, r in enumerate(rows):
        out[i, :len(r)] = r
    return out


def check_prefixes(seq: Any, n_items: int | None) -> np.ndarray:
    """The batch's `seq` as (B, L) int64, refused with one line unless every row is a contiguous run of
    item ids padded with zeros on one side."""
    seq = np.asarray(seq)
    if seq.ndim != 2 or not np.issubdtype(seq.dtype, np.integer) or seq.size == 0:
        raise SlimcartError(f"session input 'seq' must be a non-empty 2-D integer array, got {seq.dtype} {seq.shape}")
    seq = seq.astype(np.int64, copy=False)
    if seq.min() < 0 or (n_items is not None and seq.max() > n_items):
        raise SlimcartError(f"session input has item ids outside 0..{n_items} (0 = padding)")
    present = seq > 0
    n = present.sum(1)
    if (n == 0).any():
        raise SlimcartError("session input has an empty prefix (a row of padding only)")
    j = np.arange(seq.shape[1])
    left, right = present == (j >= seq.shape[1] - n[:, None]), present == (j < n[:, None])
    if not (left.all(1) | right.all(1)).all():
        raise SlimcartError("session input rows must be clicks padded with zeros on one side only")
    return seq


def rank_rows(score_fn: Callable[[np.ndarray], np.ndarray], prefixes: list[np.ndarray], targets: np.ndarray,
              max_len: int, n_items: int, batch: int = SERVING_BATCH) -> np.ndarray:
    """0-based rank of each row's target among all items (the session's own clicks stay ranked: repeat
    clicks are common and the standard protocol keeps them), in row order. Rows are scored in batches
    of similar length (less padding), right-padded."""
    order = np.argsort([min(len(p), max_len) for p in prefixes], kind="stable")
    ranks = np.empty(len(prefixes), np.int64)
    for a in range(0, len(order), batch):
        rows = order[a:a + batch]
        scores = np.asarray(score_fn(pad_right([prefixes[i] for i in rows], max_len)))
        if scores.ndim != 2 or scores.shape != (len(rows), n_items + 1):
            raise SlimcartError(f"model returned scores of shape {scores.shape}, expected ({len(rows)}, {n_items + 1}): "
                                "was it trained on this item catalogue?")
        ranks[rows] = target_ranks(scores, targets[rows])
    return ranks


def quality(ranks: np.ndarray) -> dict[str, float]:
    """HR@20 and MRR@20 of target ranks."""
    return {"hr@20": hit_rate(ranks, K), "mrr@20": mrr_at(ranks, K)}
