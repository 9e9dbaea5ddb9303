"""Time to first token of a follow-up question on a long saved context: re-prefilled (dense sdpa, sparse patch)
vs restored (sparse_attn.hf.reuse_context) from RAM and from SSD, with the bytes read.  Not collected by pytest.

A random-weight Llama (2 layers, hidden 1024, 16 query heads, 4 KV heads, head dim 64, fp32) prefills a
``--context``-token prompt once and saves its KV in a ContextCatalogue; each variant then answers a request of the
context + ``--question`` new tokens, up to the first token (the argmax of the last logits):

* ``dense``: the whole prompt with transformers' ``sdpa`` attention (``logits_to_keep=1``);
* ``sparse``: the same, patched with ``sparse_attn.hf.patch(model, VerticalSlash(512, 1024))``;
* ``ram``: lookup + restore of the full KV into a DynamicCache while the saved files are in the OS page cache
  (reads served from RAM), then the question's prefill (sdpa) over the restored keys;
* ``ssd``: the same after the saved files were dropped from the page cache with ``posix_fadvise(DONTNEED)``
  (unprivileged: dropping the whole page cache needs root, dropping one file's clean pages does not);
* ``ssd-retrieval``: restore into a RetrievalCache (keys read into RAM, values left in the saved files, read page
  by page for the top-k keys), the question through retrieval attention (``--top-k``; approximate).

Bytes read are ``/proc/self/io``'s ``read_bytes`` (from the block device: 0 when the page cache served them) and
``rchar`` (every read call).  The disk's own sequential read speed is measured on a fresh file dropped the same
way.  Variants run in turns, round after round, in one process (the VM's speed drifts); the table gives each
variant's median and its ratio to dense, the logits' max difference from dense, and the bytes read.

    flock /tmp/sparse_attn_bench.lock env PYTHONPATH=. python bench/context_reuse.py \
        [--context 32768] [--question 64] [--rounds 3] [--out bench/results/context-reuse-....txt]
"""
from __future__ import annotations

import argparse
import os
import platform
import shutil
import statistics
import tempfile
import time

import torch


def proc_io() -> tuple[int, int]:
    """(read_bytes, rchar) of this process so far."""
    fields = dict(line.split(": ") for line in open("/proc/self/io").read().splitlines() if line)
    return int(fields["read_bytes"]), int(fields["rchar"])


def drop_from_page_cache(directory) -> None:
    """Evict the clean cached pages of every file under ``directory`` (posix_fadvise DONTNEED; no root needed)."""
    for root, _, files in os.walk(directory):
        for name in files:
            fd = os.open(os.path.join(root, name), os.O_RDONLY)
            os.fsync(fd)
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
            os.close(fd)


