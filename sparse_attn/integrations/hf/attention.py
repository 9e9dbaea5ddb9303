"""The attention function transformers calls for a model patched by `sparse_attn.hf.patch`.

transformers (4.53+/5.x, `AttentionInterface`) calls it once per layer with inputs after RoPE and the cache update:
``query [B, Hq, Lq, D]``, ``key, value [B, Hkv, Lk, D]`` (KV heads not repeated), the queries being the last Lq
positions of the keys (bottom-right causal alignment, also in chunked prefill).  Because the patch registers
`key_padding_mask` as the mask function of our name, ``attention_mask`` is ``None`` or the bool ``[B, Lk]`` key mask
(True = keep; all True without padding); no ``[Lq, Lk]`` mask is ever built.  Returns ``(out [B, Lq, Hq, D], None)``.

One function, one registration (`sparse_attn.hf.IMPLEMENTATION`; `decode_cache.register` names the same function).
Each call takes one of three routes, decided once at the top:

* **retrieval decode**: a `decode_cache.RetrievalLayer` was updated for this call and holds earlier tokens (decode
  steps, later chunks): `sparse_attn.retrieval.retrieval_attention` over its device window and index.  The layer is
  found through `retrieval_link` (its ``update`` notes itself for the attention call that follows), not through an
  attribute on the key tensor, so a cast or copy of the key between the two does not lose it.  The prompt of such a
  cache (all keys present) is shown to the index and takes the prefill route.
* **dense**: decode steps (Lq == 1), sliding-window layers whose window is shorter than the keys, non-causal
  modules: exact dense attention (`masked_dense_attention`).
* **sparse prefill**: the layer's per-head patterns through `sparse_attn.estimate` + `sparse_attn.sparse_attention`
  (dense below ``dense_below`` keys, above ``dense_above`` density, and for all-`Dense` patterns); left-padded
  batches row by row over each row's valid keys, any other padding dense.  Modality patterns (`Grid`,
  `QBoundary`, `TwoDBoundary`) get the spans of the current ``sparse_attn.hf.modality`` block.  For inference this
  runs as the custom op `custom_ops.hf_sparse_prefill`, so ``torch.compile`` traces it without a graph break.

**Training.**  When autograd records and query, key or value requires grad, the sparse prefill route runs eagerly
with `backends.torch.differentiable.differentiable_sparse_attention` in place of the (forward-only) kernels: the
same layouts, the exact gradient of the sparse function (with a budget covering every key, the dense gradient).
The dense routes are differentiable as they are.  Memory is O(Lq x keys per block) (autograd keeps the gathered
keys and block scores), and under ``torch.compile`` this route breaks the graph at the estimate.

Modules without patch state (loaded with ``from_pretrained(attn_implementation="sparse_attn")`` or switched by hand)
get one from the settings saved in their config, else the online defaults (`saved_config.state_for_module`).
``softcap`` (Gemma-2) is applied by every route but retrieval decode.
"""
from __future__ import annotations

import math
import warnings

import torch
import torch.nn.functional as F

from ... import prefill
from ...backends.checks import check_softcap, resolve_scale
from ...backends.reference import reference_attention
from ...backends.torch.differentiable import differentiable_sparse_attention
from ...estimators.sample_mass import last_query_probs
from ...prefill import dense_attention
from .custom_ops import hf_sparse_prefill, registered_state
from .modality import patterns_for_call
from .retrieval_link import take_updated_layer
from .saved_config import state_for_module
from ...errors import InvalidArgumentError

#: Attribute holding the patch state on each attention module (and on the model).
STATE_ATTR = "_sparse_attn_state"
#: Elements of one [B, H, rows, keys] score block in the masked dense path (bounds its memory, never O(L^2)).
_SCORE_BLOCK_ELEMENTS = 1 << 25
_warned: set = set()


def _warn_once(key: str, message: str) -> None:
    if key not in _warned:
        _warned.add(key)
        warnings.warn(message, stacklevel=3)


