"""The attention function transformers calls for a model patched by `sparse_attn.hf.patch`.

transformers (4.53+/5.x, `AttentionInterface`) calls it once per layer with inputs after RoPE and the cache update:
``query [B, Hq, Lq, D]``, ``key, value [B, Hkv, Lk, D]`` (KV heads not repeated), the queries being the last Lq
positions of the keys (bottom-right causal alignment, also in chunked prefill).  Because the patch registers
transformers' flash-attention mask function for our name, ``attention_mask`` is ``None`` without padding, or a bool
``[B, Lk]`` key mask (True = keep) with padding; no ``[Lq, Lk]`` mask is ever built.  Returns ``(out [B, Lq, Hq, D],
None)``.

Routing: prefill (Lq > 1) of a causal full-attention layer runs the layer's per-head patterns through
`sparse_attn.estimate` + `sparse_attn.sparse_attention` (dense below ``dense_below`` keys and above
``dense_above`` density); decode steps (Lq == 1), sliding-window layers whose
window is shorter than the keys, non-causal modules and modules without patch state run exact dense attention.
Left-padded batches run row by row over each row's valid (right-aligned) keys; any other padding runs dense.
Modality patterns (`Grid`, `QBoundary`, `TwoDBoundary`) get the spans of the current ``sparse_attn.hf.modality``
block (`modality.py`; outside one, an all-text call).
With a `sparse_attn.integrations.hf.decode_cache.RetrievalCache` (``sparse_attn.hf.retrieval_cache(model)``) the prompt runs
the sparse prefill above and every later forward runs `sparse_attn.retrieval.retrieval_attention`.
"""
from __future__ import annotations

import math
import warnings

import torch
import torch.nn.functional as F

from ... import prefill
from ...backends.checks import check_softcap, resolve_scale
from ...backends.reference import reference_attention
from ...estimators.sample_mass import last_query_probs
from ...prefill import dense_attention
from ...retrieval.cache import HF_LAYER_TAG
from .modality import patterns_for_call
from .saved_config import state_for_module

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
    """transformers attention-function signature; see the module docstring for shapes and routing."""
    for name in ("s_aux", "sinks"):
        if kwargs.get(name) is not None:
            raise NotImplementedError(f"sparse_attn: attention with `{name}` is not supported; "
                                      f"unpatch the model (sparse_attn.hf.unpatch) to use its own attention")
    if dropout and module.training:
        raise ValueError("sparse_attn: attention dropout > 0 in training mode is not supported; call model.eval() "
                         "or unpatch the model")
    softcap = check_softcap(kwargs.get("softcap") or 0.0)        # Gemma-2's attn_logit_softcapping
    state = getattr(module, STATE_ATTR, None)
    if state is None:       # loaded with attn_implementation="sparse_attn": the settings saved in its config
        state = state_for_module(module)
        setattr(module, STATE_ATTR, state)
    layer = _retrieval_layer(key)
    if layer is not None:
        if attention_mask is not None and not bool(attention_mask.to(torch.bool).all()):
            raise NotImplementedError("sparse_attn: retrieval decode does not support padded batches; generate "
                                      "one row at a time or without the retrieval cache")
        if layer.cache.seq_len != key.shape[2]:
            # decode steps (and later prefill chunks): the device window + the top-k keys from the index
            from ...retrieval.attention import retrieval_attention
            out = retrieval_attention(query, layer.cache, layer.top_k, scale=scaling)
            return out.transpose(1, 2).contiguous(), None
        layer.cache.observe_queries(query)      # the prompt's queries shape the attention-aware index
        attention_mask = None
    causal = getattr(module, "is_causal", True) if is_causal is None else bool(is_causal)
    key_keep, key, value = _key_mask(attention_mask, key, value)
    Lq, Lk = query.shape[2], key.shape[2]
    window = sliding_window if sliding_window is not None and causal and sliding_window < Lk else None
    if key_keep is None and causal and Lq == Lk > 1:
        _check_not_packed(kwargs.get("position_ids"))

    if state is None or not causal or window is not None or Lq == 1:
        out = masked_dense_attention(query, key, value, key_keep, causal=causal, scale=scaling, window=window,
                                     softcap=softcap)
    elif key_keep is None:
        out = _sparse(state, module, query, key, value, scaling, softcap=softcap)
    else:
        out = _sparse_padded(state, module, query, key, value, key_keep, scaling, softcap)
    return out.transpose(1, 2).contiguous(), None


