"""The sharded refresh (``index.refresh_path=shards``): each rank writes its KB vectors to a memory-mapped shard,
rank 0 indexes the shards chunk by chunk and publishes an ``embeddings.npy`` streamed from them.  It must give the
same vectors and the same index as the former all-gather path, keep the stored vectors as a memory map, and
publish a layout that ``np.load`` and ``IndexStore.load_version`` read as before."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from ragtrain.config import ConfigError
from ragtrain.index.faiss_index import DenseIndex
from ragtrain.index.refresh import IndexStore, concat_npy
from ragtrain.train import trainer as T
from ragtrain.train.trainer import Trainer


def _queries(dim: int) -> np.ndarray:
    return torch.randn(8, dim, generator=torch.Generator().manual_seed(0)).numpy()


@pytest.mark.parametrize("kind", ["flat", "ivfpq"])
def test_shard_refresh_equals_the_gather_refresh(tiny_cfg, kind):
    extra = {"index.kind": kind, "index.nlist": 2, "index.nprobe": 1, "index.pq_m": 8, "index.encode_batch_size": 7}
    old = Trainer(tiny_cfg("gather", **{**extra, "index.refresh_path": "gather"}))
    new = Trainer(tiny_cfg("shards", **extra))
    a = np.load(old.store.current_dir() / "embeddings.npy")
    b = np.load(new.store.current_dir() / "embeddings.npy")  # an ordinary .npy, as exports need
    assert b.dtype == np.float32 and b.shape == (len(new.kb), 32)
    np.testing.assert_array_equal(b, a)
    np.testing.assert_array_equal(b, old.encode_kb())  # = the gathered vectors of the old path
    # the stored vectors rank 0 keeps for rag.mode=original are a memory map of the published file, not a RAM copy
    assert isinstance(new.embeddings, np.memmap) and not isinstance(old.embeddings, np.memmap)
    assert Path(new.embeddings.filename).resolve() == (new.store.current_dir() / "embeddings.npy").resolve()
    np.testing.assert_array_equal(new._rows(np.array([[3, -1]])), a[[3, 0]][None])
    assert not (new.store.root / T.SHARDS_DIR).exists(), "the shards are removed once published"
    q = _queries(32)
    for tr in (old, new):
        assert tr.retriever is not None
    sa, ia = old.search(torch.from_numpy(q), [""] * 8, 3).values()
    sb, ib = new.search(torch.from_numpy(q), [""] * 8, 3).values()
    torch.testing.assert_close(sb, sa)
    assert torch.equal(ib, ia)
    index, emb, info = new.store.load_version(new.index_version)
    assert index.kind == kind and index.ntotal == len(new.kb) and info["ntotal"] == len(new.kb)
    np.testing.assert_array_equal(emb, a)


def test_shard_refresh_in_float16(tiny_cfg):
    tr = Trainer(tiny_cfg(**{"index.embedding_dtype": "float16", "index.encode_batch_size": 5}))
    stored = np.load(tr.store.current_dir() / "embeddings.npy")
    ref = tr.encode_kb()  # float32, all-gathered
    assert stored.dtype == np.float16 and tr.embeddings.dtype == np.float16
    np.testing.assert_array_equal(stored, ref.astype(np.float16))
    assert tr._rows(np.array([[0, 1]])).dtype == np.float32
    # the index holds the fp16-rounded vectors (what rank 0 read back from the shards)
    q = _queries(32)
    s, i = tr.retriever.search(q, [""] * 8, 4)
    np.testing.assert_allclose(s, np.take_along_axis(q @ stored.astype(np.float32).T, i, 1), rtol=1e-5, atol=1e-5)


def test_encode_kb_writes_this_ranks_shard_and_drops_its_pages(tiny_cfg, tmp_path, monkeypatch):
    """The shard is written through a memory map whose pages are released as it goes (so the slice does not
    accumulate in RSS); one process: one shard holding the whole KB in order."""
    tr = Trainer(tiny_cfg(**{"index.encode_batch_size": 3}))
    import ragtrain.index.shards as S

    dropped = []
    real = S.drop_pages
    monkeypatch.setattr(S, "drop_pages", lambda a: dropped.append(type(a).__name__) or real(a))
    shards = tr.encode_kb(shard_dir=tmp_path / "sh")
    assert shards == [tmp_path / "sh" / "shard_00000.npy"]
    np.testing.assert_array_equal(np.load(shards[0]), tr.encode_kb())
    assert dropped and set(dropped) == {"memmap"}


def test_ivfpq_needs_the_encoder_dim_divisible_by_pq_m(tiny_cfg):
    with pytest.raises(ConfigError, match=r"index\.pq_m.*32.*divisible by 5"):
        Trainer(tiny_cfg(**{"index.kind": "ivfpq", "index.pq_m": 5}))


def test_publish_from_shards_streams_them_into_one_npy(tmp_path):
    rng = np.random.default_rng(0)
    parts = [rng.standard_normal((n, 8)).astype(np.float32) for n in (5, 0, 7)]
    paths = []
    for i, p in enumerate(parts):
        paths.append(tmp_path / f"s{i}.npy")
        np.save(paths[-1], p)
    whole = np.concatenate(parts)
    store = IndexStore(tmp_path / "store")
    v = store.publish(DenseIndex.build(whole), step=3, shards=paths)
    index, emb, info = store.load_version(v)
    assert isinstance(emb, np.memmap) and info["ntotal"] == 12
    np.testing.assert_array_equal(np.load(store.version_dir(v) / "embeddings.npy"), whole)
    with pytest.raises(ValueError, match="exactly one"):
        store.publish(DenseIndex.build(whole), whole, step=4, shards=paths)
    with pytest.raises(ValueError, match="rows"):
        store.publish(DenseIndex.build(whole[:11]), step=4, shards=paths)
    np.save(tmp_path / "bad.npy", np.zeros((2, 4), np.float32))
    with pytest.raises(ValueError, match="dim"):
        store.publish(DenseIndex.build(np.zeros((7, 8), np.float32)), step=4, shards=[paths[0], tmp_path / "bad.npy"])
    assert store.versions() == [v], "a refused publish leaves nothing behind"
    assert concat_npy(paths, tmp_path / "c.npy", buffer_bytes=16) == (12, 8)  # tiny buffer: many pieces
    np.testing.assert_array_equal(np.load(tmp_path / "c.npy"), whole)


@pytest.mark.parametrize("path", ["shards", "gather"])
def test_rank0_drops_the_old_index_before_building_the_new_one(tiny_cfg, monkeypatch, path):
    """Rank 0 never holds two whole indexes: the live one is released before a refresh builds the next (nothing
    searches meanwhile), which is what keeps its refresh peak near one index (benchmarks/scale.py)."""
    tr = Trainer(tiny_cfg(**{"index.refresh_path": path}))
    held = []
    for name in ("build", "build_chunked"):
        inner = getattr(DenseIndex, name).__func__

        def spy(cls, *a, _inner=inner, **kw):
            held.append((tr.retriever, tr.embeddings))
            return _inner(cls, *a, **kw)

        monkeypatch.setattr(DenseIndex, name, classmethod(spy))
    tr.refresh_index()
    assert held and all(r is None and e is None for r, e in held)
    assert tr.retriever is not None and tr.index_version == 2
