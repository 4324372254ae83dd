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
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from ..contracts import BenchInputs, DataInfo, DistillOptions, EvalResult, ModelBundle
from ..errors import SlimcartError
from ..models.gru4rec import (
    GRU4Rec,
    GRU4RecConfig,
    actual_config,
    load_gru4rec,
    right_align,
    save_gru4rec,
)
from ..paths import home, resolve_dataset
from .io import load_checkpoint, model_folder
from .session_data import (  # noqa: F401 - re-exported: the workload's data API
    DATASET,
    K,
    SessionData,
    all_prefixes,
    check_prefixes,
    dataset_name,
    load_sessions,
    pad_right,
    quality,
    rank_rows,
    read_prefixes,
    read_sessions,
    synthetic_sessions,
)

ALIAS = "gru4rec"
SERVING_BATCH = 256
VAL_ROWS_PER_EPOCH = 10_000  # fixed sample of validation rows scored after every epoch
# Chosen on Diginetica validation HR@20 (10,000 fixed validation rows, 4-epoch runs, docs/session.md):
# tied item table 0.441 vs untied 0.382 (and half the bytes); uniform negatives (alpha 0) 0.443 vs
# popularity^0.5 0.441 (same within noise: the simpler one); dropout 0.25 still rising at epoch 3 (0.440)
# where the undropped model had flattened. Full softmax measured 11 min/epoch vs ~1 for 2048 negatives.
TRAIN_DEFAULTS = {
    "max_len": 50, "emb_dim": 100, "hidden": 100, "tied": True, "dropout_emb": 0.25, "dropout_hidden": 0.25,
    "lr": 2e-3, "batch": 128, "negatives": 2048, "alpha": 0.0, "patience": 2, "max_minutes": 15.0, "threads": 1,
}


def checkpoint_dir(name: str) -> Path:
    """$SLIMCART_HOME (or ~/.cache/slimcart) / session / gru4rec-<dataset name>."""
    return home() / "session" / f"gru4rec-{name}"


