"""Dense maximum-inner-product index over knowledge-base passage embeddings.

:class:`DenseIndex` wraps a FAISS index of one of three kinds:

* ``"flat"``  -- exact search, ``IndexFlatIP`` inside ``IndexIDMap2``;
* ``"ivf"``   -- ``IndexIVFFlat`` (inner-product metric) trained on the embeddings themselves, with
  ``nlist`` clipped to ``max(1, N // 39)`` for small ``N`` (FAISS wants ~39 points per centroid);
* ``"ivfpq"`` -- ``IndexIVFPQ`` (inner-product metric, residual product quantisation): ``pq_m`` sub-quantizers
  of ``pq_bits`` bits each, so a vector costs ``pq_m * pq_bits / 8`` bytes (plus its 8-byte id) instead of
  ``4 * dim``; ``dim`` must be divisible by ``pq_m``; ``pq_bits`` is clipped to ``log2(N)`` for tiny ``N``
  (a PQ codebook of ``2**bits`` centroids needs at least that many training points);
* ``"hnsw"``  -- ``IndexHNSWFlat(dim, M, METRIC_INNER_PRODUCT)`` inside ``IndexIDMap2``.

``nlist="auto"`` picks the list count from ``N`` (:func:`auto_nlist`); ``nprobe="auto"`` tunes it once the index
holds every vector (:meth:`DenseIndex.tune_nprobe`): the smallest probe count that finds at least ``target_recall``
of the exact top-``tune_k`` neighbours of a seeded sample of the indexed vectors (each query's own id left out).
The chosen value and the recall measured are stored with the index (``meta.json``), so a loaded or resumed index
searches exactly as it did when built.

IVF and IVF-PQ are trained on at most ``train_size`` vectors: all of them when ``N <= train_size``, else a
seeded random sample (:meth:`DenseIndex.train`, or the first batch given to :meth:`DenseIndex.add`);
:meth:`DenseIndex.build_chunked` trains on a sample drawn across chunked sources (e.g. memory-mapped
shards) and then adds them chunk by chunk, so the vectors never need to sit whole in RAM.

Ids are knowledge-base row ids (int64).  With ``use_gpu=True`` and a GPU build of FAISS with visible
GPUs, the flat/IVF index is sharded across all GPUs (``index_cpu_to_all_gpus`` with
``GpuMultipleClonerOptions(shard=True, useFloat16=gpu_fp16)``); otherwise a warning is logged once
and the index stays on CPU.  HNSW has no FAISS GPU implementation and always stays on CPU.

:func:`torch_flat_search` is a pure-torch brute-force search (matmul + top-k, chunked over the
passages) that runs on any device, including CUDA in fp16; it is both a GPU path when only
``faiss-cpu`` is installed and a reference implementation for tests.
"""

from __future__ import annotations

import json
import logging
import mmap
from pathlib import Path
from typing import Any

import faiss
import numpy as np
import torch

logger = logging.getLogger(__name__)

__all__ = ["DenseIndex", "torch_flat_search", "INDEX_FILE", "META_FILE", "drop_pages"]

INDEX_FILE = "index.faiss"
META_FILE = "meta.json"
_KINDS = ("flat", "ivf", "ivfpq", "hnsw")
_IVF_KINDS = ("ivf", "ivfpq")
DEFAULT_TRAIN_SIZE = 1 << 17  # vectors an IVF/IVF-PQ index is trained on (a sample when N is larger)
_MIN_POINTS_PER_CENTROID = 39
AUTO = "auto"
TUNE_QUERIES = 256  # sample queries nprobe="auto" is tuned on


def auto_nlist(n: int) -> int:
    """IVF list count for ``n`` vectors: ``4 * sqrt(n)`` (the low end of FAISS's guideline of 4-16 x sqrt(N)),
    rounded to a power of two; at least 1."""
    return max(1, 1 << int(round(np.log2(max(4.0 * np.sqrt(max(n, 1)), 1.0)))))


def _auto_or_int(value: Any, what: str) -> int | str:
    if value == AUTO:
        return AUTO
    try:
        out = int(value)
    except (TypeError, ValueError):
        raise ValueError(f"DenseIndex: {what} must be an integer or {AUTO!r}, got {value!r}") from None
    if out < 1:
        raise ValueError(f"DenseIndex: {what} must be >= 1 or {AUTO!r}, got {value!r}")
    return out


_warned_no_gpu = False


