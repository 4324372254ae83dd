"""Typed configs: one per technique (discriminated by `method`) and the table selection around them.

    EmbeddingCompressConfig(method="rowwise", bits=4, tables=["*item*"])          # flat form
    EmbeddingCompressConfig(tables=["*"], technique={"method": "rowwise", "bits": 4},
                            per_table={"*user*": {"method": "mixed_precision", "tail_bits": 2}})

Tables are chosen by fnmatch patterns on module names (`tables`, minus `exclude`); a table matching a
`per_table` pattern (first match, in the order written) gets that technique, every other chosen table
`technique`. Patterns of `per_table` also choose their tables. Tables of fewer than `min_rows` rows
are never chosen. Without `tables`, every table is chosen,
unless only `per_table` is given (no technique): then only its tables. A model that reads some table's
`.weight` directly (SASRec's position table) must not have that table compressed.
"""
from __future__ import annotations

from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from ...errors import SlimcartError


class _Technique(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class RowwiseConfig(_Technique):
    """Row-wise int8/int4/int2 with a per-row scale and offset (rowwise.py)."""

    method: Literal["rowwise"] = "rowwise"
    bits: Literal[8, 4, 2] = 4
    optimized_range: bool = False  # FBGEMM's greedy search of each row's range (4 and 2 bits)
    score_kernel: Literal["tiled", "int_mm", "int8_gemm"] = "tiled"

    @model_validator(mode="after")
    def _check(self):
        if self.optimized_range and self.bits == 8:
            raise SlimcartError("optimized_range is a 4- and 2-bit option (the 8-bit prepack has none)")
        return self


class Tier(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)
    bits: Literal[32, 16, 8, 4]
    fraction: float = Field(gt=0, le=1)  # of all rows, by training frequency


class MixedPrecisionConfig(_Technique):
    """Hot rows at more bits, the tail at `tail_bits` (mixed_precision.py). Default: Yang et al.'s
    int4 table with a float32 cache of the 1% most frequent rows."""

    method: Literal["mixed_precision"] = "mixed_precision"
    tiers: list[Tier] = Field(default_factory=lambda: [Tier(bits=32, fraction=0.01)])
    tail_bits: Literal[8, 4, 2] = 4
    optimized_range: bool = False
    score_kernel: Literal["tiled", "int_mm", "int8_gemm"] = "tiled"

    @model_validator(mode="after")
    def _check(self):
        if sum(t.fraction for t in self.tiers) > 1 + 1e-9:
            raise SlimcartError("mixed-precision tier fractions add up to more than 1")
        if any(t.bits <= self.tail_bits for t in self.tiers):
            raise SlimcartError(f"every mixed-precision tier needs more bits than the tail's {self.tail_bits}")
        if self.optimized_range and self.tail_bits == 8:
            raise SlimcartError("optimized_range is a 4- and 2-bit option (the 8-bit prepack has none)")
        return self


class QRConfig(_Technique):
    """Quotient-remainder compositional embeddings (qr.py)."""

    method: Literal["qr"] = "qr"
    collisions: int = Field(4, ge=1)  # ids per remainder row = rows of the quotient table
    operation: Literal["mult", "sum", "concat"] = "mult"
    q_dim: int | None = Field(None, ge=1)  # concat only: width of the quotient part
    init: Literal["fit", "random"] = "fit"
    fit_iters: int = Field(10, ge=1, le=1000)
    seed: int = 0

    @model_validator(mode="after")
    def _check(self):
        if self.q_dim is not None and self.operation != "concat":
            raise SlimcartError("q_dim applies to operation 'concat' only")
        return self


class HashConfig(_Technique):
    """The hashing trick (hashed.py): `buckets` rows, or `ratio` of the table's rows."""

    method: Literal["hash"] = "hash"
    buckets: int | None = Field(None, ge=1)
    ratio: float | None = Field(None, gt=0, le=1)
    hash: Literal["universal", "modulo"] = "universal"
    init: Literal["fit", "random"] = "fit"
    seed: int = 0

    @model_validator(mode="after")
    def _check(self):
        if (self.buckets is None) == (self.ratio is None):
            raise SlimcartError("hash needs exactly one of buckets or ratio")
        return self


class DimBlock(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)
    fraction: float = Field(gt=0, le=1)
    dim: int | None = Field(None, ge=1)  # None: the table's full width


class MixedDimConfig(_Technique):
    """Frequency blocks at smaller widths with projections (mixed_dim.py), hottest block first."""

    method: Literal["mixed_dim"] = "mixed_dim"
    blocks: list[DimBlock] = Field(default_factory=lambda: [DimBlock(fraction=0.05), DimBlock(fraction=0.25, dim=16),
                                                            DimBlock(fraction=0.70, dim=4)])

    @model_validator(mode="after")
    def _check(self):
        if not self.blocks:
            raise SlimcartError("mixed_dim needs at least one block")
        if abs(sum(b.fraction for b in self.blocks) - 1) > 1e-6:
            raise SlimcartError("mixed_dim block fractions must add up to 1")
        return self


class TTConfig(_Technique):
    """Tensor-train cores (tt.py). Factors default to balanced ones; `ranks` overrides `rank`."""

    method: Literal["tt"] = "tt"
    cores: int = Field(3, ge=2, le=6)
    rank: int = Field(16, ge=1)
    ranks: list[Annotated[int, Field(ge=1)]] | None = None
    row_factors: list[Annotated[int, Field(ge=1)]] | None = None
    dim_factors: list[Annotated[int, Field(ge=1)]] | None = None
    init: Literal["svd", "random"] = "svd"
    seed: int = 0

    @model_validator(mode="after")
    def _check(self):
        for name in ("ranks", "row_factors", "dim_factors"):
            v, want = getattr(self, name), self.cores - 1 if name == "ranks" else self.cores
            if v is not None and len(v) != want:
                raise SlimcartError(f"tt {name} needs {want} entries for {self.cores} cores, got {len(v)}")
        return self


class PQConfig(_Technique):
    """Product quantization (pq.py): one `code_bits` code per `subvector_dim` values of a row, k-means
    codebooks weighted by training counts, the hottest rows optionally kept at more bits (`hot`)."""

    method: Literal["pq"] = "pq"
    subvector_dim: int = Field(4, ge=1)  # s: must divide the table's width (M = width / s codes a row)
    code_bits: Literal[8, 4] = 8  # 256 or 16 centroids per sub-space
    weighting: Literal["count", "sqrt_count", "none"] = "count"
    rotate: bool = False  # OPQ: an orthonormal rotation fitted first (d x d floats more)
    hot: list[Tier] = []
    iters: int = Field(25, ge=1, le=1000)
    seed: int = 0

    @model_validator(mode="after")
    def _check(self):
        if sum(t.fraction for t in self.hot) > 1 + 1e-9:
            raise SlimcartError("pq hot-tier fractions add up to more than 1")
        return self


class PruneRowsConfig(_Technique):
    """Rare rows share one fallback row (pruned.py)."""

    method: Literal["prune_rows"] = "prune_rows"
    min_count: float = Field(1, gt=0)  # rows seen fewer times in training are pruned
    keep_fraction: float | None = Field(None, gt=0, le=1)  # instead: keep this most frequent fraction
    fallback: Literal["mean", "zero"] = "mean"
    bits: Literal[32, 16, 8, 4, 2] = 32


TECHNIQUES = (RowwiseConfig, MixedPrecisionConfig, QRConfig, HashConfig, MixedDimConfig, TTConfig, PQConfig,
              PruneRowsConfig)
Technique = Annotated[
    RowwiseConfig | MixedPrecisionConfig | QRConfig | HashConfig | MixedDimConfig | TTConfig | PQConfig | PruneRowsConfig,
    Field(discriminator="method"),
]
TECHNIQUE_FIELDS = set().union(*(c.model_fields for c in TECHNIQUES))


class EmbeddingCompressConfig(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)
    tables: list[str] | None = None  # default: every table ("*"); none beyond per_table's if only that is given
    exclude: list[str] = Field(default_factory=list)
    technique: Technique = Field(default_factory=RowwiseConfig)
    per_table: dict[str, Technique] = Field(default_factory=dict)
    min_rows: int = Field(0, ge=0)  # smaller tables are left as they are (a codebook would outweigh them)

    @model_validator(mode="before")
    @classmethod
    def _flat(cls, v):
        """Accept the technique's fields at the top level (`method=..., bits=...`)."""
        if isinstance(v, dict) and "method" in v:
            if "technique" in v:
                raise SlimcartError("give the technique either flat (method=...) or as technique=..., not both")
            v = dict(v)
            v["technique"] = {k: v.pop(k) for k in list(v) if k in TECHNIQUE_FIELDS}
        return v


def chosen_patterns(config: EmbeddingCompressConfig) -> list[str]:
    """The patterns that pick tables for the default technique."""
    if config.tables is not None:
        return list(config.tables)
    return [] if config.per_table and "technique" not in config.model_fields_set else ["*"]


def parse_embedding_config(raw) -> EmbeddingCompressConfig:
    """A config from a dict (recipe YAML), every problem as one SlimcartError line."""
    if isinstance(raw, EmbeddingCompressConfig):
        return raw
    if not isinstance(raw, dict):
        raise SlimcartError(f"embedding compression config must be a mapping, got {type(raw).__name__}")
    try:
        return EmbeddingCompressConfig(**raw)
    except ValidationError as e:
        first = e.errors()[0]
        loc = ".".join(str(x) for x in first["loc"])
        raise SlimcartError(f"embedding compression config: {loc}: {first['msg']}") from None
