"""Inverted-file (IVF) maximum-inner-product indexes on faiss-cpu, one faiss index per stream (batch x KV head).

faiss does the heavy lifting (k-means training, the inverted lists, the fine scan); the coarse step (scoring the
list centroids and choosing the lists to probe) is done here in one batched torch op over all streams, so that
subclasses can change how lists are formed and probed.  faiss is called once per stream per step: it has no
batched-over-indexes search.  Newly offloaded keys are searchable at once: they wait in a small exact-scanned
*tail* and move into the inverted lists in batches (and the first batch large enough trains the index)."""
from __future__ import annotations

import math

import numpy as np
import torch

from .index_exact import exact_topk
from ..errors import InvalidArgumentError


def _faiss():
    try:
        import faiss
    except ImportError as err:  # pragma: no cover - faiss-cpu is an optional dependency
        raise ImportError("the IVF indexes need faiss-cpu: pip install faiss-cpu (extra: sparse_attn[retrieval])") from err
    return faiss


class IVFIndex:
    """Off-the-shelf faiss IVF-Flat with the inner-product metric, trained on the keys (the plain ANN baseline).

    ``nlist``: inverted lists (default ``sqrt(N)`` at training); ``nprobe``: lists probed per query (default 5%
    of ``nlist``, at least 1); ``train_min``: keys needed before training (below that, search is exact);
    ``tail_max``: keys that wait in the exact tail before they are assigned to lists."""

    name = "ivf"

    def __init__(self, nlist: int | None = None, nprobe: int | None = None, train_min: int = 4096,
                 tail_max: int = 1024, kmeans_iter: int = 10, points_per_centroid: int = 64, seed: int = 0):
        if nlist is not None and nlist < 1:
            raise InvalidArgumentError(f"nlist must be >= 1, got {nlist}")
        if nprobe is not None and nprobe < 1:
            raise InvalidArgumentError(f"nprobe must be >= 1, got {nprobe}")
        self.params = dict(nlist=nlist, nprobe=nprobe, train_min=train_min, tail_max=tail_max,
                           kmeans_iter=kmeans_iter, points_per_centroid=points_per_centroid, seed=seed)  # to save
        self.nlist_arg, self.nprobe_arg, self.train_min, self.tail_max = nlist, nprobe, train_min, tail_max
        self.kmeans_iter, self.points_per_centroid, self.seed = kmeans_iter, points_per_centroid, seed
        self.trained = False
        self.tail = None                  # [S, t, D] fp32 keys not yet in the lists
        self.n_indexed = 0
        self.faiss_indexes = []
        self.train_seconds = 0.0

    # ------------------------------------------------------------------------------------------ hooks
    def attach(self, ram_tier) -> None:
        pass

    def observe_queries(self, q: torch.Tensor) -> None:
        pass

    def _fit(self, keys: torch.Tensor) -> None:
        """Set ``key_map``/``query_map`` ``[S, D, D]`` (or None) and ``centroids [S, C, D]`` from ``keys``."""
        faiss = _faiss()
        S, N, D = keys.shape
        self.key_map = self.query_map = None
        cents = []
        for s in range(S):   # faiss's own IP training, as a user of the library would run it
            quantizer = faiss.IndexFlatIP(D)
            ivf = faiss.IndexIVFFlat(quantizer, D, self.nlist, faiss.METRIC_INNER_PRODUCT)
            ivf.cp.niter, ivf.cp.seed = self.kmeans_iter, self.seed
            ivf.cp.max_points_per_centroid = self.points_per_centroid
            ivf.train(np.ascontiguousarray(keys[s].numpy()))
            cents.append(torch.from_numpy(quantizer.reconstruct_n(0, self.nlist)))
        self.centroids = torch.stack(cents)

    def _assign(self, keys_mapped: torch.Tensor) -> torch.Tensor:
        """``[S, n, D]`` mapped keys -> list ids ``[S, n]``: the max-inner-product centroid, as faiss assigns."""
        return _chunked_argmax(keys_mapped, self.centroids, None)

    def _probe_scores(self, q_mapped: torch.Tensor) -> torch.Tensor:
        """``[S, m, D]`` -> ``[S, m, C]`` list scores; the lists with the highest scores are scanned."""
        return torch.bmm(q_mapped, self.centroids.transpose(1, 2))

    # ------------------------------------------------------------------------------------------ building
    def add(self, keys: torch.Tensor) -> None:
        """``keys [S, n, D]``: the next offloaded keys (their ids continue from the previous ones)."""
        keys = keys.detach().float().cpu()
        self.tail = keys if self.tail is None else torch.cat([self.tail, keys], 1)
        if not self.trained and self.tail.shape[1] >= self.train_min:
            self._train(self.tail)
        if self.trained and self.tail.shape[1] >= self.tail_max:
            self._index(self.tail)
            self.tail = self.tail[:, :0]

    def _train(self, keys: torch.Tensor) -> None:
        import time
        _faiss()                                   # a clear ImportError before any work when faiss is missing
        start = time.perf_counter()
        S, N, D = keys.shape
        self.nlist = min(N, self.nlist_arg or max(8, int(math.sqrt(N))))       # k-means needs >= nlist points
        self.nprobe = min(self.nlist, self.nprobe_arg or max(1, math.ceil(0.05 * self.nlist)))
        self._fit(keys)
        Dm = self.centroids.shape[-1]
        self._make_lists(keys)
        self.list_sizes = torch.zeros(S, self.nlist, dtype=torch.int64)
        self.list_sum = torch.zeros(S, self.nlist, Dm, dtype=torch.float64)
        self.list_sq = torch.zeros(S, self.nlist, Dm, dtype=torch.float64)
        self.trained = True
        self.train_seconds += time.perf_counter() - start

    def _make_lists(self, keys: torch.Tensor) -> None:
        """Create the empty faiss inverted lists once the centroids exist (``keys``: the training keys)."""
        faiss = _faiss()
        S, Dm = self.centroids.shape[0], self.centroids.shape[-1]
        self.faiss_indexes = []
        for s in range(S):
            ivf = faiss.IndexIVFFlat(faiss.IndexFlatL2(Dm), Dm, self.nlist, faiss.METRIC_INNER_PRODUCT)
            ivf.quantizer.add(np.ascontiguousarray(self.centroids[s].numpy()))
            ivf.is_trained = True
            self.faiss_indexes.append(ivf)

    def _map_keys(self, keys):
        return keys if self.key_map is None else torch.bmm(keys, self.key_map)

    def _map_queries(self, q):
        return q if self.query_map is None else torch.bmm(q, self.query_map)

    def _index(self, keys: torch.Tensor) -> None:
        S, n, _ = keys.shape
        mapped = self._map_keys(keys).contiguous()
        lists = self._assign(mapped)
        self.list_sizes.scatter_add_(1, lists, torch.ones_like(lists))
        idx = lists[..., None].expand_as(mapped)
        self.list_sum.scatter_add_(1, idx, mapped.double())
        self.list_sq.scatter_add_(1, idx, mapped.double() ** 2)
        self._add_to_lists(mapped, lists, np.arange(self.n_indexed, self.n_indexed + n, dtype=np.int64))
        self.n_indexed += n

    def _add_to_lists(self, mapped: torch.Tensor, lists: torch.Tensor, ids: np.ndarray) -> None:
        """Put ``mapped [S, n, D']`` keys with ids ``ids [n]`` into the faiss lists ``lists [S, n]``."""
        faiss = _faiss()
        for s in range(mapped.shape[0]):
            x = np.ascontiguousarray(mapped[s].numpy())
            assign = np.ascontiguousarray(lists[s].numpy())
            self.faiss_indexes[s].add_core(len(ids), faiss.swig_ptr(x), faiss.swig_ptr(ids), faiss.swig_ptr(assign))

    # ------------------------------------------------------------------------------------------ search
    def search(self, q: torch.Tensor, top_k: int):
        """``q [S, m, D]`` -> ``(ids [S, m, top_k]`` int64 (-1 = none), ``scanned [S, m]`` keys scored per query
        row, ``read [S, m]`` keys read in full: the same here, the lists hold fp32 vectors)."""
        q = q.detach().float().cpu()
        S, m, _ = q.shape
        tail_n = 0 if self.tail is None else self.tail.shape[1]
        scores, ids = [], []
        scanned = torch.full((S, m), tail_n, dtype=torch.int64)
        if tail_n:
            s_tail, i_tail = exact_topk(q, self.tail, top_k)
            scores.append(s_tail)
            ids.append(i_tail + self.n_indexed)
        if self.trained and self.n_indexed:
            qm = self._map_queries(q).contiguous()
            probe = self._probe_scores(qm)
            probe = probe.masked_fill(self.list_sizes[:, None, :] == 0, float("-inf"))
            dq, iq = probe.topk(self.nprobe, dim=-1)
            scanned += self.list_sizes.gather(1, iq.flatten(1)).view(S, m, -1).sum(-1)
            s_ivf = torch.empty(S, m, top_k)
            i_ivf = torch.empty(S, m, top_k, dtype=torch.int64)
            for s in range(S):
                ivf = self.faiss_indexes[s]
                ivf.nprobe = self.nprobe
                d, i = ivf.search_preassigned(qm[s].numpy(), top_k, iq[s].numpy(), dq[s].numpy())
                s_ivf[s], i_ivf[s] = torch.from_numpy(d), torch.from_numpy(i)
            scores.append(s_ivf.masked_fill(i_ivf < 0, float("-inf")))
            ids.append(i_ivf)
        return best_candidates(scores, ids, (S, m), top_k), scanned, scanned

    # ------------------------------------------------------------------------------------------ saving
    _state_fields = ("trained", "n_indexed", "tail", "train_seconds")
    _trained_fields = ("nlist", "nprobe", "centroids", "key_map", "query_map", "list_sizes", "list_sum", "list_sq")

    def state_dict(self) -> dict:
        """Everything a search depends on (tensors, numbers; the faiss indexes serialized), for
        :func:`~.index_file.save_index`; the constructor arguments are in ``params``."""
        state = {name: getattr(self, name) for name in self._state_fields}
        if self.trained:
            state.update({name: getattr(self, name) for name in self._trained_fields})
            state["faiss"] = [torch.from_numpy(_faiss().serialize_index(ix)) for ix in self.faiss_indexes]
        return state

    def load_state_dict(self, state: dict) -> None:
        """Restore what :meth:`state_dict` returned (on an index built with the same ``params``)."""
        for name, value in state.items():
            if name != "faiss":
                setattr(self, name, value)
        self.faiss_indexes = [_faiss().deserialize_index(t.numpy()) for t in state.get("faiss", [])]
        if self.trained:
            self._restored()

    def _restored(self) -> None:
        """Rebuild what is derived from the restored state (subclasses)."""

    def nbytes(self) -> int:
        """RAM of the inverted lists (fp32 vectors + int64 ids), the centroids and the tail."""
        total = 0 if self.tail is None else self.tail.numel() * 4
        if self.trained:
            D = self.centroids.shape[-1]
            total += len(self.faiss_indexes) * self.n_indexed * (4 * D + 8) + self.centroids.numel() * 4
            total += (self.list_sum.numel() + self.list_sq.numel()) * 8
            if self.key_map is not None:
                total += (self.key_map.numel() + self.query_map.numel()) * 4
        return total


