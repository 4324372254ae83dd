"""Distilling a sentence encoder (search workload) on unlabeled e-commerce text the teacher labels.

Transfer texts: the workload's calibration split (dev-split queries and product texts: never the
evaluated queries) plus, optionally, product titles from the PriceRunner offers under
SLIMCART_DATA. The teacher embeds every text once; per batch the student is pulled towards
  - the teacher's embeddings (cosine and/or MSE),
  - the teacher's ranking of a fixed bank of product texts (listwise KL over query–product scores),
  - optionally the teacher's hidden states (MSE, learned projection if widths differ) and the
    last layer's attention maps / value relations (MiniLM), which need a teacher pass per batch.
"""
from __future__ import annotations

import hashlib

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from .. import losses as L
from ..arch import detect
from ..errors import SlimcartError
from ..paths import data_root
from ..training import TeacherStudentTask, length_bucketed

WEIGHTS = ("embedding_cosine", "embedding_mse", "listwise", "hidden_mse", "attention", "value_relation")
DEFAULT_WEIGHTS = {"embedding_cosine": 1.0, "listwise": 1.0}
MAX_TOKENS = 128
TITLES = "categories-pricerunner/pricerunner_aggregate.csv"


def transfer_texts(calibration_texts: list[str], extra_titles: int, seed: int = 0) -> list[str]:
    """Calibration texts first, then up to `extra_titles` distinct PriceRunner titles (seeded sample)."""
    texts = [t for t in dict.fromkeys(calibration_texts) if t and t.strip()]
    root = data_root()
    if extra_titles and root is not None and (root / TITLES).exists():
        import pandas as pd

        titles = pd.read_csv(root / TITLES, header=None, usecols=[1], dtype=str)[1].dropna().str.strip()
        titles = [t for t in dict.fromkeys(titles) if t]
        pick = np.random.default_rng(seed).permutation(len(titles))[:extra_titles]
        seen = set(texts)
        texts += [titles[i] for i in sorted(pick) if titles[i] not in seen]
    return texts


def _quiet(msg: str) -> None:
    pass


def _pool(hidden: torch.Tensor, mask: torch.Tensor, pooling: str, normalize: bool) -> torch.Tensor:
    """The SentenceEncoder's pooling, on hidden states we also need for other losses."""
    if pooling == "cls":
        emb = hidden[:, 0]
    else:
        m = mask.unsqueeze(-1).to(hidden.dtype)
        emb = (hidden * m).sum(1) / m.sum(1).clamp(min=1e-9)
    return F.normalize(emb.float(), dim=-1) if normalize else emb


class _Capture:
    """Forward hook keeping the output of one module (the last layer's value projection)."""

    def __init__(self, module: nn.Module):
        self.out = None
        self.handle = module.register_forward_hook(lambda m, i, o: setattr(self, "out", o))


def _value_module(encoder) -> nn.Module:
    last = detect(encoder).layers[-1]
    value = getattr(getattr(getattr(last, "attention", None), "self", None), "value", None)
    if value is None:
        raise SlimcartError("value-relation loss needs a BERT-style layer (attention.self.value)")
    return value


