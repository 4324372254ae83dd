"""Session-based recommendation: predict the next click of an anonymous browsing session (GRU4Rec).

Model: a GRU4Rec trained by `slimcart train --workload session` (alias `gru4rec` = the default
checkpoint folder), or any folder with config.json + model.safetensors.
Data: Diginetica (CIKM Cup 2016) in the common SR-GNN preprocessing: `train_sessions.txt` (one
session a line, item ids >= 1 in click order, sessions in time order) and `test_prefixes.tsv`
(`prefix<TAB>target`, the last weeks' sessions cut into every prefix -> next click). A user's folder
in that format works too; without a test file (or given one sessions .txt), the last 10% of the
sessions become test sessions, cut into prefixes the same way.
Split: test = the test prefixes (never used for training, validation or calibration); validation =
every prefix of the last 10% of the training sessions (the most recent ones); training = the rest.
Metrics: HR@20 (share of rows whose next click is in the top 20) and MRR@20 (mean 1/rank, 0 beyond
20), ranking the target against ALL items; items already clicked in the session stay ranked
(repeat clicks are common and the standard protocol keeps them). Ties count against the target.
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
import torch.nn.functional as F

from ..contracts import BenchInputs, DataInfo, EvalResult, ModelBundle
from ..errors import SlimcartError
from ..models.gru4rec import GRU4Rec, GRU4RecConfig, actual_config, load_gru4rec, right_align, save_gru4rec
from ..paths import resolve_dataset

DATASET = "sessions-diginetica"
ALIAS = "gru4rec"
TRAIN_FILE, TEST_FILE = "train_sessions.txt", "test_prefixes.tsv"
K = 20
SERVING_BATCH = 256
VAL_FRACTION = 0.1  # newest share of training sessions held out for early stopping
TEST_FRACTION = 0.1  # newest share of a sessions file that has no test file
VAL_ROWS_PER_EPOCH = 10_000  # fixed sample of validation rows scored after every epoch
# Chosen on Diginetica validation HR@20 (see docs/session.md for the measured comparison).
TRAIN_DEFAULTS = {
    "max_len": 50, "emb_dim": 100, "hidden": 100, "tied": False, "dropout_emb": 0.0, "dropout_hidden": 0.0,
    "lr": 2e-3, "batch": 128, "negatives": 2048, "alpha": 0.5, "patience": 2, "max_minutes": 12.0, "threads": 1,
}


def _home() -> Path:
    return Path(os.environ.get("SLIMCART_HOME") or "~/.cache/slimcart").expanduser()


def checkpoint_dir(name: str) -> Path:
    """$SLIMCART_HOME (or ~/.cache/slimcart) / session / gru4rec-<dataset name>."""
    return _home() / "session" / f"gru4rec-{name}"


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


def split_sessions(sessions: list[np.ndarray], prefixes, targets, name: str, synthetic: bool, source: str) -> SessionData:
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
    info = DataInfo(name=name, synthetic=synthetic, n=len(prefixes),
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
                              TEST_FILE if test[0] is not None else TRAIN_FILE)
    if path.suffix.lower() != ".txt":
        raise SlimcartError(f"{path}: session data is a folder with {TRAIN_FILE} (+ {TEST_FILE}) or one sessions .txt file")
    return split_sessions(read_sessions(path), None, None, dataset_name(path), False, path.name)


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


def target_ranks(scores: np.ndarray, targets: np.ndarray) -> np.ndarray:
    """0-based rank of each target among items 1..n (column 0, padding, is left out).
    Ties count against the target; NaN scores count as -inf."""
    s = np.nan_to_num(np.asarray(scores, np.float32)[:, 1:], nan=-np.inf)
    t = s[np.arange(len(s)), np.asarray(targets) - 1][:, None]
    return ((s > t).sum(1) + (s == t).sum(1) - 1).astype(np.int64)


def hit_rate(ranks: np.ndarray, k: int = K) -> float:
    return float(np.mean(ranks < k))


def reciprocal_ranks(ranks: np.ndarray, k: int = K) -> np.ndarray:
    """Per row 1/(rank + 1) if the target is in the top k, else 0 (MRR@k is their mean)."""
    return np.where(ranks < k, 1.0 / (ranks + 1.0), 0.0)


def rank_rows(score_fn: Callable[[np.ndarray], np.ndarray], prefixes: list[np.ndarray], targets: np.ndarray,
              max_len: int, n_items: int, batch: int = SERVING_BATCH) -> np.ndarray:
    """Ranks of each row's target, rows scored in batches of similar length (less padding), returned in row order."""
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
    return {"hr@20": hit_rate(ranks), "mrr@20": float(reciprocal_ranks(ranks).mean())}