def _warn_no_gpu_once(reason: str) -> None:
    global _warned_no_gpu
    if not _warned_no_gpu:
        logger.warning("DenseIndex: use_gpu requested but %s; keeping the FAISS index on CPU.", reason)
        _warned_no_gpu = True


def _faiss_num_gpus() -> int:
    get = getattr(faiss, "get_num_gpus", None)
    if get is None or not hasattr(faiss, "GpuMultipleClonerOptions"):
        return 0
    try:
        return int(get())
    except Exception:  # pragma: no cover - defensive: broken CUDA runtime
        return 0


def _sample_rows(sources: list[np.ndarray], size: int, seed: int) -> np.ndarray:
    """At most ``size`` rows drawn uniformly (seeded, in order) across ``sources``, as one float32 array; all rows
    when there are not more than ``size``."""
    lengths = [int(s.shape[0]) for s in sources]
    total = sum(lengths)
    if total <= size:
        return np.concatenate([_as_float32_2d(s[:], "embeddings") for s in sources]) if len(sources) > 1 \
            else _as_float32_2d(sources[0][:], "embeddings")
    pick = np.sort(np.random.default_rng(seed).choice(total, size, replace=False))
    out, start = [], 0
    for src, n in zip(sources, lengths):
        mine = pick[(pick >= start) & (pick < start + n)] - start
        if len(mine):
            out.append(np.asarray(src[mine], dtype=np.float32))
        _drop_pages(src)
        start += n
    return np.ascontiguousarray(np.concatenate(out))


def _drop_pages(arr: Any) -> None:
    """Release the resident pages of a file-backed ``np.memmap`` (they count in the process's RSS while mapped;
    clean or flushed pages are re-read from the file on the next access).  A no-op for anything else."""
    mm = getattr(arr, "_mmap", None)
    if mm is None:
        base = getattr(arr, "base", None)
        mm = base if isinstance(base, mmap.mmap) else getattr(base, "_mmap", None)
    if isinstance(mm, mmap.mmap) and hasattr(mm, "madvise") and hasattr(mmap, "MADV_DONTNEED"):
        try:
            if getattr(arr, "mode", "r") != "r" and hasattr(arr, "flush"):
                arr.flush()
            mm.madvise(mmap.MADV_DONTNEED)
        except (OSError, ValueError):  # pragma: no cover - e.g. a closed map
            pass


def _as_float32_2d(x: np.ndarray | torch.Tensor, what: str) -> np.ndarray:
    """Contiguous float32 numpy array of shape (n, d); a 1-D input becomes (1, d)."""
    if isinstance(x, torch.Tensor):
        x = x.detach().to(device="cpu", dtype=torch.float32).numpy()
    arr = np.ascontiguousarray(np.asarray(x), dtype=np.float32)
    if arr.ndim == 1:
        arr = arr[None, :]
    if arr.ndim != 2:
        raise ValueError(f"{what} must be 2-D (n, dim), got shape {tuple(arr.shape)}")
    return arr


