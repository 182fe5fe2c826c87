"""An index sharded across ranks (``index.placement=ranks``): every rank indexes its own contiguous KB slice and the
per-slice top-k lists are merged into the global top-k.

No process holds the whole index nor the whole N x d matrix: a rank's :class:`SliceIndex` is built chunk by chunk
from its rows of the published ``embeddings.npy`` memory map (rank 0 publishes that file streamed from the ranks'
shards, :mod:`ragtrain.index.shards`).  With ``kind=flat`` every slice is searched exactly, so the merged result
equals an exact search over the whole KB (FAISS ``IndexShards`` does the same merge across GPUs of one process;
here the shards live in different processes).  The collective part (gathering every rank's queries, exchanging
the per-slice lists) is the trainer's; this module only indexes a slice and merges lists.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from ragtrain.index.faiss_index import DenseIndex

__all__ = ["SliceIndex", "merge_topk"]


class SliceIndex:
    """The index of KB rows ``rows`` (a contiguous ``range``) of ``vectors`` (the whole KB's (N, d) array, usually
    a read-only memory map: only this slice is read).  :meth:`search` answers in KB row ids."""

    def __init__(self, vectors: np.ndarray, rows: range, kind: str = "flat", **index_kw: Any) -> None:
        if rows.step != 1 or rows.start < 0 or rows.stop > len(vectors):
            raise ValueError(f"SliceIndex: rows {rows} is not a contiguous slice of {len(vectors)} vectors")
        self.start, self.stop = rows.start, rows.stop
        self.index = (DenseIndex.build_chunked([vectors[rows.start: rows.stop]], kind, **index_kw)
                      if len(rows) else None)

    @property
    def ntotal(self) -> int:
        return self.stop - self.start

    def search(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """``(scores (B, k) float32, ids (B, k) int64)``: this slice's best ``k`` (KB row ids), padded with
        ``(-inf, -1)`` where the slice holds fewer than ``k`` vectors (or the index visits fewer)."""
        q = np.ascontiguousarray(queries, dtype=np.float32)
        scores = np.full((len(q), k), -np.inf, dtype=np.float32)
        ids = np.full((len(q), k), -1, dtype=np.int64)
        kk = min(k, self.ntotal)
        if kk and len(q):
            s, i = self.index.search(q, kk)
            hit = i >= 0
            scores[:, :kk] = np.where(hit, s, -np.inf)
            ids[:, :kk] = np.where(hit, i + self.start, -1)
        return scores, ids


def merge_topk(scores: np.ndarray, ids: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Merge per-shard top lists ``scores``/``ids`` of shape (P, B, k_shard) into the top ``k`` of each of the B
    rows, best first.  Padding (``-1``) sorts last; equal scores keep shard order (lower KB ids first, since the
    shards are contiguous slices in KB order), as an exact search over the whole KB would."""
    p, b, ks = scores.shape
    s = np.transpose(scores, (1, 0, 2)).reshape(b, p * ks)
    i = np.transpose(ids, (1, 0, 2)).reshape(b, p * ks)
    s = np.where(i < 0, -np.inf, s)
    order = np.argsort(-s, axis=1, kind="stable")[:, :k]
    return (np.ascontiguousarray(np.take_along_axis(s, order, axis=1), dtype=np.float32),
            np.ascontiguousarray(np.take_along_axis(i, order, axis=1), dtype=np.int64))
