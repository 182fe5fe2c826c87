"""Retrievers behind one interface: dense (FAISS over context-encoder vectors), BM25 (bm25s) and hybrid.

``search(query_vectors, questions, k) -> (scores (B, k) float32, ids (B, k) int64)``.  Dense uses the vectors,
BM25 the question text, hybrid fuses both rankings with reciprocal-rank fusion.  These objects live on rank 0
only; the trainer routes queries to them.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol

import numpy as np

from ragtrain.index.faiss_index import DenseIndex


class Retriever(Protocol):
    def search(self, query_vectors: np.ndarray, questions: Sequence[str], k: int) -> tuple[np.ndarray, np.ndarray]:
        ...


class DenseRetriever:
    def __init__(self, index: DenseIndex):
        self.index = index

    def search(self, query_vectors, questions, k):
        return self.index.search(np.ascontiguousarray(query_vectors, dtype=np.float32), k)


class BM25Retriever:
    """Lexical retrieval with bm25s (English stop words).  ``texts``: any sequence that slices (a list, or
    :class:`KBTexts` over a KB); the index is built ``chunk`` texts at a time in bounded memory
    (:func:`ragtrain.index.bm25.build_bm25`: the same scores as ``bm25s.BM25().index(bm25s.tokenize(texts))``);
    with ``scratch_dir`` its score matrix lives in memory-mapped files there, not in anonymous RAM."""

    def __init__(self, texts: Sequence[str], stopwords: str = "en", chunk: int = 20000, scratch_dir=None):
        import bm25s

        from ragtrain.index.bm25 import build_bm25, text_chunks

        self._bm25s = bm25s
        self.stopwords = stopwords
        self.model = build_bm25(text_chunks(texts, chunk), stopwords=stopwords, scratch_dir=scratch_dir)
        self.n = len(texts)

    def search(self, query_vectors, questions, k):
        if k > self.n:
            raise ValueError(f"k={k} is larger than the knowledge base ({self.n} passages)")
        tokens = self._bm25s.tokenize(list(questions), stopwords=self.stopwords, show_progress=False)
        ids, scores = self.model.retrieve(tokens, k=k, show_progress=False, n_threads=0)
        return scores.astype(np.float32), ids.astype(np.int64)


class HybridRetriever:
    """Reciprocal-rank fusion of dense and BM25 rankings (each searched ``depth`` deep)."""

    def __init__(self, dense: DenseRetriever, bm25: BM25Retriever, depth: int = 50, rrf_k: float = 60.0):
        self.dense, self.bm25, self.depth, self.rrf_k = dense, bm25, depth, rrf_k

    def search(self, query_vectors, questions, k):
        depth = min(max(self.depth, k), self.bm25.n)
        _, d_ids = self.dense.search(query_vectors, questions, depth)
        _, b_ids = self.bm25.search(query_vectors, questions, depth)
        out_ids = np.full((len(d_ids), k), -1, dtype=np.int64)  # -1 / -inf: padding, as FAISS pads
        out_scores = np.full((len(d_ids), k), -np.inf, dtype=np.float32)
        for row, (dr, br) in enumerate(zip(d_ids, b_ids)):
            fused: dict[int, float] = {}
            for ranking in (dr, br):
                for rank, pid in enumerate(ranking):
                    if pid >= 0:
                        fused[int(pid)] = fused.get(int(pid), 0.0) + 1.0 / (self.rrf_k + rank + 1)
            best = sorted(fused.items(), key=lambda kv: -kv[1])[:k]
            out_ids[row, : len(best)] = [p for p, _ in best]
            out_scores[row, : len(best)] = [s for _, s in best]
        return out_scores, out_ids


RETRIEVERS = ("dense", "bm25", "hybrid")
# what an export records so that ``ragtrain eval`` rebuilds the same lexical retriever
HYBRID_DEFAULTS = {"depth": 50, "rrf_k": 60.0}
BM25_DEFAULTS = {"stopwords": "en", "text": "{title} {text}"}


class KBTexts(Sequence):
    """The text BM25 indexes for each KB passage (title and text), read from the KB (an Arrow memory map) only
    when sliced: the whole KB's texts never sit in a Python list."""

    def __init__(self, kb):
        self.kb = kb

    def __len__(self) -> int:
        return len(self.kb)

    def __getitem__(self, item):
        if isinstance(item, slice):
            rows = self.kb[item]
            return [BM25_DEFAULTS["text"].format(title=t, text=x) for t, x in zip(rows["title"], rows["text"])]
        row = self.kb[int(item)]
        return BM25_DEFAULTS["text"].format(title=row["title"], text=row["text"])


def bm25_texts(kb) -> KBTexts:
    """The text BM25 indexes for each KB passage (title and text), as a lazy sequence."""
    return KBTexts(kb)


def build_retriever(kind: str, index: DenseIndex | None, kb=None, bm25: BM25Retriever | None = None,
                    bm25_dir=None):
    """``(retriever, bm25)`` for ``index.retriever=kind``: the BM25 index is built from ``kb`` unless ``bm25`` (one
    built before, e.g. by the previous refresh: it does not depend on the encoders) is given; ``bm25_dir``: a
    folder (emptied first) for its memory-mapped score matrix."""
    if kind not in RETRIEVERS:
        raise ValueError(f"unknown retriever {kind!r} (choose from {', '.join(RETRIEVERS)})")
    dense = DenseRetriever(index) if index is not None else None
    if kind == "dense":
        return dense, bm25
    if bm25 is None:
        if bm25_dir is not None:
            import shutil

            shutil.rmtree(bm25_dir, ignore_errors=True)
        bm25 = BM25Retriever(bm25_texts(kb), stopwords=BM25_DEFAULTS["stopwords"], scratch_dir=bm25_dir)
    if kind == "bm25":
        return bm25, bm25
    return HybridRetriever(dense, bm25, **HYBRID_DEFAULTS), bm25


def retriever_settings(kind: str) -> dict:
    """Recorded in exports (``ragtrain.json``)."""
    return {"kind": kind, **({"bm25": BM25_DEFAULTS} if kind != "dense" else {}),
            **({"hybrid": HYBRID_DEFAULTS} if kind == "hybrid" else {})}

