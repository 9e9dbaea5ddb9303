"""Sparse patterns: each turns (q, k) into a SparseLayout for every head at once."""
from .ashape import AShape
from .base import Pattern
from .block_sparse import BlockSparse
from .dense import Dense
from .vertical_slash import VerticalSlash

__all__ = ["AShape", "BlockSparse", "Dense", "Pattern", "VerticalSlash"]
