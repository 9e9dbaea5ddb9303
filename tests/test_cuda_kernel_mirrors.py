"""The CUDA backend end to end on the CPU: the real launchers (`ops.cuda`) run unchanged, and each kernel launch
runs a step-by-step Python transcription of the kernel on what the launch arguments say (pointers, strides,
sizes, flags, grid, shared memory).  Checked against the torch index conversion and the dense fp32 oracle.
A GPU run (tests/test_cuda_gpu.py) checks the compiled kernels themselves; this checks the algorithms (tile and
column walks, row passes, key chunks, masking, online softmax) and the launch glue where no GPU is.  Keep the
transcriptions in step with csrc/."""
import math
import random

import pytest
import torch

import sparse_attn as sa
from sparse_attn.integrations.vertical_slash_clipped import clipped_vertical_slash_indexes
from sparse_attn.backends.cuda import launcher as cuda

from helpers import assert_close, assert_lse_close, lse_fp64, make_qkv, random_layout
from cuda_helpers import kernel_parameters, random_index_case

NEG_INF = float("-inf")


# ---------------------------------------------------------------------------------------------------- index kernel
def index_kernel(q_lens, kv_lens, verticals, slashes, block_count, block_offset, column_count, column_index, *,
                 heads, n_rows, nnz_v, nnz_s, max_tiles, block_m, block_n, causal):
    """csrc/vertical_slash_index.cu, one 'thread' per (b, h, m), on the launcher's prepared inputs (flat views)."""
    bm, bn = block_m, block_n
    batch = q_lens.numel()
    for b in range(batch):
        q_len, kv_len = int(q_lens[b]), int(kv_lens[b])
        n_qb = -(-q_len // bm)
        for h in range(heads):
            bh = b * heads + h
            vs = verticals[bh * nnz_v:(bh + 1) * nnz_v].tolist()
            ss = slashes[bh * nnz_s:(bh + 1) * nnz_s].tolist()
            for m in range(min(n_rows, n_qb)):
                row = bh * n_rows + m
                shift = kv_len - q_len
                p0 = m * bm + shift
                p1 = min((m + 1) * bm, q_len) - 1 + shift
                limit = p1 + 1 if causal else kv_len
                key_end = min(limit, kv_len)
                offsets, is_open, g_start, g_end = [], False, 0, 0
                for s in ss:
                    start, end = max(p0 - s, 0), min(p1 - s + 1, key_end)
                    if end <= start:
                        continue
                    if is_open and start < g_end + bn:
                        g_end = max(g_end, end)
                        continue
                    if is_open:
                        offsets += list(range(g_start, g_end, bn))
                    is_open, g_start, g_end = True, start, end
                if is_open:
                    offsets += list(range(g_start, g_end, bn))
                offsets = offsets[:max_tiles]
                block_count[row] = len(offsets)
                block_offset[row * max_tiles:row * max_tiles + len(offsets)] = torch.tensor(offsets, dtype=torch.int32)
                cols, t = [], 0
                for i, v in enumerate(vs):
                    if i > 0 and v == vs[i - 1]:
                        continue
                    if v < 0:
                        continue
                    if v >= limit:
                        break
                    while t < len(offsets) and offsets[t] + bn <= v:
                        t += 1
                    if t < len(offsets) and offsets[t] <= v:
                        continue
                    cols.append(v)
                column_count[row] = len(cols)
                column_index[row * nnz_v:row * nnz_v + len(cols)] = torch.tensor(cols, dtype=torch.int32)


# ---------------------------------------------------------------------------------------------------- emulation
class EmulatedDevice:
    """Stands in for CuPy and the GPU: the launchers run unchanged on CPU tensors, and each launch runs the
    kernel's mirror on what the launch arguments say (pointers resolved to the tensors behind them, strides,
    sizes and flags taken from the arguments, grid / block / shared memory checked against the kernel)."""

    def __init__(self, monkeypatch):
        self.tensors, self.launches = {}, []
        monkeypatch.setattr(cuda, "cuda_unavailable_reasons", lambda tensors=None: [])
        monkeypatch.setattr(cuda, "get_kernel", lambda source, name, defines, device: (source, name, defines))
        monkeypatch.setattr(cuda, "_launch", self.launch)
        monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
        for spied in ("attention_launch_args", "vertical_slash_launch_args"):
            monkeypatch.setattr(cuda, spied, self.spy(getattr(cuda, spied)))

    def spy(self, build_args):
        def wrapper(*args, **kwargs):
            for a in list(args) + list(kwargs.values()):
                for t in (a if isinstance(a, tuple) else (a,)):
                    if isinstance(t, torch.Tensor):
                        self.tensors[t.data_ptr()] = t
            return build_args(*args, **kwargs)
        return wrapper

    def buffer(self, pointer, size, stride=None, dtype=None):
        """The memory at ``pointer`` seen as ``size`` with ``stride`` (contiguous when None)."""
        if math.prod(size) == 0:                          # nothing is read (empty tensors may share address 0)
            return torch.empty(size, dtype=dtype)
        base = self.tensors[int(pointer)]
        if dtype is not None:
            assert base.dtype == dtype, f"kernel reads {dtype}, tensor is {base.dtype}"
        if stride is None:
            stride = torch.empty(size, device="meta").stride()
        return base.as_strided(size, stride, base.storage_offset())

    def launch(self, kernel, grid, block, args, device_index, shared_mem=0):
        source, name, defines = kernel
        named = {n: a.item() for (n, _), a in zip(kernel_parameters(source, name), args)}
        self.launches.append((name, grid, block, shared_mem, defines))
        if name == cuda.ATTENTION_KERNEL:
            self.attention(grid, block, shared_mem, defines, named)
        else:
            self.index(grid, block, named)

    def attention(self, grid, block, shared_mem, defines, a):
        D = defines["SA_HEAD_DIM"]
        dtype = {code: dt for dt, code in cuda.ATTENTION_DTYPES.items()}[defines["SA_DTYPE"]]
        n_qb, Hq, B = grid
        assert block == (cuda._ATT_THREADS,) and shared_mem == cuda.attention_shared_bytes(D)
        assert (n_qb, Hq) == (a["n_qb"], a["q_heads"])
        Hkv, Lq, Lk = Hq // a["group_size"], a["q_len"], a["k_len"]
        q = self.buffer(a["q"], (B, Hq, Lq, D), [a[f"sq{d}"] for d in "bhld"], dtype)
        k = self.buffer(a["k"], (B, Hkv, Lk, D), [a[f"sk{d}"] for d in "bhld"], dtype)
        v = self.buffer(a["v"], (B, Hkv, Lk, D), [a[f"sv{d}"] for d in "bhld"], dtype)
        index = [self.buffer(a[n], (B, Hq, n_qb, *w), dtype=torch.int32) for n, w in (
            ("block_count", ()), ("block_offset", (a["max_blocks"],)), ("column_count", ()),
            ("column_index", (a["max_columns"],)))]
        layout = sa.SparseLayout(*index, q_len=Lq, k_len=Lk, block_m=a["block_m"], block_n=a["block_n"])
        out, lse = mirror_sparse_attention(q, k, v, layout, causal=bool(a["causal"]),
                                           scale=a["scale_log2"] / 1.4426950408889634)
        self.buffer(a["out"], (B, Hq, Lq, D), dtype=dtype).copy_(out)
        if a["write_lse"]:
            self.buffer(a["lse"], (B, Hq, Lq), dtype=torch.float32).copy_(lse)
        else:
            assert a["lse"] == 0

    def index(self, grid, block, a):
        B = self.tensors[int(a["q_seqlens"])].numel()
        heads, n_rows, nnz_v, nnz_s, max_tiles = (a[n] for n in ("heads", "n_rows", "nnz_v", "nnz_s", "max_tiles"))
        assert block == (cuda._INDEX_THREADS,) and grid == (-(-n_rows // cuda._INDEX_THREADS), heads, B)
        flat = lambda name, n, dtype: self.buffer(a[name], (n,), dtype=dtype)          # noqa: E731
        index_kernel(flat("q_seqlens", B, torch.int32), flat("kv_seqlens", B, torch.int32),
                     flat("vertical", B * heads * nnz_v, torch.int64), flat("slash", B * heads * nnz_s, torch.int64),
                     flat("block_count", B * heads * n_rows, torch.int32),
                     flat("block_offset", B * heads * n_rows * max_tiles, torch.int32),
                     flat("column_count", B * heads * n_rows, torch.int32),
                     flat("column_index", B * heads * n_rows * nnz_v, torch.int32),
                     heads=heads, n_rows=n_rows, nnz_v=nnz_v, nnz_s=nnz_s, max_tiles=max_tiles,
                     block_m=a["block_m"], block_n=a["block_n"], causal=a["causal"])


@pytest.fixture
def emulated_device(monkeypatch):
    return EmulatedDevice(monkeypatch)


@pytest.mark.parametrize("causal", [True, False])
def test_index_kernel_equals_torch_conversion(emulated_device, causal):
    rng = random.Random(7 + causal)
    for _ in range(60):
        case = random_index_case(rng, causal)
        expected = clipped_vertical_slash_indexes(case[0].tolist(), case[1].tolist(), *case[2:7], causal=causal)
        got = cuda.cuda_convert_vertical_slash_indexes(*case[:7], causal=causal)
        for name, e, g in zip(("block_count", "block_offset", "column_count", "column_index"), expected, got):
            assert torch.equal(e, g), f"{name} differs for case {case}"
    assert len(emulated_device.launches) >= 50                  # empty cases return before launching


# ---------------------------------------------------------------------------------------------------- attention
def mirror_sparse_attention(q, k, v, layout, *, causal, scale, keys=cuda._ATT_KEYS, rows=cuda._ATT_ROWS):
    """csrc/sparse_attention.cu: per (b, h, m) block, passes of `rows` query rows, tiles then columns in chunks
    of `keys` keys, fp32 scores in log2 units, online softmax with the kernel's -inf rules."""
    B, Hq, Lq, D = q.shape
    Hkv, Lk = k.shape[1], k.shape[2]
    group = Hq // Hkv
    out = torch.zeros(B, Hq, Lq, D)
    lse = torch.full((B, Hq, Lq), NEG_INF)
    shift = Lk - Lq
    scale_log2 = torch.tensor(scale * 1.4426950408889634, dtype=torch.float32)
    for b in range(B):
        for h in range(Hq):
            kh, vh = k[b, h // group].float(), v[b, h // group].float()
            for m in range(layout.num_query_blocks):
                n_tiles, n_cols = int(layout.block_count[b, h, m]), int(layout.column_count[b, h, m])
                tiles, cols = layout.block_offset[b, h, m].tolist(), layout.column_index[b, h, m].tolist()
                block_end = min((m + 1) * layout.block_m, Lq)
                for row0 in range(m * layout.block_m, block_end, rows):
                    rows_in_pass = min(rows, block_end - row0)
                    first_row_pos = row0 + shift
                    key_end = min(Lk, first_row_pos + rows_in_pass) if causal else Lk
                    sq = q[b, h, row0:row0 + rows_in_pass].float() * scale_log2
                    pos = torch.arange(rows_in_pass) + first_row_pos
                    state = [torch.full((rows_in_pass,), NEG_INF), torch.zeros(rows_in_pass),
                             torch.zeros(rows_in_pass, D)]
                    chunks = []
                    for i in range(n_tiles):
                        first, last = max(tiles[i], 0), min(tiles[i] + layout.block_n, key_end)
                        for n0 in range(first, last, keys):
                            chunks.append([n0 + t if n0 + t < last else -1 for t in range(keys)])
                    for c0 in range(0, n_cols, keys):
                        chunk = [cols[c0 + t] if c0 + t < n_cols else -1 for t in range(keys)]
                        chunks.append([c if 0 <= c < key_end else -1 for c in chunk])
                    for key_pos in chunks:
                        _attend_chunk(sq, kh, vh, torch.tensor(key_pos), pos, causal, state)
                    row_max, row_sum, acc = state
                    inv = torch.where(row_sum > 0, 1.0 / row_sum, 0.0)
                    out[b, h, row0:row0 + rows_in_pass] = acc * inv[:, None]
                    lse[b, h, row0:row0 + rows_in_pass] = torch.where(
                        row_sum > 0, (row_max + torch.log2(row_sum)) * math.log(2), NEG_INF)
    return out.to(q.dtype), lse


def _attend_chunk(sq, kh, vh, key_pos, pos, causal, state):
    row_max, row_sum, acc = state
    valid_key = key_pos >= 0
    safe = key_pos.clamp(min=0)
    sk = torch.where(valid_key[:, None], kh[safe], 0.0)
    sv = torch.where(valid_key[:, None], vh[safe], 0.0)
    s = sq @ sk.T                                                             # [rows, keys], log2 units
    visible = valid_key[None, :] & ((key_pos[None, :] <= pos[:, None]) if causal else True)
    s = torch.where(visible, s, NEG_INF)
    new_max = torch.maximum(row_max, s.max(-1).values)
    none = new_max == NEG_INF
    alpha = torch.where(none, 1.0, torch.exp2(row_max - new_max))
    p = torch.where(none[:, None], 0.0, torch.exp2(s - new_max[:, None]))
    state[1] = row_sum * alpha + p.sum(-1)
    state[0] = new_max
    state[2] = acc * alpha[:, None] + p @ sv


# output rounding is the only low-precision step (inputs are read exactly, math is fp32): half an ulp of the dtype
ROUNDING = {torch.float32: 2e-6, torch.float16: 2.0 ** -10, torch.bfloat16: 2.0 ** -8}


@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("B,Hq,Hkv,Lq,Lk,bm,bn,dtype,contiguity", [
    (2, 4, 2, 65, 113, 64, 64, torch.float16, "contiguous"),   # GQA, Lq < Lk, partial last block
    (1, 3, 1, 130, 130, 100, 40, torch.bfloat16, "blhd"),      # MQA, block_m > ROWS: 2 passes; block_n > KEYS
    (2, 2, 2, 63, 400, 16, 8, torch.float32, "strided"),       # MHA, many tiles, > KEYS columns per block
    (1, 2, 1, 1, 63, 64, 64, torch.float16, "strided"),        # a single query row
])
def test_cuda_attention_launch_matches_oracle(emulated_device, causal, B, Hq, Hkv, Lq, Lk, bm, bn, dtype,
                                              contiguity):
    rng = random.Random(B * 1000 + Lq + Lk + causal)
    q, k, v = make_qkv(B, Hq, Hkv, Lq, Lk, 64, dtype=dtype, seed=Lk, contiguity=contiguity)
    v = v.contiguous() if contiguity != "contiguous" else v.transpose(1, 2).contiguous().transpose(1, 2)
    layout, _, _ = random_layout(rng, B, Hq, Lq, Lk, bm, bn, p_column=0.5)
    scale = 0.1
    out, lse = cuda.cuda_sparse_attention(q, k, v, layout, causal=causal, scale=scale, return_lse=True)
    assert out.dtype == dtype and out.shape == q.shape and out.is_contiguous() and lse.dtype == torch.float32
    mask = layout.to_mask()
    ref = sa.reference_attention(q.float(), k.float(), v.float(), mask, causal=causal, scale=scale)
    assert_close(out, ref, atol=2e-5, rtol=ROUNDING[dtype])
    assert_lse_close(lse, lse_fp64(q.float(), k.float(), mask, causal=causal, scale=scale).float(), atol=2e-5,
                     rtol=2e-5)
    visible = mask & causal_or_all(Lq, Lk, causal)
    assert torch.equal(torch.isneginf(lse), ~visible.any(-1))
    ((name, grid, _, _, defines),) = emulated_device.launches
    assert grid == (layout.num_query_blocks, Hq, B) and defines["SA_HEAD_DIM"] == 64
    assert sa.sparse_attention(q, k, v, layout, causal=causal, scale=scale, backend="cuda").dtype == dtype


def causal_or_all(Lq, Lk, causal):
    rows = torch.arange(Lq)[:, None] + (Lk - Lq)
    return torch.arange(Lk)[None, :] <= rows if causal else torch.ones(Lq, Lk, dtype=torch.bool)


def test_cuda_attention_launch_empty_rows_and_layouts(emulated_device):
    q, k, v = make_qkv(1, 2, 1, 40, 100, 64, seed=5)
    z3, z4 = torch.zeros(1, 2, 1, dtype=torch.int32), torch.zeros(1, 2, 1, 1, dtype=torch.int32)
    layout = sa.SparseLayout(z3, z4, z3, z4, q_len=40, k_len=100)
    out, lse = cuda.cuda_sparse_attention(q, k, v, layout, return_lse=True)
    assert torch.equal(out, torch.zeros_like(out)) and bool(torch.isneginf(lse).all())
    # a tile partly after the rows' positions under causal: the early rows see nothing (0, -inf), as in torch
    late = sa.SparseLayout(torch.ones_like(z3), torch.full_like(z4, 90), z3, z4, q_len=40, k_len=100, block_m=64)
    out, lse = cuda.cuda_sparse_attention(q, k, v, late, causal=True, scale=0.3, return_lse=True)
    t_out, t_lse = sa.sparse_attention(q, k, v, late, causal=True, scale=0.3, backend="torch", return_lse=True)
    assert_close(out, t_out, atol=1e-6)
    assert_lse_close(lse, t_lse)
    # no query rows: nothing to launch
    n_launches = len(emulated_device.launches)
    empty = sa.SparseLayout(torch.zeros(1, 2, 0, dtype=torch.int32), torch.zeros(1, 2, 0, 1, dtype=torch.int32),
                            torch.zeros(1, 2, 0, dtype=torch.int32), torch.zeros(1, 2, 0, 1, dtype=torch.int32),
                            q_len=0, k_len=100)
    out, lse = cuda.cuda_sparse_attention(q[:, :, :0], k, v, empty, return_lse=True)
    assert out.shape == (1, 2, 0, 64) and lse.shape == (1, 2, 0) and len(emulated_device.launches) == n_launches
