"""Old (main a30c6e2, built from /tmp/ck/old/old.cpp: its TORCH_LIBRARY renamed sparse_attn_cpu_old) vs new CPU kernel on the
same VerticalSlash(512, 1024) layout, timed in turns in one process; kernel only (no estimate).  A one-off script of
issue 20, kept for the record: it needs the old source at that path."""
import sys, time, torch, os
sys.path.insert(0, os.getcwd())
import sparse_attn as sa
from sparse_attn.synthetic import Workload, make_qkv
from sparse_attn.ops import cpu_kernel
from torch.utils.cpp_extension import load
load(name="sparse_attn_cpu_old", sources=["/tmp/ck/old/old.cpp"], extra_cflags=list(cpu_kernel.FLAGS),
     extra_ldflags=["-fopenmp"], build_directory="/tmp/ck/old", is_python_module=False)
old_op = torch.ops.sparse_attn_cpu_old.sparse_attention

def old_kernel(q, k, v, layout, scale):   # main's Python wrapper, verbatim in effect
    B, Hq, Lq, D = q.shape; Hkv, Lk = k.shape[1], k.shape[2]
    qf, vf = q.to(torch.float32).contiguous(), v.to(torch.float32).contiguous()
    ldk = (Lk // 16 + 1 + (Lk // 16) % 2) * 16
    k_t = q.new_empty(B, Hkv, D, ldk, dtype=torch.float32); k_t[..., :Lk] = k.transpose(-1, -2)
    counts = layout.block_count.contiguous(); col_counts = layout.column_count.contiguous()
    max_keys = int((counts.long() * min(layout.block_n, Lk) + col_counts).max())
    out, lse = old_op(qf, k_t, vf, layout.block_offset.contiguous(), counts, layout.column_index.contiguous(),
                      col_counts, layout.block_m, layout.block_n, True, float(scale), max_keys)
    return out.to(q.dtype)

heads = int(os.environ.get("HEADS", 8)); kvh = int(os.environ.get("KV_HEADS", 2))
for L in map(int, sys.argv[1:]):
    q, k, v = make_qkv(Workload(q_heads=heads, kv_heads=kvh, seq_len=L, head_dim=128))
    path = f"/tmp/ck/vs_{L}_{heads}.pt"
    if os.path.exists(path):
        lay = torch.load(path, weights_only=False)
    else:
        lay = sa.estimate(q, k, sa.VerticalSlash(vertical=512, slash=1024)); torch.save(lay, path)
    qb, kb, vb = (t.bfloat16() for t in (q, k, v))
    s = 128 ** -0.5
    def new_bf16_fp32route():
        os.environ["SPARSE_ATTN_CPU_LOW_PRECISION"] = "0"
        try:
            return cpu_kernel.cpu_kernel_attention(qb, kb, vb, lay, causal=True, scale=s)
        finally:
            del os.environ["SPARSE_ATTN_CPU_LOW_PRECISION"]
    fns = {"old fp32": lambda: old_kernel(q, k, v, lay, s),
           "new fp32": lambda: cpu_kernel.cpu_kernel_attention(q, k, v, lay, causal=True, scale=s),
           "old bf16 (fp32 copies)": lambda: old_kernel(qb, kb, vb, lay, s),
           "new bf16 (fp32 route)": new_bf16_fp32route,
           "new bf16 (bf16 GEMMs)": lambda: cpu_kernel.cpu_kernel_attention(qb, kb, vb, lay, causal=True, scale=s)}
    best, res = {n: float("inf") for n in fns}, {}
    for r in range(3):
        for n, f in fns.items():
            t = time.perf_counter(); res[n] = f(); best[n] = min(best[n], time.perf_counter() - t)
    ref = res["old fp32"].float()
    print(f"L={L} Hq={heads} Hkv={kvh} density={lay.density():.4f} (best of 3, in turns)")
    for n in fns:
        err = float((res[n].float() - ref).norm() / ref.norm())
        print(f"  {n:<24} {best[n] * 1e3:9.1f} ms  x{best[n] / best['old fp32']:.3f} of old fp32  rel diff vs old fp32 {err:.2e}")
    sys.stdout.flush()
