"""Command line: ``python -m sparse_attn <command> [options]``.

Each command lives in its own module with a ``main(argv)``; it is imported only when asked for, so a command's
optional dependencies (transformers, faiss) are never needed by the others.  A command raises
`sparse_attn.tools.cli.InputError` for a wrong input: one line on stderr, exit code 2.
"""
import importlib
import sys

#: command -> (module relative to this package, one-line help)
COMMANDS = {
    "bench": (".tools.bench", "sparse vs dense attention on the synthetic workload (a table)"),
    "calibrate": (".tools.calibrate_cli", "per-head pattern search on a model's calibration input -> a config JSON"),
    "demo": (".tools.demo", "a small random Llama: generate with sdpa vs sparse attention (time, density, agreement)"),
    "needle": (".tools.needle", "needle-in-a-haystack accuracy of a local causal LM, dense vs sparse (table, heatmap)"),
}


def _usage() -> str:
    lines = ["usage: python -m sparse_attn <command> [options]   (<command> --help for its options)"]
    lines += [f"  {name:<10} {help_}" for name, (_, help_) in COMMANDS.items()]
    return "\n".join(lines)


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] in ("-h", "--help"):
        print(_usage())
        return 0
    if argv[0] not in COMMANDS:
        print(f"python -m sparse_attn: error: unknown command {argv[0]!r} (commands: {', '.join(COMMANDS)})",
              file=sys.stderr)
        return 2
    module = importlib.import_module(COMMANDS[argv[0]][0], __package__)
    from .tools.cli import InputError, report
    try:
        result = module.main(argv[1:])
    except InputError as e:          # a wrong input: one line and exit code 2, not a traceback
        return report(f"python -m sparse_attn {argv[0]}", e)
    return 0 if result is None else result


if __name__ == "__main__":
    sys.exit(main())
