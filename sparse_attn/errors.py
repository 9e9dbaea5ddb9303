"""The package's exceptions: one base class, so callers can catch everything sparse_attn raises on purpose.

Argument mistakes are also the built-in exception a Python user expects: a wrong value is a `ValueError`, a wrong
type a `TypeError`."""
from __future__ import annotations


class SparseAttnError(Exception):
    """Base class of every exception sparse_attn raises on purpose."""


class InvalidArgumentError(SparseAttnError, ValueError):
    """An argument has a wrong value or shape; the message names the argument and what was expected."""


class InvalidTypeError(SparseAttnError, TypeError):
    """An argument has a wrong type; the message names the argument and the expected type."""


class NotSupportedError(InvalidArgumentError):
    """No backend (or not the one asked for) can run these inputs; the message lists every backend's reasons."""


class BackendUnavailableError(SparseAttnError, RuntimeError):
    """A backend's kernel cannot be built or loaded on this machine (no compiler, no GPU, no CuPy)."""


class SavedContextMismatchError(InvalidArgumentError):
    """A saved context belongs to another model (architecture, heads, dtype, RoPE, weights) or to other tokens than
    the request's; nothing was restored.  (A damaged saved file raises `sparse_attn.retrieval.KVFileError`.)"""
