"""ragtrain.index.shards: a shard written through ShardWriter is an ordinary .npy whose pages do not pile up in the
writer's RSS."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from ragtrain.index.refresh import IndexStore
from ragtrain.index.shards import ShardWriter, index_and_publish, shard_paths


def _rss_file_mb() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("RssFile:"):
            return int(line.split()[1]) / 1024
    raise KeyError("RssFile")


@pytest.mark.parametrize("rows,dim,bound", [(32768, 512, 24),  # 64 MB of float32, 2 KB rows
                                            (262144, 16, 8)])  # 16 MB of 64-byte rows: each dirties a 4 KB page
def test_shard_writer_writes_rows_in_any_order_and_releases_pages(tmp_path, rows, dim, bound):
    w = ShardWriter(tmp_path / "s.npy", rows, dim, drop_bytes=4 << 20)
    base = _rss_file_mb()
    order = np.random.default_rng(0).permutation(rows)
    high = 0.0
    for lo in range(0, rows, 256):
        pos = order[lo: lo + 256]
        w.write(pos, np.repeat(pos[:, None].astype(np.float32), dim, axis=1))
        high = max(high, _rss_file_mb() - base)
    assert w.close() == tmp_path / "s.npy"
    assert high < bound, f"{high:.0f} MB of the {rows * dim * 4 >> 20} MB shard stayed resident while writing"
    got = np.load(tmp_path / "s.npy", mmap_mode="r")
    assert got.shape == (rows, dim) and got.dtype == np.float32
    np.testing.assert_array_equal(got[:, 0], np.arange(rows, dtype=np.float32))
    np.testing.assert_array_equal(got[:, -1], np.arange(rows, dtype=np.float32))


def test_index_and_publish_from_shards(tmp_path):
    rng = np.random.default_rng(0)
    parts = [rng.standard_normal((n, 16)).astype(np.float16) for n in (300, 200)]
    for r, (p, path) in enumerate(zip(parts, shard_paths(tmp_path / "sh", 2))):
        w = ShardWriter(path, len(p), 16, dtype=np.float16)
        w.write(np.arange(len(p)), p)
        w.close()
    store = IndexStore(tmp_path / "store")
    index, emb, v = index_and_publish(store, shard_paths(tmp_path / "sh", 2), step=7, kind="flat")
    whole = np.concatenate(parts)
    assert isinstance(emb, np.memmap) and emb.dtype == np.float16 and v == store.current_version()
    np.testing.assert_array_equal(emb, whole)
    q = rng.standard_normal((4, 16)).astype(np.float32)
    ref = np.argsort(-(q @ whole.astype(np.float32).T), axis=1, kind="stable")[:, :5]
    np.testing.assert_array_equal(index.search(q, 5)[1], ref)
