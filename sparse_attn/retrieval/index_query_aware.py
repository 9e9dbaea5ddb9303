"""Attention-aware IVF: lists formed in the metric the *queries* induce on keys, probed by expected best score.

Why: what matters about two keys is how differently a query scores them, ``q . (k1 - k2)``, whose mean square over
the queries is ``(k1 - k2)^T M (k1 - k2)`` with ``M = E[q q^T]`` (the queries' second moment, estimated from the
prefill queries of the KV head's query group).  Keys carry large variance in directions queries hardly read
(outlier channels, RoPE components, a shared offset), so k-means on raw keys spends its lists on those
directions; k-means in the ``M`` metric spends them on what changes attention scores.
With ``M = L L^T`` (Cholesky), keys map to ``k' = k L`` and queries to ``q' = q L^{-T}``: then
``q' . k' = q . k`` exactly (the fine scan returns true scores) and L2 distance between ``k'`` is the ``M``
metric.  Lists are probed by an estimate of the best score inside each list: mean score
``q' . mu_c`` plus ``beta sqrt(2 ln n_c)`` times the list's spread along the query, ``sqrt(sum_d q'_d^2 var_cd)``
(the expected maximum of ``n_c`` Gaussian scores), with ``mu_c, var_c`` running per-list moments kept as keys
arrive.  Without observed queries it falls back to ``M = I`` (k-means on the keys)."""
from __future__ import annotations


import numpy as np
import torch

from .index_ivf import IVFIndex, _chunked_argmax, _faiss
from ..errors import InvalidArgumentError


class QueryAwareIndex(IVFIndex):
    """IVF whose lists are k-means clusters of keys in the queries' metric (see the module docstring).

    ``max_queries``: prefill queries kept per stream for ``M`` (a uniform sample); ``ridge``: added to ``M``'s
    diagonal, relative to its mean eigenvalue, so rarely-queried directions still count a little; ``beta``:
    weight of the spread term when probing (0 = probe by mean score only)."""

    name = "query_aware"

    def __init__(self, *args, max_queries: int = 8192, ridge: float = 1e-2, beta: float = 1.0, **kwargs):
        super().__init__(*args, **kwargs)
        if ridge < 0 or beta < 0 or max_queries < 1:
            raise InvalidArgumentError(f"ridge, beta must be >= 0 and max_queries >= 1, got {ridge}, {beta}, {max_queries}")
        self.max_queries, self.ridge, self.beta = max_queries, ridge, beta
        self.params.update(max_queries=max_queries, ridge=ridge, beta=beta)
        self.queries = None               # [S, <= max_queries, D]
        self._gen = torch.Generator().manual_seed(self.seed)

    def observe_queries(self, q: torch.Tensor) -> None:
        """``q [S, m, D]``: queries of each stream's query group (prefill); keeps a uniform sample."""
        q = q.detach().float().cpu()
        if q.shape[1] > self.max_queries:
            q = q[:, torch.randperm(q.shape[1], generator=self._gen)[:self.max_queries]]
        pool = q if self.queries is None else torch.cat([self.queries, q], 1)
        if pool.shape[1] > self.max_queries:
            pool = pool[:, torch.randperm(pool.shape[1], generator=self._gen)[:self.max_queries]]
        self.queries = pool

    def _fit(self, keys: torch.Tensor) -> None:
        faiss = _faiss()
        S, N, D = keys.shape
        eye = torch.eye(D, dtype=torch.float64)
        if self.queries is None:
            second = eye.expand(S, D, D)
        else:
            qd = self.queries.double()
            second = qd.transpose(1, 2) @ qd / qd.shape[1]
            mean_eig = second.diagonal(dim1=1, dim2=2).mean(-1)
            second = second + self.ridge * mean_eig[:, None, None] * eye
        chol = torch.linalg.cholesky(second)
        self.key_map = chol.float()                                             # k' = k L
        self.query_map = torch.linalg.inv(chol).transpose(1, 2).float()         # q' = q L^-T
        gen = torch.Generator().manual_seed(self.seed)
        n_train = min(N, self.nlist * self.points_per_centroid)
        pick = torch.randperm(N, generator=gen)[:n_train] if n_train < N else slice(None)
        mapped = self._map_keys(keys[:, pick].contiguous())                    # map the training sample only
        cents = []
        for s in range(S):
            sample = mapped[s]
            km = faiss.Kmeans(D, self.nlist, niter=self.kmeans_iter, seed=self.seed,
                              max_points_per_centroid=self.points_per_centroid)
            km.train(np.ascontiguousarray(sample.numpy()))
            cents.append(torch.from_numpy(km.centroids.copy()))
        self.centroids = torch.stack(cents)

    def _assign(self, keys_mapped: torch.Tensor) -> torch.Tensor:
        """Nearest centroid in L2 (the k-means rule): argmax of ``k' . c - |c|^2 / 2``."""
        return _chunked_argmax(keys_mapped, self.centroids, -0.5 * (self.centroids ** 2).sum(-1))

    _state_fields = IVFIndex._state_fields + ("queries",)

    def _index(self, keys: torch.Tensor) -> None:
        super()._index(keys)
        self._refresh_probe()

    def _restored(self) -> None:
        self._refresh_probe()

    def _refresh_probe(self) -> None:
        """The probe's per-list mean and spread, from the running moments."""
        n = self.list_sizes.clamp(min=1).double()
        mean = self.list_sum / n[..., None]                                     # [S, C, D']
        var = (self.list_sq / n[..., None] - mean ** 2).clamp(min=0)
        self._mean_t = mean.transpose(1, 2).float().contiguous()               # cached until lists change
        self._var_t = (var * (2 * torch.log1p(n))[..., None]).transpose(1, 2).float().contiguous()

    def _probe_scores(self, q_mapped: torch.Tensor) -> torch.Tensor:
        score = torch.bmm(q_mapped, self._mean_t)
        if self.beta:
            score += self.beta * torch.bmm(q_mapped ** 2, self._var_t).clamp_(min=0).sqrt_()
        return score
