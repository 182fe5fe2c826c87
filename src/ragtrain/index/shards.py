"""KB vectors as memory-mapped ``.npy`` shards on disk, so that a refresh never holds the (N, d) matrix whole in a
process's RAM.

Each rank writes the vectors of its contiguous KB slice to ``shard_<rank>.npy`` through a :class:`ShardWriter`
(``np.lib.format.open_memmap``; written pages are flushed and released every ``drop_bytes``, so the slice does not
pile up in the rank's RSS either).  After a barrier, rank 0 calls :func:`index_and_publish`: the index is built from
read-only memory maps of the shards (IVF kinds trained on a sample, vectors added chunk by chunk:
:meth:`DenseIndex.build_chunked`), the version's ``embeddings.npy`` is streamed from the shards file to file
(:meth:`IndexStore.publish`), and the stored vectors handed back are a read-only memory map of that file.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from ragtrain.index.faiss_index import DenseIndex, drop_pages
from ragtrain.index.refresh import EMBEDDINGS_FILE, IndexStore

__all__ = ["ShardWriter", "shard_path", "shard_paths", "index_and_publish"]
PAGE = 4096  # bytes of memory a scattered row write or read makes resident, at least


def shard_path(directory: Path, rank: int) -> Path:
    return Path(directory) / f"shard_{rank:05d}.npy"


def shard_paths(directory: Path, world: int) -> list[Path]:
    """Every rank's shard, in rank order (= KB order: rank r holds the r-th contiguous slice)."""
    return [shard_path(directory, r) for r in range(world)]


class ShardWriter:
    """Write ``rows`` vectors of ``dim`` into ``path`` (a ``.npy`` file of ``dtype``) in any order, through a
    memory map whose dirty pages are flushed and released every ``drop_bytes`` of pages touched (a row counts at
    least a page: rows come in length-sorted order, scattered over the file)."""

    def __init__(self, path: Path, rows: int, dim: int, dtype: Any = np.float32, drop_bytes: int = 64 << 20):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._mm = np.lib.format.open_memmap(self.path, mode="w+", dtype=np.dtype(dtype), shape=(rows, dim))
        self._drop_bytes = int(drop_bytes)
        self._pending = 0

    def write(self, positions: np.ndarray, vectors: np.ndarray) -> None:
        """``vectors[j]`` goes to row ``positions[j]`` (0-based in this shard), cast to the shard's dtype."""
        self._mm[positions] = np.asarray(vectors).astype(self._mm.dtype, copy=False)
        # pages made resident, not bytes: rows written in length-sorted (scattered) order each dirty a whole page
        row = self._mm.itemsize * int(self._mm.shape[1])
        self._pending += len(positions) * max(row, PAGE)
        if self._pending >= self._drop_bytes:
            drop_pages(self._mm)
            self._pending = 0

    def close(self) -> Path:
        """Flush to disk, release the pages and the map; returns the path."""
        if self._mm is not None:
            drop_pages(self._mm)
            self._mm = None
        return self.path


def index_and_publish(store: IndexStore, shards: list[Path], *, step: int, extra: dict | None = None,
                      **index_kw: Any) -> tuple[DenseIndex, np.ndarray, int]:
    """Build a :class:`DenseIndex` from ``shards`` chunk by chunk, publish it with an ``embeddings.npy`` streamed
    from them; returns ``(index, stored vectors as a read-only memory map, version)``."""
    index = DenseIndex.build_chunked([np.load(p, mmap_mode="r") for p in shards], **index_kw)
    version = store.publish(index, step=step, extra=extra, shards=shards)
    return index, np.load(store.version_dir(version) / EMBEDDINGS_FILE, mmap_mode="r"), version
