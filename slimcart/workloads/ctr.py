"""CTR prediction: will this user click (interact with) this candidate? A DIN model (models/ctr.py).

Model: a DIN trained by `slimcart train --workload ctr` (alias `din` = the checkpoint for Amazon Video
Games under $SLIMCART_HOME/ctr/recsys-amazon-videogames; `din@<dataset>` = the one for another dataset,
e.g. `din@ctr-ipinyou`), or any folder with config.json + model.safetensors.
Data (see ctr_data.py): Amazon Video Games in the DIN paper's protocol by default; `--data` may name
an iPinYou-style libFM folder (`ctr-ipinyou`), a Criteo-layout folder/file (`ctr-criteo-sample`) or a
`user item` log; synthetic behaviour data (labelled so) when nothing is found.
Metrics on the test split: AUC (primary), logloss, ECE and predicted/observed CTR (best at 1.0).
Runner outputs are logits, one per row; `EvalResult.outputs` keeps labels, logits and the bootstrap
groups (users) for paired comparisons (ctr_metrics.paired_bootstrap_auc).

Why an own ~200-line model rather than FuxiCTR / DeepCTR-Torch / TorchRec: those keep the tables inside
their own containers (per-feature ModuleDicts built from a feature map, TorchRec's fused
EmbeddingBagCollection), so swapping in a compressed table means reaching into library internals; their
forward takes library inputs (a feature dict, DeepCTR-Torch's one float matrix with ids sliced out of it,
TorchRec's KeyedJaggedTensor) that do not export to ONNX as they are; and loading a checkpoint needs the
library's feature map and code. Here a table is `setattr(model, "emb_item", new)`, inputs are plain
int64/float arrays passed by keyword, and the weights are one safetensors file.
"""
from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch

from ..contracts import BenchInputs, DataInfo, DistillOptions, EvalResult, ModelBundle
from ..errors import SlimcartError
from ..models.ctr import (
    DIN,
    FREQUENCIES_FILE,
    DINConfig,
    load_din,
    load_frequencies,
    save_din,
)
from ..paths import data_root, home, resolve_dataset
from ..runtime.torch_runtime import TorchRunner
from . import ctr_data, synthetic
from .ctr_data import CTRData
from .ctr_metrics import bootstrap_auc, ctr_quality
from .io import load_checkpoint, model_folder

DATASET = "recsys-amazon-videogames"
ALIAS = "din"
SERVING_BATCH = 1024
SINGLE_REQUESTS = 64
EVAL_BATCH = 4096
CALIBRATION_BATCH = 256
# Chosen on Video Games VALIDATION figures after 5 epochs (docs/bench-ctr.md): MLP dropout 0.3 beat 0
# (AUC 0.8635 vs 0.8612, logloss 0.596 vs 0.635); emb_l2 1e-2 and lr 2e-3 at batch 512 changed nothing.
# Platt scaling on validation then cut validation logloss (0.596 -> 0.492) at unchanged AUC.
# iPinYou uses the same settings (not tuned on it). max_minutes keeps training ~10 min on 2 shared cores.
TRAIN_DEFAULTS = {"dim": 32, "lr": 1e-3, "batch": 256, "emb_l2": 0.0, "dropout": 0.3, "patience": 2,
                  "max_minutes": 9.0, "threads": 1, "max_len": 50, "negatives": 1, "calibrate": True}


def checkpoint_dir(dataset: str) -> Path:
    """$SLIMCART_HOME (or ~/.cache/slimcart) / ctr / <dataset name>."""
    return home() / "ctr" / dataset


def _resolve(data: str | None) -> Path | None:
    """--data as a path, or a bare dataset name under $SLIMCART_DATA (e.g. `ctr-ipinyou`)."""
    root = data_root()
    if data and not Path(data).expanduser().exists() and root is not None and re.fullmatch(r"[\w.-]+", data) \
            and (root / data).exists():
        return root / data
    return resolve_dataset(data, DATASET)


def _features(batch: dict) -> dict:
    return {k: v for k, v in batch.items() if k != "label"}


