"""Fast retrieval index: query-aware IVF lists of compressed codes, exact re-ranking from the stored keys.

Why: scanning full fp32 keys is bound by memory reads (at 1M keys, 85% of a decode step was the list scan).  Here
the lists hold compressed codes of each key's residual (key minus its list's centroid): 8-bit scalar codes
(``codes="sq8"``, faiss ``IndexIVFScalarQuantizer``: 128 bytes per 128-d key instead of 512, nearly exact scores)
or 4-bit fast-scan PQ (``codes="pq4"``, faiss ``IndexIVFPQFastScan``: 4 bits per ``dims_per_code`` dimensions,
a faster scan with coarser scores).  The best ``shortlist`` candidates of the code scan are re-scored exactly
from the keys in the RAM tier, and the best ``top_k`` of those are returned.  Lists and their probing are those of
:class:`~.index_query_aware.QueryAwareIndex` (k-means in the metric of the prefill queries); the probe budget is
counted in keys (``probe_keys``), not lists, so it does not depend on how unevenly the lists fill.

All streams (batch x KV head) live in one faiss index: stream ``s`` owns lists ``[s * C, (s + 1) * C)`` and its
queries are pre-assigned to those lists only, so one ``search_preassigned`` call serves every KV head of a layer.

Below ``train_min`` offloaded keys nothing is trained and the search is exact (the right choice for short
contexts); keys offloaded after training wait in an exactly scanned tail of at most ``tail_max`` keys.  The tail
and the re-ranking read the keys where the cache stores them (``attach``), in their storage dtype, with fp32
arithmetic: the index keeps no fp32 copy of the keys."""
from __future__ import annotations

import math

import numpy as np
import torch

from .index_exact import exact_topk
from .index_ivf import _faiss, best_candidates
from .index_query_aware import QueryAwareIndex
from ..errors import InvalidArgumentError


