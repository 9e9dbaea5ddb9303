"""Integrations with inference engines (vLLM / SGLang call signatures).  Not imported by ``sparse_attn`` itself:
``from sparse_attn.integrations import sparse_attn_func``."""
from .engines import (BLOCK_M, BLOCK_N, convert_vertical_slash_indexes, convert_vertical_slash_indexes_mergehead,
                      sparse_attn_func, sparse_attn_varlen_func, sparse_prefill_varlen)

__all__ = ["BLOCK_M", "BLOCK_N", "convert_vertical_slash_indexes", "convert_vertical_slash_indexes_mergehead",
           "sparse_attn_func", "sparse_attn_varlen_func", "sparse_prefill_varlen"]
