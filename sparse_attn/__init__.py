"""sparse_attn: dynamic sparse attention for long-context prefill.

Nothing here imports CUDA code or transformers; GPU kernels load on first use."""
from .layout import SparseLayout
from .backends.reference import reference_attention
from .patterns import AShape, Auto, BlockSparse, Dense, Pattern, VerticalSlash
from .patterns import Grid, ModalitySpan, ModalitySpans, QBoundary, TwoDBoundary, with_modality
from .prefill import DEFAULT_PATTERN, dense_attention, estimate, sparse_attention, sparse_prefill

__version__ = "0.1.0"

__all__ = ["AShape", "Auto", "BlockSparse", "DEFAULT_PATTERN", "Dense", "Pattern", "SparseLayout", "VerticalSlash",
           "dense_attention", "estimate", "reference_attention", "sparse_attention", "sparse_prefill",
           "Grid", "ModalitySpan", "ModalitySpans", "QBoundary", "TwoDBoundary", "with_modality"]
