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

import argparse
import contextlib
import json
import math
import sys
from dataclasses import dataclass, field
from pathlib import Path

import torch

from ..config import NAME_OF, SparseConfig, _pattern_json
from .metrics import attention_recall_per_head
from ..patterns import AShape, BlockSparse, Dense, Grid, Pattern, QBoundary, TwoDBoundary, VerticalSlash
from ..patterns.modality import with_modality
from ..patterns.modality_spans import ModalitySpans, as_modality
from ..prefill import estimate

DEFAULT_TARGET = 0.95
CAPTURE_NAME = "sparse_attn_calibrate"
FAMILIES = ("vertical_slash", "a_shape", "block_sparse", "dense", "grid", "q_boundary", "two_d_boundary")
MODALITY_FAMILIES = (Grid, QBoundary, TwoDBoundary)


# ---------------------------------------------------------------------------------------------------- candidates
def default_candidates(seq_len: int, block_n: int = 64) -> list[Pattern]:
    """A small candidate set sized to the calibration length: vertical-slash at 1/64..1/8 of the keys as columns
    and twice that as diagonals, A-shape windows of 1/16..1/4, block-sparse top-k of 1/16..1/4 of the key blocks."""
    out = []
    for d in (64, 32, 16, 8):
        out.append(VerticalSlash(vertical=max(64, seq_len // d), slash=max(64, 2 * seq_len // d)))
    for d in (16, 8, 4):
        out.append(AShape(sink=64, local=max(64, seq_len // d)))
    n_kb = -(-seq_len // block_n)
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
            raise ValueError(f"modality: {item!r} must be START:END:KIND or START:END:video:FRAME_TOKENS with "
                             f"non-negative integers")
        spans.append((int(parts[0]), int(parts[1]), parts[2], *map(int, parts[3:])))
    if not spans:
        raise ValueError(f"modality: no span in {spec!r}")
    try:
        return ModalitySpans.of(spans)
    except (ValueError, TypeError) as e:
        raise ValueError(f"modality: {e}") from None


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
            raise ValueError(f"candidates: unknown pattern {name!r} in {item!r} (known: {sorted(makers)})")
        cls, names = makers[name]
        if len(numbers) != len(names) or not all(n.isdigit() for n in numbers):
            raise ValueError(f"candidates: {item!r} must be {':'.join([name] + [n.upper() for n in names])} "
                             f"with non-negative integers")
        values = dict(zip(names, map(int, numbers)))
        if cls in (VerticalSlash, *MODALITY_FAMILIES):
            values.update(sink=min(64, values["vertical"]), local=min(64, values["slash"]))
        out.append(cls(**values))
    if not out:
        raise ValueError(f"candidates: no pattern in {spec!r}")
    return out


# ---------------------------------------------------------------------------------------------------- scoring
def kernel_cost(layout, causal: bool = True) -> torch.Tensor:
    """Per query head, the (row, key) pairs the kernel computes for ``layout`` (whole query blocks x listed keys,
    cut at each block's causal limit) over those dense attention computes: fp32 ``[H]``, mean over the batch."""
    keys = layout.key_counts(causal).double()                                        # [B, H, nQb]
    first = torch.arange(layout.num_query_blocks, device=keys.device) * layout.block_m
    last = (first + layout.block_m).clamp(max=layout.q_len) - 1
    rows = (last - first + 1).double()
    dense = (last + layout.k_len - layout.q_len + 1).double() if causal else torch.full_like(rows, layout.k_len)
    return ((keys * rows).sum(-1) / (dense * rows).sum()).mean(0).float()


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
        """PNG of the chosen pattern family per (layer, head), each cell labelled with its density in percent."""
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        from matplotlib.colors import ListedColormap

        names = [NAME_OF[type(c)] for c in self.candidates]
        family = torch.tensor([[FAMILIES.index(names[i]) for i in row] for row in self.choice.tolist()])
        n_layers, n_heads = family.shape
        fig, ax = plt.subplots(figsize=(min(2 + 0.45 * n_heads, 24), min(1.5 + 0.35 * n_layers, 24)))
        colors = ["#4c72b0", "#55a868", "#c44e52", "#8c8c8c", "#8172b2", "#ccb974", "#64b5cd"]
        ax.imshow(family.numpy(), cmap=ListedColormap(colors), vmin=-0.5, vmax=len(FAMILIES) - 0.5, aspect="auto")
        if n_layers * n_heads <= 1200:
            for (i, h), d in zip(torch.cartesian_prod(torch.arange(n_layers), torch.arange(n_heads)).tolist(),
                                 self.chosen_cost.flatten().tolist()):
                ax.text(h, i, f"{100 * d:.0f}", ha="center", va="center", fontsize=6, color="white")
        ax.set_xlabel("query head")
        ax.set_ylabel("layer")
        ax.set_title(f"chosen patterns (cell: density %), target recall {self.target}")
        handles = [plt.Rectangle((0, 0), 1, 1, color=c) for c in colors]
        shown = self.families()
        handles = [handles[FAMILIES.index(n)] for n in shown]
        ax.legend(handles, shown, loc="upper left", bbox_to_anchor=(1.01, 1), fontsize=8)
        fig.tight_layout()
        fig.savefig(path, dpi=120)
        plt.close(fig)


class Calibrator:
    """Scores layers as they arrive (`add_layer`) and builds the result (`result`)."""

    def __init__(self, num_layers: int, num_heads: int, candidates=None, *, target: float = DEFAULT_TARGET,
                 fallback: str = "dense", block_m: int = 64, block_n: int = 64, progress: bool = True,
                 modality=None):
        if not 0 < target <= 1:
            raise ValueError(f"target must lie in (0, 1], got {target!r}")
        if fallback not in ("dense", "best"):
            raise ValueError(f"fallback must be 'dense' or 'best', got {fallback!r}")
        if candidates is not None and (not candidates or not all(isinstance(c, Pattern) for c in candidates)):
            raise ValueError("candidates must be a non-empty list of Patterns (or None for the defaults)")
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
            raise ValueError(f"layer_idx {layer_idx} outside [0, {self.num_layers})")
        if layer_idx in self.scores:
            raise ValueError(f"layer {layer_idx} was recorded twice (one prefill forward is expected)")
        if q.shape[1] != self.num_heads:
            raise ValueError(f"layer {layer_idx}: q has {q.shape[1]} heads, expected {self.num_heads}")
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


# ---------------------------------------------------------------------------------------------------- recording
@contextlib.contextmanager
def capture_attention(model, on_layer):
    """Within the block, every attention call of ``model`` passes ``(layer_idx, query, key, scaling)`` to
    ``on_layer`` and then runs SDPA.  The previous attention implementation is restored on exit, also on error."""
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS, AttentionInterface
    try:
        from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, AttentionMaskInterface
    except ImportError:                                   # transformers < 4.53 builds masks from the config alone
        ALL_MASK_ATTENTION_FUNCTIONS = AttentionMaskInterface = None
    config = getattr(model, "config", None)
    if config is None or not hasattr(config, "_attn_implementation"):
        raise ValueError(f"model ({type(model).__name__}) is not a transformers model with an attention registry")
    can_set = getattr(type(model), "_can_set_attn_implementation", None)
    if not getattr(model, "_supports_attention_backend", True) or (can_set is not None and not can_set()):
        raise ValueError(f"{type(model).__name__} does not dispatch attention through transformers' "
                         f"AttentionInterface, so its queries and keys cannot be recorded")
    sdpa = ALL_ATTENTION_FUNCTIONS["sdpa"]
    calls = {"n": 0}

    def capturing_attention(module, query, key, value, attention_mask, **kwargs):
        layer_idx = getattr(module, "layer_idx", None)
        on_layer(calls["n"] if layer_idx is None else layer_idx, query.detach(), key.detach(),
                 kwargs.get("scaling"))
        calls["n"] += 1
        return sdpa(module, query, key, value, attention_mask, **kwargs)

    previous = config._attn_implementation
    AttentionInterface.register(CAPTURE_NAME, capturing_attention)
    if AttentionMaskInterface is not None:
        AttentionMaskInterface.register(CAPTURE_NAME, ALL_MASK_ATTENTION_FUNCTIONS["sdpa"])
    try:
        _set_implementation(model, CAPTURE_NAME)
        yield
    finally:
        _set_implementation(model, previous)
        AttentionInterface._global_mapping.pop(CAPTURE_NAME, None)
        if AttentionMaskInterface is not None:
            AttentionMaskInterface._global_mapping.pop(CAPTURE_NAME, None)


def _set_implementation(model, name):
    if name is None:                                      # the model had not resolved one yet: leave it unresolved
        model.config._attn_implementation_internal = None
    elif hasattr(model, "set_attn_implementation"):
        model.set_attn_implementation(name)
    else:                                                 # older transformers: the config decides per call
        model.config._attn_implementation = name


def model_shape(model) -> tuple[int, int]:
    """(layers, query heads per layer) of a transformers decoder model, from its (text) config."""
    cfg = model.config
    cfg = cfg.get_text_config(decoder=True) if hasattr(cfg, "get_text_config") else cfg
    return cfg.num_hidden_layers, cfg.num_attention_heads


def calibrate_model(model, input_ids, candidates=None, *, target: float = DEFAULT_TARGET, fallback: str = "dense",
                    block_m: int = 64, block_n: int = 64, scale_with_length: bool = True, progress: bool = True,
                    metadata=None, modality=None) -> CalibrationResult:
    """Calibrate a transformers causal LM on ``input_ids [B, L]`` (long, no padding): one forward pass, each
    layer's q/k scored as it arrives.  ``modality``: the spans of ``input_ids`` (see the module docstring).
    Returns a CalibrationResult whose ``config`` drives ``hf.patch``."""
    if not isinstance(input_ids, torch.Tensor) or input_ids.dim() != 2 or input_ids.dtype != torch.long:
        raise ValueError("input_ids must be a long tensor [batch, seq_len]")
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
        raise ValueError("layers must hold at least one (q, k) pair")
    cal = Calibrator(len(layers), layers[0][0].shape[1], candidates, target=target, fallback=fallback,
                     block_m=block_m, block_n=block_n, progress=progress, modality=modality)
    for i, (q, k) in enumerate(layers):
        cal.add_layer(i, q, k, scale)
    return cal.result(scale_with_length=scale_with_length, metadata=metadata)


def build_tiny_model(num_layers: int = 2, hidden: int = 128, heads: int = 4, kv_heads: int = 2, vocab: int = 512,
                     seed: int = 0, init_std: float = 0.02):
    """A LlamaForCausalLM built from a small config with random weights (no download)."""
    from transformers import LlamaConfig, LlamaForCausalLM
    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=vocab, hidden_size=hidden, intermediate_size=2 * hidden,
                      num_hidden_layers=num_layers, num_attention_heads=heads, num_key_value_heads=kv_heads,
                      max_position_embeddings=1 << 17, initializer_range=init_std)
    cfg._attn_implementation = "sdpa"
    return LlamaForCausalLM(cfg).eval()


# ---------------------------------------------------------------------------------------------------- command line
def _token_ids(path: Path) -> list[int]:
    text = path.read_text().strip()
    try:
        ids = json.loads(text) if text.startswith("[") else [int(t) for t in text.split()]
    except ValueError as e:
        raise ValueError(f"--token-ids {path}: expected a JSON list or whitespace-separated integers ({e})") from None
    if not ids or not all(isinstance(i, int) and i >= 0 for i in ids):
        raise ValueError(f"--token-ids {path}: expected non-negative integers")
    return ids


def _input_ids(args, model, vocab: int) -> torch.Tensor:
    if args.text:
        if not args.model:
            raise ValueError("--text needs --model DIR (its tokenizer)")
        from transformers import AutoTokenizer
        ids = AutoTokenizer.from_pretrained(args.model)(Path(args.text).read_text())["input_ids"]
    elif args.token_ids:
        ids = _token_ids(Path(args.token_ids))
    else:
        gen = torch.Generator().manual_seed(args.seed)
        return torch.randint(0, vocab, (1, args.seq_len), generator=gen)
    ids = ids[:args.seq_len]
    if max(ids) >= vocab:
        raise ValueError(f"token id {max(ids)} is outside the model's vocabulary ({vocab})")
    return torch.tensor([ids], dtype=torch.long)


def main(argv=None):
    parser = argparse.ArgumentParser(prog="python -m sparse_attn calibrate", description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    src = parser.add_mutually_exclusive_group(required=True)
    src.add_argument("--model", help="local transformers model directory (causal LM)")
    src.add_argument("--tiny", action="store_true", help="a small random-weight Llama built from a config")
    src.add_argument("--synthetic", action="store_true",
                     help="no model: the synthetic workload's q/k for each layer (sparse_attn.tools.synthetic)")
    inp = parser.add_mutually_exclusive_group()
    inp.add_argument("--text", help="calibration text file (tokenized with --model's tokenizer)")
    inp.add_argument("--token-ids", help="file of token ids (JSON list or whitespace-separated)")
    parser.add_argument("--seq-len", type=int, default=4096, help="calibration length (text/ids are cut to it; "
                        "random tokens / synthetic use it)")
    parser.add_argument("--target", type=float, default=DEFAULT_TARGET, help="recall each head must reach")
    parser.add_argument("--candidates", help="e.g. 'vs:256:512,ashape:64:1024,bs:8' (default: sized to seq-len)")
    parser.add_argument("--fallback", choices=("dense", "best"), default="dense",
                        help="a head no candidate serves: run it dense, or take the best-recall candidate")
    parser.add_argument("--block-size", type=int, default=64, help="block_m = block_n of the layouts")
    parser.add_argument("--no-length-scaling", action="store_true",
                        help="write fixed budgets (no reference_length; always so with --format minference)")
    parser.add_argument("-o", "--output", default="sparse_config.json")
    parser.add_argument("--format", choices=("sparse_attn", "minference"), default="sparse_attn")
    parser.add_argument("--plot", help="write a PNG of the chosen patterns per layer/head")
    parser.add_argument("--dtype", choices=("float32", "bfloat16", "float16"), default="float32")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--layers", type=int, default=2, help="--tiny / --synthetic: number of layers")
    parser.add_argument("--heads", type=int, default=4, help="--tiny / --synthetic: query heads")
    parser.add_argument("--kv-heads", type=int, default=2, help="--tiny / --synthetic: key/value heads")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--no-progress", action="store_true")
    parser.add_argument("--modality", help="spans of the calibration input, e.g. '0:1000:text,1000:30000:video:576' "
                        "(START:END:KIND[:FRAME_TOKENS]); adds the modality patterns to the default candidates")
    parser.add_argument("--workload", choices=("text", "mixed"), default="text",
                        help="--synthetic: the text workload, or text / video frames / text with its spans "
                        "(sparse_attn.tools.synthetic.make_mixed_qkv; modality candidates are added)")
    parser.add_argument("--frame-tokens", type=int, default=576, help="--workload mixed: tokens per video frame")
    args = parser.parse_args(argv)
    candidates = parse_candidates(args.candidates) if args.candidates else None
    modality = parse_modality(args.modality) if args.modality else None
    if args.workload == "mixed" and (not args.synthetic or modality is not None):
        parser.error("--workload mixed needs --synthetic and brings its own spans (no --modality)")
    # The MInference schema has no reference length: its budgets are fixed.
    scale_with_length = not args.no_length_scaling and args.format == "sparse_attn"
    common = dict(target=args.target, fallback=args.fallback, block_m=args.block_size, block_n=args.block_size,
                  scale_with_length=scale_with_length, progress=not args.no_progress)

    if args.synthetic:
        from .synthetic import MixedWorkload, Workload, make_mixed_qkv, make_qkv
        if args.text or args.token_ids:
            parser.error("--synthetic takes no --text / --token-ids")
        layers = []
        for i in range(args.layers):
            if args.workload == "mixed":
                L = args.seq_len
                q, k, _, modality = make_mixed_qkv(MixedWorkload(
                    q_heads=args.heads, kv_heads=args.kv_heads, seq_len=L, head_dim=64, seed=args.seed + i,
                    text_before=min(1000, L // 8), text_after=min(1500, L // 8), frame_tokens=args.frame_tokens),
                    device=args.device)
            else:
                q, k, _ = make_qkv(Workload(q_heads=args.heads, kv_heads=args.kv_heads, seq_len=args.seq_len,
                                            head_dim=64, seed=args.seed + i), device=args.device)
            layers.append((q, k))
        result = calibrate_qk(layers, candidates, metadata={"source": f"synthetic {args.workload} workload"},
                              modality=modality, **common)
    else:
        dtype = getattr(torch, args.dtype)
        if args.tiny:
            model = build_tiny_model(args.layers, heads=args.heads, kv_heads=args.kv_heads, seed=args.seed)
            source = "tiny random-weight Llama"
        else:
            import transformers
            from transformers import AutoModelForCausalLM
            dtype_key = "dtype" if int(transformers.__version__.split(".")[0]) >= 5 else "torch_dtype"
            model = AutoModelForCausalLM.from_pretrained(args.model, **{dtype_key: dtype}).eval()
            source = args.model
        model = model.to(device=args.device, dtype=dtype)
        vocab = model.get_input_embeddings().num_embeddings
        ids = _input_ids(args, model, vocab)
        result = calibrate_model(model, ids, candidates, metadata={"source": source}, modality=modality, **common)

    result.config.save(args.output, format=args.format)
    print(result.summary())
    print(f"config ({args.format} schema) written to {args.output}")
    if args.plot:
        result.plot(args.plot)
        print(f"plot written to {args.plot}")
    return 0
