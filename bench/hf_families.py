"""The model-family table of issue 17: every family of `sparse_attn.tools.tiny_model.FAMILIES` (tiny configs,
random weights, nothing downloaded) patched with a full budget against its own attention: logit diffs (one row and
a left-padded batch), greedy tokens, sparse layer calls, unpatch.  Prints the table and writes it with the machine,
versions and date.

    PYTHONPATH=. python bench/hf_families.py [--out bench/results/hf-families-cpu-2core-2026-12-04.txt]
"""
import argparse
import datetime
import os
import platform
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from sparse_attn.tools.families import LENGTH, NEW_TOKENS, PAD, check_family, format_table  # noqa: E402
from sparse_attn.tools.tiny_model import FAMILIES  # noqa: E402

TOLERANCE = 1e-4


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--families", nargs="+", default=list(FAMILIES), choices=list(FAMILIES))
    parser.add_argument("--out", default="bench/results/hf-families-cpu-2core-2026-12-04.txt")
    args = parser.parse_args(argv)
    import transformers

    results = []
    for family in args.families:
        results.append(check_family(family))
        print(f"{family}: done in {results[-1].seconds:.1f} s", file=sys.stderr, flush=True)
    header = [
        f"# Model families x sparse_attn.hf.patch (full budget), {datetime.date.today()}",
        f"# machine: {platform.machine()} CPU, {os.cpu_count()} cores, torch threads {torch.get_num_threads()}; "
        f"torch {torch.__version__}, transformers {transformers.__version__}, python {platform.python_version()}",
        f"# each model: 4 layers, hidden 64, 4 query heads / 2 KV heads, vocab 128, random weights (fp32); prompt "
        f"{LENGTH} tokens; padded batch: 2 different rows, the second left-padded by {PAD}; greedy {NEW_TOKENS} new "
        f"tokens for the row and the batch; patch(VerticalSlash(10**6, 10**6), dense_below=0, dense_above=1.0); "
        f"'ok' = within {TOLERANCE}; baseline = the model's own attention (sdpa; eager for Gemma-2, which has no sdpa)",
        "# command: PYTHONPATH=. python bench/hf_families.py",
        "",
    ]
    text = "\n".join(header) + format_table(results, TOLERANCE) + "\n"
    print(text)
    if args.out:
        with open(args.out, "w") as f:
            f.write(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
