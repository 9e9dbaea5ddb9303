"""What the commands of ``python -m sparse_attn`` share: a wrong input is one line on stderr and exit code 2 (as
argparse does for a bad option, without the usage block), never a traceback; progress goes to stderr."""
from __future__ import annotations

import argparse
import os
import sys
from contextlib import contextmanager

from ..errors import InvalidArgumentError

#: exit code of a command whose input is wrong (argparse's)
INPUT_ERROR = 2
#: files of which a model directory needs one for `AutoTokenizer` to load it
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json", "tokenizer.tiktoken")


class InputError(InvalidArgumentError):
    """A command's input is wrong (a missing file, a model without a tokenizer, a config that does not fit): the
    command line prints the message as one line and exits with `INPUT_ERROR`."""


class Parser(argparse.ArgumentParser):
    """argparse with one-line errors: ``prog: error: message (--help for the options)``."""

    def error(self, message):
        self.exit(INPUT_ERROR, f"{self.prog}: error: {message} (--help for the options)\n")


def line_printer(path=None):
    """A ``log(line="")`` that prints each line at once and, given ``path``, also writes it there (flushed, so a
    benchmark killed half-way keeps what it measured)."""
    out = open(path, "w") if path else None

    def log(line: str = "") -> None:
        print(line, flush=True)
        if out:
            out.write(line + "\n")
            out.flush()
    return log


def report(prog: str, error: Exception) -> int:
    """Print ``error`` as one line on stderr; returns `INPUT_ERROR`."""
    message = " ".join(str(error).split())          # one line, whatever the message held
    print(f"{prog}: error: {message}", file=sys.stderr)
    return INPUT_ERROR


def warn(prog: str, message: str) -> None:
    """A command's warning about its input (the run goes on): one line on stderr."""
    print(f"{prog}: warning: {' '.join(message.split())}", file=sys.stderr)


@contextmanager
def input_errors(what: str, *kinds):
    """Turn ``kinds`` of exceptions (default: OSError, ValueError) raised inside into `InputError` prefixed by
    ``what`` (e.g. ``"--model /x"``): for library calls that fail on a bad path or file."""
    try:
        yield
    except InputError:
        raise
    except (kinds or (OSError, ValueError)) as e:
        raise InputError(f"{what}: {e}") from e


def require_tokenizer(path, why: str) -> None:
    """`InputError` when the model directory ``path`` holds no tokenizer files (before anything loads)."""
    if not any(os.path.isfile(os.path.join(path, name)) for name in TOKENIZER_FILES):
        raise InputError(f"--model {path}: no tokenizer files ({', '.join(TOKENIZER_FILES)}); {why} (save it "
                         f"beside the weights: tokenizer.save_pretrained(path))")


def progress(iterable, total: int, desc: str):
    """``iterable`` with a progress bar on stderr (tqdm where installed, else one line per step)."""
    try:
        from tqdm import tqdm
    except ImportError:
        return _lines(iterable, total, desc)
    return tqdm(iterable, total=total, desc=desc, file=sys.stderr, leave=False)


def _lines(iterable, total, desc):
    for i, item in enumerate(iterable, 1):
        yield item
        print(f"{desc}: {i}/{total}", file=sys.stderr, flush=True)
