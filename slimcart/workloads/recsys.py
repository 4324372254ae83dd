"""Sequential recommendation: predict each user's next item from their history with SASRec.

Model: a SASRec trained by `slimcart train --workload recsys` (alias `sasrec` = the default
checkpoint folder), or any folder with config.json + model.safetensors (or model.onnx).
Data: Amazon Video Games 5-core (`Video.txt`, `user item` per line, time-ordered per user), or a
user's .txt (two ints per line) / csv / parquet / jsonl with user_id, item_id[, timestamp].
Split: leave-last-out per user (last item = test, second last = validation, rest = training).
Metrics: HR@10 and NDCG@10 ranking the test item against ALL items, with the user's other
already-interacted items removed from the ranking; AUC of the test item vs 100 sampled unseen items.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Callable

import numpy as np
import pandas as pd
import torch

from ..contracts import BenchInputs, DataInfo, DistillOptions, EvalResult, ModelBundle
from ..errors import SlimcartError
from ..models.sasrec import (
    SASRec,
    SASRecConfig,
    actual_config,
    fit,
    load_sasrec,
    save_sasrec,
    sequence_loss,
)
from ..paths import home, resolve_dataset
from ..runtime.torch_runtime import TorchRunner
from . import synthetic
from .io import read_table, require_columns
from .ranking import (
    SERVING_BATCH,
    hit_rate,
    leave_last_out,
    left_pad,
    ndcg_at,
    ndcg_per_user,
    rank_users,
)

DATASET = "recsys-amazon-videogames"
ALIAS = "sasrec"
EVAL_USERS = 5000  # fixed sample keeps one full-ranking evaluation well under 20 s on 2 cores
AUC_NEGATIVES = 100
TOP_KEPT = 100  # per-user top items/scores kept as EvalResult.outputs (full rows would be ~0.5 GB)
# Chosen on Video Games validation NDCG@10: sampled softmax beat one-negative
# BCE (0.05 vs 0.012), 4096 negatives matched 1024 at twice the cost, dropout 0.5 beat 0.2.
TRAIN_DEFAULTS = {
    "max_len": 50, "hidden": 64, "heads": 2, "layers": 2, "dropout": 0.5, "lr": 3e-3, "batch": 128,
    "loss": "sampled_softmax", "negatives": 1024, "patience": 3, "max_minutes": 8.0, "threads": 1,
}


def default_checkpoint_dir(data: str | None = None) -> Path:
    """$SLIMCART_HOME (or ~/.cache/slimcart) / recsys / sasrec-<dataset name>."""
    return _checkpoint_dir(dataset_name(resolve_dataset(data, DATASET)))


def _checkpoint_dir(name: str) -> Path:
    return home() / "recsys" / f"sasrec-{name}"


def dataset_name(path: Path | None) -> str:
    """Folder name, or file stem, or 'synthetic' when no data was found."""
    return "synthetic" if path is None else (path.name if path.is_dir() else path.stem)


# ---------------------------------------------------------------- data
@dataclass
class RecsysData:
    histories: list[np.ndarray]  # per user, every item id (1..n_items) in time order
    n_items: int
    eval_users: np.ndarray  # users evaluated: sampled among those with a test item
    auc_negatives: np.ndarray  # (len(eval_users), AUC_NEGATIVES) items each user never touched
    name: str
    info: DataInfo
    target: str = "test"  # the item scored: "test" (last) or "validation" (second last; validation_data)


def read_interactions(path: Path) -> pd.DataFrame:
    """A user/item(/timestamp) table from Video.txt-style text or a csv/parquet/jsonl file."""
    if path.is_dir():
        suffixes = (".txt", ".csv", ".tsv", ".parquet", ".jsonl")
        files = [f for f in [path / "Video.txt", *sorted(path.iterdir())] if f.is_file() and f.suffix.lower() in suffixes]
        if not files:
            raise SlimcartError(f"no interaction file in {path} (expected Video.txt or a .txt/.csv/.parquet/.jsonl)")
        path = files[0]
    if path.suffix.lower() == ".txt":
        try:
            df = pd.read_csv(path, sep=r"\s+", header=None, dtype=str)
        except pd.errors.EmptyDataError:
            raise SlimcartError(f"data file {path} is empty") from None
        except (UnicodeDecodeError, pd.errors.ParserError, ValueError) as e:
            raise SlimcartError(f"cannot read data file {path}: {str(e).splitlines()[0]}") from None
        if df.shape[1] != 2 or df.isna().any().any() or not df.apply(lambda c: c.str.isdigit()).all().all():
            raise SlimcartError(f"{path}: every line must be two integers 'user item'")
        return pd.DataFrame({"user": df[0].astype(np.int64), "item": df[1].astype(np.int64)})
    df = read_table(path)
    cols = require_columns(df, path, {"user": ("user_id", "user", "userid", "customer_id"),
                                      "item": ("item_id", "item", "itemid", "product_id", "asin")})
    out = pd.DataFrame({"user": df[cols["user"]], "item": df[cols["item"]]})
    ts = next((c for c in df.columns if str(c).lower() in ("timestamp", "time", "ts", "event_time")), None)
    if ts is not None:
        out["ts"] = df[ts]
    out = out.dropna(subset=["user", "item"])
    if out.empty:
        raise SlimcartError(f"data file {path} has no rows with both a user and an item")
    return out


def group_histories(df: pd.DataFrame) -> tuple[list[np.ndarray], int]:
    """Per-user item sequences in time order (file order breaks ties) with items renumbered 1..n."""
    # Mixed ids (e.g. 12 and "A12") cannot be sorted together: compare them as text.
    df = df.assign(order=np.arange(len(df)), **{c: df[c].astype(str) for c in ("user", "item") if df[c].dtype == object})
    df = df.sort_values(["user", "ts", "order"] if "ts" in df else ["user", "order"], kind="stable")
    uniq, codes = np.unique(df["item"].to_numpy(), return_inverse=True)
    _, starts = np.unique(df["user"].to_numpy(), return_index=True)
    return np.split(codes.astype(np.int64) + 1, np.sort(starts)[1:]), len(uniq)


def _sample_negatives(histories, users, n_items: int, k: int, rng) -> np.ndarray:
    out = np.zeros((len(users), k), np.int64)
    for i, u in enumerate(users):
        seen = np.unique(histories[u])
        if n_items - len(seen) < 4 * k:  # tiny catalogues: draw from the unseen set directly
            pool = np.setdiff1d(np.arange(1, n_items + 1), seen)
            out[i] = rng.choice(pool, k, replace=len(pool) < k) if len(pool) else 0
            continue
        got = np.empty(0, np.int64)
        while len(got) < k:
            cand = rng.integers(1, n_items + 1, 2 * k)
            got = np.concatenate([got, cand[~np.isin(cand, seen)]])
        out[i] = got[:k]
    return out


class RecsysWorkload:
    name = "recsys"
    primary_metric = "ndcg@10"
    quality_keys = ("ndcg@10", "hr@10", "auc")
    higher_is_better = {"ndcg@10": True, "hr@10": True, "auc": True}
    serving_batch = SERVING_BATCH

    # ---------------------------------------------------------------- model
    def load_model(self, spec: str) -> ModelBundle:
        """`sasrec` = the default checkpoint folder; else a folder with config.json + model.safetensors."""
        if spec == ALIAS:
            folder = default_checkpoint_dir()
            if not (folder / "model.safetensors").exists():
                raise SlimcartError(
                    f"no trained SASRec at {folder}: run `slimcart train --workload recsys` first (or pass a model folder)")
        else:
            folder = Path(spec).expanduser()
            if not folder.is_dir():
                raise SlimcartError(f"unknown model '{spec}': not the alias '{ALIAS}' and no such folder")
        if not ((folder / "config.json").exists() and (folder / "model.safetensors").exists()):
            raise SlimcartError(f"model folder {folder} needs config.json and model.safetensors")
        try:
            module, cfg = load_sasrec(folder)
        except Exception as e:
            raise SlimcartError(f"cannot load SASRec from {folder}: {str(e).splitlines()[0]}") from None
        return ModelBundle(name=spec, module=module, source=folder, extra={"config": cfg})

    def save_model(self, bundle: ModelBundle, folder: Path) -> None:
        """model.safetensors + config.json (training info carried over from the source config)."""
        folder.mkdir(parents=True, exist_ok=True)
        extra = {k: v for k, v in bundle.extra.get("config", {}).items() if k not in ("model_type", "model")}
        save_sasrec(bundle.module, folder, extra)

    def save_companions(self, bundle: ModelBundle, folder: Path) -> None:
        """config.json next to an exported model (so bench inputs know max_len); one written by
        save_model already describes the (possibly pruned) weights and is kept."""
        if (folder / "config.json").exists():
            return
        cfg = dict(bundle.extra.get("config", {}))
        if isinstance(bundle.module, SASRec):
            cfg.update(model_type="sasrec", model=actual_config(bundle.module).to_dict())
        folder.mkdir(parents=True, exist_ok=True)
        (folder / "config.json").write_text(json.dumps(cfg, indent=2))

    def load_companions(self, folder: Path) -> ModelBundle:
        cfg_file = Path(folder) / "config.json"
        try:
            cfg = json.loads(cfg_file.read_text()) if cfg_file.is_file() else {}
        except (json.JSONDecodeError, UnicodeDecodeError):
            raise SlimcartError(f"{cfg_file} is not valid JSON") from None
        if not isinstance(cfg, dict):
            raise SlimcartError(f"{cfg_file} must be a JSON object")
        return ModelBundle(name=str(folder), module=None, source=Path(folder), extra={"config": cfg})

    def torch_runner(self, bundle: ModelBundle):
        return TorchRunner(bundle.module)

    def table_frequencies(self, bundle: ModelBundle, data: "RecsysData") -> dict[str, np.ndarray]:
        """How often each item appears in the training histories (validation and test items excluded):
        what frequency-aware embedding compression ranks the item table's rows by."""
        train, _, _ = leave_last_out(data.histories)
        return {"item_emb": np.bincount(np.concatenate(train), minlength=data.n_items + 1).astype(np.float64)}

    @staticmethod
    def max_len(bundle: ModelBundle) -> int:
        """History length the model was built for (config.json's model.max_len)."""
        return int(bundle.extra.get("config", {}).get("model", {}).get("max_len", TRAIN_DEFAULTS["max_len"]))

    def example_batch(self, bundle: ModelBundle) -> dict:
        """Two fixed histories (a short and a long one) with valid item ids."""
        n = int(bundle.extra.get("config", {}).get("model", {}).get("n_items", 2))
        return {"seq": left_pad([np.arange(1, 8) % n + 1, np.arange(3, 40) % n + 1], self.max_len(bundle))}

    def export_spec(self, bundle: ModelBundle) -> dict:
        return {"example": self.example_batch(bundle), "dynamic_axes": {"seq": {0: "batch"}, "scores": {0: "batch"}},
                "output_name": "scores", "model_type": None}

    def task_loss(self, bundle: ModelBundle):
        """SASRec's training objective (its sampled softmax or BCE, as configured when trained) on a
        batch of histories: every position predicts the next item; padding is never a target."""
        training = bundle.extra.get("config", {}).get("training", {})
        loss, negatives = training.get("loss", "sampled_softmax"), int(training.get("negatives", 1024))
        gen = torch.Generator().manual_seed(0)

        def rec(module, batch):
            seq = torch.as_tensor(batch["seq"])
            inp, tgt = seq[:, :-1], seq[:, 1:]
            return sequence_loss(module, inp, tgt * (inp > 0), loss, negatives, gen)
        return rec

    def distill_task(self, teacher, student, bundle: ModelBundle, data: "RecsysData", options: DistillOptions):
        """Next-item distribution KL + task loss on the training histories (see recsys_distill.py)."""
        from .recsys_distill import RecsysDistillTask

        return RecsysDistillTask(teacher, student, data, options.losses, options.temperature,
                                 int(options.transfer.get("kd_positions", 4)), seed=options.seed)

    # ---------------------------------------------------------------- data
    def load_data(self, data: str | None) -> RecsysData:
        """Real interactions (or a deterministic synthetic set when none are found), split leave-last-out."""
        path = resolve_dataset(data, DATASET)
        df = synthetic.interactions(0).rename(columns={"user_id": "user", "item_id": "item", "timestamp": "ts"}) \
            if path is None else read_interactions(path)
        histories, n_items = group_histories(df)
        _, _, test = leave_last_out(histories)
        candidates = np.flatnonzero(test)
        if not len(candidates):
            raise SlimcartError(f"data {path}: no user has the 3+ interactions leave-last-out needs")
        rng = np.random.default_rng(0)
        users = np.sort(rng.choice(candidates, min(EVAL_USERS, len(candidates)), replace=False))
        negs = _sample_negatives(histories, users, n_items, AUC_NEGATIVES, rng)
        info = DataInfo(
            name=dataset_name(path), synthetic=path is None, n=len(users), source=path,
            split=f"leave-last-out test item of {len(users)} of {len(candidates)} users (fixed sample, seed 0); "
                  f"full ranking over {n_items} items, history excluded; AUC vs {AUC_NEGATIVES} unseen items",
        )
        return RecsysData(histories, n_items, users, negs, info.name, info)

    def validation_data(self, data: RecsysData, fraction: float = 1.0) -> RecsysData:
        """The same users scored on their validation item (second last; the test item is never an input)
        instead of the test item, for tuning; `fraction` < 1 keeps that share of the user sample. The
        sampled AUC negatives exclude each user's whole history, so they serve both targets."""
        keep = max(1, round(len(data.eval_users) * min(max(fraction, 0.0), 1.0)))
        info = DataInfo(name=data.info.name, synthetic=data.info.synthetic, n=keep, source=data.info.source,
                        split=f"leave-last-out validation item (second last) of {keep} of the {len(data.eval_users)} "
                              "sampled users; the same SASRec early-stopped on it while training")
        return replace(data, eval_users=data.eval_users[:keep], auc_negatives=data.auc_negatives[:keep], info=info,
                       target="validation")

    def data_info(self, data: RecsysData) -> DataInfo:
        return data.info

    # ---------------------------------------------------------------- inputs
    def bench_inputs(self, bundle: ModelBundle, data: RecsysData) -> BenchInputs:
        """Real histories (all but the test item): 64 batch-1 requests and 16 batches of 256 users."""
        L, rng = self.max_len(bundle), np.random.default_rng(0)
        users = rng.permutation(len(data.histories))
        seqs = [data.histories[u][:-1] if len(data.histories[u]) > 1 else data.histories[u] for u in users]
        single = [{"seq": left_pad([s], L)} for s in seqs[:64]]
        serving = [{"seq": left_pad(seqs[i:i + SERVING_BATCH], L)} for i in range(0, SERVING_BATCH * 16, SERVING_BATCH)]
        serving = [b for b in serving if len(b["seq"]) == SERVING_BATCH] or serving[:1]
        return BenchInputs(single=single, serving=serving, items_per_serving_batch=SERVING_BATCH, unit="users")

    def calibration_batches(self, bundle: ModelBundle, data: RecsysData, n: int) -> list[dict]:
        """`n` batches of 64 training histories (never the validation/test items)."""
        train, _, _ = leave_last_out(data.histories)
        order = np.random.default_rng(1).permutation(len(train))
        seqs = [train[u] for u in order[: n * 64]]
        return [{"seq": left_pad(seqs[i:i + 64], self.max_len(bundle))} for i in range(0, len(seqs), 64)][:n]

    # ---------------------------------------------------------------- quality
    def evaluate(self, runner, bundle: ModelBundle, data: RecsysData, reference: Any = None) -> EvalResult:
        """HR@10 / NDCG@10 (full ranking; the user's other past items excluded) and sampled AUC on the
        test item of the fixed user sample. outputs = those users' top-100 items and scores, and the
        test item's rank per user (for paired comparisons between models)."""
        cut = 2 if data.target == "validation" else 1  # the scored item and everything after it are hidden
        inputs = [data.histories[u][:-cut] for u in data.eval_users]
        targets = np.array([data.histories[u][-cut] for u in data.eval_users], np.int64)

        def score(batch):
            out = np.asarray(runner({"seq": batch}))
            if out.ndim != 2 or out.shape[1] != data.n_items + 1:
                raise SlimcartError(f"model scores {out.shape[-1] - 1} items but the data has {data.n_items}: "
                                    "was it trained on this dataset?")
            return out

        r = rank_users(score, inputs, targets, self.max_len(bundle), data.auc_negatives, keep_top=TOP_KEPT)
        quality = {"ndcg@10": ndcg_at(r["ranks"]), "hr@10": hit_rate(r["ranks"]), "auc": r["auc"]}
        return EvalResult(quality=quality, outputs={"users": data.eval_users, "top_items": r["top_items"],
                                                    "top_scores": r["top_scores"], "ranks": r["ranks"]},
                          per_unit=ndcg_per_user(r["ranks"]))

    # ---------------------------------------------------------------- training
    def train(self, data: str | RecsysData | None = None, out: Path | None = None, epochs: int = 200, seed: int = 0,
              progress: Callable[[str], None] | None = None, resume: bool = True, **overrides) -> Path:
        """Train SASRec; early-stops on validation NDCG@10 (patience, time budget); returns the model folder.

        Loss: softmax over the true next item and 1024 shared uniform negatives at every position;
        ~10 CPU-seconds an epoch on Video Games, best validation after ~13 epochs. `max_minutes`
        caps wall time, so on a busy machine training stops earlier with a somewhat weaker model.

        Each finished epoch is checkpointed to `<out>.partial`; with resume=True a rerun with the
        same data and settings continues after the last finished epoch. The final folder is written
        to a temporary folder and renamed into place.
        """
        hp = {**TRAIN_DEFAULTS, **overrides}
        if set(hp) != set(TRAIN_DEFAULTS):
            raise SlimcartError(f"unknown training option(s): {', '.join(sorted(set(hp) - set(TRAIN_DEFAULTS)))}")
        d = data if isinstance(data, RecsysData) else self.load_data(data)
        out = Path(out).expanduser() if out else _checkpoint_dir(d.name)
        train, valid, _ = leave_last_out(d.histories)
        users = d.eval_users  # validation positions of the same fixed user sample keep epochs cheap
        val_in, val_tgt = [train[u] for u in users], valid[users]

        def validate(model: SASRec) -> float:
            with torch.inference_mode():
                r = rank_users(lambda b: model(torch.from_numpy(b)).numpy(), val_in, val_tgt, hp["max_len"])
            return ndcg_at(r["ranks"])

        config = SASRecConfig(n_items=d.n_items, **{k: hp[k] for k in ("max_len", "hidden", "heads", "layers", "dropout")})
        return fit(config, train, validate, out, hp, epochs=epochs, seed=seed, progress=progress or (lambda m: None),
                   resume=resume, meta={"dataset": d.name, "n_users": len(d.histories), "n_items": d.n_items})


WORKLOAD_CLASS = RecsysWorkload
