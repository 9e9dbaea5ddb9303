"""Helpers of the CUDA tests that run without a GPU too: kernel signatures parsed from the sources, random
vertical/slash index cases."""
from __future__ import annotations

import re
from pathlib import Path

import torch

CSRC = Path(__file__).resolve().parents[1] / "csrc"
_C_TYPES = {"int": "int32", "long long": "int64", "float": "float32"}


def kernel_parameters(source_name, kernel_name):
    """(name, numpy dtype name) of each parameter of an extern "C" kernel, parsed from its source."""
    text = re.sub(r"//[^\n]*", "", (CSRC / source_name).read_text())
    params = re.search(kernel_name + r"\s*\((.*?)\)\s*\{", text, re.S).group(1)
    out = []
    for p in params.split(","):
        p = " ".join(p.replace("__restrict__", "").replace("const ", "").split())
        ctype, name = p.rsplit(" ", 1)
        if "*" in p:
            out.append((name.lstrip("*"), "uint64"))
        else:
            out.append((name, _C_TYPES[ctype]))
    return out


def random_index_case(rng, causal):
    batch, heads = rng.randint(1, 3), rng.randint(1, 3)
    bm, bn = rng.choice([(64, 64), (32, 16), (16, 32), (64, 8), (8, 64)])
    context = rng.randint(1, 300)
    lens = []
    for _ in range(batch):
        kv = rng.randint(0, context)
        lens.append((rng.randint(0, kv), kv))
    nnz_v, nnz_s = rng.randint(0, 12), rng.randint(0, 8)
    # unsorted, duplicates, negatives and positions past the sequence: all must be handled as the torch path does
    vert = torch.tensor([[[rng.randint(-5, context + 5) for _ in range(nnz_v)] for _ in range(heads)]
                         for _ in range(batch)], dtype=torch.int64).reshape(batch, heads, nnz_v)
    slash = torch.tensor([[[rng.choice([rng.randint(-3, 5), rng.randint(0, context + 10)]) for _ in range(nnz_s)]
                           for _ in range(heads)] for _ in range(batch)], dtype=torch.int64)
    slash = slash.reshape(batch, heads, nnz_s)
    dtype = rng.choice([torch.int32, torch.int64])
    q_lens = torch.tensor([q for q, _ in lens], dtype=torch.int32)
    kv_lens = torch.tensor([kv for _, kv in lens], dtype=torch.int32)
    return q_lens, kv_lens, vert.to(dtype), slash.to(dtype), context, bm, bn, causal