def best_candidates(scores: list, ids: list, lead: tuple, top_k: int) -> torch.Tensor:
    """The ``top_k`` best of the candidate lists ``scores`` / ``ids`` (each ``[*lead, n_i]``; -inf scores are
    missing candidates): long ``[*lead, top_k]``, -1 where fewer than ``top_k`` real candidates exist."""
    if not scores:
        return torch.full((*lead, top_k), -1, dtype=torch.int64)
    all_s, all_i = torch.cat(scores, -1), torch.cat(ids, -1)
    best, pick = all_s.topk(min(top_k, all_s.shape[-1]), dim=-1)
    out = all_i.gather(-1, pick).masked_fill(torch.isinf(best), -1)
    if out.shape[-1] < top_k:
        out = torch.cat([out, torch.full((*lead, top_k - out.shape[-1]), -1, dtype=torch.int64)], -1)
    return out


def _chunked_argmax(x: torch.Tensor, centroids: torch.Tensor, bias, chunk: int = 32768) -> torch.Tensor:
    """argmax over C of ``x @ centroids^T + bias`` for ``x [S, n, D]``, ``centroids [S, C, D]``, ``bias [S, C]``,
    ``chunk`` rows at a time (memory O(chunk x C))."""
    out = torch.empty(x.shape[:2], dtype=torch.int64)
    ct = centroids.transpose(1, 2)
    for start in range(0, x.shape[1], chunk):
        s = torch.bmm(x[:, start:start + chunk], ct)
        if bias is not None:
            s += bias[:, None, :]
        out[:, start:start + chunk] = s.argmax(-1)
    return out
