"""Argument checks shared by every entry point: collect every reason, raise one message."""
from __future__ import annotations

import torch

from ..errors import InvalidArgumentError, InvalidTypeError

_FLOATS = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def attention_input_reasons(q, k, v) -> list[str]:
    """Reasons why (q, k, v) are not valid BHLD attention inputs; empty when they are."""
    reasons = []
    for name, t in (("q", q), ("k", k), ("v", v)):
        if not isinstance(t, torch.Tensor):
            reasons.append(f"{name} must be a torch.Tensor, got {type(t).__name__}")
        elif t.dim() != 4:
            reasons.append(f"{name} must be 4-d [batch, heads, seq_len, head_dim] (BHLD), got shape {tuple(t.shape)}")
        elif t.dtype not in _FLOATS:
            reasons.append(f"{name} must be a floating tensor (fp16, bf16, fp32, fp64), got {t.dtype}")
    if reasons:
        return reasons
    if len({q.device, k.device, v.device}) > 1:
        reasons.append(f"q, k, v must be on one device, got {q.device}, {k.device}, {v.device}")
    if len({q.dtype, k.dtype, v.dtype}) > 1:
        reasons.append(f"q, k, v must share a dtype, got {q.dtype}, {k.dtype}, {v.dtype}")
    B, Hq, Lq, D = q.shape
    if k.shape != v.shape:
        reasons.append(f"k and v must have the same shape, got {tuple(k.shape)} and {tuple(v.shape)}")
    Bk, Hkv, Lk, Dk = k.shape
    if Bk != B:
        reasons.append(f"k batch ({Bk}) must equal q batch ({B})")
    if Dk != D:
        reasons.append(f"k head_dim ({Dk}) must equal q head_dim ({D})")
    if Hkv == 0 or Hq % Hkv != 0:
        reasons.append(f"q heads ({Hq}) must be a multiple of k/v heads ({Hkv}) (MHA, GQA or MQA)")
    if Lq > Lk:
        reasons.append(f"q seq_len ({Lq}) must be <= k seq_len ({Lk}): queries are the last Lq positions")
    if Lk == 0:
        reasons.append("k seq_len must be >= 1")
    if D == 0:
        reasons.append("head_dim must be >= 1, got 0")
    return reasons


def check_attention_inputs(q, k, v) -> None:
    reasons = attention_input_reasons(q, k, v)
    if reasons:
        raise InvalidArgumentError("invalid attention inputs: " + "; ".join(reasons))


def check_layout_matches(layout, q, k) -> None:
    """Raise ValueError if ``layout`` was not built for these q/k shapes."""
    B, Hq, Lq, _ = q.shape
    Lk = k.shape[2]
    reasons = []
    if (layout.batch, layout.heads) != (B, Hq):
        reasons.append(f"layout is for batch={layout.batch}, heads={layout.heads}; q has batch={B}, heads={Hq}")
    if (layout.q_len, layout.k_len) != (Lq, Lk):
        reasons.append(f"layout is for q_len={layout.q_len}, k_len={layout.k_len}; inputs have {Lq}, {Lk}")
    if layout.device != q.device:
        reasons.append(f"layout is on {layout.device}, q on {q.device}")
    if reasons:
        raise InvalidArgumentError("layout does not match the inputs: " + "; ".join(reasons))


def check_out(out, q, k, v) -> None:
    """``out`` (the optional output buffer of `sparse_attention`): a tensor of q's shape, dtype and device whose last
    dimension is contiguous (any other strides: an engine's ``[tokens, Hq, D]`` buffer viewed as BHLD), in memory of
    its own (the kernel reads q, k, v while it writes)."""
    if not isinstance(out, torch.Tensor):
        raise InvalidTypeError(f"out must be a torch.Tensor or None, got {type(out).__name__}")
    if out.shape != q.shape or out.dtype != q.dtype or out.device != q.device or out.stride(-1) != 1:
        raise InvalidArgumentError(
            f"out must be shaped, typed and placed like q ({tuple(q.shape)}, {q.dtype}, {q.device}) with its last "
            f"dimension contiguous; got {tuple(out.shape)}, {out.dtype}, {out.device}, strides {out.stride()}")
    storage = out.untyped_storage().data_ptr()
    for name, t in (("q", q), ("k", k), ("v", v)):
        if t.untyped_storage().data_ptr() == storage:
            raise InvalidArgumentError(f"out must not share memory with {name} (the kernel reads it while writing)")


def resolve_scale(scale, head_dim: int) -> float:
    if scale is None:
        return head_dim ** -0.5
    if not isinstance(scale, (int, float)) or isinstance(scale, bool) or not scale > 0:
        raise InvalidArgumentError(f"scale must be a positive number or None, got {scale!r}")
    return float(scale)


def check_softcap(softcap) -> float:
    """``softcap`` as a float: 0 switches soft-capping off, a positive value caps scores at ``softcap * tanh(s /
    softcap)``."""
    if not isinstance(softcap, (int, float)) or isinstance(softcap, bool) or not 0 <= softcap < float("inf"):
        raise InvalidArgumentError(f"softcap must be a finite number >= 0 (0 switches soft-capping off), got {softcap!r}")
    return float(softcap)
