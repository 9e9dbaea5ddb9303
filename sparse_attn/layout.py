"""SparseLayout: the one index format every pattern compiles to and every backend executes.

For each batch row ``b``, query head ``h`` and query block ``m`` (``block_m`` consecutive query rows, counted from the
first query row), a layout lists

* ``block_count[b, h, m]`` dense key tiles, whose first keys are ``block_offset[b, h, m, :block_count]``; a tile
  covers keys ``[offset, offset + block_n)`` (clipped to ``k_len``). Offsets need not be multiples of ``block_n``.
* ``column_count[b, h, m]`` single key columns ``column_index[b, h, m, :column_count]`` outside every tile.

Entries past a count are padding and are never read.  Queries are the **last** ``q_len`` positions of the key
sequence (bottom-right alignment): query row ``i`` sits at key position ``i + k_len - q_len``.  With ``causal=True``
the kernels also mask keys after that position::

    k_len = 6, q_len = 3, causal        key:  0 1 2 3 4 5
                               query row 0:   x x x x . .
                               query row 1:   x x x x x .
                               query row 2:   x x x x x x

This is the index format of vLLM / SGLang's ``sparse_attn_func`` (``block_count, block_offset, column_count,
column_index``).  This module imports nothing else from the package.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch


def ceil_div(a: int, b: int) -> int:
    """Blocks of size ``b`` that cover ``a`` items (the package's one ceil-div)."""
    return -(-a // b)

_INDEX_FIELDS = ("block_count", "block_offset", "column_count", "column_index")




def block_row_positions(q_len: int, k_len: int, block_m: int, device=None):
    """Key positions of the first and last query row of each query block (bottom-right alignment), int64."""
    n_qb = ceil_div(q_len, block_m)
    first = torch.arange(n_qb, device=device) * block_m
    last = (first + block_m).clamp(max=q_len) - 1
    return first + (k_len - q_len), last + (k_len - q_len)


def query_positions(q_len: int, k_len: int, device=None) -> torch.Tensor:
    """Key position of every query row under bottom-right alignment: ``arange(q_len) + k_len - q_len``."""
    return torch.arange(q_len, device=device) + (k_len - q_len)


@dataclass
class SparseLayout:
    """Per (batch, query head, query block) key tiles and key columns; see the module docstring.

    Shapes: ``block_count [B, H, nQb]``, ``block_offset [B, H, nQb, max_blocks]``, ``column_count [B, H, nQb]``,
    ``column_index [B, H, nQb, max_columns]``, all int32, ``nQb = ceil(q_len / block_m)``.
    """

    block_count: torch.Tensor
    block_offset: torch.Tensor
    column_count: torch.Tensor
    column_index: torch.Tensor
    q_len: int
    k_len: int
    block_m: int = 64
    block_n: int = 64

    def __post_init__(self):
        self.check_shapes()

    # ------------------------------------------------------------------ invariants
    @property
    def batch(self) -> int:
        return self.block_count.shape[0]

    @property
    def heads(self) -> int:
        return self.block_count.shape[1]

    @property
    def num_query_blocks(self) -> int:
        return self.block_count.shape[2]

    @property
    def device(self) -> torch.device:
        return self.block_count.device

    def check_shapes(self) -> None:
        """Raise ValueError naming every field whose shape, dtype or device breaks the format (no data read)."""
        reasons = []
        for name in ("q_len", "k_len", "block_m", "block_n"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < (0 if name == "q_len" else 1):
                reasons.append(f"{name} must be a positive int, got {value!r}")
        if not reasons and self.q_len > self.k_len:
            reasons.append(f"q_len ({self.q_len}) must be <= k_len ({self.k_len}): queries are the last positions")
        tensors = {name: getattr(self, name) for name in _INDEX_FIELDS}
        for name, t in tensors.items():
            if not isinstance(t, torch.Tensor):
                reasons.append(f"{name} must be a torch.Tensor, got {type(t).__name__}")
            elif t.dtype != torch.int32:
                reasons.append(f"{name} must be int32, got {t.dtype}")
        if reasons:
            raise ValueError("invalid SparseLayout: " + "; ".join(reasons))
        for name, ndim in zip(_INDEX_FIELDS, (3, 4, 3, 4)):
            if tensors[name].dim() != ndim:
                reasons.append(f"{name} must have {ndim} dims, got shape {tuple(tensors[name].shape)}")
        if not reasons:
            lead = tuple(self.block_count.shape)
            n_qb = ceil_div(self.q_len, self.block_m)
            if lead[2] != n_qb:
                reasons.append(f"block_count has {lead[2]} query blocks, expected ceil(q_len / block_m) = {n_qb}")
            for name in _INDEX_FIELDS[1:]:
                if tuple(tensors[name].shape[:3]) != lead:
                    reasons.append(f"{name} leading shape {tuple(tensors[name].shape[:3])} != block_count's {lead}")
            devices = {t.device for t in tensors.values()}
            if len(devices) > 1:
                reasons.append(f"index tensors are on several devices: {sorted(map(str, devices))}")
        if reasons:
            raise ValueError("invalid SparseLayout: " + "; ".join(reasons))

    def check_indices(self) -> None:
        """Raise ValueError if any index is out of range or a key is listed twice (tiles overlapping each other or
        a column, repeated columns): the kernels would count such a key twice.  Reads the data (one host sync)."""
        reasons = []
        bc, cc = self.block_count, self.column_count
        if bool(((bc < 0) | (bc > self.block_offset.shape[-1])).any()):
            reasons.append(f"block_count must lie in [0, {self.block_offset.shape[-1]}]")
        if bool(((cc < 0) | (cc > self.column_index.shape[-1])).any()):
            reasons.append(f"column_count must lie in [0, {self.column_index.shape[-1]}]")
        if reasons:
            raise ValueError("invalid SparseLayout: " + "; ".join(reasons))
        offsets, valid_o = self.sorted_offsets()
        columns, valid_c = self.sorted_columns()
        if bool((valid_o & ((offsets < 0) | (offsets >= self.k_len))).any()):
            reasons.append(f"block_offset entries must lie in [0, k_len={self.k_len})")
        if bool((valid_c & ((columns < 0) | (columns >= self.k_len))).any()):
            reasons.append(f"column_index entries must lie in [0, k_len={self.k_len})")
        if offsets.shape[-1] > 1:
            gap = offsets[..., 1:] - offsets[..., :-1]
            if bool((valid_o[..., 1:] & (gap < self.block_n)).any()):
                reasons.append(f"tiles overlap: block_offset entries of one query block must be >= block_n "
                               f"({self.block_n}) apart")
        if columns.shape[-1] > 1:
            if bool((valid_c[..., 1:] & (columns[..., 1:] == columns[..., :-1])).any()):
                reasons.append("column_index repeats a column within one query block")
        if columns.shape[-1] and offsets.shape[-1]:
            if bool((valid_c & self.covered_by_tiles(columns, offsets, valid_o)).any()):
                reasons.append("a column in column_index lies inside a tile of the same query block")
        if reasons:
            raise ValueError("invalid SparseLayout: " + "; ".join(reasons))

    def check(self) -> "SparseLayout":
        self.check_shapes()
        self.check_indices()
        return self

    # ------------------------------------------------------------------ views of the data
    def sorted_offsets(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Tile offsets sorted ascending per query block with padding pushed to the end (as int64), and the
        validity mask of the sorted entries."""
        return sorted_valid(self.block_offset, self.block_count)

    def sorted_columns(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Columns sorted ascending per query block with padding at the end (int64), and their validity mask."""
        return sorted_valid(self.column_index, self.column_count)

    def covered_by_tiles(self, keys: torch.Tensor, offsets: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
        """Bool, shaped like ``keys [..., n]``: whether each key lies inside a tile of its row; ``offsets``
        sorted ascending per row (padding last, marked False in ``valid``)."""
        return keys_in_tiles(keys, offsets, valid, self.block_n)

    def to_mask(self, q_len: int | None = None, k_len: int | None = None) -> torch.Tensor:
        """Bool ``[B, H, q_len, k_len]``: True where the layout lists the key for the query row (tiles and
        columns, without the causal mask).  For tests and small inputs only: this is O(L^2) memory."""
        q_len = self.q_len if q_len is None else q_len
        k_len = self.k_len if k_len is None else k_len
        if (q_len, k_len) != (self.q_len, self.k_len):
            raise ValueError(f"to_mask: layout was built for q_len={self.q_len}, k_len={self.k_len}, "
                             f"got q_len={q_len}, k_len={k_len}")
        return self.block_key_mask().repeat_interleave(self.block_m, dim=2)[:, :, :q_len]

    def block_key_mask(self, blocks: slice = slice(None)) -> torch.Tensor:
        """Bool ``[B, H, n, k_len]``: the keys each query block of ``blocks`` lists (tiles and columns, without
        the causal mask).  O(n x k_len) memory: pass a slice of blocks to bound it."""
        offsets, valid_o = sorted_valid(self.block_offset[:, :, blocks], self.block_count[:, :, blocks])
        columns, valid_c = sorted_valid(self.column_index[:, :, blocks], self.column_count[:, :, blocks])
        B, H, n = offsets.shape[:3]
        keys = torch.arange(self.k_len, device=self.device).expand(B, H, n, self.k_len)
        in_col = torch.zeros(B, H, n, self.k_len + 1, dtype=torch.bool, device=self.device)
        in_col.scatter_(-1, torch.where(valid_c, columns, self.k_len), True)
        return self.covered_by_tiles(keys, offsets, valid_o) | in_col[..., :self.k_len]

    def key_counts(self, causal: bool = True) -> torch.Tensor:
        """Keys each query block computes, int64 ``[B, H, nQb]``: tile keys within the sequence plus columns,
        both cut at the block's last visible key when causal (the kernels skip keys past it)."""
        limit = self._block_key_limit(causal)
        offsets = self.block_offset.long()
        used = (torch.arange(self.block_offset.shape[-1], device=self.device) < self.block_count[..., None])
        tile_keys = ((offsets + self.block_n).clamp(max=limit[..., None]) - offsets).clamp(min=0)
        cols = self.column_index.long()
        used_c = (torch.arange(self.column_index.shape[-1], device=self.device) < self.column_count[..., None])
        return (tile_keys * used).sum(-1) + (used_c & (cols < limit[..., None])).sum(-1)

    def density(self, causal: bool = True) -> float:
        """Fraction of the attention matrix the layout lets through: (query, key) pairs listed by the tiles and
        columns (and visible under the causal mask when ``causal``) over the pairs dense attention uses."""
        p0, p1 = block_row_positions(self.q_len, self.k_len, self.block_m, self.device)
        p0, p1 = p0[:, None], p1[:, None]                                              # [nQb, 1] positions
        o = self.block_offset.long()
        w = ((o + self.block_n).clamp(max=self.k_len) - o).clamp(min=0)
        used_t = torch.arange(o.shape[-1], device=self.device) < self.block_count[..., None]
        c = self.column_index.long()
        used_c = torch.arange(c.shape[-1], device=self.device) < self.column_count[..., None]
        if causal:
            tile_pairs = _clamped_ramp_sum(p1 + 1 - o, w) - _clamped_ramp_sum(p0 - o, w)
            col_pairs = (p1 - torch.maximum(c, p0) + 1).clamp(min=0)
            dense = int((query_positions(self.q_len, self.k_len) + 1).sum())
        else:
            tile_pairs, col_pairs = w * (p1 - p0 + 1), (p1 - p0 + 1).expand_as(c)
            dense = self.q_len * self.k_len
        pairs = (tile_pairs * used_t).sum() + (col_pairs * used_c).sum()
        return pairs.item() / max(dense * self.batch * self.heads, 1)

    def _block_key_limit(self, causal: bool) -> torch.Tensor:
        """One past the last key any row of each query block may see, int64 [nQb]."""
        _, last = block_row_positions(self.q_len, self.k_len, self.block_m, self.device)
        return last + 1 if causal else torch.full_like(last, self.k_len)

    # ------------------------------------------------------------------ conversions
    def to_block_mask(self, causal: bool = False) -> torch.Tensor:
        """Bool ``[B, H, nQb, ceil(k_len / block_n)]`` over a ``block_n``-aligned key grid: True where the layout
        computes any key of that key block (an exact description only when tiles are aligned and there are no
        columns; otherwise the smallest aligned cover).  ``causal`` drops blocks wholly after the block's last
        visible key."""
        B, H, n_qb = self.block_count.shape
        n_kb = ceil_div(self.k_len, self.block_n)
        out = torch.zeros(B, H, n_qb, n_kb + 1, dtype=torch.bool, device=self.device)
        limit = self._block_key_limit(causal)[:, None]
        offsets = self.block_offset.long()
        used = (torch.arange(offsets.shape[-1], device=self.device) < self.block_count[..., None])
        last = (offsets + self.block_n).clamp(max=limit) - 1
        for key in (offsets, last):   # a tile touches at most two aligned key blocks
            ok = used & (key < limit) & (offsets < limit)
            out.scatter_(-1, torch.where(ok, key // self.block_n, n_kb), True)
        cols = self.column_index.long()
        ok = (torch.arange(cols.shape[-1], device=self.device) < self.column_count[..., None]) & (cols < limit)
        out.scatter_(-1, torch.where(ok, cols // self.block_n, n_kb), True)
        return out[..., :n_kb]

    def is_block_aligned(self) -> bool:
        """True when every tile starts on a ``block_n`` multiple and there are no columns (one host sync)."""
        used = torch.arange(self.block_offset.shape[-1], device=self.device) < self.block_count[..., None]
        aligned = not bool((used & (self.block_offset % self.block_n != 0)).any())
        return aligned and int(self.column_count.max().item() if self.column_count.numel() else 0) == 0

    @classmethod
    def from_block_mask(cls, block_mask: torch.Tensor, q_len: int, k_len: int, block_m: int = 64,
                        block_n: int = 64) -> "SparseLayout":
        """Layout of aligned tiles from a bool ``[B, H, nQb, nKb]`` block mask (True = compute that key block)."""
        if not isinstance(block_mask, torch.Tensor) or block_mask.dim() != 4:
            raise ValueError("block_mask must be a 4-d tensor [B, H, nQb, nKb]")
        n_qb, n_kb = ceil_div(q_len, block_m), ceil_div(k_len, block_n)
        if tuple(block_mask.shape[2:]) != (n_qb, n_kb):
            raise ValueError(f"block_mask must be [B, H, {n_qb}, {n_kb}] for q_len={q_len}, k_len={k_len}, "
                             f"block sizes ({block_m}, {block_n}); got {tuple(block_mask.shape)}")
        mask = block_mask.bool()
        count = mask.sum(-1, dtype=torch.int32)
        order = kept_first(mask)                                   # chosen blocks first, ascending
        max_blocks = max(int(count.max().item()) if count.numel() else 0, 1)
        offsets = (order[..., :max_blocks] * block_n).to(torch.int32)
        B, H = mask.shape[:2]
        empty = torch.zeros(B, H, n_qb, 0, dtype=torch.int32, device=mask.device)
        return cls(count, offsets.contiguous(), torch.zeros_like(count), empty, q_len=q_len, k_len=k_len,
                   block_m=block_m, block_n=block_n)

    def to_flex_block_mask(self, causal: bool = True, cover: bool = False):
        """A FlexAttention ``BlockMask`` computing the same attention.

        Exact when tiles are ``block_n``-aligned and there are no columns; otherwise raises ValueError unless
        ``cover=True``, which returns the aligned cover (a superset: FlexAttention can only skip whole blocks).
        Blocks are (block_m, block_n); the causal mask is bottom-right aligned as here."""
        from torch.nn.attention.flex_attention import BlockMask

        if not cover and not self.is_block_aligned():
            raise ValueError("to_flex_block_mask: the layout has unaligned tiles or columns, which a BlockMask "
                             "cannot express; pass cover=True for the aligned cover")
        blocks = self.to_block_mask(causal=causal)
        n_kb = blocks.shape[-1]
        bm, bn, shift = self.block_m, self.block_n, self.k_len - self.q_len
        # Blocks wholly at or before each query block's first row need no mask (FlexAttention's "full" blocks);
        # the rest get the mask_mod, which also carries the block membership so eager FlexAttention (which
        # evaluates mask_mod everywhere) computes the same thing.
        first_row = torch.arange(self.num_query_blocks, device=self.device) * bm + shift
        key_end = (torch.arange(n_kb, device=self.device) + 1) * bn - 1
        no_mask = (key_end[None, :] <= first_row[:, None]) if causal else torch.ones(
            self.num_query_blocks, n_kb, dtype=torch.bool, device=self.device)
        full, partial = blocks & no_mask, blocks & ~no_mask

        def as_indices(mask):
            order = kept_first(mask).to(torch.int32)
            return mask.sum(-1, dtype=torch.int32), order.contiguous()

        def block_membership(b, h, q_idx, kv_idx):
            listed = blocks[b, h, q_idx // bm, kv_idx // bn]
            return listed & (kv_idx <= q_idx + shift) if causal else listed

        count, indices = as_indices(partial)
        full_count, full_indices = as_indices(full)
        return BlockMask.from_kv_blocks(count, indices, full_count, full_indices, BLOCK_SIZE=(bm, bn),
                                        mask_mod=block_membership, seq_lengths=(self.q_len, self.k_len))

    @classmethod
    def from_flex_block_mask(cls, block_mask) -> "SparseLayout":
        """Layout of the blocks a FlexAttention ``BlockMask`` visits (full and partial); a ``mask_mod`` other than
        causal is not representable and is dropped, so use this for block-level masks."""
        q_len, k_len = block_mask.seq_lengths
        block_m, block_n = block_mask.BLOCK_SIZE
        dense = block_mask.to_dense().bool()
        n_qb, n_kb = ceil_div(q_len, block_m), ceil_div(k_len, block_n)
        return cls.from_block_mask(dense[..., :n_qb, :n_kb], q_len, k_len, block_m, block_n)

    def to(self, device) -> "SparseLayout":
        moved = {name: getattr(self, name).to(device) for name in _INDEX_FIELDS}
        return SparseLayout(**moved, q_len=self.q_len, k_len=self.k_len, block_m=self.block_m, block_n=self.block_n)

    def select_heads(self, index: torch.Tensor) -> "SparseLayout":
        """The layout of the query heads ``index`` (a long tensor), in that order."""
        picked = {name: getattr(self, name).index_select(1, index) for name in _INDEX_FIELDS}
        return SparseLayout(**picked, q_len=self.q_len, k_len=self.k_len, block_m=self.block_m, block_n=self.block_n)

    def __repr__(self) -> str:
        B, H, n_qb = self.block_count.shape
        return (f"SparseLayout(B={B}, H={H}, q_len={self.q_len}, k_len={self.k_len}, block_m={self.block_m}, "
                f"block_n={self.block_n}, max_blocks={self.block_offset.shape[-1]}, "
                f"max_columns={self.column_index.shape[-1]})")


def _clamped_ramp_sum(n: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """sum of clamp(x, 0, w) for integer x <= n (the pairs a tile of width w gives rows up to relative index n)."""
    n_in = n.clamp(min=0, max=None)
    inside = torch.minimum(n_in, w)
    return inside * (inside + 1) // 2 + (n_in - inside) * w


def keys_in_tiles(keys: torch.Tensor, offsets: torch.Tensor, valid: torch.Tensor, block_n: int) -> torch.Tensor:
    """Bool like ``keys [..., n]``: whether each key lies in a tile ``[offset, offset + block_n)`` of its row.
    ``offsets [..., T]``: the valid entries (``valid``) ascending and before the padding."""
    if offsets.shape[-1] == 0:
        return torch.zeros_like(keys, dtype=torch.bool)
    offsets = torch.where(valid, offsets.long(), torch.iinfo(torch.int64).max).contiguous()
    pos = torch.searchsorted(offsets, keys.long().contiguous(), right=True) - 1
    pos_c = pos.clamp(min=0)
    start = offsets.gather(-1, pos_c)
    return (pos >= 0) & valid.gather(-1, pos_c) & (keys >= start) & (keys < start + block_n)


def kept_first(keep: torch.Tensor, width: int | None = None) -> torch.Tensor:
    """Indices along the last dim that put the True entries of ``keep`` first, each group in its original order
    (cut to ``width``)."""
    order = torch.sort((~keep).to(torch.int8), dim=-1, stable=True).indices
    return order if width is None else order[..., :width]


def sorted_valid(values: torch.Tensor, count: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The first ``count`` entries of ``values [..., n]`` sorted ascending (int64) with the padding pushed to the
    end, and the validity mask of the sorted entries."""
    n = values.shape[-1]
    valid = torch.arange(n, device=values.device) < count[..., None]
    big = torch.iinfo(torch.int64).max
    keyed = torch.where(valid, values.long(), big)
    sorted_values = keyed.sort(-1).values
    return sorted_values, sorted_values != big


def concat_heads(layouts: list[SparseLayout]) -> SparseLayout:
    """Stack layouts of disjoint head groups (same B, lengths and block sizes) along the head axis, padding the
    index tensors to the widest."""
    first = layouts[0]
    for other in layouts[1:]:
        if (other.q_len, other.k_len, other.block_m, other.block_n, other.batch) != (
                first.q_len, first.k_len, first.block_m, first.block_n, first.batch):
            raise ValueError("concat_heads: layouts differ in batch, lengths or block sizes")

    def pad_cat(name):
        parts = [getattr(l, name) for l in layouts]
        width = max(p.shape[-1] for p in parts)
        return torch.cat([torch.nn.functional.pad(p, (0, width - p.shape[-1])) for p in parts], dim=1)

    return SparseLayout(torch.cat([l.block_count for l in layouts], 1), pad_cat("block_offset"),
                        torch.cat([l.column_count for l in layouts], 1), pad_cat("column_index"),
                        q_len=first.q_len, k_len=first.k_len, block_m=first.block_m, block_n=first.block_n)