class CTRWorkload:
    name = "ctr"
    quality_keys = ("auc", "logloss", "ece", "calibration")
    # "calibration" (predicted / observed CTR) is best at 1.0: neither direction is better, so it has no entry.
    higher_is_better = {"auc": True, "logloss": False, "ece": False}
    primary_metric = "auc"
    serving_batch = SERVING_BATCH

    # ---------------------------------------------------------------- model
    def load_model(self, spec: str) -> ModelBundle:
        """`din`, `din@<dataset>` or a folder with config.json + model.safetensors."""
        if spec == ALIAS or spec.startswith(ALIAS + "@"):
            dataset = spec.partition("@")[2] or DATASET
            if not re.fullmatch(r"[\w.-]+", dataset) or dataset in (".", ".."):
                raise SlimcartError(f"'{spec}': the dataset after '@' must be a plain name such as ctr-ipinyou")
            folder = checkpoint_dir(dataset)
            if not (folder / "model.safetensors").exists():
                data_hint = "" if dataset == DATASET else f" --data {dataset}"
                raise SlimcartError(f"no trained DIN at {folder}: run `slimcart train --workload ctr{data_hint}` first "
                                    "(or pass a model folder)")
        else:
            folder = model_folder(spec, f"'{ALIAS}' / '{ALIAS}@<dataset>'")
        module, cfg = load_checkpoint(folder, load_din, "DIN")
        # Training-set counts per table row stay with the trained checkpoint (not copied into compressed
        # folders, where their bytes would count as model size); techniques read them from this path.
        freq = folder / FREQUENCIES_FILE
        return ModelBundle(name=spec, module=module, source=folder,
                           extra={"config": cfg, "frequencies": freq if freq.is_file() else None})

    def load_companions(self, folder: Path) -> ModelBundle:
        """The config.json beside a model that runs elsewhere (ONNX): input layout and table sizes."""
        f = Path(folder) / "config.json"
        try:
            cfg = json.loads(f.read_text())
            DINConfig.from_dict(cfg["model"]).check()
        except Exception as e:
            raise SlimcartError(f"{f}: not a DIN config ({str(e).splitlines()[0] if str(e) else type(e).__name__})") from None
        return ModelBundle(name=str(folder), module=None, source=Path(folder), extra={"config": cfg})

    def save_model(self, bundle: ModelBundle, folder: Path) -> None:
        """model.safetensors + config.json (training info carried over from the source config)."""
        folder.mkdir(parents=True, exist_ok=True)
        extra = {k: v for k, v in bundle.extra.get("config", {}).items() if k not in ("model_type", "model")}
        save_din(bundle.module, folder, extra)

    def save_companions(self, bundle: ModelBundle, folder: Path) -> None:
        """config.json next to an exported model; an existing config.json is kept."""
        folder.mkdir(parents=True, exist_ok=True)
        if not (folder / "config.json").exists():
            cfg = dict(bundle.extra.get("config", {}))
            if isinstance(bundle.module, DIN):
                cfg["model"] = bundle.module.config.to_dict()
            (folder / "config.json").write_text(json.dumps(cfg, indent=2))

    def torch_runner(self, bundle: ModelBundle) -> TorchRunner:
        """Eager PyTorch: batch dict of numpy arrays -> logits (B,) float32 (a batch's `label` is ignored)."""
        return TorchRunner(bundle.module)

    def table_frequencies(self, bundle: ModelBundle, data: CTRData) -> dict[str, np.ndarray]:
        """Training-set count of every row of every table, keyed by module name (`emb_<table>`): what
        frequency-aware embedding compression ranks rows by. Read from the counts saved beside the
        trained checkpoint (`frequencies.safetensors`), else counted on this data's training split
        (the same counts when the model was trained on it; `_check` makes sure the tables match)."""
        self._check(bundle, data)
        path = bundle.extra.get("frequencies")
        saved = load_frequencies(Path(path).parent) if path else {}
        counts = {k: np.asarray(v.numpy() if hasattr(v, "numpy") else v, np.float64) for k, v in
                  (saved or data.frequencies).items()}
        for name, rows in self.model_config(bundle)["tables"].items():
            got = counts.get(f"emb_{name}")
            if got is None or len(got) != rows:
                raise SlimcartError(f"training-set counts for table '{name}' are missing or have {None if got is None else len(got)} "
                                    f"entries for {rows} rows ({path or 'the data'})")
        return counts

    @staticmethod
    def model_config(bundle: ModelBundle) -> dict:
        return bundle.extra.get("config", {}).get("model", {})

    def example_batch(self, bundle: ModelBundle) -> dict:
        """Two rows of valid ids (history of 3 and 8 items; numeric features 0)."""
        c = self.model_config(bundle)
        rows = [c["tables"][f] for f in c["fields"]]
        out = {"sparse": np.array([[1 % r for r in rows], [2 % r for r in rows]], np.int64)}
        if c.get("history_table"):
            n = c["tables"][c["history_table"]]
            out["hist"] = np.array([[0] * 5 + [1 % n, 2 % n, 3 % n], [(i + 1) % n for i in range(8)]], np.int64)
        if c.get("n_dense"):
            out["dense"] = np.zeros((2, c["n_dense"]), np.float32)
        return out

    def export_spec(self, bundle: ModelBundle) -> dict:
        """ONNX export: pass the example as keyword arguments (DIN's `hist`/`dense` are both optional)."""
        example = self.example_batch(bundle)
        axes = {"sparse": {0: "batch"}, "hist": {0: "batch", 1: "history"}, "dense": {0: "batch"}, "logit": {0: "batch"}}
        return {"example": example, "dynamic_axes": {k: v for k, v in axes.items() if k in example or k == "logit"},
                "output_name": "logit", "model_type": None}

    def task_loss(self, bundle: ModelBundle) -> Callable:
        """BCE of the logits against batch["label"]: calibration_batches carry the labels in the same dict,
        the features go to the model and the label only to this loss (DIN.forward ignores it)."""
        def bce(module, batch):
            logits = module(**{k: torch.as_tensor(v) for k, v in _features(batch).items()})
            if "label" not in batch:
                raise SlimcartError("ctr task loss needs labelled batches (calibration_batches carry 'label')")
            return torch.nn.functional.binary_cross_entropy_with_logits(
                logits.float(), torch.as_tensor(batch["label"], dtype=torch.float32))
        return bce

    def distill_task(self, teacher, student, bundle: ModelBundle, data: CTRData, options: DistillOptions):
        """Soft targets (teacher's probabilities) + BCE on labels over the training split (ctr_distill.py)."""
        from .ctr_distill import CTRDistillTask

        return CTRDistillTask(teacher, student, data, options.losses, options.temperature, options.seed,
                              self._check(bundle, data))

    # ---------------------------------------------------------------- data
    def load_data(self, data: str | None) -> CTRData:
        """See the module docstring; every problem with the data is one SlimcartError line."""
        path = _resolve(data)
        if path is None:
            df = synthetic.interactions(0).rename(columns={"user_id": "user", "item_id": "item", "timestamp": "ts"})
            return self._behaviour(df, "synthetic", synthetic_data=True)
        if path.is_dir() and (path / "train.fm.txt").exists():
            if not (path / "test.fm.txt").exists():
                raise SlimcartError(f"{path}: a libFM folder needs test.fm.txt beside train.fm.txt")
            d = ctr_data.libfm_data(path)
        else:
            criteo = next((path / f"train{s}" for s in (".csv", ".tsv", ".txt") if (path / f"train{s}").is_file()),
                          path) if path.is_dir() else path
            if criteo.is_file() and ctr_data.is_criteo_file(criteo):
                d = ctr_data.criteo_data(path)
            else:
                from .recsys import (
                    read_interactions,  # the `user item` log reader shared with the recsys workload
                )

                d = self._behaviour(read_interactions(path), path.name if path.is_dir() else path.stem)
        d.info.source = path  # part of a resumed run's identity
        return d

    @staticmethod
    def _behaviour(df, name: str, synthetic_data: bool = False) -> CTRData:
        from .recsys import group_histories

        histories, n_items = group_histories(df)
        return ctr_data.behaviour_data(histories, n_items, name, synthetic_data)

    def data_info(self, data: CTRData) -> DataInfo:
        return data.info

    def _check(self, bundle: ModelBundle, data: CTRData) -> int:
        """The model's tables must be the ones this data was encoded for; returns its history length."""
        c = self.model_config(bundle)
        if c.get("tables") != data.tables or c.get("fields") != data.fields or c.get("n_dense", 0) != data.n_dense:
            def brief(tables: dict) -> str:
                items = [f"{k}({v})" for k, v in (tables or {}).items()]
                return ", ".join(items[:4]) + (f" +{len(items) - 4} more" if len(items) > 4 else "")

            trained = bundle.extra.get("config", {}).get("dataset")
            raise SlimcartError(f"the model{f' (trained on {trained})' if trained else ''} has tables "
                                f"{brief(c.get('tables'))} but the data {data.name} needs {brief(data.tables)}: "
                                "was it trained on this dataset?")
        return int(c.get("max_len", TRAIN_DEFAULTS["max_len"]))

    # ---------------------------------------------------------------- inputs
    def bench_inputs(self, bundle: ModelBundle, data: CTRData) -> BenchInputs:
        """Real test rows: 64 single-row requests and up to 8 batches of 1,024 rows."""
        max_len = self._check(bundle, data)
        order = np.random.default_rng(0).permutation(len(data.test))
        single = [data.batch(data.test, order[i:i + 1], max_len) for i in range(min(SINGLE_REQUESTS, len(order)))]
        serving = [data.batch(data.test, order[a:a + SERVING_BATCH], max_len)
                   for a in range(0, min(len(order), 8 * SERVING_BATCH), SERVING_BATCH)]
        serving = [b for b in serving if len(b["sparse"]) == SERVING_BATCH] or serving[:1]
        return BenchInputs(single=single, serving=serving, items_per_serving_batch=len(serving[0]["sparse"]),
                           unit="rows")

    def calibration_batches(self, bundle: ModelBundle, data: CTRData, n: int) -> list[dict]:
        """`n` labelled batches of 256 training rows (behaviour data: with sampled negatives); never test."""
        max_len = self._check(bundle, data)
        rows = data.epoch_rows(np.random.default_rng(1))
        order = np.random.default_rng(2).permutation(len(rows))[: n * CALIBRATION_BATCH]
        return [data.batch(rows, order[a:a + CALIBRATION_BATCH], max_len, labels=True)
                for a in range(0, len(order), CALIBRATION_BATCH)][:n]

    # ---------------------------------------------------------------- quality
    def predict(self, runner, data: CTRData, rows, max_len: int) -> np.ndarray:
        """Logits for every row, scored in batches of similar history length, returned in row order."""
        order = np.argsort(rows.end, kind="stable") if rows.end is not None else np.arange(len(rows))
        out = np.empty(len(rows), np.float32)
        for a in range(0, len(rows), EVAL_BATCH):
            idx = order[a:a + EVAL_BATCH]
            got = np.asarray(runner(data.batch(rows, idx, max_len)), np.float32).reshape(-1)
            if got.shape != idx.shape:
                raise SlimcartError(f"the model returned {got.size} scores for {len(idx)} rows: not a CTR model")
            out[idx] = got
        return out

    def evaluate(self, runner, bundle: ModelBundle, data: CTRData, reference: Any = None) -> EvalResult:
        """AUC / logloss / ECE / calibration on the test split. outputs: labels, logits, groups (users for
        behaviour data), the AUC's bootstrap interval, and with `reference` (another model's outputs on
        the same rows) the paired bootstrap of the AUC difference."""
        from .ctr_metrics import paired_bootstrap_auc

        logits = self.predict(runner, data, data.test, self._check(bundle, data))
        labels, groups = data.test.label, data.groups
        outputs = {"labels": labels, "logits": logits, "groups": groups,
                   "auc_ci95": bootstrap_auc(labels, logits, groups)["ci95"]}
        if isinstance(reference, dict) and np.shape(reference.get("logits")) == logits.shape:
            outputs["vs_reference"] = paired_bootstrap_auc(labels, reference["logits"], logits, groups)
        return EvalResult(quality=ctr_quality(labels, logits), outputs=outputs)

    # ---------------------------------------------------------------- training
    def train(self, data: str | CTRData | None = None, out: Path | None = None, epochs: int = 200, seed: int = 0,
              progress: Callable[[str], None] | None = None, resume: bool = True, **overrides) -> Path:
        """Train a DIN on the training split; early stopping on validation AUC, then Platt scaling fitted
        on the validation split (calibrate=False skips it); returns the model folder.

        Trained by slimcart.training.fit (one validation per epoch), checkpointed to `<out>.partial` at
        every validation and resumed exactly when data and settings match; the final folder is written
        under a temporary name and renamed into place.
        """
        from ..models.ctr_train import fit
        from .ctr_metrics import auc

        hp = {**TRAIN_DEFAULTS, **overrides}
        if set(hp) != set(TRAIN_DEFAULTS):
            raise SlimcartError(f"unknown training option(s): {', '.join(sorted(set(hp) - set(TRAIN_DEFAULTS)))}")
        d = data if isinstance(data, CTRData) else self.load_data(data)
        out = Path(out).expanduser() if out else checkpoint_dir(d.name)
        config = DINConfig(tables=dict(d.tables), fields=list(d.fields), dim=int(hp["dim"]), history_table=d.history_table,
                           target_field=d.target_field, n_dense=d.n_dense, max_len=int(hp["max_len"]),
                           dropout=float(hp["dropout"]))

        def validation(model) -> tuple[float, np.ndarray, np.ndarray]:
            logits = self.predict(TorchRunner(model), d, d.valid, config.max_len)
            return auc(d.valid.label, logits), d.valid.label, logits

        def negative_items(users: np.ndarray, rng: np.random.Generator) -> np.ndarray:
            return ctr_data.sample_unseen(d, users, rng)

        meta = {"dataset": d.name, "synthetic": d.info.synthetic, "split": d.info.split,
                "frequencies": d.frequency_note}
        return fit(config, d, validation, out, hp, epochs=epochs, seed=seed, progress=progress or (lambda m: None),
                   resume=resume, meta=meta, negative_items=negative_items if d.history_table else None,
                   frequencies=d.frequencies)


WORKLOAD_CLASS = CTRWorkload
