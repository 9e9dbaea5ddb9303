"""The Hugging Face sparse prefill as a PyTorch custom op, so ``torch.compile(model)`` on a patched model traces
the attention function without a graph break.

Our prefill decides on the data (the estimate's budgets, the dense pre-checks, the layout's density) and calls a
compiled C++ kernel: Dynamo cannot trace that.  As a `torch.library.custom_op` it is one opaque node whose output
shape and dtype a fake implementation gives (``[B, Hq, Lq, D]``, the query's), and it runs eagerly at run time, the
same code eager mode runs.  A custom op takes tensors and plain scalars only, so the patch state (per-layer
patterns, options, the ``on_layout`` callback) travels as an int handle into a weak registry of states.

The op has no autograd formula: it serves inference.  When autograd records and q/k/v require grad, the attention
function runs the same route eagerly with a differentiable kernel instead (see `attention.py`).
"""
from __future__ import annotations

import itertools
import weakref
from typing import Optional

import torch

_STATES: "weakref.WeakValueDictionary[int, object]" = weakref.WeakValueDictionary()
_HANDLES = itertools.count(1)


def register_state(state) -> int:
    """A new int naming ``state`` (a `PatchState`) in the op's calls, held weakly (`PatchState` calls it once)."""
    handle = next(_HANDLES)
    _STATES[handle] = state
    return handle


def registered_state(handle: int):
    """The patch state `register_state` named ``handle``."""
    state = _STATES.get(handle)
    if state is None:
        raise RuntimeError(f"sparse_attn: patch state {handle} is gone (the model was patched again or freed); "
                           f"recompile the model after patching it")
    return state


@torch.library.custom_op("sparse_attn::hf_sparse_prefill", mutates_args=())
def hf_sparse_prefill(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, key_keep: Optional[torch.Tensor],
                      scale: Optional[float], softcap: float, state: int, layer_idx: int) -> torch.Tensor:
    """Sparse prefill of one layer: ``query [B, Hq, Lq, D]`` over ``key, value [B, Hkv, Lk, D]`` with the bool
    left-padding mask ``key_keep [B, Lk]`` (or None) -> ``[B, Hq, Lq, D]`` (contiguous, query's dtype).
    ``softcap``: Gemma-2's score cap (0: none); ``state``: the patch state's ``op_handle``; ``layer_idx``: the
    module's layer (-1: none)."""
    from .attention import prefill_route

    out = prefill_route(registered_state(state), None if layer_idx < 0 else layer_idx, query, key, value, key_keep, scale,
                        softcap)
    return out.contiguous()


@hf_sparse_prefill.register_fake
def _(query, key, value, key_keep, scale, softcap, state, layer_idx):
    return query.new_empty(query.shape)
