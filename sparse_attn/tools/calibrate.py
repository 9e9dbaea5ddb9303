"""Offline per-head pattern search: record each layer's queries and keys on a calibration input, score every head's
candidate patterns by the attention mass they keep, and pick per head the cheapest one that reaches a target.

* **Recording.**  A capturing attention function is registered in transformers' ``AttentionInterface`` for one
  forward pass: it hands each layer's post-RoPE ``q [B, Hq, L, D]``, ``k [B, Hkv, L, D]`` to the scorer and calls
  SDPA so the forward goes on.  Each layer is scored as it arrives and its q/k dropped, so memory stays at one
  layer's q/k plus the scorer's chunks.  The model's previous attention implementation is restored afterwards, also
  on error.
* **Scoring.**  For each candidate, `sparse_attn.estimate` builds the layout of all heads at once; its recall per
  head is the mean dense attention mass on the layout's keys (`attention_recall_per_head`, a chunk of query blocks
  at a time, never L x L), and its cost per head the keys the kernel computes (tiles and columns, cut at each
  block's causal limit, times the block's rows) over what dense attention computes.  The estimate's own cost is
  not counted.
* **Choice.**  Per head, the cheapest candidate whose recall reaches ``target`` (ties: higher recall).  With
  ``fallback="dense"`` (default) `Dense` is always a candidate (recall 1, cost 1), so a head no sparse candidate
  serves runs dense; with ``fallback="best"`` such a head gets the candidate with the highest recall.  A layer whose
  heads all choose dense is written as a dense layer.
* **Modality.**  With ``modality=spans`` (the calibration input's `ModalitySpans`, a list of ``(start, end, kind[,
  frame_tokens])`` tuples, or one per batch row) the modality patterns among the candidates (`Grid`, `QBoundary`,
  `TwoDBoundary`; by default one of each per vertical-slash size) are scored with those spans, so each head chooses
  between modality-aware and text patterns by the same rule; the written config names the patterns without the
  spans (passed per call at run time, ``sparse_attn.hf.modality``).  Without spans, modality candidates are scored
  as on an all-text call, as `sparse_attn.hf` runs them outside a ``modality`` block.
* **Output.**  A `SparseConfig` whose ``reference_length`` is the calibration length (budgets then scale with the
  input length at run time; ``scale_with_length=False`` writes fixed budgets), with each head's recall as its score.
"""
from __future__ import annotations

import math
import sys
from dataclasses import dataclass, field

import torch

from ..config import NAME_OF, SparseConfig, _pattern_json
from ..patterns import Dense, Pattern
from ..patterns.base import computed_share
from ..patterns.modality import with_modality
from ..patterns.modality_spans import ModalitySpans, as_modality
from ..prefill import estimate
from .calibrate_candidates import FAMILIES, default_candidates, default_modality_candidates
from .calibrate_capture import capture_attention, model_shape
from .metrics import attention_recall_per_head
from ..errors import InvalidArgumentError

DEFAULT_TARGET = 0.95


# ---------------------------------------------------------------------------------------------------- scoring
def kernel_cost(layout, causal: bool = True) -> torch.Tensor:
    """Per query head, the (row, key) pairs the kernel computes for ``layout`` (whole query blocks x listed keys,
    cut at each block's causal limit) over those dense attention computes: fp32 ``[H]``, mean over the batch."""
    return computed_share(layout, causal).mean(0)


def score_layer(q, k, candidates, *, scale=None, causal: bool = True, block_m: int = 64, block_n: int = 64):
    """Recall and kernel cost of every candidate on every query head of one layer: two fp32 ``[C, Hq]`` tensors.
    ``q [B, Hq, L, D]``, ``k [B, Hkv, L, D]``; each candidate's layout is estimated for all heads in one call."""
    Hq = q.shape[1]
    recall = torch.ones(len(candidates), Hq)
    cost = torch.ones(len(candidates), Hq)
    sparse = [i for i, c in enumerate(candidates) if not isinstance(c, Dense)]      # Dense: recall 1, cost 1
    layouts = [estimate(q, k, candidates[i], causal=causal, scale=scale, block_m=block_m, block_n=block_n)
               for i in sparse]
    if layouts:
        recall[sparse] = attention_recall_per_head(q, k, layouts, causal=causal, scale=scale).cpu()
        cost[sparse] = torch.stack([kernel_cost(lay, causal).cpu() for lay in layouts])
    return recall, cost


def choose(recall: torch.Tensor, cost: torch.Tensor, target: float) -> torch.Tensor:
    """Per head, the index of the cheapest candidate with ``recall >= target`` (ties: higher recall), else of the
    highest recall: long ``[H]`` from ``recall, cost [C, H]``."""
    ok = recall >= target
    key = torch.where(ok, cost.double() - 1e-9 * recall.double(), math.inf)
    return torch.where(ok.any(0), key.argmin(0), recall.argmax(0))


