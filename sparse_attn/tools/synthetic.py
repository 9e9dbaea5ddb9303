"""Synthetic long-context workload with the attention structure sparse estimators were designed for.

Queries and keys are built in RoPE's rotating frame, so the dot product of query i and key j depends on i - j:
* a *local band* that decays smoothly with distance (shared components on RoPE's standard frequencies);
* *periodic diagonals* (a comb from harmonics of a period, like repeated structure in a document);
* *attention sinks* (the first keys) and a few *needle* columns (keys every query looks at), both on
  non-rotating components;
* Gaussian noise drawn differently for queries and keys (their distributions differ, as in real models).
Each head mixes these with its own weights, so heads differ the way real heads do.  No weights, no downloads."""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from ..errors import InvalidArgumentError


@dataclass(frozen=True)
class Workload:
    batch: int = 1
    q_heads: int = 8
    kv_heads: int = 2
    seq_len: int = 8192
    head_dim: int = 128
    q_len: int | None = None          # None: queries at every position (prefill); else the last q_len positions
    sinks: int = 4
    needles: int = 16
    period: int = 997
    seed: int = 0
    dtype: torch.dtype = torch.float32


def make_qkv(w: Workload = Workload(), device="cpu"):
    """``q [B, Hq, Lq, D]``, ``k, v [B, Hkv, L, D]`` of the synthetic workload (deterministic in ``w.seed``)."""
    if w.head_dim < 32 or w.head_dim % 2:
        raise InvalidArgumentError(f"head_dim must be an even number >= 32, got {w.head_dim}")
    if w.q_heads % w.kv_heads:
        raise InvalidArgumentError(f"q_heads ({w.q_heads}) must be a multiple of kv_heads ({w.kv_heads})")
    gen = torch.Generator().manual_seed(w.seed)
    B, Hq, Hkv, L, D = w.batch, w.q_heads, w.kv_heads, w.seq_len, w.head_dim
    pairs = D // 2
    n_comb, n_flat = 8, 2                                   # pairs for the periodic comb, non-rotating pairs
    n_local = pairs - n_comb - n_flat
    theta = torch.cat([10000.0 ** (-torch.arange(n_local) / n_local),
                       2 * math.pi * torch.arange(1, n_comb + 1) / w.period, torch.zeros(n_flat)])

    def amplitude(logit: float, n_pairs: int) -> float:
        """Per-pair amplitude (same for q and k) giving ``logit`` after the 1/sqrt(D) scaling, at zero phase."""
        return math.sqrt(logit * math.sqrt(D) / n_pairs)

    # Peak logits of each structure; each query head weighs them (0..1) its own way, as real heads do.
    a_local, a_comb = amplitude(14.0, n_local), amplitude(10.0, n_comb)
    a_sink, a_needle = amplitude(16.0, 1), amplitude(13.0, 1)
    mix = torch.rand(B, Hq, 4, generator=gen)
    local_w = 0.55 + 0.45 * mix[..., 0]
    comb_w = torch.where(mix[..., 1] < 0.5, 0.0, 0.6 + 0.8 * (mix[..., 1] - 0.5))
    sink_w = 0.75 + 0.25 * mix[..., 2]
    needle_w = 0.6 + 0.4 * mix[..., 3]

    k_pre = torch.randn(B, Hkv, L, pairs, 2, generator=gen) * 0.35
    q_pre = torch.randn(B, Hq, L, pairs, 2, generator=gen) * 0.45
    flat0, flat1 = n_local + n_comb, n_local + n_comb + 1
    k_pre[..., :n_local, 0] += a_local
    k_pre[..., n_local:flat0, 0] += a_comb
    k_pre[..., :w.sinks, flat0, 0] += a_sink
    needle_pos = torch.randint(w.sinks + 1, max(L, w.sinks + 2), (B, Hkv, w.needles), generator=gen)
    k_pre[..., flat1, 0].scatter_add_(-1, needle_pos.clamp(max=L - 1), torch.full(needle_pos.shape, a_needle))
    q_pre[..., :n_local, 0] += (local_w * a_local)[..., None, None]
    q_pre[..., n_local:flat0, 0] += (comb_w * a_comb)[..., None, None]
    q_pre[..., flat0, 0] += (sink_w * a_sink)[..., None]
    q_pre[..., flat1, 0] += (needle_w * a_needle)[..., None]
    return _rotated_qkv(q_pre, k_pre, theta, w, gen, device)


def _rotated_qkv(q_pre, k_pre, theta, w, gen, device):
    """RoPE-rotated q (the last ``w.q_len`` positions) and k, and random v, in ``w.dtype`` on ``device``."""
    L = k_pre.shape[2]
    pos_all = torch.arange(L)
    q_len = L if w.q_len is None else w.q_len
    q = _rotate(q_pre[:, :, L - q_len:], theta, pos_all[L - q_len:])
    k = _rotate(k_pre, theta, pos_all)
    v = torch.randn(k.shape, generator=gen)
    return (q.to(device=device, dtype=w.dtype), k.to(device=device, dtype=w.dtype),
            v.to(device=device, dtype=w.dtype))