def sparse_attention_forward(module, query, key, value, attention_mask, dropout: float = 0.0, scaling=None,
                             sliding_window=None, is_causal=None, **kwargs):
    """transformers attention-function signature; see the module docstring for shapes and routes."""
    softcap = _check_supported(module, dropout, kwargs)
    layer = take_updated_layer(key)
    if layer is not None:
        _check_unpadded(attention_mask)
        if layer.cache.seq_len != key.shape[2]:
            from ...retrieval.attention import retrieval_attention
            return _as_output(retrieval_attention(query, layer.cache, layer.top_k, scale=scaling))
        layer.cache.observe_queries(query)      # the prompt's queries shape the attention-aware index
        attention_mask = None
    causal = getattr(module, "is_causal", True) if is_causal is None else bool(is_causal)
    key_keep, key, value = _key_mask(attention_mask, key, value)
    Lq, Lk = query.shape[2], key.shape[2]
    window = sliding_window if sliding_window is not None and causal and sliding_window < Lk else None
    if key_keep is None and causal and Lq == Lk > 1:
        _check_not_packed(kwargs.get("position_ids"))

    state = getattr(module, STATE_ATTR, None)
    handle = state.op_handle if state is not None else _adopt_state(module)
    if handle == 0 or not causal or window is not None or Lq == 1:
        out = masked_dense_attention(query, key, value, key_keep, causal=causal, scale=scaling, window=window,
                                     softcap=softcap)
    else:
        layer_idx = getattr(module, "layer_idx", None)
        if torch.is_grad_enabled() and any(t.requires_grad for t in (query, key, value)):
            out = prefill_route(registered_state(handle), layer_idx, query, key, value, key_keep, scaling, softcap,
                                kernel=differentiable_sparse_attention)
        else:
            out = hf_sparse_prefill(query, key, value, key_keep, scaling, softcap, handle,
                                    -1 if layer_idx is None else layer_idx)
    return _as_output(out)


def _as_output(out):
    """[B, Hq, Lq, D] -> transformers' [B, Lq, Hq, D]."""
    return out.transpose(1, 2).contiguous(), None


def _check_supported(module, dropout, kwargs) -> float:
    """Refuses what the function cannot run; returns the checked ``softcap`` (Gemma-2's attn_logit_softcapping,
    0.0 without one)."""
    for name in ("s_aux", "sinks"):
        if kwargs.get(name) is not None:
            raise NotImplementedError(f"sparse_attn: attention with `{name}` is not supported; "
                                      f"unpatch the model (sparse_attn.hf.unpatch) to use its own attention")
    if dropout and module.training:
        raise InvalidArgumentError("sparse_attn: attention dropout > 0 in training mode is not supported; set the model's "
                         "attention_dropout to 0, call model.eval(), or unpatch the model")
    return check_softcap(kwargs.get("softcap") or 0.0)


def _check_unpadded(attention_mask) -> None:
    if attention_mask is not None and not bool(attention_mask.to(torch.bool).all()):
        raise NotImplementedError("sparse_attn: retrieval decode does not support padded batches; generate "
                                  "one row at a time or without the retrieval cache")


def _state_of_unpatched_module(module) -> int:
    """For a module running our implementation without `patch` (a model loaded with
    ``attn_implementation="sparse_attn"`` or switched by hand): its state from the settings saved in its config, or
    the online defaults, kept on the module; returns its ``op_handle``, or 0 (dense) where the module has no
    config to read its shape from."""
    state = state_for_module(module)
    if state is None:
        return 0
    setattr(module, STATE_ATTR, state)
    return state.op_handle


# Under torch.compile the state is built once, at trace time, and the module's new attribute makes Dynamo retrace
# with it.  From torch 2.13 that is a constant function (no graph break); older Dynamo cannot pass a module to one
# (torch 2.11: "UnspecializedNNModuleVariable is not a constant"), so there the first call has graph breaks (10 on a
# tiny Llama under torch 2.11).
_TORCH_MAJOR_MINOR = tuple(int(part) for part in torch.__version__.split(".")[:2])
_adopt_state = (torch.compiler.assume_constant_result if _TORCH_MAJOR_MINOR >= (2, 13)
                else torch.compiler.disable)(_state_of_unpatched_module)