# ---------------------------------------------------------------------------------------------------- results
@dataclass
class CalibrationResult:
    """What calibration measured.  ``recall, cost [layers, C, H]`` for the ``candidates``; ``choice [layers, H]``
    indexes them; ``config`` is the SparseConfig written from the choice."""

    config: SparseConfig
    candidates: list
    recall: torch.Tensor
    cost: torch.Tensor
    choice: torch.Tensor
    target: float
    seq_len: int
    metadata: dict = field(default_factory=dict)

    @property
    def chosen_recall(self) -> torch.Tensor:
        return self.recall.gather(1, self.choice[:, None]).squeeze(1)

    @property
    def chosen_cost(self) -> torch.Tensor:
        return self.cost.gather(1, self.choice[:, None]).squeeze(1)

    def family_counts(self) -> list[dict]:
        names = [NAME_OF[type(c)] for c in self.candidates]
        rows = []
        for layer in self.choice.tolist():
            counts = dict.fromkeys(FAMILIES, 0)
            for idx in layer:
                counts[names[idx]] += 1
            rows.append(counts)
        return rows

    def families(self) -> tuple:
        """The text families, and the modality families among the candidates."""
        names = {NAME_OF[type(c)] for c in self.candidates}
        return tuple(n for i, n in enumerate(FAMILIES) if i < 4 or n in names)

    def summary(self) -> str:
        """A table: per layer, the heads choosing each pattern family, mean kernel density, mean recall."""
        families = self.families()
        head = f"{'layer':>5}  " + "  ".join(f"{n:>14}" for n in families) + f"  {'density':>8}  {'recall':>7}"
        lines = [head, "-" * len(head)]
        dens, rec = self.chosen_cost, self.chosen_recall
        for i, counts in enumerate(self.family_counts()):
            lines.append(f"{i:>5}  " + "  ".join(f"{counts[n]:>14}" for n in families)
                         + f"  {float(dens[i].mean()):>8.3f}  {float(rec[i].mean()):>7.3f}")
        totals = {n: sum(c[n] for c in self.family_counts()) for n in families}
        lines.append(f"{'all':>5}  " + "  ".join(f"{totals[n]:>14}" for n in families)
                     + f"  {float(dens.mean()):>8.3f}  {float(rec.mean()):>7.3f}")
        lines.append(f"target recall {self.target}, calibration length {self.seq_len}; density = kernel work "
                     f"vs dense (estimate not counted); {int((rec < self.target).sum())} head(s) below target")
        return "\n".join(lines)

    def plot(self, path) -> None:
        """PNG of the chosen pattern family per (layer, head) (`calibrate_plot.plot_choices`)."""
        from .calibrate_plot import plot_choices
        plot_choices(self, path)


class Calibrator:
    """Scores layers as they arrive (`add_layer`) and builds the result (`result`)."""

    def __init__(self, num_layers: int, num_heads: int, candidates=None, *, target: float = DEFAULT_TARGET,
                 fallback: str = "dense", block_m: int = 64, block_n: int = 64, progress: bool = True,
                 modality=None):
        if not 0 < target <= 1:
            raise InvalidArgumentError(f"target must lie in (0, 1], got {target!r}")
        if fallback not in ("dense", "best"):
            raise InvalidArgumentError(f"fallback must be 'dense' or 'best', got {fallback!r}")
        if candidates is not None and (not candidates or not all(isinstance(c, Pattern) for c in candidates)):
            raise InvalidArgumentError("candidates must be a non-empty list of Patterns (or None for the defaults)")
        self.num_layers, self.num_heads = num_layers, num_heads
        # Candidates as the config names them: modality patterns without spans (spans belong to the input).
        self.candidates = None if candidates is None else with_modality(list(candidates), None)
        try:
            self.modality = None if modality is None else as_modality(modality)
        except (ValueError, TypeError) as e:
            raise type(e)(f"modality: {e}") from None
        self.target, self.fallback, self.block_m, self.block_n = target, fallback, block_m, block_n
        self.scores: dict = {}
        self.seq_len = None
        self._bar = None
        if progress:
            from tqdm.auto import tqdm
            self._bar = tqdm(total=num_layers, desc="calibrating layers", unit="layer", file=sys.stderr)

    def _set_candidates(self, seq_len: int):
        if self.candidates is None:
            self.candidates = default_candidates(seq_len, self.block_n)
            if self.modality is not None:
                self.candidates += default_modality_candidates(seq_len)
        if self.fallback == "dense" and not any(isinstance(c, Dense) for c in self.candidates):
            self.candidates.append(Dense())

    def add_layer(self, layer_idx: int, q, k, scale=None) -> None:
        """Score layer ``layer_idx`` from its ``q [B, Hq, L, D]`` and ``k [B, Hkv, L, D]`` (post-RoPE)."""
        if not 0 <= layer_idx < self.num_layers:
            raise InvalidArgumentError(f"layer_idx {layer_idx} outside [0, {self.num_layers})")
        if layer_idx in self.scores:
            raise InvalidArgumentError(f"layer {layer_idx} was recorded twice (one prefill forward is expected)")
        if q.shape[1] != self.num_heads:
            raise InvalidArgumentError(f"layer {layer_idx}: q has {q.shape[1]} heads, expected {self.num_heads}")
        if self.seq_len is None:
            self.seq_len = k.shape[2]
            self._set_candidates(self.seq_len)
        with torch.no_grad():
            # no spans: modality candidates see an all-text input, as at run time outside a modality block
            scored = with_modality(self.candidates, ModalitySpans() if self.modality is None else self.modality)
            self.scores[layer_idx] = score_layer(q, k, scored, scale=scale, block_m=self.block_m,
                                                 block_n=self.block_n)
        if self._bar is not None:
            self._bar.update(1)

    def close(self):
        if self._bar is not None:
            self._bar.close()
            self._bar = None

    def result(self, *, scale_with_length: bool = True, metadata=None) -> CalibrationResult:
        self.close()
        missing = [i for i in range(self.num_layers) if i not in self.scores]
        if missing:
            raise RuntimeError(f"no queries/keys were recorded for layers {missing}: the model does not route "
                               f"attention through transformers' AttentionInterface for them")
        recall = torch.stack([self.scores[i][0] for i in range(self.num_layers)])
        cost = torch.stack([self.scores[i][1] for i in range(self.num_layers)])
        choice = torch.stack([choose(recall[i], cost[i], self.target) for i in range(self.num_layers)])
        layers = [[self.candidates[c] for c in row] for row in choice.tolist()]
        chosen = recall.gather(1, choice[:, None]).squeeze(1)
        meta = {"calibration": {"target": self.target, "fallback": self.fallback, "seq_len": self.seq_len,
                                "block_m": self.block_m, "block_n": self.block_n,
                                "candidates": [_pattern_json(c) for c in self.candidates],
                                **({} if self.modality is None else {"modality": _spans_json(self.modality)})},
                **(metadata or {})}
        config = SparseConfig(self.num_layers, self.num_heads, layers,
                              reference_length=self.seq_len if scale_with_length else None,
                              scores=chosen.tolist(), metadata=meta)
        return CalibrationResult(config, self.candidates, recall, cost, choice, self.target, self.seq_len, meta)


