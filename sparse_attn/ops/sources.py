"""Where the kernel sources (``csrc/``) are: next to the package in a source checkout, inside it in an install."""
from __future__ import annotations

from pathlib import Path


def source_dir() -> Path:
    """``csrc/`` next to the package (a source checkout) or inside it (an install that ships it as data)."""
    here = Path(__file__).resolve().parents[1]
    for candidate in (here / "csrc", here.parent / "csrc"):
        if candidate.is_dir():
            return candidate
    raise FileNotFoundError(f"the kernel sources (csrc/) were not found next to or inside {here}")
