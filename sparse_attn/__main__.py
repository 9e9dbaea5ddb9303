"""Command line: ``python -m sparse_attn bench [options]``."""
import sys


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] in ("-h", "--help"):
        print("usage: python -m sparse_attn bench [--lengths L ...] [--patterns ...] [--no-flex]\n"
              "  bench   sparse vs dense attention on the synthetic workload (a table)")
        return 0
    if argv[0] == "bench":
        from .bench import main as bench_main
        bench_main(argv[1:])
        return 0
    print(f"unknown command {argv[0]!r}; try: python -m sparse_attn bench", file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main())