def disk_read_speed(directory, mib: int = 512) -> dict:
    """Sequential read of a fresh ``mib`` MiB file: cold (dropped from the page cache) and warm, in MiB/s."""
    path = os.path.join(directory, "read_speed.bin")
    block = os.urandom(8 << 20)
    with open(path, "wb") as f:
        for _ in range(mib // 8):
            f.write(block)
        f.flush()
        os.fsync(f.fileno())
    result = {}
    for name, drop in (("cold", True), ("warm", False)):
        if drop:
            drop_from_page_cache(directory)
        before, start = proc_io(), time.perf_counter()
        with open(path, "rb", buffering=0) as f:
            while f.read(8 << 20):
                pass
        seconds = time.perf_counter() - start
        result[name] = (mib / seconds, (proc_io()[0] - before[0]) / 2**20)
    os.remove(path)
    return result


def build(args):
    from sparse_attn.tools.tiny_model import tiny_llama

    return tiny_llama(args.layers, args.hidden, args.heads, args.kv_heads, args.vocab, seed=0)


@torch.no_grad()
def first_token(model, ids, cache=None):
    """(last logits [vocab], the first token) of a forward over ``ids`` with ``cache``."""
    logits = model(ids, cache=cache, logits_to_keep=1, use_cache=cache is not None).logits[0, -1]
    return logits, int(logits.argmax())


def main(argv=None):
    import sparse_attn as sa
    import sparse_attn.hf as sah
    from sparse_attn.integrations.hf.decode_cache import register
    from sparse_attn.retrieval import ContextCatalogue
    from sparse_attn.tools.timing import time_in_turns

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--context", type=int, default=32768)
    parser.add_argument("--question", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--hidden", type=int, default=1024)
    parser.add_argument("--heads", type=int, default=16)
    parser.add_argument("--kv-heads", type=int, default=4)
    parser.add_argument("--vocab", type=int, default=1024)
    parser.add_argument("--top-k", type=int, default=100)
    parser.add_argument("--read-mib", type=int, default=512, help="size of the disk read-speed probe file")
    parser.add_argument("--dir", default=None, help="where the contexts go (default: a temporary directory)")
    parser.add_argument("--out", default=None, help="also write the report to this file")
    args = parser.parse_args(argv)

    lines = []

    def say(text=""):
        print(text, flush=True)
        lines.append(text)

    work = tempfile.mkdtemp(prefix="context_reuse_", dir=args.dir)
    try:
        model = build(args)
        gen = torch.Generator().manual_seed(0)
        ids = torch.randint(0, args.vocab, (1, args.context + args.question), generator=gen)
        context = ids[:, :args.context]
        catalogue = ContextCatalogue(os.path.join(work, "contexts"))
        start = time.perf_counter()
        with torch.no_grad():
            out = model(context, use_cache=True, logits_to_keep=1)
        cache = out.cache if "cache" in out else out.past_key_values      # renamed in transformers 5.x
        del out
        prefill_s = time.perf_counter() - start
        start = time.perf_counter()
        directory = sah.save_context(model, cache, context, catalogue)
        save_s = time.perf_counter() - start
        saved_bytes = catalogue.total_bytes()
        del cache
        speed = disk_read_speed(work, args.read_mib)

        sdpa = model.config._attn_implementation
        pattern = sa.VerticalSlash(vertical=512, slash=1024)

        def dense():
            return first_token(model, ids)

        def sparse():
            sah.patch(model, pattern)
            try:
                return first_token(model, ids)
            finally:
                sah.unpatch(model)

        def restored(cold):
            def run():
                if cold:
                    drop_from_page_cache(directory)
                r = sah.reuse_context(model, ids, catalogue)
                assert r is not None and r.tokens == args.context
                return first_token(model, ids[:, r.tokens:], r.cache)
            return run

        def retrieval():
            drop_from_page_cache(directory)
            scratch = tempfile.mkdtemp(dir=work)
            model.set_attn_implementation(register())
            try:
                r = sah.reuse_context(model, ids, catalogue, into="retrieval", top_k=args.top_k,
                                      scratch_dir=scratch)
                return first_token(model, ids[:, r.tokens:], r.cache)
            finally:
                model.set_attn_implementation(sdpa)
                shutil.rmtree(scratch, ignore_errors=True)

        variants = {"dense": dense, "sparse": sparse, "ram": restored(False), "ssd": restored(True),
                    "ssd-retrieval": retrieval}
        io = {name: [] for name in variants}

        def counted(name, fn):                                     # the bytes each call read
            def run():
                before = proc_io()
                result = fn()
                after = proc_io()
                io[name].append((after[0] - before[0], after[1] - before[1]))
                return result
            return run

        restored(False)()                                          # warm-up: the restore and suffix paths
        retrieval()
        sah.patch(model, pattern)                                  # and the sparse kernel (built on first use)
        first_token(model, ids[:, -8192:])
        sah.unpatch(model)
        timings = time_in_turns({name: counted(name, fn) for name, fn in variants.items()}, args.rounds, warmup=0)
        times, logits = timings.samples, timings.results

        say(f"# context reuse: time to first token, {args.context}-token context + {args.question}-token question")
        say(f"date {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}; {platform.machine()} CPU, "
            f"{os.cpu_count()} cores, torch {torch.__version__}, threads {torch.get_num_threads()}; "
            f"python {platform.python_version()}")
        import transformers
        say(f"transformers {transformers.__version__}; model: random-weight Llama, {args.layers} layers, hidden "
            f"{args.hidden}, {args.heads} query heads, {args.kv_heads} KV heads, head dim {args.hidden // args.heads}, "
            f"fp32, vocab {args.vocab}")
        say(f"command: python bench/context_reuse.py {' '.join(argv if argv is not None else os.sys.argv[1:])}")
        say(f"first prefill (sdpa, once) {prefill_s:.2f} s; save_context {save_s:.2f} s, {saved_bytes / 2**20:.1f} MiB "
            f"on disk")
        say(f"disk sequential read of a fresh {args.read_mib} MiB file: cold {speed['cold'][0]:.0f} MiB/s "
            f"({speed['cold'][1]:.0f} MiB from the device), warm (page cache) {speed['warm'][0]:.0f} MiB/s "
            f"({speed['warm'][1]:.0f} MiB from the device)")
        say(f"rounds {args.rounds} (sparse_attn.tools.timing.time_in_turns: every variant once per round, in turns); "
            f"times are medians (all runs listed)")
        say()
        say("| variant | TTFT median | runs (s) | vs dense | max abs logit diff vs dense | same first token | "
            "read from device | read calls (rchar) |")
        say("|---|---|---|---|---|---|---|---|")
        base = timings.median("dense")
        ref_logits, ref_token = logits["dense"]
        for name in variants:
            med = timings.median(name)
            out, token = logits[name]
            dev = statistics.median(b for b, _ in io[name]) / 2**20
            rchar = statistics.median(c for _, c in io[name]) / 2**20
            say(f"| {name} | {med:.3f} s | {', '.join(f'{t:.3f}' for t in times[name])} | {base / med:.1f}x | "
                f"{(out - ref_logits).abs().max().item():.2e} | {token == ref_token} | {dev:.1f} MiB | "
                f"{rchar:.1f} MiB |")
        if args.out:
            with open(args.out, "w") as f:
                f.write("\n".join(lines) + "\n")
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