def _key_mask(attention_mask, key, value):
    """The bool [B, Lk] key mask (True = keep; all True without padding), or None without a mask; keys past a
    shorter mask (a static cache's unfilled slots) are dropped so the queries stay the last positions of the keys."""
    if attention_mask is None:
        return None, key, value
    if not isinstance(attention_mask, torch.Tensor) or attention_mask.dim() != 2:
        shape = tuple(attention_mask.shape) if isinstance(attention_mask, torch.Tensor) else type(attention_mask)
        raise InvalidArgumentError(f"sparse_attn: expected attention_mask None or a [batch, kv_len] padding mask (the mask "
                         f"function registered by sparse_attn.hf.patch), got {shape}; patch the model with "
                         f"sparse_attn.hf.patch instead of setting the implementation by hand")
    keep = attention_mask.to(torch.bool)
    Lk = key.shape[2]
    if keep.shape[1] < Lk:
        key, value = key[:, :, :keep.shape[1]], value[:, :, :keep.shape[1]]
    elif keep.shape[1] > Lk:
        keep = keep[:, -Lk:]
    return keep, key, value


def _check_not_packed(position_ids) -> None:
    """Packed sequences (position ids restarting inside a row, no mask) would need a block-diagonal mask.  Under
    ``torch.compile`` the check stays in the graph as an assertion (a RuntimeError with the same message) instead of
    a host-side branch, which would break the graph."""
    if position_ids is None or position_ids.shape[-1] < 2:
        return
    consecutive = (position_ids[..., 1:] - position_ids[..., :-1] == 1).all()
    message = ("sparse_attn: packed sequences (position_ids restarting inside a row without an attention_mask) "
               "are not supported; pass an attention_mask or unpatch the model")
    if torch.compiler.is_compiling():
        torch._assert_async(consecutive, message)
    elif not bool(consecutive):
        raise InvalidArgumentError(message)


def prefill_route(state, layer_idx, q, k, v, key_keep, scale, softcap=0.0, kernel=None):
    """The sparse prefill route of `sparse_attention_forward` (body of the custom op `hf_sparse_prefill`):
    ``q [B, Hq, Lq, D]`` over ``k, v [B, Hkv, Lk, D]`` with the optional bool key mask ``key_keep [B, Lk]`` ->
    ``[B, Hq, Lq, D]``.  ``softcap`` > 0: Gemma-2's score cap.  ``kernel``: None (the patch's backend through
    `sparse_attention`) or a function ``(q, k, v, layout, *, causal, scale, softcap)`` such as
    `differentiable_sparse_attention`."""
    if key_keep is None or bool(key_keep.all()):          # an all-True mask (see `key_padding_mask`): no padding
        return _sparse(state, layer_idx, q, k, v, scale, softcap, kernel)
    return _sparse_padded(state, layer_idx, q, k, v, key_keep, scale, softcap, kernel)