class DenseIndex:
    """Inner-product index over passage embeddings; ids are KB row ids (int64).

    Create with :meth:`build` (or construct, then :meth:`add`), query with :meth:`search`, persist
    with :meth:`save` / :meth:`load`.  An IVF index is trained on the first batch passed to
    :meth:`add`.
    """

    def __init__(
        self,
        dim: int,
        kind: str = "flat",
        *,
        nlist: int | str = AUTO,
        nprobe: int | str = AUTO,
        target_recall: float = 0.9,
        tune_k: int = 10,
        hnsw_m: int = 32,
        ef_search: int = 128,
        ef_construction: int = 64,
        use_gpu: bool = False,
        gpu_fp16: bool = False,
        pq_m: int = 16,
        pq_bits: int = 8,
        train_size: int = DEFAULT_TRAIN_SIZE,
    ) -> None:
        if kind not in _KINDS:
            raise ValueError(f"DenseIndex: unknown kind {kind!r}; expected one of {_KINDS}")
        if dim < 1:
            raise ValueError(f"DenseIndex: dim must be >= 1, got {dim}")
        if kind == "ivfpq":
            if pq_m < 1 or dim % pq_m:
                raise ValueError(f"DenseIndex: ivfpq needs dim ({dim}) divisible by pq_m ({pq_m})")
            if not 1 <= pq_bits <= 16:
                raise ValueError(f"DenseIndex: pq_bits must be between 1 and 16, got {pq_bits}")
        if train_size < 1:
            raise ValueError(f"DenseIndex: train_size must be >= 1, got {train_size}")
        self._dim = int(dim)
        self.kind = kind
        if not 0 < target_recall <= 1:
            raise ValueError(f"DenseIndex: target_recall must be in (0, 1], got {target_recall}")
        if int(tune_k) < 1:
            raise ValueError(f"DenseIndex: tune_k must be >= 1, got {tune_k}")
        self.nlist = _auto_or_int(nlist, "nlist")  # requested; the effective value is fixed at training time
        self.nprobe = _auto_or_int(nprobe, "nprobe")  # requested; "auto": tuned once every vector is added
        self.target_recall = float(target_recall)
        self.tune_k = int(tune_k)
        self.tuned: dict[str, Any] | None = None  # nprobe="auto": see tune_nprobe
        self.hnsw_m = int(hnsw_m)
        self.ef_search = int(ef_search)
        self.ef_construction = int(ef_construction)
        self.use_gpu = bool(use_gpu)
        self.gpu_fp16 = bool(gpu_fp16)
        self.pq_m = int(pq_m)
        self.pq_bits = int(pq_bits)  # requested; the effective value is fixed at training time
        self.train_size = int(train_size)
        self._effective_pq_bits_value: int | None = None
        self._on_gpu = False
        self._index: Any = None  # built lazily for ivf/ivfpq (nlist depends on N)
        self._effective_nlist_value: int | None = None
        if kind == "flat":
            self._index = faiss.IndexIDMap2(faiss.IndexFlatIP(self._dim))
        elif kind == "hnsw":
            hnsw = faiss.IndexHNSWFlat(self._dim, self.hnsw_m, faiss.METRIC_INNER_PRODUCT)
            hnsw.hnsw.efConstruction = self.ef_construction
            hnsw.hnsw.efSearch = self.ef_search
            self._index = faiss.IndexIDMap2(hnsw)

    # ------------------------------------------------------------------ construction
    @classmethod
    def build(
        cls,
        embeddings: np.ndarray | torch.Tensor,
        ids: np.ndarray | None = None,
        kind: str = "flat",
        **kw: Any,
    ) -> DenseIndex:
        """Index ``embeddings`` (N, d) with ids ``ids`` (default ``arange(N)``)."""
        emb = _as_float32_2d(embeddings, "embeddings")
        index = cls(emb.shape[1], kind, **kw)
        if kind in _IVF_KINDS:
            index.train(emb, n_total=emb.shape[0])
        index.add(emb, ids)
        index._tune_if_auto([emb], None if ids is None else np.asarray(ids, dtype=np.int64).reshape(-1))
        return index

    @classmethod
    def build_chunked(
        cls,
        sources: list[np.ndarray],
        kind: str = "flat",
        *,
        chunk_rows: int = 1 << 16,
        seed: int = 0,
        **kw: Any,
    ) -> DenseIndex:
        """Index the rows of ``sources`` (2-D arrays, typically read-only memory maps of shards, in id order:
        ids ``0..N-1`` across them) without ever holding them whole: IVF kinds are trained first on a sample
        of at most ``train_size`` rows drawn across all sources, then every source is added ``chunk_rows``
        rows at a time (each chunk copied to float32, then released)."""
        if not sources:
            raise ValueError("DenseIndex.build_chunked: no sources")
        dims = {int(s.shape[1]) for s in sources}
        if len(dims) != 1 or any(s.ndim != 2 for s in sources):
            raise ValueError(f"DenseIndex.build_chunked: sources must be 2-D with one dim, got shapes "
                             f"{[tuple(s.shape) for s in sources]}")
        use_gpu = bool(kw.pop("use_gpu", False))
        index = cls(dims.pop(), kind, **kw)  # on CPU while adding; moved to GPUs once complete
        total = sum(int(s.shape[0]) for s in sources)
        if kind in _IVF_KINDS:
            index.train(_sample_rows(sources, index.train_size, seed), n_total=total)
        start = 0
        for src in sources:
            for lo in range(0, src.shape[0], chunk_rows):
                chunk = _as_float32_2d(src[lo: lo + chunk_rows], "embeddings")
                index.add(chunk, np.arange(start + lo, start + lo + chunk.shape[0], dtype=np.int64))
                del chunk
                _drop_pages(src)
            start += src.shape[0]
        index._tune_if_auto(sources, None)
        if use_gpu:
            index.use_gpu = True
            index.to_gpu()
        return index

    def _effective_nlist(self, n: int, n_total: int | None = None) -> int:
        want = auto_nlist(n if n_total is None else n_total) if self.nlist == AUTO else self.nlist
        return max(1, min(want, n // _MIN_POINTS_PER_CENTROID))

    def train(self, sample: np.ndarray | torch.Tensor, n_total: int | None = None) -> None:
        """Train an IVF/IVF-PQ index on ``sample`` (at most ``train_size`` rows are used: a seeded random
        subset of a larger sample); a no-op for flat/hnsw.  ``n_total``: how many vectors the index will hold
        (``nlist="auto"`` is chosen from it; default: the sample's size).  ``nlist`` (and ``pq_bits``) are
        clipped to what the sample supports."""
        if self.kind not in _IVF_KINDS:
            return
        if self._index is not None:
            raise RuntimeError("DenseIndex.train: the index is already trained")
        emb = _as_float32_2d(sample, "sample")
        if emb.shape[0] > self.train_size:
            pick = np.sort(np.random.default_rng(0).choice(emb.shape[0], self.train_size, replace=False))
            emb = emb[pick]
        n = emb.shape[0]
        nlist = self._effective_nlist(n, n_total)
        if self.nlist == AUTO:
            logger.info("DenseIndex: nlist=auto -> %d lists for %d vectors (%d training vectors)", nlist,
                        n if n_total is None else n_total, n)
        elif nlist < self.nlist:
            logger.info("DenseIndex: clipping IVF nlist %d -> %d for %d training vectors", self.nlist, nlist, n)
        quantizer = faiss.IndexFlatIP(self._dim)
        if self.kind == "ivf":
            ivf = faiss.IndexIVFFlat(quantizer, self._dim, nlist, faiss.METRIC_INNER_PRODUCT)
        else:
            bits = max(1, min(self.pq_bits, int(np.floor(np.log2(max(n, 2))))))
            if bits < self.pq_bits:
                logger.info("DenseIndex: clipping PQ bits %d -> %d for %d training vectors", self.pq_bits, bits, n)
            ivf = faiss.IndexIVFPQ(quantizer, self._dim, nlist, self.pq_m, bits, faiss.METRIC_INNER_PRODUCT)
            self._effective_pq_bits_value = bits
        ivf.train(emb)
        ivf.nprobe = nlist if self.nprobe == AUTO else min(self.nprobe, nlist)  # auto: exhaustive until tuned
        self._effective_nlist_value = nlist
        self._index = ivf

    def _train_ivf(self, emb: np.ndarray) -> None:
        self.train(emb)

    def _tune_if_auto(self, sources: list[np.ndarray], ids: np.ndarray | None, seed: int = 1,
                      chunk_rows: int = 1 << 16) -> None:
        """``nprobe="auto"``: tune it on a seeded sample of the indexed rows of ``sources`` (ids ``ids``, default
        ``0..N-1`` across them), against their exact top-k computed from ``sources`` chunk by chunk."""
        if self.kind not in _IVF_KINDS or self.nprobe != AUTO or self.ntotal == 0:
            return
        total = sum(int(s.shape[0]) for s in sources)
        pick = np.sort(np.random.default_rng(seed).choice(total, min(TUNE_QUERIES, total), replace=False))
        rows, start = [], 0
        for src in sources:
            n = int(src.shape[0])
            mine = pick[(pick >= start) & (pick < start + n)] - start
            if len(mine):
                rows.append(np.asarray(src[mine], dtype=np.float32))
            start += n
        q = np.ascontiguousarray(np.concatenate(rows))
        k = min(self.tune_k, total - 1) + 1  # + the query itself, left out below
        heap, start = faiss.ResultHeap(len(q), k, keep_max=True), 0
        for src in sources:
            for lo in range(0, int(src.shape[0]), chunk_rows):
                chunk = _as_float32_2d(src[lo: lo + chunk_rows], "embeddings")
                d, i = faiss.knn(q, chunk, min(k, chunk.shape[0]), metric=faiss.METRIC_INNER_PRODUCT)
                heap.add_result(np.ascontiguousarray(d), np.ascontiguousarray(i + start + lo))
            _drop_pages(src)
            start += int(src.shape[0])
        heap.finalize()
        pos = np.clip(heap.I, 0, None)
        exact = np.where(heap.I >= 0, pos if ids is None else ids[pos], -1)
        self.tune_nprobe(q, pick if ids is None else ids[pick], exact)

    def tune_nprobe(self, queries: np.ndarray, query_ids: np.ndarray | None = None,
                    exact_ids: np.ndarray | None = None) -> dict[str, Any]:
        """Set ``nprobe`` to the fewest lists with which at least ``target_recall`` of the ``queries``' true
        top-``tune_k`` neighbours are found (recall grows with ``nprobe``, so 1..nlist is bisected: about log2(nlist)
        searches of the sample).  The truth is ``exact_ids`` (exact search, best first) or, without
        it, the index's own exhaustive probe of every list.  Where even probing every list falls short of the
        target (product quantisation's error), a warning says so; in general the target is ``target_recall`` times
        what probing every list finds (1 for ivf), so that ``nprobe`` answers for the lists' loss only.  ``query_ids``: the queries' own ids when they are indexed vectors; each is left out of
        every list.  Returns (and stores in ``self.tuned``, saved with the index)
        ``{"nprobe", "recall", "queries", "k", "recall_all_lists"}``."""
        if self.kind not in _IVF_KINDS or self._index is None:
            raise RuntimeError("DenseIndex.tune_nprobe: needs a built ivf/ivfpq index")
        q = _as_float32_2d(queries, "queries")
        nlist = int(self._effective_nlist_value)
        k = min(self.tune_k, self.ntotal - 1) if query_ids is not None else min(self.tune_k, self.ntotal)
        if k < 1:
            self._set_nprobe(nlist)
            self.tuned = {"nprobe": nlist, "recall": 1.0, "queries": int(q.shape[0]), "k": 0, "recall_all_lists": 1.0}
            return self.tuned

        def first_k(ids: np.ndarray) -> list[set]:
            out = []
            for i, row in enumerate(ids):
                row = [int(x) for x in row if x >= 0 and (query_ids is None or x != query_ids[i])]
                out.append(set(row[:k]))
            return out

        def top(nprobe: int) -> list[set]:
            self._set_nprobe(nprobe)
            return first_k(self._index.search(q, k + (query_ids is not None))[1])

        truth = first_k(exact_ids) if exact_ids is not None else top(nlist)
        denom = sum(len(t) for t in truth) or 1

        def recall(nprobe: int) -> float:
            return sum(len(a & t) for a, t in zip(top(nprobe), truth)) / denom

        grid = range(1, nlist + 1)
        measured = {nlist: recall(nlist)}
        target = self.target_recall * measured[nlist]  # nprobe controls the lists' loss, not the codes'
        if measured[nlist] < self.target_recall:
            logger.warning("DenseIndex: nprobe=auto: even probing all %d lists finds only %.3f of the exact top-%d "
                           "(target %.2f; the %s codes lose the rest: raise pq_m / pq_bits or use ivf, hnsw, flat); "
                           "tuning nprobe to %.2f x that", nlist, measured[nlist], k, self.target_recall, self.kind,
                           self.target_recall)
        lo, hi = 0, len(grid) - 1  # grid[hi] (= nlist) meets the target
        while lo < hi:
            mid = (lo + hi) // 2
            measured[grid[mid]] = recall(grid[mid])
            if measured[grid[mid]] >= target:
                hi = mid
            else:
                lo = mid + 1
        chosen = grid[hi]
        self._set_nprobe(chosen)
        self.tuned = {"nprobe": chosen, "recall": round(measured[chosen], 4), "queries": int(q.shape[0]), "k": k,
                      "recall_all_lists": round(measured[nlist], 4)}
        logger.info("DenseIndex: nprobe=auto -> %d of %d lists (recall of the %s top-%d: %.3f, target %.2f; all lists: "
                    "%.3f; %d sample queries)", chosen, nlist, "exact" if exact_ids is not None else "all-lists", k,
                    measured[chosen], self.target_recall, measured[nlist], q.shape[0])
        return self.tuned

    def _set_nprobe(self, nprobe: int) -> None:
        space = faiss.GpuParameterSpace() if self._on_gpu else faiss.ParameterSpace()
        space.set_index_parameter(self._index, "nprobe", int(nprobe))

    @property
    def effective_nprobe(self) -> int | None:
        """The probe count searches use (ivf/ivfpq), or None."""
        if self.kind not in _IVF_KINDS or self._effective_nlist_value is None:
            return None
        if self.nprobe == AUTO:
            return self.tuned["nprobe"] if self.tuned else self._effective_nlist_value
        return min(self.nprobe, self._effective_nlist_value)

    def add(self, embeddings: np.ndarray | torch.Tensor, ids: np.ndarray | None = None) -> None:
        """Add vectors with int64 ``ids`` (default: continue ``ntotal, ntotal+1, ...``)."""
        emb = _as_float32_2d(embeddings, "embeddings")
        if emb.shape[1] != self._dim:
            raise ValueError(f"DenseIndex.add: embeddings have dim {emb.shape[1]}, index has dim {self._dim}")
        n = emb.shape[0]
        if ids is None:
            start = self.ntotal
            id_arr = np.arange(start, start + n, dtype=np.int64)
        else:
            id_arr = np.ascontiguousarray(np.asarray(ids), dtype=np.int64).reshape(-1)
            if id_arr.shape[0] != n:
                raise ValueError(f"DenseIndex.add: {n} embeddings but {id_arr.shape[0]} ids")
        if n == 0:
            return
        if self._on_gpu:
            raise RuntimeError("DenseIndex.add: cannot add to an index already moved to GPU; add before to_gpu()")
        if self._index is None:  # ivf/ivfpq, untrained: train on (a sample of) this first batch
            self._train_ivf(emb)
        self._index.add_with_ids(emb, id_arr)
        if self.use_gpu:
            self.to_gpu()

    # ------------------------------------------------------------------ GPU
    def to_gpu(self) -> bool:
        """Shard the index across all visible GPUs; returns whether it is on GPU afterwards."""
        if self._on_gpu:
            return True
        if self.kind == "hnsw":
            _warn_no_gpu_once("FAISS has no GPU HNSW index")
            return False
        n_gpus = _faiss_num_gpus()
        if n_gpus == 0:
            _warn_no_gpu_once("FAISS was built without GPU support or sees no GPU")
            return False
        if self._index is None:
            return False  # untrained IVF: moved after the first add()
        co = faiss.GpuMultipleClonerOptions()
        co.shard = True
        co.useFloat16 = self.gpu_fp16
        self._index = faiss.index_cpu_to_all_gpus(self._index, co)
        self._on_gpu = True
        logger.info("DenseIndex: %s index with %d vectors sharded across %d GPU(s)", self.kind, self.ntotal, n_gpus)
        return True

    @property
    def on_gpu(self) -> bool:
        return self._on_gpu

    def _cpu_index(self) -> Any:
        if self._on_gpu:
            return faiss.index_gpu_to_cpu(self._index)
        return self._index

    def set_search_params(self, *, nprobe: int | None = None, ef_search: int | None = None) -> None:
        """Change search-time parameters in place (nprobe for ivf, efSearch for hnsw); others ignored."""
        if nprobe is not None:
            self.nprobe = _auto_or_int(nprobe, "nprobe")
            if self.nprobe == AUTO:
                raise ValueError("DenseIndex.set_search_params: nprobe must be an integer (tune_nprobe tunes it)")
        if ef_search is not None:
            self.ef_search = int(ef_search)
        if self._index is None:
            return
        space = faiss.GpuParameterSpace() if self._on_gpu else faiss.ParameterSpace()
        if self.kind in _IVF_KINDS and nprobe is not None:
            self.tuned = None  # an explicit nprobe replaces a tuned one
            space.set_index_parameter(self._index, "nprobe", min(self.nprobe, self._effective_nlist_value))
        elif self.kind == "hnsw" and ef_search is not None:
            space.set_index_parameter(self._index, "efSearch", self.ef_search)

    # ------------------------------------------------------------------ queries
    @property
    def ntotal(self) -> int:
        return 0 if self._index is None else int(self._index.ntotal)

    @property
    def dim(self) -> int:
        return self._dim

    def search(self, queries: np.ndarray | torch.Tensor, k: int) -> tuple[np.ndarray, np.ndarray]:
        """Top-``k`` by inner product: ``(scores float32 (B, k), ids int64 (B, k))``, best first.

        A 1-D query is treated as a batch of one.  Approximate kinds (ivf with small nprobe, hnsw)
        may pad a row with id ``-1`` when fewer than ``k`` candidates were visited."""
        q = _as_float32_2d(queries, "queries")
        if q.shape[1] != self._dim:
            raise ValueError(f"DenseIndex.search: queries have dim {q.shape[1]}, index has dim {self._dim}")
        k = int(k)
        if k < 1:
            raise ValueError(f"DenseIndex.search: k must be >= 1, got {k}")
        if k > self.ntotal:
            raise ValueError(f"DenseIndex.search: k={k} is larger than the number of indexed vectors (ntotal={self.ntotal})")
        scores, ids = self._index.search(q, k)
        return np.ascontiguousarray(scores, dtype=np.float32), np.ascontiguousarray(ids, dtype=np.int64)

    # ------------------------------------------------------------------ persistence
    def _params(self) -> dict[str, Any]:
        params: dict[str, Any] = {
            "nlist": self.nlist,
            "nprobe": self.nprobe,
            "target_recall": self.target_recall,
            "tune_k": self.tune_k,
            "hnsw_m": self.hnsw_m,
            "ef_search": self.ef_search,
            "ef_construction": self.ef_construction,
            "gpu_fp16": self.gpu_fp16,
            "pq_m": self.pq_m,
            "pq_bits": self.pq_bits,
            "train_size": self.train_size,
        }
        if self._effective_nlist_value is not None:
            params["effective_nlist"] = self._effective_nlist_value
        if self._effective_pq_bits_value is not None:
            params["effective_pq_bits"] = self._effective_pq_bits_value
        if self.tuned is not None:
            params["tuned_nprobe"] = dict(self.tuned)
        return params

    @staticmethod
    def save_meta_only(directory: Path | str, kind: str, dim: int, ntotal: int, vectors_file: str,
                       params: dict[str, Any] | None = None) -> None:
        """``meta.json`` for a version whose index is built from its stored ``vectors_file`` when loaded (no
        ``index.faiss``)."""
        meta = {"kind": kind, "dim": int(dim), "ntotal": int(ntotal), "params": dict(params or {}),
                "vectors_file": vectors_file}
        (Path(directory) / META_FILE).write_text(json.dumps(meta, indent=2) + "\n")

    def save(self, directory: Path | str) -> None:
        """Write ``index.faiss`` (CPU form) and ``meta.json`` into ``directory`` (created if needed)."""
        if self._index is None:
            raise RuntimeError("DenseIndex.save: the index is empty and untrained; add vectors first")
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        faiss.write_index(self._cpu_index(), str(directory / INDEX_FILE))
        meta = {"kind": self.kind, "dim": self._dim, "ntotal": self.ntotal, "params": self._params()}
        (directory / META_FILE).write_text(json.dumps(meta, indent=2) + "\n")

    @classmethod
    def load(cls, directory: Path | str, use_gpu: bool = False) -> DenseIndex:
        """Read an index written by :meth:`save`; optionally shard it onto GPUs."""
        directory = Path(directory)
        meta = json.loads((directory / META_FILE).read_text())
        params = dict(meta.get("params", {}))
        if not (directory / INDEX_FILE).exists() and meta.get("vectors_file"):
            # a version published without a FAISS file (index.placement=ranks: the ranks index their slices):
            # build the index from its stored vectors, chunk by chunk from the memory map
            vectors = np.load(directory / meta["vectors_file"], mmap_mode="r")
            keys = ("nlist", "nprobe", "hnsw_m", "pq_m", "pq_bits", "train_size", "tune_k")
            kw = {k: params[k] if params[k] == AUTO else int(params[k]) for k in keys if k in params}
            if "target_recall" in params:
                kw["target_recall"] = float(params["target_recall"])
            return cls.build_chunked([vectors], meta["kind"], use_gpu=use_gpu, **kw)
        obj = cls(
            int(meta["dim"]),
            meta["kind"],
            nlist=_auto_or_int(params.get("nlist", 1024), "nlist"),
            nprobe=_auto_or_int(params.get("nprobe", 32), "nprobe"),
            target_recall=float(params.get("target_recall", 0.9)),
            tune_k=int(params.get("tune_k", 10)),
            hnsw_m=int(params.get("hnsw_m", 32)),
            ef_search=int(params.get("ef_search", 128)),
            ef_construction=int(params.get("ef_construction", 64)),
            use_gpu=use_gpu,
            gpu_fp16=bool(params.get("gpu_fp16", False)),
            pq_m=int(params.get("pq_m", 16)),
            pq_bits=int(params.get("pq_bits", 8)),
            train_size=int(params.get("train_size", DEFAULT_TRAIN_SIZE)),
        )
        index = faiss.read_index(str(directory / INDEX_FILE))
        if index.d != obj.dim:
            raise ValueError(f"DenseIndex.load: {directory / INDEX_FILE} has dim {index.d}, meta.json says {obj.dim}")
        # search-time parameters are not always serialized by FAISS: restore them
        if obj.kind in _IVF_KINDS:
            ivf = faiss.extract_index_ivf(index)
            obj._effective_nlist_value = int(ivf.nlist)
            if obj.nprobe == AUTO:
                if "tuned_nprobe" not in params:
                    raise ValueError(f"DenseIndex.load: {directory / META_FILE} says nprobe=auto but records no "
                                     "tuned value")
                obj.tuned = dict(params["tuned_nprobe"])
                ivf.nprobe = int(obj.tuned["nprobe"])
            else:
                ivf.nprobe = min(obj.nprobe, int(ivf.nlist))
            if obj.kind == "ivfpq":
                obj._effective_pq_bits_value = int(faiss.downcast_index(ivf).pq.nbits)
        elif obj.kind == "hnsw":
            faiss.ParameterSpace().set_index_parameter(index, "efSearch", obj.ef_search)
        obj._index = index
        if use_gpu:
            obj.to_gpu()
        return obj

    def __repr__(self) -> str:
        return f"DenseIndex(kind={self.kind!r}, dim={self._dim}, ntotal={self.ntotal}, on_gpu={self._on_gpu})"


def torch_flat_search(
    embeddings: torch.Tensor,
    queries: torch.Tensor | np.ndarray,
    k: int,
    *,
    ids: torch.Tensor | np.ndarray | None = None,
    chunk_size: int = 1 << 20,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Exact inner-product top-``k`` with torch: ``(scores float32 (B, k), ids int64 (B, k))`` on
    ``embeddings.device``, best first.

    ``embeddings`` (N, d) may live on any device in any float dtype (e.g. CUDA fp16); queries are
    moved/cast to match.  On CPU, half/bfloat16 are upcast to float32 for the matmul.  The passages
    are processed ``chunk_size`` rows at a time, merging running top-k, so the (B, N) score matrix is
    never materialised.  ``ids`` maps row positions to KB ids (default: row positions)."""
    if embeddings.ndim != 2:
        raise ValueError(f"torch_flat_search: embeddings must be 2-D (N, d), got {tuple(embeddings.shape)}")
    n, d = embeddings.shape
    k = int(k)
    if k < 1:
        raise ValueError(f"torch_flat_search: k must be >= 1, got {k}")
    if k > n:
        raise ValueError(f"torch_flat_search: k={k} is larger than the number of embeddings (N={n})")
    device = embeddings.device
    compute_dtype = embeddings.dtype
    if device.type == "cpu" and compute_dtype in (torch.float16, torch.bfloat16):
        compute_dtype = torch.float32
    if not torch.is_floating_point(embeddings):
        compute_dtype = torch.float32
    q = torch.as_tensor(queries)
    if q.ndim == 1:
        q = q.unsqueeze(0)
    if q.ndim != 2 or q.shape[1] != d:
        raise ValueError(f"torch_flat_search: queries must be (B, {d}), got {tuple(q.shape)}")
    q = q.to(device=device, dtype=compute_dtype)

    best_scores: torch.Tensor | None = None
    best_pos: torch.Tensor | None = None
    with torch.no_grad():
        for start in range(0, n, max(1, int(chunk_size))):
            block = embeddings[start : start + chunk_size].to(compute_dtype)
            scores = (q @ block.T).float()
            kk = min(k, scores.shape[1])
            s, p = scores.topk(kk, dim=1)
            p = p + start
            if best_scores is None:
                best_scores, best_pos = s, p
            else:
                cat_s = torch.cat([best_scores, s], dim=1)
                cat_p = torch.cat([best_pos, p], dim=1)  # type: ignore[list-item]
                best_scores, sel = cat_s.topk(k, dim=1)
                best_pos = cat_p.gather(1, sel)
    assert best_scores is not None and best_pos is not None
    if ids is not None:
        id_map = torch.as_tensor(np.asarray(ids) if not isinstance(ids, torch.Tensor) else ids).to(device=device, dtype=torch.int64)
        if id_map.shape[0] != n:
            raise ValueError(f"torch_flat_search: {n} embeddings but {id_map.shape[0]} ids")
        return best_scores, id_map[best_pos]
    return best_scores, best_pos.to(torch.int64)


drop_pages = _drop_pages