class SearchDistillTask(TeacherStudentTask):
    """DistillTask for SentenceEncoder teacher/student pairs that share a tokenizer."""

    LOSSES, DEFAULTS, what = WEIGHTS, DEFAULT_WEIGHTS, "search distillation"

    def __init__(self, teacher, student, tokenizer, texts: list[str], weights: dict[str, float] | None = None,
                 score_temperature: float = 0.05, bank_size: int = 1024, val_texts: int = 512, seed: int = 0,
                 progress=_quiet):
        self.setup(teacher, weights)
        if len(texts) < 4:
            raise SlimcartError(f"distillation transfer data is empty or too small ({len(texts)} texts)")
        t_tok, s_tok = teacher.transformer.config.vocab_size, student.transformer.config.vocab_size
        if t_tok != s_tok:
            raise SlimcartError(f"teacher and student vocabularies differ ({t_tok} vs {s_tok} tokens): "
                                "they must share the tokenizer the transfer texts are encoded with")
        self.tokenizer, self.tau = tokenizer, score_temperature
        self.set_student(student)
        self.online = any(k in self.w for k in ("hidden_mse", "attention", "value_relation"))
        if "attention" in self.w and teacher.transformer.config.num_attention_heads != student.transformer.config.num_attention_heads:
            raise SlimcartError("attention-map transfer needs equal head counts; use value_relation instead")
        self.rel_heads = teacher.transformer.config.num_attention_heads

        self.texts = list(texts)
        self.ids = tokenizer(self.texts, truncation=True, max_length=MAX_TOKENS)["input_ids"]
        order = np.random.default_rng(seed).permutation(len(self.texts))
        n_val = min(val_texts, max(1, len(self.texts) // 10))
        self.val_idx, self.train_idx = np.sort(order[:n_val]), order[n_val:]
        self._bank_idx = np.sort(np.random.default_rng(seed + 1).permutation(self.train_idx)[:bank_size])
        self._t_emb, self._progress = None, progress
        self._fp = {"texts": hashlib.sha1("\n".join(self.texts).encode()).hexdigest(), "weights": self.w,
                    "tau": self.tau, "bank": len(self._bank_idx), "val": n_val, "seed": seed}

    @property
    def t_emb(self) -> np.ndarray:
        """Teacher embeddings of every transfer text, computed on first use (a reused finished run never needs them)."""
        if self._t_emb is None:
            self._progress(f"teacher labelling {len(self.texts)} transfer texts")
            self._t_emb = self._embed_all(self.teacher)
        return self._t_emb

    @property
    def bank(self) -> np.ndarray:
        """Teacher embeddings of the fixed product bank the listwise loss ranks."""
        return self.t_emb[self._bank_idx]

    def prepare(self) -> None:
        """Label everything now (before data-parallel workers are spawned, so they do not each redo it)."""
        _ = self.t_emb

    def __getstate__(self) -> dict:
        return {**self.__dict__, "_progress": _quiet}  # the CLI's progress callback does not pickle

    def set_student(self, student: nn.Module) -> None:
        """Swap in another initial student (after choosing layers by measurement)."""
        ds, dt = student.transformer.config.hidden_size, self.teacher.transformer.config.hidden_size
        self.attach(student, proj=L.projection(ds, dt))
        n_s = student.transformer.config.num_hidden_layers
        n_t = self.teacher.transformer.config.num_hidden_layers
        self.layer_map = [round(i * n_t / n_s) for i in range(n_s + 1)]  # student hidden i <-> teacher hidden

    # ------------------------------------------------------------- DistillTask
    def n_examples(self) -> int:
        return len(self.train_idx)

    def arrange(self, order: np.ndarray, batch_size: int, rng) -> np.ndarray:
        """Batches of similar length: titles, queries and long product texts mixed in one batch would
        pad every row to the longest."""
        return length_bucketed(order, np.array([len(self.ids[i]) for i in self.train_idx]), batch_size, rng)

    def batch(self, idx) -> dict[str, torch.Tensor]:
        rows = [self.ids[i] for i in idx]
        enc = self.tokenizer.pad({"input_ids": rows}, return_tensors="pt")
        out = {"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"]}
        out["token_type_ids"] = torch.zeros_like(out["input_ids"])
        return out

    def _forward(self, enc, batch, hidden: bool, attentions: bool):
        out = enc.transformer(**batch, output_hidden_states=hidden, output_attentions=attentions)
        return _pool(out[0], batch["attention_mask"], enc.pooling, enc.normalize), out

    def _compare(self, emb: torch.Tensor) -> torch.Tensor:
        proj = self.heads["proj"]
        return emb if isinstance(proj, nn.Identity) else F.normalize(proj(emb), dim=-1)

    def loss(self, idx: np.ndarray):
        idx = self.train_idx[idx]
        batch = self.batch(idx)
        need_h, need_a = "hidden_mse" in self.w, "attention" in self.w
        s_val = t_val = None
        if "value_relation" in self.w:
            s_cap = _Capture(_value_module(self.student().transformer))
        try:
            s_emb, s_out = self._forward(self.student(), batch, need_h, need_a)
        finally:
            if "value_relation" in self.w:
                s_cap.handle.remove()
                s_val = s_cap.out
        s_emb = self._compare(s_emb)
        t_emb = torch.from_numpy(self.t_emb[idx])
        parts = {}
        if "embedding_cosine" in self.w:
            parts["embedding_cosine"] = L.embedding_cosine(s_emb, t_emb)
        if "embedding_mse" in self.w:
            parts["embedding_mse"] = L.embedding_mse(s_emb, t_emb)
        if "listwise" in self.w:
            bank = torch.from_numpy(self.bank)
            parts["listwise"] = L.listwise_kl(s_emb @ bank.T, t_emb @ bank.T, self.tau)
        if self.online:
            mask = batch["attention_mask"].bool()
            with torch.no_grad():
                t_cap = _Capture(_value_module(self.teacher.transformer)) if s_val is not None else None
                _, t_out = self._forward(self.teacher, batch, need_h, need_a)
                if t_cap is not None:
                    t_cap.handle.remove()
                    t_val = t_cap.out
            if need_h:
                parts["hidden_mse"] = sum(
                    L.hidden_mse(s_out.hidden_states[i], t_out.hidden_states[j], self.heads["proj"], mask)
                    for i, j in enumerate(self.layer_map)) / len(self.layer_map)
            if need_a:
                parts["attention"] = L.attention_kl(s_out.attentions[-1], t_out.attentions[-1], mask)
            if s_val is not None:
                parts["value_relation"] = L.relation_kl(s_val, t_val, self.rel_heads, mask)
        return self.combine(parts)

    @torch.no_grad()
    def validate(self) -> float:
        """On the held-out transfer texts: minus the listwise KL of student vs teacher product rankings
        when that loss is used (ranking agreement is what search needs), else the mean cosine."""
        s = self._embed_idx(self.student(), self.val_idx, compare=True)
        t = self.t_emb[self.val_idx]
        if "listwise" not in self.w:
            return float(np.mean(np.sum(s * t, 1)))
        bank = torch.from_numpy(self.bank)
        return -float(L.listwise_kl(torch.from_numpy(s) @ bank.T, torch.from_numpy(t) @ bank.T, self.tau))

    # ------------------------------------------------------------- helpers
    @torch.no_grad()
    def _embed_idx(self, enc, idx: np.ndarray, compare: bool = False, batch_size: int = 64) -> np.ndarray:
        enc.eval()
        idx = np.asarray(idx)
        order = idx[np.argsort([len(self.ids[i]) for i in idx], kind="stable")]
        out = {}
        for a in range(0, len(order), batch_size):
            chunk = order[a : a + batch_size]
            emb, _ = self._forward(enc, self.batch(chunk), False, False)
            if compare:
                emb = self._compare(emb)
            for i, e in zip(chunk, emb.numpy()):
                out[int(i)] = e
        return np.stack([out[int(i)] for i in idx]).astype(np.float32)

    def _embed_all(self, enc) -> np.ndarray:
        return self._embed_idx(enc, np.arange(len(self.texts)))

    def score_undistilled(self, student) -> float:
        """Validation cosine of a candidate student before any training (used to choose layers)."""
        with torch.no_grad():
            s = self._embed_idx(student, self.val_idx)
        if s.shape[1] != self.t_emb.shape[1]:
            return float("nan")
        return float(np.mean(np.sum(s * self.t_emb[self.val_idx], 1)))
