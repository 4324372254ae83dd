"""Embedding-table compression: drop-in replacements for nn.Embedding / nn.EmbeddingBag that look up
(and score against) compressed tables, and the verb that swaps them into a model.

    report = compress_embeddings_(model, EmbeddingCompressConfig(method="rowwise", bits=4, tables=["*item*"]))

Techniques (one file each, maths in the docstrings): rowwise (int8/int4/int2 on torch's fused FBGEMM
lookup kernels), mixed_precision (hot rows at more bits), qr (quotient-remainder), hash (hashing
trick), mixed_dim (frequency blocks at smaller widths), tt (tensor-train cores), pq (product
quantization, hot rows at more bits), prune_rows (rare rows share a fallback). Saving:
`state_for_save()` -> (tensors, JSON-able dict); `load_table` rebuilds.
"""
from .apply import compress_embeddings_, plan_tables
from .artifact import EmbeddingsCompressedArtifact  # registers the saved format
from .base import CompressedEmbedding, load_table
from .config import (
    DimBlock,
    EmbeddingCompressConfig,
    HashConfig,
    MixedDimConfig,
    MixedPrecisionConfig,
    PQConfig,
    PruneRowsConfig,
    QRConfig,
    RowwiseConfig,
    Tier,
    TTConfig,
    parse_embedding_config,
)
from .hashed import HashedEmbedding
from .mixed_dim import MixedDimEmbedding
from .mixed_precision import MixedPrecisionEmbedding
from .pq import ProductQuantizedEmbedding
from .pruned import PrunedRowsEmbedding
from .qr import QREmbedding
from .rowwise import RowwiseQuantEmbedding
from .tt import TTEmbedding

__all__ = [
                     "CompressedEmbedding",
                     "DimBlock",
                     "EmbeddingCompressConfig",
                     "EmbeddingsCompressedArtifact",
                     "HashConfig",
                     "HashedEmbedding",
                     "MixedDimConfig",
                     "MixedDimEmbedding",
                     "MixedPrecisionConfig",
                     "MixedPrecisionEmbedding",
                     "PruneRowsConfig",
                     "PQConfig",
                     "ProductQuantizedEmbedding",
                     "PrunedRowsEmbedding",
                     "QRConfig",
                     "QREmbedding",
                     "RowwiseConfig",
                     "RowwiseQuantEmbedding",
                     "TTConfig",
                     "TTEmbedding",
                     "Tier",
                     "compress_embeddings_",
                     "load_table",
                     "parse_embedding_config",
                     "plan_tables",
]
