"""A replay of SGLang's dual-chunk attention prefill (``dual_chunk_flashattention_backend.py``, sparse mode) through
our engine functions, against a dense reference that applies the engines' semantics.

The backend splits a prefill into chunks of ``chunk_len`` keys; each query chunk attends to its own chunk (stage
"intra", causal), to the previous chunk ("succ", non-causal: the queries follow the keys) and to everything before
that ("inter", non-causal), each stage through ``convert_vertical_slash_indexes_mergehead`` + ``sparse_attn_func``
with per-head vertical / slash budgets in padded buffers, and merges the stages by their LSE.  This is our own
compact re-implementation of that call sequence (index arithmetic, padding, sorting, ``context_size = q_len``);
the reference builds each stage's mask from `engine_convert_walk` (the engines' per-block rules) and runs the fp32
oracle."""
import pytest
import torch

import sparse_attn as sa
from sparse_attn.integrations import convert_vertical_slash_indexes_mergehead, sparse_attn_func
from sparse_attn.integrations.vertical_slash_engine import engine_convert_walk
from sparse_attn.backends.merge import merge_partials

I32_MAX, I32_MIN = torch.iinfo(torch.int32).max, torch.iinfo(torch.int32).min
CHUNK_SIZE, LOCAL_SIZE = 640, 128                   # chunk_len = 512
LAST_Q = 64
V_SIZES, S_SIZES = [40, 130, 25, 60], [20, 64, 110, 33]      # per-head budgets (the backend's per-head config)


def fallback(n_keys: int) -> torch.Tensor:
    """The backend's stand-in when a stage gets no index: five evenly spread positions."""
    return torch.arange(0, n_keys, max(1, n_keys / 5), dtype=torch.int32)


def pad_heads(per_head: list[torch.Tensor], width: int, fill: int):
    buf = torch.full((len(per_head), width), fill, dtype=torch.int64)
    for h, t in enumerate(per_head):
        buf[h, :t.numel()] = t
    return buf, torch.tensor([t.numel() for t in per_head], dtype=torch.int32)


def estimate_topk(q_last, k_all, end, scale):
    """Per head: vertical_topk (key positions) and slash_topk (positions on the diagonal through the last query),
    from the attention of the last queries, as the backend scores them (first 30 keys, last 100 diagonals forced)."""
    H, n_last = q_last.shape[0], q_last.shape[1]
    qk = (q_last * scale) @ k_all.transpose(1, 2)                                   # [H, n_last, end]
    causal = torch.ones(n_last, n_last, dtype=torch.bool).tril()
    qk[:, :, -n_last:] = qk[:, :, -n_last:].masked_fill(~causal, float("-inf"))
    p = torch.softmax(qk, -1)
    vertical = p.sum(1)
    vertical[:, :30] = float("inf")
    verticals, slashes = [], []
    for h in range(H):
        diag = torch.zeros(end + n_last - 1)
        for r in range(n_last):                       # diagonal j of row r: key j - (n_last - 1 - r)
            diag[n_last - 1 - r:n_last - 1 - r + end] += p[h, r]
        slash = diag[n_last - 1:]                       # [end]: index j = key on the last query's diagonal
        slash[-100:] = float("inf")
        verticals.append(torch.topk(vertical[h], min(V_SIZES[h], end)).indices)
        slashes.append(torch.topk(slash, min(S_SIZES[h], end)).indices)
    return verticals, slashes