class SessionTorchRunner:
    """A GRU4Rec in eager PyTorch: {"seq": (B, L) prefixes, 0-padded left or right} -> (B, n_items + 1) scores."""

    runtime = "torch"

    def __init__(self, module: torch.nn.Module):
        self.module = module.eval()
        emb = getattr(module, "item_emb", None)  # a replaced (e.g. compressed) table may not say its size
        self.n_items = int(emb.num_embeddings) - 1 if hasattr(emb, "num_embeddings") else None

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
            folder = model_folder(spec, f"'{ALIAS}'")
        module, cfg = load_checkpoint(folder, load_gru4rec, "GRU4Rec")
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

    def validation_data(self, data: SessionData, fraction: float = 1.0) -> SessionData:
        """The same data with the evaluation rows replaced by every prefix -> next click of the validation
        sessions (the newest 10% of the training sessions, never the test prefixes), for tuning;
        `fraction` < 1 keeps a fixed random share of those rows."""
        prefixes, targets = data.validation_rows()
        keep = max(1, round(len(prefixes) * min(max(fraction, 0.0), 1.0)))
        if keep < len(prefixes):
            prefixes, targets = data.validation_rows(keep)
        info = DataInfo(name=data.info.name, synthetic=data.info.synthetic, n=len(prefixes), source=data.info.source,
                        split=f"validation: {len(prefixes)} prefix -> next-click rows of the newest {len(data.valid)} "
                              f"training sessions (the GRU4Rec early-stopped on a sample of them); ranking over all "
                              f"{data.n_items} items")
        return replace(data, test_prefixes=prefixes, test_targets=targets, info=info)

    def bench_inputs(self, bundle: ModelBundle, data: SessionData) -> BenchInputs:
        """Test prefixes in arrival order: 64 single requests, 16 batches of 256 (padded to each batch's longest)."""
        L, rng = self.config(bundle).max_len, np.random.default_rng(0)
        rows = rng.permutation(len(data.test_prefixes))
        pick = [data.test_prefixes[i] for i in rows[: SERVING_BATCH * 16]]
        single = [{"seq": pad_right([p], L)} for p in pick[:64]]
        serving = [{"seq": pad_right(pick[i:i + SERVING_BATCH], L)} for i in range(0, len(pick), SERVING_BATCH)]
        serving = [b for b in serving if len(b["seq"]) == SERVING_BATCH] or serving[:1]
        return BenchInputs(single=single, serving=serving, items_per_serving_batch=len(serving[0]["seq"]), unit="sessions")

    def calibration_batches(self, bundle: ModelBundle, data: SessionData, n: int) -> list[dict]:
        """`n` batches of 64 whole training sessions (right-padded; never validation or test sessions)."""
        L = self.config(bundle).max_len
        order = np.random.default_rng(1).permutation(len(data.train))[: n * 64]
        return [{"seq": pad_right([data.train[i][:L + 1] for i in order[a:a + 64]], L + 1)} for a in range(0, len(order), 64)][:n]

    # ---------------------------------------------------------------- quality
    def evaluate(self, runner, bundle: ModelBundle, data: SessionData, reference: Any = None) -> EvalResult:
        """HR@20 / MRR@20 over all items on every test row; outputs["ranks"] = each row's 0-based target
        rank (row order = the test file's), for paired comparisons (e.g. `bench.paired_bootstrap` on
        `ranks < 20`)."""
        ranks = rank_rows(lambda seq: runner({"seq": seq}), data.test_prefixes, data.test_targets, self.config(bundle).max_len, data.n_items)
        return EvalResult(quality=quality(ranks), outputs={"ranks": ranks}, per_unit=(np.asarray(ranks) < K).astype(float))

    @staticmethod
    def evaluate_rows(model: torch.nn.Module, prefixes, targets, n_items: int) -> dict[str, float]:
        """HR@20 / MRR@20 of a torch GRU4Rec on given rows (validation)."""
        with torch.inference_mode():
            ranks = rank_rows(lambda b: model(torch.from_numpy(b)).float().numpy(), prefixes, targets,
                              model.config.max_len, n_items)
        return quality(ranks)

    def table_frequencies(self, bundle: ModelBundle, data: SessionData) -> dict[str, np.ndarray]:
        """How often each item is clicked in the training sessions (validation sessions and test rows
        excluded), per row of the item table: what frequency-aware embedding compression ranks rows by."""
        n_rows = self.config(bundle).n_items + 1
        if data.n_items + 1 > n_rows:
            raise SlimcartError(f"the data has {data.n_items} items but the model's item table {n_rows - 1}")
        return {"item_emb": np.bincount(np.concatenate(data.train), minlength=n_rows).astype(np.float64)}

    def task_loss(self, bundle: ModelBundle):
        """Next-click cross-entropy (full softmax over all items) at every position of a batch of whole
        sessions such as `calibration_batches` gives; rows may be padded on either side."""
        def loss(module, batch):
            seq, _ = right_align(torch.as_tensor(batch["seq"]))
            inp, tgt = seq[:, :-1], seq[:, 1:]
            h, _ = module.encode(inp)
            mask = tgt > 0
            return F.cross_entropy(module.score(h[mask])[:, 1:], tgt[mask] - 1)
        return loss

    def distill_task(self, teacher, student, bundle: ModelBundle, data: SessionData, options: DistillOptions):
        """The teacher's next-click distribution (KL over all items) + next-click loss on the training
        sessions (see session_distill.py)."""
        from .session_distill import SessionDistillTask

        return SessionDistillTask(teacher, student, data, options)

    # ---------------------------------------------------------------- training
    def train(self, data: str | SessionData | None = None, out: Path | None = None, epochs: int = 200, seed: int = 0,
              progress: Callable[[str], None] | None = None, resume: bool = True, **overrides) -> Path:
        """Train GRU4Rec on the training sessions with slimcart's trainer; early-stops on validation HR@20
        (patience, `max_minutes` wall-clock budget); returns the model folder. Each finished epoch is
        checkpointed to `<out>.partial` and a rerun with the same data and settings resumes after it."""
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
        return fit(config, d.train, lambda m: self.evaluate_rows(m, val_in, val_tgt, d.n_items)["hr@20"], out, hp,
                   epochs=epochs, seed=seed, progress=progress or (lambda m: None), resume=resume, meta=meta)


WORKLOAD_CLASS = SessionWorkload
