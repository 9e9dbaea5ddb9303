"""Sparse patterns: each turns (q, k) into a SparseLayout for every head at once."""
from .ashape import AShape
from .auto import Auto
from .base import Pattern
from .block_sparse import BlockSparse
from .dense import Dense
from .modality import Grid, QBoundary, TwoDBoundary, with_modality
from .modality_spans import ModalitySpan, ModalitySpans
from .vertical_slash import VerticalSlash

__all__ = ["AShape", "Auto", "BlockSparse", "Dense", "Grid", "ModalitySpan", "ModalitySpans", "Pattern", "QBoundary",
           "TwoDBoundary", "VerticalSlash", "with_modality"]