def engine_mask(q_len, kv_len, verticals, slashes, causal):
    """Bool [H, q_len, kv_len]: the keys the engines' index names (their per-block rules, `engine_convert_walk`)."""
    H = len(verticals)
    mask = torch.zeros(H, q_len, kv_len, dtype=torch.bool)
    for h in range(H):
        v = sorted(verticals[h].tolist())
        s = sorted(slashes[h].tolist(), reverse=True)
        for m in range(-(-q_len // 64)):
            tiles, columns = engine_convert_walk(q_len, kv_len, m, v, s, 64, 64, causal)
            rows = slice(m * 64, min((m + 1) * 64, q_len))
            for t in tiles:
                mask[h, rows, t:min(t + 64, kv_len)] = True
            mask[h, rows, [c for c in columns if 0 <= c < kv_len]] = True
    return mask


def run_stage(q, k, v, verticals, slashes, causal, scale):
    """The backend's sparse stage: sort, pad, mergehead convert with context_size = q_len, then sparse_attn_func;
    and the dense reference of the same stage.  q [L, H, D], k, v [Lk, H, D] (KV already repeated to q heads)."""
    q_len, kv_len = q.shape[0], k.shape[0]
    width_v, width_s = max(V_SIZES), max(S_SIZES)
    vbuf, v_counts = pad_heads(verticals, width_v, I32_MAX)
    sbuf, s_counts = pad_heads(slashes, width_s, I32_MIN)
    vbuf = vbuf.to(torch.int32).sort(-1).values[None]
    sbuf = sbuf.to(torch.int32).sort(-1, descending=True).values[None]
    index = convert_vertical_slash_indexes_mergehead(torch.tensor([q_len], dtype=torch.int32),
                                                     torch.tensor([kv_len], dtype=torch.int32), vbuf, sbuf,
                                                     v_counts, s_counts, q_len, 64, 64, causal)
    out, lse = sparse_attn_func(q[None], k[None], v[None], *index, causal=causal, softmax_scale=scale,
                                return_softmax_lse=True)
    mask = engine_mask(q_len, kv_len, verticals, slashes, causal)
    ref, ref_lse = sa.reference_attention(q.transpose(0, 1)[None], k.transpose(0, 1)[None], v.transpose(0, 1)[None],
                                          mask[None], causal=causal, scale=scale, return_lse=True)
    return (out[0], lse[0]), (ref[0].transpose(0, 1), ref_lse[0])


def replay(k_length, q_len, seed=0, H=4, D=64):
    """Run the dual-chunk prefill of the last ``q_len`` of ``k_length`` positions; returns per stage the max
    |out - ref| and |lse - ref lse| (over all chunks), the max difference of the merged output, and the stages seen
    as (name, q_len, kv_len)."""
    gen = torch.Generator().manual_seed(seed)
    q, q_succ, q_inter = (torch.randn(q_len, H, D, generator=gen) for _ in range(3))
    k, v = torch.randn(k_length, H, D, generator=gen), torch.randn(k_length, H, D, generator=gen)
    scale = D ** -0.5
    chunk_len = CHUNK_SIZE - LOCAL_SIZE
    diffs = {"intra": [0.0, 0.0], "succ": [0.0, 0.0], "inter": [0.0, 0.0]}
    seen, merged_diff = [], 0.0
    begin = k_length - q_len
    while begin < k_length:
        prev_end = (begin // chunk_len) * chunk_len
        end = min(prev_end + chunk_len, k_length)
        qb, qe = begin - (k_length - q_len), end - (k_length - q_len)
        n = qe - qb
        last = min(n, LAST_Q)
        verticals, slashes = estimate_topk(q[qb:qe].transpose(0, 1)[:, -last:], k[:end].transpose(0, 1), end, scale)
        stages = [("intra", q[qb:qe], prev_end, end, causal_base(end), True)]
        if prev_end - chunk_len >= 0:
            stages.append(("succ", q_succ[qb:qe], prev_end - chunk_len, prev_end, prev_end + n - 1, False))
        if prev_end - 2 * chunk_len >= 0:
            stages.append(("inter", q_inter[qb:qe], 0, prev_end - chunk_len, prev_end - chunk_len + n - 1, False))
        outs, refs = [], []
        for name, qs, lo, hi, base, causal in stages:
            v_idx, s_idx = stage_slices(name, verticals, slashes, lo, hi, base, prev_end, hi - lo)
            (o, l), (r, rl) = run_stage(qs, k[lo:hi], v[lo:hi], v_idx, s_idx, causal, scale)
            diffs[name][0] = max(diffs[name][0], (o - r).abs().max().item())
            finite = torch.isfinite(rl)
            assert torch.equal(torch.isposinf(l), ~finite)          # rows with no key: +inf here, -inf in ours
            diffs[name][1] = max(diffs[name][1], (l[finite] - rl[finite]).abs().max().item() if finite.any() else 0)
            outs.append((o, l))
            refs.append((r, rl))
            seen.append((name, qs.shape[0], hi - lo))
        merged = merge_as_backend(outs)
        ref_merged, _ = merge_partials([r.transpose(0, 1) for r, _ in refs], [rl for _, rl in refs])
        merged_diff = max(merged_diff, (merged - ref_merged.transpose(0, 1)).abs().max().item())
        begin = end
    return diffs, merged_diff, seen


def causal_base(end):
    return end - 1                         # intra slashes: (qk.size(-1) - 1) - slash_topk


def stage_slices(name, verticals, slashes, lo, hi, base, prev_end, kv_len):
    """The backend's per-stage selection of the estimated positions (its index arithmetic, one branch per stage)."""
    v_out, s_out = [], []
    for vt, st in zip(verticals, slashes):
        if name == "intra":
            v, s = vt[vt >= lo] - lo, base - st[st >= prev_end]
        elif name == "succ":
            v, s = vt[(vt < hi) & (vt >= lo)] - lo, base - st[(st >= lo) & (st < base + 1)]
        else:
            v, s = vt[vt < hi], base - st[st < base + 1]
        v_out.append(v if v.numel() else fallback(kv_len))
        s_out.append(s if s.numel() else fallback(kv_len))
    return v_out, s_out


def merge_as_backend(parts):
    """The backend's merge: softmax over the stages' LSEs weights their outputs (a single stage passes through)."""
    if len(parts) == 1:
        return parts[0][0]
    outs = torch.stack([o for o, _ in parts])                          # [S, L, H, D]
    lses = torch.stack([l for _, l in parts]).float()                  # [S, H, L]
    w = torch.softmax(lses, 0)
    return (outs * w.transpose(1, 2)[..., None]).sum(0)


@pytest.mark.parametrize("k_length,q_len,stages", [
    (1700, 1700, {"intra", "succ", "inter"}),    # full prefill: 4 chunks, the last one q 164 over succ kv 512
    (1024, 24, {"intra", "succ"}),               # chunked prefill: 24 new queries, intra over 512 keys
    (1700, 300, {"intra", "succ", "inter"}),     # chunked prefill spanning two chunks
])
def test_dual_chunk_replay_matches_engine_semantics(k_length, q_len, stages):
    diffs, merged, seen = replay(k_length, q_len)
    assert {name for name, _, _ in seen} == stages
    assert any(kv > q for _, q, kv in seen)             # context_size (= q_len) below kv_len was accepted
    for name in stages:
        assert diffs[name][0] < 1e-5 and diffs[name][1] < 1e-5, (name, diffs[name])
    assert merged < 1e-5


def test_replay_reference_is_not_the_named_keys():
    """The engine-semantics mask differs from "the keys the pattern names" (so the replay checks the engines'
    rules, not a looser superset): in a causal stage the engines drop verticals past the last slash range."""
    mask = engine_mask(64, 512, [torch.tensor([5, 300, 500])], [torch.tensor([400])], causal=True)
    # rows at 448..511, E = 512: slash 400 -> chunk [48, 112); vertical 5 is a column, 300 and 500 (visible to
    # every row, named by the pattern) lie past the last slash range and are dropped
    assert mask[0, :, 5].all() and mask[0, :, 48:112].all()
    assert not mask[0, :, 300].any() and not mask[0, :, 500].any()


if __name__ == "__main__":        # print the per-stage differences (the figures of the closing note)
    for args in ((1700, 1700), (1024, 24), (1700, 300)):
        d, mdiff, st = replay(*args)
        print(args, {k: [f"{x:.2e}" for x in val] for k, val in d.items()}, f"merged {mdiff:.2e}", sorted(set(st)))