class FastScanIndex(QueryAwareIndex):
    """See the module docstring.

    ``probe_keys``: keys whose codes are scanned per query row, as a fraction of the indexed keys (float in
    (0, 1]) or a count (int); ``shortlist``: candidates per query row re-ranked exactly (default
    ``max(4 * top_k, 1024)``); ``codes``: "sq8" or "pq4" (see the module docstring); ``dims_per_code``: for
    "pq4", dimensions per 4-bit code (1: 64 bytes per 128-d key; 2: 32 bytes, faster, less exact); ``chunk``: keys
    mapped and added per step while indexing (bounds memory).  Defaults: measured at 1M keys (docs/retrieval.md).
    Other arguments as :class:`~.index_query_aware.QueryAwareIndex`."""

    name = "fast"

    def __init__(self, nlist: int | None = None, *, probe_keys: float | int = 0.03, shortlist: int | None = None,
                 codes: str = "pq4", dims_per_code: int = 1, train_min: int = 32768, tail_max: int = 4096,
                 chunk: int = 32768, **kwargs):
        super().__init__(nlist, train_min=train_min, tail_max=tail_max, **kwargs)
        if isinstance(probe_keys, bool) or not (isinstance(probe_keys, int) and probe_keys >= 1
                                                or isinstance(probe_keys, float) and 0 < probe_keys <= 1):
            raise InvalidArgumentError(f"probe_keys must be a fraction in (0, 1] or a key count >= 1, got {probe_keys!r}")
        if shortlist is not None and (isinstance(shortlist, bool) or not isinstance(shortlist, int) or shortlist < 1):
            raise InvalidArgumentError(f"shortlist must be a positive int or None, got {shortlist!r}")
        if codes not in ("pq4", "sq8"):
            raise InvalidArgumentError(f"codes must be 'pq4' or 'sq8', got {codes!r}")
        if dims_per_code not in (1, 2, 4, 8):
            raise InvalidArgumentError(f"dims_per_code must be 1, 2, 4 or 8, got {dims_per_code!r}")
        self.probe_keys, self.shortlist, self.dims_per_code, self.chunk = probe_keys, shortlist, dims_per_code, chunk
        self.codes = codes
        self.params.update(probe_keys=probe_keys, shortlist=shortlist, codes=codes, dims_per_code=dims_per_code,
                           chunk=chunk)
        self.source = None
        self.n_seen = 0                       # keys added (indexed + tail)

    # ------------------------------------------------------------------------------------------ building
    def attach(self, ram_tier) -> None:
        """Read keys (tail scan, re-ranking, training) from ``ram_tier``, which holds every added key."""
        self.source = ram_tier

    def add(self, keys: torch.Tensor) -> None:
        """``keys [S, n, D]``: the next offloaded keys, already stored in the attached tier (only counted here)."""
        if self.source is None:
            raise RuntimeError("FastScanIndex.add: attach() the key tier first (RetrievalKVCache does this)")
        self.n_seen += keys.shape[1]
        if not self.trained and self.n_seen >= self.train_min:
            self._train(self.source.view()[:, :self.n_seen])
        if self.trained and self.n_seen - self.n_indexed >= self.tail_max:
            stored = self.source.view()
            for start in range(self.n_indexed, self.n_seen, self.chunk):
                super()._index(stored[:, start:min(self.n_seen, start + self.chunk)].float())

    def _map_keys(self, keys):
        return super()._map_keys(keys.float())

    def _make_lists(self, keys: torch.Tensor) -> None:
        """One faiss IVF-PQ fast-scan index with ``S * C`` lists; its codebook is trained on residuals (key minus
        its list's centroid, in the mapped space) of a sample of every stream's keys."""
        faiss = _faiss()
        S, C, Dm = self.centroids.shape
        quantizer = faiss.IndexFlatL2(Dm)
        quantizer.add(np.ascontiguousarray(self.centroids.reshape(S * C, Dm).numpy()))
        if self.codes == "pq4":
            ivf = faiss.IndexIVFPQFastScan(quantizer, Dm, S * C, Dm // self.dims_per_code, 4,
                                           faiss.METRIC_INNER_PRODUCT)
            ivf.pq.cp.seed, ivf.pq.cp.niter = self.seed, self.kmeans_iter
        else:
            ivf = faiss.IndexIVFScalarQuantizer(quantizer, Dm, S * C, faiss.ScalarQuantizer.QT_8bit,
                                                faiss.METRIC_INNER_PRODUCT)
        ivf.by_residual = True                  # codes of key - centroid: finer than codes of the keys themselves
        gen = torch.Generator().manual_seed(self.seed)
        n = min(keys.shape[1], max(256, 16384 // S))                 # 16 codewords per sub-space: few points do
        sample = self._map_keys(keys[:, torch.randperm(keys.shape[1], generator=gen)[:n]]).contiguous()
        residual = sample - self.centroids.gather(1, self._assign(sample)[..., None].expand_as(sample))
        ivf.train_encoder(S * n, faiss.swig_ptr(np.ascontiguousarray(residual.reshape(-1, Dm).numpy())), None)
        ivf.is_trained = True
        self.faiss_indexes = [ivf]
        self._make_stream_quantizers()

    _state_fields = ("trained", "n_indexed", "n_seen", "train_seconds", "queries")

    def _restored(self) -> None:
        super()._restored()
        self._make_stream_quantizers()

    def _make_stream_quantizers(self) -> None:
        """pq4: adds go through one small quantizer per stream whose ids are that stream's list numbers (faiss's
        fast-scan lists take no pre-assigned adds)."""
        faiss = _faiss()
        S, C, Dm = self.centroids.shape
        self._quantizer = self.faiss_indexes[0].quantizer          # all S * C centroids (used by searches)
        self._stream_quantizers = []
        if self.codes != "pq4":
            return
        for s in range(S):
            flat = faiss.IndexFlatL2(Dm)
            q = faiss.IndexIDMap2(flat)
            q.add_with_ids(np.ascontiguousarray(self.centroids[s].numpy()),
                           np.arange(s * C, (s + 1) * C, dtype=np.int64))
            self._stream_quantizers.append((q, flat))

    def _add_to_lists(self, mapped: torch.Tensor, lists: torch.Tensor, ids: np.ndarray) -> None:
        ivf = self.faiss_indexes[0]
        if self.codes == "sq8":                 # stream s owns lists [s * C, (s + 1) * C)
            faiss = _faiss()
            for s in range(mapped.shape[0]):
                x = np.ascontiguousarray(mapped[s].numpy())
                assign = np.ascontiguousarray((lists[s] + s * self.nlist).numpy())
                ivf.add_core(len(ids), faiss.swig_ptr(x), faiss.swig_ptr(ids), faiss.swig_ptr(assign))
            return
        # faiss assigns each key to its own stream's lists (the nearest centroid, as `lists` does)
        for s in range(mapped.shape[0]):
            ivf.quantizer = self._stream_quantizers[s][0]
            ivf.add_with_ids(np.ascontiguousarray(mapped[s].numpy()), ids)
        ivf.quantizer = self._quantizer

    # ------------------------------------------------------------------------------------------ search
    def _budget(self) -> int:
        if isinstance(self.probe_keys, int):
            return self.probe_keys
        return max(1, math.ceil(self.probe_keys * self.n_indexed))

    def search(self, q: torch.Tensor, top_k: int):
        """``q [S, m, D]`` -> ``(ids [S, m, top_k]`` (-1 = none), ``scanned [S, m]`` keys whose codes or vectors
        were scored, ``read [S, m]`` keys read in full (tail + re-ranked shortlist)).  ids index the added keys."""
        q = q.detach().float().cpu()
        S, m, D = q.shape
        tail_n = self.n_seen - self.n_indexed
        scores, ids = [], []
        scanned = torch.full((S, m), tail_n, dtype=torch.int64)
        read = scanned.clone()
        if tail_n:
            s_tail, i_tail = exact_topk(q, self.source.view()[:, self.n_indexed:self.n_seen], top_k)
            scores.append(s_tail)
            ids.append(i_tail + self.n_indexed)
        if self.trained and self.n_indexed:
            s_ivf, i_ivf, n_scanned, n_read = self._scan_and_rerank(q, top_k)
            scanned += n_scanned
            read += n_read
            scores.append(s_ivf)
            ids.append(i_ivf)
        return best_candidates(scores, ids, (S, m), top_k), scanned, read

    def shortlist_for(self, top_k: int) -> int:
        """Candidates re-ranked exactly per query row for a search of ``top_k``."""
        return self.shortlist or max(4 * top_k, 1024)

    def _scan_and_rerank(self, q: torch.Tensor, top_k: int):
        """Code scan of the probed lists (one faiss call for all streams), then exact scores of the shortlist."""
        S, m, D = q.shape
        C = self.nlist
        qm = self._map_queries(q).contiguous()
        probe = self._probe_scores(qm).masked_fill(self.list_sizes[:, None, :] == 0, float("-inf"))
        # the best lists, enough of them to reach the budget unless lists are 4x smaller than average
        mean_size = max(1.0, self.n_indexed / max(1, int((self.list_sizes > 0).sum(-1).min())))
        order = probe.topk(min(C, 4 * math.ceil(self._budget() / mean_size) + 8), dim=-1).indices     # [S, m, n]
        sizes = self.list_sizes[:, None, :].expand(S, m, C).gather(-1, order)
        keep = (sizes.cumsum(-1) - sizes < self._budget()) & (sizes > 0)                   # lists before the budget
        nprobe = max(1, int(keep.sum(-1).max()))
        order, keep, sizes = order[..., :nprobe], keep[..., :nprobe], sizes[..., :nprobe]
        # faiss adds the list's coarse score to each code's score: it must be q' . centroid (IP by residual)
        coarse = torch.bmm(qm, self.centroids.transpose(1, 2)).gather(-1, order)
        lists = (order + torch.arange(S)[:, None, None] * C).masked_fill(~keep, -1)
        ivf = self.faiss_indexes[0]
        ivf.nprobe = nprobe
        n_short = min(self.shortlist_for(top_k), self.n_indexed)
        _, cand = ivf.search_preassigned(qm.view(S * m, -1).numpy(), n_short, lists.view(S * m, -1).numpy(),
                                         coarse.view(S * m, -1).contiguous().numpy())
        cand = torch.from_numpy(cand).view(S, m, n_short)
        keys = self.source.gather(cand.clamp(min=0).view(S, -1)).view(S * m, n_short, D)
        exact = torch.bmm(keys.float(), q.view(S * m, D, 1)).view(S, m, n_short)
        exact = exact.masked_fill(cand < 0, float("-inf"))
        best, pick = exact.topk(min(top_k, n_short), dim=-1)
        found = cand.gather(-1, pick).masked_fill(torch.isinf(best), -1)
        return best, found, (sizes * keep).sum(-1), (cand >= 0).sum(-1)

    def nbytes(self) -> int:
        """RAM of the index: codes + ids in the lists (pq4 lists are padded to blocks of 32, counted), centroids,
        list moments, the maps; the keys themselves stay in the cache's tier."""
        if not self.trained:
            return 0
        S, C, Dm = self.centroids.shape
        code = self.faiss_indexes[0].code_size
        total = S * self.n_indexed * (code + 8) + (S * C * 32 * code if self.codes == "pq4" else 0)
        total += 2 * self.centroids.numel() * 4 + (self.list_sum.numel() + self.list_sq.numel()) * 8
        total += (self.key_map.numel() + self.query_map.numel()) * 4
        return total
