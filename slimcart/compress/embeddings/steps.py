"""The `compress_embeddings` recipe step: replace the chosen embedding tables (see config.py).

    - kind: compress_embeddings
      targets: ["item_emb"]              # module-name patterns (default: every table)
      method: rowwise                   # the technique for the chosen tables, flat or as technique: {...}
      bits: 4
      overrides: {"*user*": {method: mixed_precision, tail_bits: 2}}   # per-table techniques

Frequency-aware techniques rank rows by training-set frequency, which the workload supplies through
an optional `table_frequencies(bundle, data) -> {module name: counts per row}` method.
"""
from __future__ import annotations

from typing import Literal

from pydantic import Field, model_validator

from ...errors import SlimcartError
from ...recipe import Step, register_step
from .apply import NEEDS_FREQUENCIES, compress_embeddings_, plan_tables
from .artifact import EmbeddingsCompressedArtifact
from .config import TECHNIQUE_FIELDS, EmbeddingCompressConfig, RowwiseConfig, Technique

KERNELS = {"rowwise": "torch quantized embedding_bag row-wise int{bits} lookups (FBGEMM)",
           "mixed_precision": "torch quantized embedding_bag lookups, int{tail_bits} tail (FBGEMM)"}


@register_step
class CompressEmbeddings(Step):
    """Compress embedding tables: row-wise int8/int4/int2, frequency-aware mixed precision, QR, hashing,
    mixed dimensions, tensor-train cores, product quantization or pruned rows (follow the trainable ones with
    `recover`)."""

    kind: Literal["compress_embeddings"] = "compress_embeddings"
    targets: list[str] | None = None
    exclude: list[str] = []
    technique: Technique = Field(default_factory=RowwiseConfig)
    overrides: dict[str, Technique] = {}
    min_rows: int = Field(0, ge=0)  # tables with fewer rows stay as they are

    @model_validator(mode="before")
    @classmethod
    def _flat(cls, v):
        """Accept the technique's fields at the top level (`method: rowwise, bits: 4`)."""
        if isinstance(v, dict) and "method" in v:
            v = dict(v)
            v["technique"] = {k: v.pop(k) for k in list(v) if k in TECHNIQUE_FIELDS}
        return v

    def config(self) -> EmbeddingCompressConfig:
        return EmbeddingCompressConfig(tables=self.targets, exclude=self.exclude, technique=self.technique,
                                       per_table=self.overrides, min_rows=self.min_rows)

    def apply(self, state, ctx):
        module = state.torch_module(self.kind)
        cfg = self.config()
        plan = plan_tables(module, cfg)
        freqs = None
        if any(t.method in NEEDS_FREQUENCIES for _, _, t in plan) or any(t.method != "rowwise" for _, _, t in plan):
            counts = getattr(ctx.workload, "table_frequencies", None)
            if counts is None and any(t.method in NEEDS_FREQUENCIES for _, _, t in plan):
                raise SlimcartError("frequency-aware embedding compression needs the workload's training-set row counts "
                                    "(a `table_frequencies` method), which this workload does not have")
            names = {n for n, _, _ in plan}
            freqs = {n: c for n, c in (counts(state.bundle, ctx.data) if counts else {}).items() if n in names}
        state.keep_teacher(ctx)
        rep = compress_embeddings_(module, cfg, freqs)
        for name, t in rep["tables"].items():
            kernel = KERNELS.get(t["method"])
            if kernel:
                state.kernels.append(f"{name}: " + kernel.format(**t["config"]))
            if t["config"].get("score_kernel") == "int8_gemm":
                state.kernels.append(f"{name}: scores on FBGEMM int8 x int8 GEMM (derived int8 copy, activations per call)")
        state.notes.append("embedding tables " + "; ".join(f"{n}: {t['method']} {t['bytes_before'] / 1e6:.2f} -> "
                                                           f"{t['bytes_after'] / 1e6:.2f} MB" for n, t in rep["tables"].items()))
        state.reports[self.kind] = rep
        state.artifact = EmbeddingsCompressedArtifact()
        return state
