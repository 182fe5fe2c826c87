"""Tests for ragtrain.index.faiss_index."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from ragtrain.index.faiss_index import DenseIndex, torch_flat_search

N, D, K = 500, 32, 10


@pytest.fixture(scope="module")
def data():
    rng = np.random.default_rng(0)
    emb = rng.standard_normal((N, D)).astype(np.float32)
    queries = rng.standard_normal((20, D)).astype(np.float32)
    return emb, queries


def brute_force(emb: np.ndarray, queries: np.ndarray, k: int):
    scores = queries @ emb.T
    ids = np.argsort(-scores, axis=1, kind="stable")[:, :k]
    return np.take_along_axis(scores, ids, axis=1), ids


def test_flat_equals_brute_force(data):
    emb, q = data
    index = DenseIndex.build(emb, kind="flat")
    assert index.ntotal == N and index.dim == D
    scores, ids = index.search(q, K)
    ref_scores, ref_ids = brute_force(emb, q, K)
    assert scores.dtype == np.float32 and ids.dtype == np.int64
    assert scores.shape == ids.shape == (len(q), K)
    np.testing.assert_array_equal(ids, ref_ids)
    np.testing.assert_allclose(scores, ref_scores, rtol=1e-5, atol=1e-5)


def test_search_accepts_torch_and_1d(data):
    emb, q = data
    index = DenseIndex.build(emb)
    s1, i1 = index.search(torch.from_numpy(q).double(), K)
    s2, i2 = index.search(q, K)
    np.testing.assert_array_equal(i1, i2)
    s3, i3 = index.search(q[0], K)
    assert i3.shape == (1, K)
    np.testing.assert_array_equal(i3[0], i2[0])
    with pytest.raises(ValueError, match="dim"):
        index.search(q[:, :5], K)


def test_ivf_full_probe_equals_brute_force(data):
    emb, q = data
    index = DenseIndex.build(emb, kind="ivf", nlist=8, nprobe=8)
    scores, ids = index.search(q, K)
    ref_scores, ref_ids = brute_force(emb, q, K)
    np.testing.assert_array_equal(ids, ref_ids)
    np.testing.assert_allclose(scores, ref_scores, rtol=1e-5, atol=1e-5)


def test_ivf_nlist_clipped_for_small_n(data):
    emb, q = data
    index = DenseIndex.build(emb, kind="ivf", nlist=1024, nprobe=1024)
    # 500 // 39 = 12 lists; nprobe >= nlist -> exhaustive
    _, ids = index.search(q, K)
    np.testing.assert_array_equal(ids, brute_force(emb, q, K)[1])


def test_hnsw_recall(data):
    emb, q = data
    index = DenseIndex.build(emb, kind="hnsw", hnsw_m=32, ef_search=128)
    _, ids = index.search(q, K)
    _, ref_ids = brute_force(emb, q, K)
    recall = np.mean([len(set(a) & set(b)) / K for a, b in zip(ids, ref_ids)])
    assert recall >= 0.95


def test_custom_ids(data):
    emb, q = data
    custom = np.arange(N, dtype=np.int64) * 7 + 1000
    for kind in ("flat", "ivf", "hnsw"):
        index = DenseIndex.build(emb, custom, kind=kind, nlist=4, nprobe=4)
        _, ids = index.search(q, 5)
        assert np.isin(ids, custom).all(), kind
    index = DenseIndex.build(emb, custom, kind="flat")
    _, ids = index.search(q, K)
    np.testing.assert_array_equal(ids, custom[brute_force(emb, q, K)[1]])
    with pytest.raises(ValueError):
        DenseIndex.build(emb, custom[:10])


@pytest.mark.parametrize("kind", ["flat", "ivf", "hnsw"])
def test_save_load_roundtrip(tmp_path, data, kind):
    emb, q = data
    index = DenseIndex.build(emb, kind=kind, nlist=8, nprobe=3, ef_search=64)
    index.save(tmp_path / "idx")
    assert (tmp_path / "idx" / "index.faiss").is_file()
    meta = json.loads((tmp_path / "idx" / "meta.json").read_text())
    assert meta["kind"] == kind and meta["dim"] == D and meta["ntotal"] == N
    loaded = DenseIndex.load(tmp_path / "idx")
    assert loaded.kind == kind and loaded.ntotal == N and loaded.dim == D
    s1, i1 = index.search(q, K)
    s2, i2 = loaded.search(q, K)
    np.testing.assert_array_equal(i1, i2)
    np.testing.assert_array_equal(s1, s2)


def test_torch_flat_search_equals_brute_force(data):
    emb, q = data
    ref_scores, ref_ids = brute_force(emb, q, K)
    e = torch.from_numpy(emb)
    for chunk in (N, 64, 7):
        scores, ids = torch_flat_search(e, q, K, chunk_size=chunk)
        assert scores.dtype == torch.float32 and ids.dtype == torch.int64
        np.testing.assert_array_equal(ids.numpy(), ref_ids)
        np.testing.assert_allclose(scores.numpy(), ref_scores, rtol=1e-5, atol=1e-5)
    custom = torch.arange(N) + 10_000
    _, ids = torch_flat_search(e, torch.from_numpy(q), K, ids=custom)
    np.testing.assert_array_equal(ids.numpy(), ref_ids + 10_000)
    # half precision storage on CPU is upcast internally
    s16, _ = torch_flat_search(e.half(), q, K)
    assert s16.dtype == torch.float32 and s16.shape == (len(q), K)
    with pytest.raises(ValueError, match="larger"):
        torch_flat_search(e, q, N + 1)


def test_k_larger_than_ntotal(data):
    emb, q = data
    index = DenseIndex.build(emb[:5])
    with pytest.raises(ValueError, match=r"k=6.*ntotal=5"):
        index.search(q, 6)
    with pytest.raises(ValueError):
        index.search(q, 0)


def test_use_gpu_without_gpu_stays_on_cpu(data):
    emb, q = data
    index = DenseIndex.build(emb, kind="flat", use_gpu=True)
    # on a faiss-cpu build (or no GPU) this logs a warning and stays on CPU; results are identical
    _, ids = index.search(q, K)
    np.testing.assert_array_equal(ids, brute_force(emb, q, K)[1])


def test_unknown_kind():
    with pytest.raises(ValueError, match="kind"):
        DenseIndex(8, "pq")


@pytest.mark.parametrize("kind", ["flat", "ivf"])
def test_gpu_sharding_call_with_a_stand_in_faiss_gpu(data, monkeypatch, tmp_path, kind):
    """No GPU here: stand-ins for faiss-gpu's entry points record how rank 0 shards the index (all GPUs,
    shard=True, fp16 as configured) and hand back the CPU index, so search and save must still be right; the
    saved file must come from index_gpu_to_cpu.  The real faiss-gpu run is a GPU-machine benchmark."""
    import faiss

    import ragtrain.index.faiss_index as F

    calls = {}

    class Opts:
        shard = False
        useFloat16 = False

    def to_all_gpus(index, co):
        calls["to_gpus"] = (co.shard, co.useFloat16)
        return index

    def to_cpu(index):
        calls["to_cpu"] = calls.get("to_cpu", 0) + 1
        return index

    monkeypatch.setattr(F, "_faiss_num_gpus", lambda: 2)
    monkeypatch.setattr(faiss, "GpuMultipleClonerOptions", Opts, raising=False)
    monkeypatch.setattr(faiss, "index_cpu_to_all_gpus", to_all_gpus, raising=False)
    monkeypatch.setattr(faiss, "index_gpu_to_cpu", to_cpu, raising=False)
    monkeypatch.setattr(faiss, "GpuParameterSpace", faiss.ParameterSpace, raising=False)
    emb, q = data
    index = DenseIndex.build(emb, kind=kind, nlist=4, nprobe=4, use_gpu=True, gpu_fp16=True)
    assert index.on_gpu and calls["to_gpus"] == (True, True)
    _, ids = index.search(q, K)
    np.testing.assert_array_equal(ids[:, 0], brute_force(emb, q, K)[1][:, 0])
    index.save(tmp_path / "ix")
    assert calls.get("to_cpu", 0) >= 1
    assert DenseIndex.load(tmp_path / "ix").ntotal == N


# ------------------------------------------------------------------ ivfpq and chunked builds
def clustered(n: int, d: int, n_clusters: int = 20, seed: int = 1):
    """Unit vectors around ``n_clusters`` centres (what passage embeddings look like, unlike isotropic noise),
    and queries near the same centres."""
    rng = np.random.default_rng(seed)
    centres = rng.standard_normal((n_clusters, d)).astype(np.float32)
    emb = centres[rng.integers(0, n_clusters, n)] + 0.3 * rng.standard_normal((n, d)).astype(np.float32)
    q = centres[rng.integers(0, n_clusters, 30)] + 0.3 * rng.standard_normal((30, d)).astype(np.float32)
    emb /= np.linalg.norm(emb, axis=1, keepdims=True)
    return emb.astype(np.float32), q.astype(np.float32)


def _recall(ids, ref_ids):
    return float(np.mean([len(set(a) & set(b)) / len(b) for a, b in zip(ids, ref_ids)]))


def test_ivfpq_recall_against_brute_force():
    emb, q = clustered(4000, 32, n_clusters=200)
    _, ref_ids = brute_force(emb, q, K)
    index = DenseIndex.build(emb, kind="ivfpq", nlist=16, nprobe=16, pq_m=16, pq_bits=8)
    assert index.ntotal == len(emb)
    scores, ids = index.search(q, K)
    assert ids.dtype == np.int64 and scores.dtype == np.float32 and ids.shape == (len(q), K)
    coarse = _recall(ids, ref_ids)
    assert coarse >= 0.7  # 16 bytes a vector instead of 128 (measured 0.81; chance: 10/4000)
    # a finer code (more sub-quantizers) is closer to exact
    fine = DenseIndex.build(emb, kind="ivfpq", nlist=16, nprobe=16, pq_m=32, pq_bits=8)
    assert _recall(fine.search(q, K)[1], ref_ids) >= max(0.85, coarse)  # measured 0.93
    # scores approximate the true inner products of the returned ids
    true = np.take_along_axis(q @ emb.T, fine.search(q, K)[1], axis=1)
    np.testing.assert_allclose(fine.search(q, K)[0], true, atol=0.15)


def test_ivfpq_pads_with_minus_one_like_ivf():
    emb, q = clustered(2000, 32)
    for kind in ("ivf", "ivfpq"):
        index = DenseIndex.build(emb, kind=kind, nlist=40, nprobe=1, pq_m=8)
        _, ids = index.search(q, 200)  # one list of ~50 vectors cannot fill 200 slots
        assert (ids == -1).any(), kind
        assert ((ids >= 0) | (ids == -1)).all()
        for row in ids:  # padding only at the tail of a row
            pad = np.flatnonzero(row < 0)
            assert len(pad) == 0 or pad[0] == len(row) - len(pad)
        index.set_search_params(nprobe=40)  # probing every list fills every slot
        assert (index.search(q, 200)[1] >= 0).all(), kind


def test_ivfpq_validation_and_small_n():
    with pytest.raises(ValueError, match="pq_m"):
        DenseIndex(30, "ivfpq", pq_m=8)
    with pytest.raises(ValueError, match="pq_bits"):
        DenseIndex(32, "ivfpq", pq_m=8, pq_bits=0)
    emb, q = clustered(100, 16)  # 100 < 2**8 codebook entries: bits clipped, still searchable
    index = DenseIndex.build(emb, kind="ivfpq", nlist=4, nprobe=4, pq_m=4, pq_bits=8)
    assert index._effective_pq_bits_value == 6
    assert index.search(q, 5)[1].shape == (len(q), 5)


def test_ivfpq_save_load_roundtrip(tmp_path):
    emb, q = clustered(3000, 32)
    index = DenseIndex.build(emb, kind="ivfpq", nlist=16, nprobe=3, pq_m=8, pq_bits=6)
    index.save(tmp_path / "ix")
    meta = json.loads((tmp_path / "ix" / "meta.json").read_text())
    assert meta["kind"] == "ivfpq" and meta["params"]["pq_m"] == 8 and meta["params"]["pq_bits"] == 6
    loaded = DenseIndex.load(tmp_path / "ix")
    assert loaded.kind == "ivfpq" and loaded.ntotal == len(emb) and loaded._effective_pq_bits_value == 6
    s1, i1 = index.search(q, K)
    s2, i2 = loaded.search(q, K)  # nprobe=3 restored (FAISS does not store it)
    np.testing.assert_array_equal(i1, i2)
    np.testing.assert_array_equal(s1, s2)


@pytest.mark.parametrize("kind", ["flat", "ivf", "ivfpq", "hnsw"])
def test_build_chunked_from_memmap_shards_equals_build(tmp_path, kind):
    """Shards on disk (read-only memory maps, one fp16), added chunk by chunk: the same index as building from the
    whole array (IVF kinds trained on the same rows when N <= train_size)."""
    emb, q = clustered(1500, 32)
    paths = []
    for i, (lo, hi) in enumerate([(0, 700), (700, 1200), (1200, 1500)]):
        mm = np.lib.format.open_memmap(tmp_path / f"s{i}.npy", mode="w+", dtype=np.float32, shape=(hi - lo, 32))
        mm[:] = emb[lo:hi]
        mm.flush()
        del mm
        paths.append(tmp_path / f"s{i}.npy")
    shards = [np.load(p, mmap_mode="r") for p in paths]
    kw = dict(nlist=8, nprobe=3, pq_m=8)
    a = DenseIndex.build(emb, kind=kind, **kw)
    b = DenseIndex.build_chunked(shards, kind=kind, chunk_rows=128, **kw)
    assert b.ntotal == len(emb)
    sa, ia = a.search(q, K)
    sb, ib = b.search(q, K)
    if kind == "hnsw":  # the graph depends on insertion batches: approximate either way
        assert _recall(ib, brute_force(emb, q, K)[1]) >= 0.95
    else:
        np.testing.assert_array_equal(ia, ib)
        np.testing.assert_allclose(sa, sb, rtol=1e-5, atol=1e-5)


def test_build_chunked_trains_on_a_sample_across_shards():
    emb, q = clustered(3000, 32)
    shards = [emb[:1000], emb[1000:]]
    index = DenseIndex.build_chunked(shards, kind="ivf", nlist=16, nprobe=16, train_size=800)
    assert index._effective_nlist_value == 16 and index.ntotal == 3000
    np.testing.assert_array_equal(index.search(q, K)[1], brute_force(emb, q, K)[1])  # full probe: exact
    from ragtrain.index.faiss_index import _sample_rows

    s = _sample_rows(shards, 800, seed=0)
    assert s.shape == (800, 32)
    rows = {tuple(r) for r in emb[:1000]}
    assert 0 < sum(tuple(r) in rows for r in s) < 800  # drawn from both shards


# ------------------------------------------------------------------ nlist / nprobe = "auto"
def _recall_of_exact(index, emb, query_ids, nprobe, k):
    """Share of the sample's exact top-k neighbours (brute force; each query's own id left out) that the index
    finds at ``nprobe``, computed here independently of ``tune_nprobe``."""
    q = emb[query_ids]
    exact = brute_force(emb, q, k + 1)[1]
    index._set_nprobe(nprobe)
    found = index._index.search(q, k + 1)[1]
    sets = [[set([int(x) for x in row if x >= 0 and x != qid][:k]) for row, qid in zip(ids, query_ids)]
            for ids in (found, exact)]
    return sum(len(a & b) for a, b in zip(*sets)) / sum(len(b) for b in sets[1])


def test_auto_nlist_is_four_sqrt_n_clipped_by_the_training_sample():
    from ragtrain.index.faiss_index import auto_nlist

    assert [auto_nlist(n) for n in (100_000, 1_000_000, 21_000_000)] == [1024, 4096, 16384]
    emb, _ = clustered(4000, 16, n_clusters=50)
    index = DenseIndex.build(emb, kind="ivf", nlist="auto", nprobe=4)
    assert index._effective_nlist_value == 4000 // 39  # 4 x sqrt(4000) -> 256 lists, clipped to 102
    index = DenseIndex.build_chunked([emb[:2000], emb[2000:]], kind="ivf", nlist="auto", nprobe=4, train_size=1200)
    assert index._effective_nlist_value == 1200 // 39  # chosen from N = 4000, clipped by the 1200 trained on


@pytest.mark.parametrize("kind", ["ivf", "ivfpq"])
@pytest.mark.parametrize("target", [0.5, 0.8, 0.95])
def test_auto_nprobe_is_the_fewest_lists_that_meet_the_target(kind, target):
    from ragtrain.index.faiss_index import TUNE_QUERIES

    emb = np.random.default_rng(0).standard_normal((6000, 32)).astype(np.float32)  # isotropic: hard for IVF
    index = DenseIndex.build(emb, kind=kind, nlist=64, nprobe="auto", target_recall=target, tune_k=8, pq_m=8,
                             pq_bits=8)
    tuned = index.tuned
    assert tuned["k"] == 8 and tuned["queries"] == TUNE_QUERIES and tuned["nprobe"] == index.effective_nprobe
    pick = np.sort(np.random.default_rng(1).choice(len(emb), TUNE_QUERIES, replace=False))  # the tuner's sample
    grid = range(1, 65)
    at = {p: _recall_of_exact(index, emb, pick, p, 8) for p in grid}
    assert tuned["recall_all_lists"] == pytest.approx(at[64], abs=1e-4)
    reachable = target * at[64]  # product quantisation caps what probing every list finds
    best = min(p for p in grid if at[p] >= reachable)
    assert tuned["nprobe"] == best and tuned["recall"] == pytest.approx(at[best], abs=1e-4)
    assert 1 < best < 64  # the test covers a real choice, neither extreme


def test_auto_nprobe_searches_with_the_tuned_value_and_survives_save_load(tmp_path):
    emb, q = clustered(6000, 32, n_clusters=300)
    index = DenseIndex.build(emb, kind="ivf", nlist=64, nprobe="auto", target_recall=0.8, tune_k=8)
    p = index.tuned["nprobe"]
    fixed = DenseIndex.build(emb, kind="ivf", nlist=64, nprobe=p)
    np.testing.assert_array_equal(index.search(q, K)[1], fixed.search(q, K)[1])
    index.save(tmp_path / "ix")
    meta = json.loads((tmp_path / "ix" / "meta.json").read_text())
    assert meta["params"]["nprobe"] == "auto" and meta["params"]["tuned_nprobe"]["nprobe"] == p
    loaded = DenseIndex.load(tmp_path / "ix")
    assert loaded.tuned == index.tuned and loaded.effective_nprobe == p
    np.testing.assert_array_equal(loaded.search(q, K)[1], fixed.search(q, K)[1])
    meta["params"].pop("tuned_nprobe")
    (tmp_path / "ix" / "meta.json").write_text(json.dumps(meta))
    with pytest.raises(ValueError, match="nprobe=auto but records no tuned value"):
        DenseIndex.load(tmp_path / "ix")
    index.set_search_params(nprobe=64)  # an explicit value replaces the tuned one
    assert index.tuned is None and index.effective_nprobe == 64
    np.testing.assert_array_equal(index.search(q, K)[1], brute_force(emb, q, K)[1])


def test_auto_nprobe_rebuilt_from_stored_vectors_tunes_the_same(tmp_path):
    """A version published without index.faiss (index.placement=ranks) is rebuilt from its vectors on load: the
    same nlist, the same tuned nprobe, the same results."""
    emb, q = clustered(6000, 32, n_clusters=300)
    index = DenseIndex.build_chunked([emb], kind="ivf", nlist="auto", nprobe="auto", target_recall=0.8)
    np.save(tmp_path / "embeddings.npy", emb)
    DenseIndex.save_meta_only(tmp_path, "ivf", 32, len(emb), "embeddings.npy", index._params())
    loaded = DenseIndex.load(tmp_path)
    assert loaded._effective_nlist_value == index._effective_nlist_value and loaded.tuned == index.tuned
    np.testing.assert_array_equal(loaded.search(q, K)[1], index.search(q, K)[1])


def test_auto_parameter_errors():
    with pytest.raises(ValueError, match="nlist must be an integer or 'auto'"):
        DenseIndex(8, "ivf", nlist="many")
    with pytest.raises(ValueError, match="nprobe must be >= 1"):
        DenseIndex(8, "ivf", nprobe=0)
    with pytest.raises(ValueError, match="target_recall"):
        DenseIndex(8, "ivf", target_recall=0)
