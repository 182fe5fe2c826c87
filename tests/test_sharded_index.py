"""``index.placement=ranks``: every rank indexes its own KB slice and the per-slice top-k lists are merged.  The merge
must equal an exact search over the whole KB, a version published without a FAISS file must load (built from its
vectors), and a run with the sharded index must train and evaluate exactly like the rank-0 index.  The 2-rank
run against a single process is in ``test_distributed.py``."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from ragtrain.config import ConfigError, load_config
from ragtrain.index.faiss_index import INDEX_FILE, DenseIndex
from ragtrain.index.refresh import IndexStore
from ragtrain.index.sharded import SliceIndex, merge_topk
from ragtrain.train.trainer import Trainer

from conftest import tiny_overrides


def _brute(q, x, k):
    s = q @ x.T
    i = np.argsort(-s, axis=1, kind="stable")[:, :k]
    return np.take_along_axis(s, i, 1), i


@pytest.mark.parametrize("bounds,k", [((0, 40, 75, 100), 7), ((0, 3, 3, 100), 5), ((0, 2, 90, 100), 10)])
def test_merged_slices_equal_an_exact_search_of_the_whole_kb(bounds, k):
    """Uneven slices, an empty slice and slices smaller than k (padded with -1, which must never win)."""
    rng = np.random.default_rng(0)
    x = rng.standard_normal((100, 16)).astype(np.float32)
    q = rng.standard_normal((9, 16)).astype(np.float32)
    parts = [SliceIndex(x, range(a, b)).search(q, k) for a, b in zip(bounds, bounds[1:])]
    s, i = merge_topk(np.stack([p[0] for p in parts]), np.stack([p[1] for p in parts]), k)
    bs, bi = _brute(q, x, k)
    np.testing.assert_array_equal(i, bi)
    np.testing.assert_allclose(s, bs, rtol=1e-5, atol=1e-5)
    # each slice answers in KB row ids, inside its own rows
    for (a, b), (_, ids) in zip(zip(bounds, bounds[1:]), parts):
        assert np.all((ids == -1) | ((ids >= a) & (ids < b)))


def test_merge_keeps_padding_last_and_prefers_lower_shards_on_ties():
    scores = np.array([[[1.0, 0.5]], [[1.0, -np.inf]]], dtype=np.float32)  # 2 shards, 1 row, k=2
    ids = np.array([[[3, 4]], [[10, -1]]])
    s, i = merge_topk(scores, ids, 3)
    assert i.tolist() == [[3, 10, 4]] and s.tolist() == [[1.0, 1.0, 0.5]]


def test_a_version_published_without_a_faiss_file_loads_built_from_its_vectors(tmp_path):
    rng = np.random.default_rng(1)
    x = rng.standard_normal((50, 8)).astype(np.float32)
    shard = tmp_path / "s.npy"
    np.save(shard, x)
    store = IndexStore(tmp_path / "index")
    v = store.publish(None, step=3, shards=[shard], index_kind="flat")
    d = store.version_dir(v)
    assert not (d / INDEX_FILE).exists()
    assert json.loads((d / "version.json").read_text())["ntotal"] == 50
    index, emb, info = store.load_version(v)
    assert index.ntotal == 50 and info["step"] == 3
    q = rng.standard_normal((4, 8)).astype(np.float32)
    np.testing.assert_array_equal(index.search(q, 5)[1], _brute(q, x, 5)[1])
    np.testing.assert_array_equal(DenseIndex.load(d).search(q, 5)[1], _brute(q, x, 5)[1])  # as eval/ask load it


@pytest.mark.parametrize("mode", ["end2end", "original", "end2end-async"])
def test_a_run_with_the_index_on_the_ranks_equals_the_rank0_index(tmp_path, mode):
    """One process holds the single slice: losses, evaluation and stored vectors equal the rank-0 index's run, and
    no FAISS file of the whole KB is ever written (the export builds one from the vectors when loaded)."""
    extra = {"rag.mode": mode.split("-")[0], "index.refresh_every": 0 if mode == "original" else 2,
             "train.max_steps": 4, "data.max_eval_examples": 8}
    if mode.endswith("async"):  # the encoding process's vectors, swapped in one step later
        extra.update({"index.refresh_mode": "async", "index.async_lag": 1})
    runs = {}
    for placement in ("rank0", "ranks"):
        out = tmp_path / placement
        tr = Trainer(load_config(None, tiny_overrides(out, **extra, **{"index.placement": placement})))
        final = tr.train()
        runs[placement] = (out, final, tr)
    (a, fa, ta), (b, fb, tb) = runs["rank0"], runs["ranks"]
    assert tb._slice_index is not None and tb.retriever is None
    losses = [[json.loads(x)["loss"] for x in (o / "train_log.jsonl").read_text().splitlines()] for o in (a, b)]
    assert losses[1] == pytest.approx(losses[0], rel=1e-6)
    for key in ("recall@1", "recall@5", "mrr", "em", "loss"):
        assert fb[key] == pytest.approx(fa[key], rel=1e-6), key
    assert fb["index_version"] == fa["index_version"]
    for v in ta.store.versions():
        np.testing.assert_array_equal(np.load(tb.store.version_dir(v) / "embeddings.npy"),
                                      np.load(ta.store.version_dir(v) / "embeddings.npy"))
        assert not (tb.store.version_dir(v) / INDEX_FILE).exists()
    q = torch.randn(5, 32, generator=torch.Generator().manual_seed(0))
    ra, rb = ta.search(q, [""] * 5, 3, with_embeddings=True), tb.search(q, [""] * 5, 3, with_embeddings=True)
    assert torch.equal(rb["ids"], ra["ids"])
    torch.testing.assert_close(rb["doc_embeddings"], ra["doc_embeddings"])
    from ragtrain.eval.exported import load_index

    exported, stored = load_index(b / "final", None)  # as ragtrain eval / ask load the export
    assert exported.ntotal == len(tb.kb) and stored.shape[0] == len(tb.kb)
    np.testing.assert_array_equal(exported.search(q.numpy(), 3)[1], rb["ids"].numpy())


def test_placement_ranks_config_errors(tmp_path):
    for extra, word in (({"index.retriever": "bm25"}, "index.retriever"), ({"index.use_gpu": "true"}, "use_gpu"),
                        ({"index.placement": "nodes"}, "index.placement")):
        with pytest.raises(ConfigError, match=word):
            load_config(None, tiny_overrides(tmp_path, **{"index.placement": "ranks", **extra}))