class SessionTorchRunner:
    """A GRU4Rec in eager PyTorch: {"seq": (B, L) prefixes, 0-padded left or right} -> (B, n_items + 1) scores."""

    runtime = "torch"

    def __init__(self, module: torch.nn.Module):
        self.module = module.eval()
        self.n_items = getattr(getattr(module, "item_emb", None), "num_embeddings", 0) - 1 or None

    def __call__(self, batch: dict) -> np.ndarray:
        if not isinstance(batch, dict) or "seq" not in batch:
            raise SlimcartError("session model input must be a dict with 'seq'")
        seq = torch.from_numpy(check_prefixes(batch["seq"], self.n_items))
        with torch.inference_mode():
            return self.module(seq).float().numpy()


# ---------------------------------------------------------------- workload
class SessionWorkload:
    name = "session"
    quality_keys = ("hr@20", "mrr@20")
    higher_is_better = {"hr@20": True, "mrr@20": True}
    primary_metric = "hr@20"
    serving_batch = SERVING_BATCH

    # ---------------------------------------------------------------- model
    def load_model(self, spec: str) -> ModelBundle:
        """`gru4rec` = the default checkpoint for the current data; else a folder with config.json + model.safetensors."""
        if spec == ALIAS:
            folder = checkpoint_dir(dataset_name(resolve_dataset(None, DATASET)))
            if not (folder / "model.safetensors").exists():
                raise SlimcartError(f"no trained GRU4Rec at {folder}: run `slimcart train --workload session` first "
                                    "(or pass a model folder)")
        else:
            folder = Path(spec).expanduser()
            if not folder.is_dir():
                raise SlimcartError(f"unknown model '{spec}': not the alias '{ALIAS}' and no such folder")
        if not ((folder / "config.json").is_file() and (folder / "model.safetensors").is_file()):
            raise SlimcartError(f"model folder {folder} needs config.json and model.safetensors")
        try:
            module, cfg = load_gru4rec(folder)
        except Exception as e:  # corrupt JSON/safetensors, shape mismatch: one line, not a traceback
            raise SlimcartError(f"cannot load GRU4Rec from {folder}: {str(e).splitlines()[0]}") from None
        return ModelBundle(name=spec, module=module, source=folder, extra={"config": cfg})

    def load_companions(self, folder: Path) -> ModelBundle:
        """The config.json beside an exported model (ONNX, ...): what inputs need (max_len, n_items)."""
        f = Path(folder) / "config.json"
        try:
            cfg = json.loads(f.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            raise SlimcartError(f"{f} is missing or not valid JSON") from None
        if not isinstance(cfg, dict) or cfg.get("model_type") != "gru4rec" or not isinstance(cfg.get("model"), dict):
            raise SlimcartError(f"{f} is not a GRU4Rec config")
        return ModelBundle(name=str(folder), module=None, source=Path(folder), extra={"config": cfg})

    def save_model(self, bundle: ModelBundle, folder: Path) -> None:
        """model.safetensors + config.json (training record carried over from the source config)."""
        Path(folder).mkdir(parents=True, exist_ok=True)
        save_gru4rec(bundle.module, Path(folder), self._extra(bundle))

    def save_companions(self, bundle: ModelBundle, folder: Path) -> None:
        """config.json for `load_companions`, describing the (possibly pruned) weights."""
        cfg = {"model_type": "gru4rec", **self._extra(bundle), "model": self.config(bundle).to_dict()}
        Path(folder).mkdir(parents=True, exist_ok=True)
        (Path(folder) / "config.json").write_text(json.dumps(cfg, indent=2))

    @staticmethod
    def _extra(bundle: ModelBundle) -> dict:
        return {k: v for k, v in bundle.extra.get("config", {}).items() if k not in ("model_type", "model")}

    @staticmethod
    def config(bundle: ModelBundle) -> GRU4RecConfig:
        if isinstance(bundle.module, GRU4Rec):
            return actual_config(bundle.module)
        return GRU4RecConfig.from_dict(bundle.extra.get("config", {}).get("model", {"n_items": 0}))

    def torch_runner(self, bundle: ModelBundle) -> SessionTorchRunner:
        return SessionTorchRunner(bundle.module)

    def example_batch(self, bundle: ModelBundle) -> dict:
        """Two fixed prefixes (3 and 7 clicks), right-padded, with valid item ids."""
        n = max(1, self.config(bundle).n_items)
        return {"seq": pad_right([np.arange(3) % n + 1, np.arange(5, 12) % n + 1], 50)}

    def export_spec(self, bundle: ModelBundle) -> dict:
        return {"example": self.example_batch(bundle), "output_name": "scores", "model_type": None,
                "dynamic_axes": {"seq": {0: "batch", 1: "length"}, "scores": {0: "batch"}}}

    # ---------------------------------------------------------------- data
    def load_data(self, data: str | None) -> SessionData:
        return load_sessions(data)

    def data_info(self, data: SessionData) -> DataInfo:
        return data.info

    def bench_inputs(self, bundle: ModelBundle, data: SessionData) -> BenchInputs:
        """Test prefixes in arrival order: 64 single requests, 16 batches of 256 (padded to each batch's longest)."""
        L, rng = self.config(bundle).max_len, np.random.default_rng(0)
        rows = rng.permutation(len(data.test_prefixes))
        pick = [data.test_prefixes[i] for i in rows[: SERVING_BATCH * 16]]
        single = [{"seq": pad_right([p], L)} for p in pick[:64]]
        serving = [{"seq": pad_right(pick[i:i + SERVING_BATCH], L)} for i in range(0, len(pick), SERVING_BATCH)]
        serving = [b for b in serving if len(b["seq"]) == SERVING_BATCH] or serving[:1]
        return BenchInputs(single=single, serving=serving, items_per_serving_batch=len(serving[0]["seq"]), unit="sessions",
                           single_label="one session prefix")

    def calibration_batches(self, bundle: ModelBundle, data: SessionData, n: int) -> list[dict]:
        """`n` batches of 64 whole training sessions (right-padded; never validation or test sessions)."""
        L = self.config(bundle).max_len
        order = np.random.default_rng(1).permutation(len(data.train))[: n * 64]
        return [{"seq": pad_right([data.train[i][:L + 1] for i in order[a:a + 64]], L + 1)} for a in range(0, len(order), 64)][:n]

    # ---------------------------------------------------------------- quality
    def evaluate(self, runner, bundle: ModelBundle, data: SessionData, reference: Any = None) -> EvalResult:
        """HR@20 / MRR@20 over all items on every test row; outputs["ranks"] = each row's 0-based target
        rank (row order = the test file's), for paired comparisons (e.g. `bench.paired_bootstrap`)."""
        ranks = rank_rows(lambda seq: runner({"seq": seq}), data.test_prefixes, data.test_targets, self.config(bundle).max_len, data.n_items)
        return EvalResult(quality=quality(ranks), outputs={"ranks": ranks})

    def evaluate_rows(self, model: torch.nn.Module, prefixes, targets, n_items: int) -> dict[str, float]:
        """HR@20 / MRR@20 of a torch model on given rows (validation)."""
        with torch.inference_mode():
            ranks = rank_rows(lambda b: model(torch.from_numpy(b)).numpy(), prefixes, targets,
                              getattr(model, "config", GRU4RecConfig(0)).max_len, n_items)
        return quality(ranks)

    def task_loss(self, bundle: ModelBundle):
        """Next-click cross-entropy (full softmax over all items) at every position of a batch of whole
        sessions such as `calibration_batches` gives; rows may be padded on either side."""
        def loss(module, batch):
            seq, _ = right_align(torch.as_tensor(batch["seq"]))
            inp, tgt = seq[:, :-1], seq[:, 1:]
            h, _ = module.encode(inp)
            W, b = module.output_table()
            mask = tgt > 0
            return F.cross_entropy(F.linear(h[mask], W[1:], b[1:]), tgt[mask] - 1)
        return loss

    def distill_task(self, teacher, student, bundle: ModelBundle, data: SessionData, options: Any = None):
        from .session_distill import SessionDistillTask

        return SessionDistillTask(teacher, student, data, options)

    # ---------------------------------------------------------------- training
    def train(self, data: str | SessionData | None = None, out: Path | None = None, epochs: int = 200, seed: int = 0,
              progress: Callable[[str], None] | None = None, resume: bool = True, **overrides) -> Path:
        """Train GRU4Rec on the training sessions; early-stops on validation HR@20 (patience, `max_minutes`
        wall-clock budget); returns the model folder. Each finished epoch is checkpointed to
        `<out>.partial` and a rerun with the same data and settings resumes after it."""
        from ..models.gru4rec_fit import fit

        hp = {**TRAIN_DEFAULTS, **overrides}
        if set(hp) != set(TRAIN_DEFAULTS):
            raise SlimcartError(f"unknown training option(s): {', '.join(sorted(set(hp) - set(TRAIN_DEFAULTS)))}")
        if epochs < 1:
            raise SlimcartError(f"epochs must be at least 1, got {epochs}")
        d = data if isinstance(data, SessionData) else self.load_data(data)
        out = Path(out).expanduser() if out else checkpoint_dir(d.name)
        val_in, val_tgt = d.validation_rows(VAL_ROWS_PER_EPOCH)
        hidden = hp["hidden"] if isinstance(hp["hidden"], list) else [int(hp["hidden"])]
        config = GRU4RecConfig(n_items=d.n_items, emb_dim=hp["emb_dim"], hidden=hidden, tied=hp["tied"],
                               dropout_emb=hp["dropout_emb"], dropout_hidden=hp["dropout_hidden"], max_len=hp["max_len"])
        meta = {"dataset": d.name, "n_sessions": len(d.train), "n_items": d.n_items, "val_rows": len(val_in)}
        return fit(config, d.train, lambda m: self.evaluate_rows(m, val_in, val_tgt, d.n_items), out, hp, epochs=epochs,
                   seed=seed, progress=progress or (lambda m: None), resume=resume, meta=meta)


WORKLOAD_CLASS = SessionWorkload