def _sparse(state, layer_idx, q, k, v, scale, softcap=0.0, kernel=None, row=None):
    """Sparse prefill of unpadded rows: ``q [B, Hq, Lq, D]`` over ``k, v [B, Hkv, Lk, D]`` -> [B, Hq, Lq, D],
    with the module's layer patterns for Lk keys (modality patterns get the spans of the current
    `sparse_attn.hf.modality` block; ``row``: the batch row when a padded batch runs row by row).  Dense where the
    config keeps the layer dense, below ``dense_below`` keys, for all-`Dense` patterns, and where the estimated
    layout is denser than ``dense_above`` (there the sparse kernel would cost more than dense attention).
    ``softcap`` > 0: Gemma-2's score cap, applied by the kernel and the dense fallback (the estimate ranks uncapped
    scores: the cap is monotonic)."""
    options = state.options
    patterns = state.patterns(layer_idx, k.shape[2])
    dense_below = options["dense_below"]
    if dense_below is None:
        dense_below = prefill.dense_below_for(k.device)
    if (patterns is None or k.shape[2] < dense_below or all(isinstance(p, prefill.Dense) for p in patterns)):
        return _dense(q, k, v, options, scale, softcap, kernel)
    q_est, k_est = q.detach(), k.detach()             # the layout is discrete: no gradient flows through it
    if options["dense_above"] < 1 and _mass_needs_dense(q_est, k_est, patterns, scale, options["dense_above"]):
        return _dense(q, k, v, options, scale, softcap, kernel)
    patterns = patterns_for_call(patterns, q.shape[0], k.shape[2], row)
    layout = prefill.estimate(q_est, k_est, patterns, causal=True, scale=scale)
    density = layout.density() if options["dense_above"] < 1 or options["on_layout"] is not None else None
    if options["on_layout"] is not None:
        options["on_layout"](layer_idx, layout, density)
    if density is not None and density > options["dense_above"]:
        return _dense(q, k, v, options, scale, softcap, kernel)
    if kernel is not None:
        return kernel(q, k, v, layout, causal=True, scale=resolve_scale(scale, q.shape[-1]), softcap=softcap)
    return prefill.sparse_attention(q, k, v, layout, causal=True, scale=scale, backend=options["backend"],
                                    softcap=softcap, check_layout=False)


def _dense(q, k, v, options, scale, softcap, kernel):
    """The dense cases of `_sparse`: `sparse_prefill`'s dense route on the patch's backend (faster than SDPA where
    the backend is: the compiled CPU kernel), or SDPA / the capped reference where a differentiable ``kernel`` was
    asked for (the backends have no backward)."""
    if kernel is not None:
        return masked_dense_attention(q, k, v, scale=scale, softcap=softcap)
    return prefill.sparse_prefill(q, k, v, prefill.Dense(), causal=True, scale=scale, backend=options["backend"],
                                  softcap=softcap)


def _mass_needs_dense(q, k, patterns, scale, dense_above: float, rows: int = 16) -> bool:
    """Cheap pre-check for cumulative-mass (``gamma``) patterns, whose budget grows with how diffuse attention is:
    for each of the last ``rows`` queries and each head, is it certain that its top ``m = dense_above x keys``
    keys hold less than ``gamma`` of its attention?  Then any layout reaching gamma for that row is denser than
    ``dense_above``; when most (row, head) pairs are like that, the layer runs dense without the (much dearer)
    full estimate.  The certificate is Cauchy-Schwarz, mass of any m keys <= sqrt(m x sum p^2): one pass over the
    probabilities instead of a top-k.  Rows it cannot certify go to the full estimate, whose own density check
    still sends a too-dense layer to dense.  Only ever chooses exact dense attention, so it cannot make a result
    wrong."""
    gammas = [getattr(p, "gamma", None) for p in patterns]
    if any(g is None for g in gammas):
        return False
    probs, pos = last_query_probs(q, k, rows, resolve_scale(scale, q.shape[-1]))     # [B, Hq, n, Lk], [n]
    top = max(1, math.ceil(dense_above * (int(pos[-1]) + 1)))
    if top >= probs.shape[-1]:
        return False
    mass_bound = (top * probs.square().sum(-1)).sqrt()                              # [B, Hq, n]
    gamma = torch.tensor(gammas, dtype=mass_bound.dtype, device=mass_bound.device)[None, :, None]
    return bool((mass_bound < gamma).float().mean() > 0.5)