def _rotate(x: torch.Tensor, theta: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
    """Apply RoPE: rotate pair f of position p by p * theta[f]; [..., L, pairs, 2] -> [..., L, 2 * pairs]."""
    angle = pos[:, None].double() * theta[None, :].double()
    cos, sin = angle.cos().float(), angle.sin().float()
    x0, x1 = x[..., 0], x[..., 1]
    return torch.stack([x0 * cos - x1 * sin, x0 * sin + x1 * cos], -1).flatten(-2)


# ---------------------------------------------------------------------------------------------------- mixed modality
@dataclass(frozen=True)
class MixedWorkload:
    """Text, then a video of whole frames, then text (the video takes what ``text_before`` and ``text_after``
    leave, in whole frames; the rest goes to the text after).  ``q_len`` as in `Workload`."""

    batch: int = 1
    q_heads: int = 8
    kv_heads: int = 2
    seq_len: int = 32768
    head_dim: int = 128
    q_len: int | None = None
    text_before: int = 1000
    text_after: int = 1500
    frame_tokens: int = 576            # e.g. a 24 x 24 patch grid per frame
    sinks: int = 4
    needles: int = 16                  # text keys (in the text before) that every text query looks at
    prompt_keys: int = 8               # text keys (in the text before) that every video query looks at
    salient: int = 16                  # video keys that the text after the video looks at
    seed: int = 0
    dtype: torch.dtype = torch.float32

    def spans(self):
        """The `ModalitySpans` of this workload: one video span with its frame size."""
        from ..patterns.modality_spans import ModalitySpans

        frames = (self.seq_len - self.text_before - self.text_after) // self.frame_tokens
        if frames < 1 or self.text_before < self.sinks + max(self.needles, self.prompt_keys) + 1:
            raise InvalidArgumentError(f"MixedWorkload: seq_len {self.seq_len} leaves no whole frame of {self.frame_tokens} "
                             f"tokens between text_before={self.text_before} and text_after={self.text_after} "
                             f"(or text_before is too short for the sinks, needles and prompt keys)")
        start = self.text_before
        return ModalitySpans.of([(start, start + frames * self.frame_tokens, "video", self.frame_tokens)],
                                self.seq_len)


def make_mixed_qkv(w: MixedWorkload = MixedWorkload(), device="cpu"):
    """``q [B, Hq, Lq, D]``, ``k, v [B, Hkv, L, D]`` and the `ModalitySpans` of a text / video / text sequence whose
    attention changes at the modality boundaries:

    * text -> text: a strong local band, sinks, ``needles`` key columns in the text before;
    * video -> video: a *grid*: the same spatial position in every earlier frame (a comb of harmonics of the frame
      size on RoPE-rotating components, present in video queries and keys only), a weaker local band, sinks;
    * video -> text: ``prompt_keys`` columns in the text before (the instruction);
    * text after -> video: ``salient`` columns inside the video.
    Same construction as `make_qkv` (RoPE frame, per-head weights, Gaussian noise); deterministic in ``w.seed``."""
    if w.head_dim < 32 or w.head_dim % 2:
        raise InvalidArgumentError(f"head_dim must be an even number >= 32, got {w.head_dim}")
    if w.q_heads % w.kv_heads:
        raise InvalidArgumentError(f"q_heads ({w.q_heads}) must be a multiple of kv_heads ({w.kv_heads})")
    spans = w.spans()
    video = spans.spans[0]
    gen = torch.Generator().manual_seed(w.seed)
    B, Hq, Hkv, L, D = w.batch, w.q_heads, w.kv_heads, w.seq_len, w.head_dim
    pairs = D // 2
    n_flat = 4                                               # sink, needle, prompt, salient (non-rotating)
    n_comb = n_local = (pairs - n_flat) * 3 // 8
    n_noise = pairs - n_flat - n_comb - n_local
    theta = torch.cat([10000.0 ** (-torch.arange(n_local) / n_local),
                       2 * math.pi * torch.arange(1, n_comb + 1) / w.frame_tokens, torch.zeros(n_flat + n_noise)])
    c0, f0 = n_local, n_local + n_comb                       # first comb pair, first flat pair
    sink_p, needle_p, prompt_p, salient_p = f0, f0 + 1, f0 + 2, f0 + 3

    def amplitude(logit: float, n_pairs: int) -> float:
        return math.sqrt(logit * math.sqrt(D) / n_pairs)

    a_local, a_comb = amplitude(14.0, n_local), amplitude(11.0, n_comb)
    a_sink, a_needle, a_prompt, a_salient = (amplitude(x, 1) for x in (16.0, 13.0, 12.0, 13.0))
    mix = torch.rand(B, Hq, 7, generator=gen)
    text_local_w, video_local_w = 0.55 + 0.45 * mix[..., 0], 0.3 + 0.3 * mix[..., 1]
    comb_w, sink_w = 0.8 + 0.4 * mix[..., 2], 0.75 + 0.25 * mix[..., 3]
    needle_w, prompt_w, salient_w = (0.6 + 0.4 * mix[..., i] for i in (4, 5, 6))

    is_video = torch.zeros(L, dtype=torch.bool)
    is_video[video.start:video.end] = True
    is_text = ~is_video
    after = torch.arange(L) >= video.end

    k_pre = torch.randn(B, Hkv, L, pairs, 2, generator=gen) * 0.35
    q_pre = torch.randn(B, Hq, L, pairs, 2, generator=gen) * 0.45
    k_pre[..., :n_local, 0] += a_local
    k_pre[..., video.start:video.end, c0:f0, 0] += a_comb
    k_pre[..., :w.sinks, sink_p, 0] += a_sink

    def columns(n, lo, hi):        # distinct positions: a repeated one would double its logit
        return torch.rand(B, Hkv, hi - lo, generator=gen).argsort(-1)[..., :n] + lo

    for pair, n, lo, hi, a in ((needle_p, w.needles, w.sinks, w.text_before, a_needle),
                               (prompt_p, w.prompt_keys, w.sinks, w.text_before, a_prompt),
                               (salient_p, w.salient, video.start, video.end, a_salient)):
        pos = columns(n, lo, hi)
        k_pre[..., pair, 0].scatter_add_(-1, pos, torch.full(pos.shape, a))

    def add_q(pair_slice, weight, amp, rows):
        q_pre[..., pair_slice, 0] += (weight * amp)[..., None, None] * rows[:, None].float()

    add_q(slice(0, n_local), text_local_w, a_local, is_text)
    add_q(slice(0, n_local), video_local_w, a_local, is_video)
    add_q(slice(c0, f0), comb_w, a_comb, is_video)
    add_q(slice(sink_p, sink_p + 1), sink_w, a_sink, torch.ones(L, dtype=torch.bool))
    add_q(slice(needle_p, needle_p + 1), needle_w, a_needle, is_text)
    add_q(slice(prompt_p, prompt_p + 1), prompt_w, a_prompt, is_video)
    add_q(slice(salient_p, salient_p + 1), salient_w, a_salient, after)

    return (*_rotated_qkv(q_pre, k_pre, theta, w, gen, device), spans)


# ---------------------------------------------------------------------------------------------------- hard workload
#: Head kinds of `HardWorkload`, assigned to query heads in this order (cycled).
HARD_KINDS = ("sink", "far_needle", "document", "periodic", "broad", "document", "diffuse", "far_needle")


@dataclass(frozen=True)
class HardWorkload:
    """A workload made to break sample-based estimators: every query head has one kind (`HARD_KINDS`, cycled):

    * ``sink``: sinks and a sharp local band (the easy case);
    * ``far_needle``: a few needle keys in the first quarter of the sequence, far from the sampled last queries;
    * ``document``: the sequence is a run of documents (``doc_min``..``doc_max`` tokens); a query attends to its whole
      own document almost uniformly (mass spread over thousands of keys, but in one contiguous block per row);
    * ``periodic``: repeats every ``period`` tokens (diagonals far from the main one);
    * ``broad``: a slowly decaying band (about half of the keys before a query for 0.95 of its mass);
    * ``diffuse``: content-random attention with log-normal weights (``diffuse_sigma``): no structure at all.
    Same RoPE frame and per-head weights as `make_qkv`; deterministic in ``seed``."""

    batch: int = 1
    q_heads: int = 8
    kv_heads: int = 2
    seq_len: int = 16384
    head_dim: int = 128
    q_len: int | None = None
    sinks: int = 4
    needles: int = 8
    period: int = 1531
    doc_min: int = 1024
    doc_max: int = 4096
    diffuse_sigma: float = 1.5
    kinds: tuple = HARD_KINDS
    seed: int = 0
    dtype: torch.dtype = torch.float32


def make_hard_qkv(w: HardWorkload = HardWorkload(), device="cpu"):
    """``q [B, Hq, Lq, D]``, ``k, v [B, Hkv, L, D]`` of `HardWorkload` ``w``."""
    if w.head_dim < 64 or w.head_dim % 2:
        raise InvalidArgumentError(f"head_dim must be an even number >= 64, got {w.head_dim}")
    if w.q_heads % w.kv_heads:
        raise InvalidArgumentError(f"q_heads ({w.q_heads}) must be a multiple of kv_heads ({w.kv_heads})")
    bad = [kind for kind in w.kinds if kind not in HARD_KINDS]
    if bad or not w.kinds:
        raise InvalidArgumentError(f"kinds must be a non-empty tuple of {HARD_KINDS}, got {w.kinds!r}")
    gen = torch.Generator().manual_seed(w.seed)
    B, Hq, Hkv, L, D = w.batch, w.q_heads, w.kv_heads, w.seq_len, w.head_dim
    pairs = D // 2
    n_topic, n_noise, n_comb, n_flat = 8, 8, 6, 2                 # document topics, diffuse noise, comb, sink+needle
    n_local = pairs - n_topic - n_noise - n_comb - n_flat
    c0 = n_local
    t0 = c0 + n_comb
    z0 = t0 + n_topic
    sink_p, needle_p = z0 + n_noise, z0 + n_noise + 1
    # Local pairs: the first half on RoPE's fast frequencies (sharp band), the second on slow ones (broad band).
    half = n_local // 2
    theta = torch.cat([10000.0 ** (-torch.arange(half) / n_local),
                       (2 * math.pi / L) * (torch.arange(n_local - half) + 1) / (n_local - half),
                       2 * math.pi * torch.arange(1, n_comb + 1) / w.period, torch.zeros(n_topic + n_noise + n_flat)])

    def amplitude(logit: float, n_pairs: int) -> float:
        return math.sqrt(logit * math.sqrt(D) / n_pairs)

    kind = [w.kinds[h % len(w.kinds)] for h in range(Hq)]
    k_pre = torch.randn(B, Hkv, L, pairs, 2, generator=gen) * 0.3
    q_pre = torch.randn(B, Hq, L, pairs, 2, generator=gen) * 0.3
    k_pre[..., n_local:, :] *= 0.3                                # quiet structure pairs unless a kind uses them
    q_pre[..., n_local:, :] *= 0.3
    k_pre[..., :half, 0] += amplitude(14.0, half)
    k_pre[..., half:n_local, 0] += amplitude(12.0, n_local - half)
    k_pre[..., c0:t0, 0] += amplitude(10.0, n_comb)
    k_pre[..., :w.sinks, sink_p, 0] += amplitude(16.0, 1)
    needle_pos = torch.rand(B, Hkv, max(L // 4 - w.sinks, 1), generator=gen).argsort(-1)[..., :w.needles] + w.sinks
    k_pre[..., needle_p, 0].scatter_add_(-1, needle_pos.clamp(max=L - 1),
                                         torch.full(needle_pos.shape, amplitude(15.0, 1)))
    # Documents: each gets a random unit topic vector; its keys carry it (and so do document heads' queries).
    bounds = [0]
    while bounds[-1] < L:
        bounds.append(bounds[-1] + int(torch.randint(w.doc_min, w.doc_max + 1, (1,), generator=gen)))
    doc_of = torch.bucketize(torch.arange(L), torch.tensor(bounds[1:]), right=True)           # [L]
    topics = torch.randn(B, Hkv, len(bounds), n_topic * 2, generator=gen)
    topics = topics / topics.norm(dim=-1, keepdim=True) * math.sqrt(12.0 * math.sqrt(D))
    k_pre[..., t0:z0, :] += topics[:, :, doc_of].reshape(B, Hkv, L, n_topic, 2)
    # Diffuse: strong random components on the noise pairs of keys; diffuse queries read them.
    k_noise = torch.randn(B, Hkv, L, n_noise, 2, generator=gen)
    k_pre[..., z0:sink_p, :] = k_noise

    a_sink = amplitude(16.0, 1)
    for h, kd in enumerate(kind):
        kv = h // (Hq // Hkv)
        q_pre[:, h, :, sink_p, 0] += a_sink * (1.0 if kd == "sink" else 0.3)
        if kd in ("sink", "far_needle", "periodic"):
            q_pre[:, h, :, :half, 0] += amplitude(14.0, half)
        if kd == "far_needle":
            q_pre[:, h, :, needle_p, 0] += amplitude(15.0, 1)
        if kd == "periodic":
            q_pre[:, h, :, c0:t0, 0] += amplitude(10.0, n_comb)
        if kd == "broad":
            q_pre[:, h, :, half:n_local, 0] += amplitude(12.0, n_local - half)
        if kd == "document":
            q_pre[:, h, :, t0:z0, :] += topics[:, kv, doc_of].reshape(B, L, n_topic, 2)
        if kd == "diffuse":
            # logit std sigma from q . k over 2 n_noise unit-variance key components, after 1/sqrt(D)
            q_pre[:, h, :, z0:sink_p, :] = torch.randn(B, L, n_noise, 2, generator=gen) * (
                w.diffuse_sigma * math.sqrt(D) / math.sqrt(2 * n_noise) / 1.0)
    return _rotated_qkv(q_pre, k_pre, theta, w, gen, device)