def _retrieval_layer(key):
    """The `RetrievalLayer` of a `sparse_attn.integrations.hf.decode_cache.RetrievalCache` whose ``update`` returned ``key``
    (it tags the tensor), or None for any other cache."""
    return getattr(key, HF_LAYER_TAG, None)


def _key_mask(attention_mask, key, value):
    """The bool [B, Lk] key mask (True = keep), or None when every key is kept; keys past a shorter mask (a static
    cache's unfilled slots) are dropped so the queries stay the last positions of the keys."""
    if attention_mask is None:
        return None, key, value
    if not isinstance(attention_mask, torch.Tensor) or attention_mask.dim() != 2:
        shape = tuple(attention_mask.shape) if isinstance(attention_mask, torch.Tensor) else type(attention_mask)
        raise ValueError(f"sparse_attn: expected attention_mask None or a [batch, kv_len] padding mask (the mask "
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
    """Packed sequences (position ids restarting inside a row, no mask) would need a block-diagonal mask."""
    if position_ids is None or position_ids.shape[-1] < 2:
        return
    if bool((position_ids[..., 1:] - position_ids[..., :-1] != 1).any()):
        raise ValueError("sparse_attn: packed sequences (position_ids restarting inside a row without an "
                         "attention_mask) are not supported; pass an attention_mask or unpatch the model")


def _sparse(state, module, q, k, v, scale, row=None, softcap=0.0):
    """Sparse prefill of unpadded rows: ``q [B, Hq, Lq, D]`` over ``k, v [B, Hkv, Lk, D]`` -> [B, Hq, Lq, D],
    with the module's layer patterns for Lk keys (modality patterns get the spans of the current
    `sparse_attn.hf.modality` block; ``row``: the batch row when a padded batch runs row by row).  Dense where the
    config keeps the layer dense, below ``dense_below`` keys, for all-`Dense` patterns, and where the estimated
    layout is denser than ``dense_above`` (there the sparse kernel would cost more than dense attention).
    ``softcap`` > 0: Gemma-2's score cap, applied by the kernel and the dense fallback (the estimate ranks uncapped
    scores: the cap is monotonic)."""
    options = state.options
    layer_idx = getattr(module, "layer_idx", None)
    patterns = state.patterns(layer_idx, k.shape[2])
    if (patterns is None or k.shape[2] < options["dense_below"]
            or all(isinstance(p, prefill.Dense) for p in patterns)):
        return masked_dense_attention(q, k, v, scale=scale, softcap=softcap)
    if options["dense_above"] < 1 and _mass_needs_dense(q, k, patterns, scale, options["dense_above"]):
        return masked_dense_attention(q, k, v, scale=scale, softcap=softcap)
    patterns = patterns_for_call(patterns, q.shape[0], k.shape[2], row)
    layout = prefill.estimate(q, k, patterns, causal=True, scale=scale)
    density = layout.density() if options["dense_above"] < 1 or options["on_layout"] is not None else None
    if options["on_layout"] is not None:
        options["on_layout"](layer_idx, layout, density)
    if density is not None and density > options["dense_above"]:
        return masked_dense_attention(q, k, v, scale=scale, softcap=softcap)
    return prefill.sparse_attention(q, k, v, layout, causal=True, scale=scale, backend=options["backend"],
                                    softcap=softcap, check_layout=False)


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


def _sparse_padded(state, module, q, k, v, key_keep, scale, softcap=0.0):
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
        out[rows, :, first_query:] = _sparse(state, module, q[rows, :, first_query:], k[rows, :, Lk - n:],
                                             v[rows, :, Lk - n:], scale, row, softcap)
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