def _sparse_padded(state, layer_idx, q, k, v, key_keep, scale, softcap=0.0, kernel=None):
    """Rows of a left-padded batch, each over its own valid keys (right-aligned, so a slice); pad queries get 0."""
    B, Hq, Lq, D = q.shape
    Lk = k.shape[2]
    n_valid = key_keep.sum(1)                                                  # [B]
    left_padded = torch.arange(Lk, device=k.device)[None, :] >= (Lk - n_valid)[:, None]
    if not bool((left_padded == key_keep).all()):
        _warn_once("padding", "sparse_attn: the attention mask is not left padding; running dense attention "
                              "for these batches")
        return masked_dense_attention(q, k, v, key_keep, causal=True, scale=scale, softcap=softcap)
    out = q.new_zeros(B, Hq, Lq, D)
    for row, n in enumerate(n_valid.tolist()):
        first_query = max(0, Lq - n)
        if n == 0 or first_query == Lq:
            continue
        rows = slice(row, row + 1)
        out[rows, :, first_query:] = _sparse(state, layer_idx, q[rows, :, first_query:], k[rows, :, Lk - n:],
                                             v[rows, :, Lk - n:], scale, softcap, kernel, row)
    return out


def masked_dense_attention(q, k, v, key_keep=None, *, causal=True, scale=None, window=None, softcap=0.0):
    """Exact dense attention of ``q [B, Hq, Lq, D]`` over ``k, v [B, Hkv, Lk, D]`` (queries = last Lq keys) with an
    optional bool key mask ``key_keep [B, Lk]`` and sliding ``window`` (a query sees keys ``pos - window < j <=
    pos``) and ``softcap`` (> 0: scores capped as in Gemma-2; SDPA has no cap, so those chunks go through the fp32
    `reference_attention`).  Chunked over queries so scores stay O(rows x keys); rows that see no key give 0."""
    if key_keep is None and window is None and not softcap:
        return dense_attention(q, k, v, causal=causal, scale=scale)
    B, Hq, Lq, D = q.shape
    Lk = k.shape[2]
    shift = Lk - Lq
    rows_per_chunk = max(1, _SCORE_BLOCK_ELEMENTS // max(1, B * Hq * Lk))
    out = []
    for start in range(0, Lq, rows_per_chunk):
        stop = min(Lq, start + rows_per_chunk)
        pos = torch.arange(start, stop, device=q.device) + shift                      # [c] query positions
        k_lo = 0 if window is None or not causal else max(0, start + shift - window + 1)
        k_hi = stop + shift if causal else Lk
        keys = torch.arange(k_lo, k_hi, device=q.device)
        mask = torch.ones(stop - start, k_hi - k_lo, dtype=torch.bool, device=q.device)
        if causal:
            mask = keys[None, :] <= pos[:, None]
            if window is not None:
                mask = mask & (keys[None, :] > pos[:, None] - window)
        mask = mask[None, None]
        if key_keep is not None:
            mask = mask & key_keep[:, None, None, k_lo:k_hi]
        if softcap:
            chunk = reference_attention(q[:, :, start:stop], k[:, :, k_lo:k_hi], v[:, :, k_lo:k_hi], mask,
                                        causal=False, scale=scale, softcap=softcap)
        else:
            chunk = F.scaled_dot_product_attention(q[:, :, start:stop], k[:, :, k_lo:k_hi], v[:, :, k_lo:k_hi],
                                                   attn_mask=mask, scale=scale, enable_gqa=Hq != k.shape[1])
        out.append(torch.where(mask.any(-1, keepdim=True), chunk, 0.0).to(q.dtype))
    return torch.cat(out, 2) if len(out) > 1 else out[0]


def key_padding_mask(batch_size, q_length, kv_length, q_offset=0, kv_offset=0, mask_function=None,
                     attention_mask=None, **kwargs):
    """The mask function registered with `sparse_attention_forward` (transformers' `AttentionMaskInterface`
    signature): the 2D padding mask cut to the last ``kv_length`` keys (bool ``[B, kv_length]``, True = keep), or
    None without one; never an ``[Lq, Lk]`` mask.  Unlike transformers' flash-attention mask function it does not
    test whether every key is kept (a host synchronisation, and under ``torch.compile`` a graph break): the
    attention function takes an all-True mask as no padding."""
    return None if attention_mask is None else attention_mask[:, -kv_length:]


def register_under(name: str) -> str:
    """Register `sparse_attention_forward` with `key_padding_mask` under ``name``; returns ``name``."""
    from .registry import register_attention
    return register_attention(name, sparse_attention_forward, mask=key_padding_mask)
