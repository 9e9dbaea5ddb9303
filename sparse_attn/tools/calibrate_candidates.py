"""The candidate patterns a calibration scores per head: default sets sized to the calibration length, and the
command line's ``--candidates`` / ``--modality`` parsers."""
from __future__ import annotations

from ..patterns import AShape, BlockSparse, Dense, Grid, Pattern, QBoundary, TwoDBoundary, VerticalSlash
from ..patterns.modality_spans import ModalitySpans
from ..layout import ceil_div
from ..errors import InvalidArgumentError

FAMILIES = ("vertical_slash", "a_shape", "block_sparse", "dense", "grid", "q_boundary", "two_d_boundary")
MODALITY_FAMILIES = (Grid, QBoundary, TwoDBoundary)


def default_candidates(seq_len: int, block_n: int = 64) -> list[Pattern]:
    """A small candidate set sized to the calibration length: vertical-slash at 1/64..1/8 of the keys as columns
    and twice that as diagonals, A-shape windows of 1/16..1/4, block-sparse top-k of 1/16..1/4 of the key blocks."""
    out = []
    for d in (64, 32, 16, 8):
        out.append(VerticalSlash(vertical=max(64, seq_len // d), slash=max(64, 2 * seq_len // d)))
    for d in (16, 8, 4):
        out.append(AShape(sink=64, local=max(64, seq_len // d)))
    n_kb = ceil_div(seq_len, block_n)
    for d in (16, 8, 4):
        out.append(BlockSparse(top_k=max(1, n_kb // d)))
    return list(dict.fromkeys(out))


def default_modality_candidates(seq_len: int) -> list[Pattern]:
    """`Grid`, `QBoundary` and `TwoDBoundary` at the vertical-slash sizes of `default_candidates`."""
    return [cls(vertical=max(64, seq_len // d), slash=max(64, 2 * seq_len // d))
            for d in (64, 32, 16, 8) for cls in MODALITY_FAMILIES]


def parse_modality(spec: str) -> ModalitySpans:
    """Spans from ``"START:END:KIND[:FRAME_TOKENS],..."``, e.g. ``"0:1000:text,1000:30000:video:576"``."""
    spans = []
    for item in filter(None, (s.strip() for s in spec.split(","))):
        parts = item.split(":")
        numbers = parts[:2] + parts[3:]
        if len(parts) not in (3, 4) or not all(n.isdigit() for n in numbers):
            raise InvalidArgumentError(f"modality: {item!r} must be START:END:KIND or START:END:video:FRAME_TOKENS with "
                             f"non-negative integers")
        spans.append((int(parts[0]), int(parts[1]), parts[2], *map(int, parts[3:])))
    if not spans:
        raise InvalidArgumentError(f"modality: no span in {spec!r}")
    try:
        return ModalitySpans.of(spans)
    except (ValueError, TypeError) as e:
        raise InvalidArgumentError(f"modality: {e}") from None


def parse_candidates(spec: str) -> list[Pattern]:
    """Candidates from a comma-separated spec: ``vs:VERTICAL:SLASH``, ``ashape:SINK:LOCAL``, ``bs:TOP_K``,
    ``dense``, and the modality patterns ``grid:VERTICAL:SLASH``, ``qb:VERTICAL:SLASH``, ``2db:VERTICAL:SLASH``;
    e.g. ``"vs:256:512,vs:512:1024,ashape:64:1024,bs:8,grid:256:512"``."""
    makers = {"vs": (VerticalSlash, ("vertical", "slash")), "ashape": (AShape, ("sink", "local")),
              "bs": (BlockSparse, ("top_k",)), "dense": (Dense, ()), "grid": (Grid, ("vertical", "slash")),
              "qb": (QBoundary, ("vertical", "slash")), "2db": (TwoDBoundary, ("vertical", "slash"))}
    out = []
    for item in filter(None, (s.strip() for s in spec.split(","))):
        name, *numbers = item.split(":")
        if name not in makers:
            raise InvalidArgumentError(f"candidates: unknown pattern {name!r} in {item!r} (known: {sorted(makers)})")
        cls, names = makers[name]
        if len(numbers) != len(names) or not all(n.isdigit() for n in numbers):
            raise InvalidArgumentError(f"candidates: {item!r} must be {':'.join([name] + [n.upper() for n in names])} "
                             f"with non-negative integers")
        values = dict(zip(names, map(int, numbers)))
        if cls in (VerticalSlash, *MODALITY_FAMILIES):
            values.update(sink=min(64, values["vertical"]), local=min(64, values["slash"]))
        out.append(cls(**values))
    if not out:
        raise InvalidArgumentError(f"candidates: no pattern in {spec!r}")
    return out