def _spans_json(modality):
    """The calibration spans as JSON lists ``[start, end, kind, frame_tokens]`` (one list per row if per row)."""
    if isinstance(modality, tuple):
        return [_spans_json(row) for row in modality]
    return [[s.start, s.end, s.kind, s.frame_tokens] for s in modality.spans]


def calibrate_model(model, input_ids, candidates=None, *, target: float = DEFAULT_TARGET, fallback: str = "dense",
                    block_m: int = 64, block_n: int = 64, scale_with_length: bool = True, progress: bool = True,
                    metadata=None, modality=None) -> CalibrationResult:
    """Calibrate a transformers causal LM on ``input_ids [B, L]`` (long, no padding): one forward pass, each
    layer's q/k scored as it arrives.  ``modality``: the spans of ``input_ids`` (see the module docstring).
    Returns a CalibrationResult whose ``config`` drives ``hf.patch``."""
    if not isinstance(input_ids, torch.Tensor) or input_ids.dim() != 2 or input_ids.dtype != torch.long:
        raise InvalidArgumentError("input_ids must be a long tensor [batch, seq_len]")
    n_layers, n_heads = model_shape(model)
    cal = Calibrator(n_layers, n_heads, candidates, target=target, fallback=fallback, block_m=block_m,
                     block_n=block_n, progress=progress, modality=modality)
    try:
        with capture_attention(model, lambda i, q, k, s: cal.add_layer(i, q, k, s)), torch.no_grad():
            model(input_ids=input_ids.to(model.device), use_cache=False)
    finally:
        cal.close()
    meta = {"model": type(model).__name__, "batch": int(input_ids.shape[0]), **(metadata or {})}
    return cal.result(scale_with_length=scale_with_length, metadata=meta)


def calibrate_qk(layers, candidates=None, *, target: float = DEFAULT_TARGET, fallback: str = "dense",
                 block_m: int = 64, block_n: int = 64, scale_with_length: bool = True, progress: bool = True,
                 scale=None, metadata=None, modality=None) -> CalibrationResult:
    """Calibrate from recorded (or synthetic) ``layers``: a list of ``(q [B, Hq, L, D], k [B, Hkv, L, D])``;
    ``modality``: the spans of their sequence (see the module docstring)."""
    layers = list(layers)
    if not layers:
        raise InvalidArgumentError("layers must hold at least one (q, k) pair")
    cal = Calibrator(len(layers), layers[0][0].shape[1], candidates, target=target, fallback=fallback,
                     block_m=block_m, block_n=block_n, progress=progress, modality=modality)
    for i, (q, k) in enumerate(layers):
        cal.add_layer(i, q, k, scale)
    return cal.result(scale_with_length=scale_with_length, metadata=metadata)
