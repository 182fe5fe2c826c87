"""The bounded-memory BM25 build (``ragtrain.index.bm25``) must give exactly the index bm25s builds itself, whatever
the chunking, and stay an ordinary bm25s index (save, memory-mapped load)."""

from __future__ import annotations

import bm25s
import numpy as np
import pytest

from ragtrain.index.bm25 import build_bm25, text_chunks
from ragtrain.retrieval import BM25Retriever, KBTexts


def _corpus(n=600, seed=0):
    rng = np.random.default_rng(seed)
    words = [f"w{i}" for i in range(300)] + ["the", "and", "of", "Covid", "virus"]
    p = 1 / np.arange(1, len(words) + 1)
    p /= p.sum()
    texts = [" ".join(rng.choice(words, size=rng.integers(1, 40), p=p)) for _ in range(n)]
    # an empty text, a stop-words-only text, repeated tokens, case and punctuation
    texts[5], texts[17], texts[99] = "", "the and of", "virus virus VIRUS, virus."
    queries = [" ".join(rng.choice(words, size=4)) for _ in range(40)] + ["zzz unknown", "the", "virus"]
    return texts, queries


@pytest.mark.parametrize("chunk,on_disk", [(1000, False), (97, False), (1, False), (97, True)])
def test_chunked_build_equals_bm25s_own_index(chunk, on_disk, tmp_path):
    texts, queries = _corpus()
    ref = bm25s.BM25()
    ref.index(bm25s.tokenize(texts, stopwords="en", show_progress=False), show_progress=False)
    lean = build_bm25(text_chunks(texts, chunk), scratch_dir=tmp_path / "bm25" if on_disk else None)
    if on_disk:  # the score matrix is searched from its memory maps; the per-chunk scratch files are gone
        assert isinstance(lean.scores["data"], np.memmap) and isinstance(lean.scores["indices"], np.memmap)
        assert sorted(p.name for p in (tmp_path / "bm25").iterdir()) == ["data.csc.index.npy",
                                                                         "indices.csc.index.npy"]
    q = bm25s.tokenize(queries, stopwords="en", show_progress=False)
    (i1, s1), (i2, s2) = (m.retrieve(q, k=10, show_progress=False) for m in (ref, lean))
    np.testing.assert_array_equal(s2, s1)
    np.testing.assert_array_equal(i2, i1)
    for text in queries[:8] + ["virus"]:
        toks = bm25s.tokenize([text], stopwords="en", show_progress=False, return_ids=False)[0]
        np.testing.assert_array_equal(lean.get_scores(toks), ref.get_scores(toks))
    assert lean.scores["num_docs"] == len(texts)
    # the same CSC layout: every column's rows ascending, as scipy builds it
    ptr, rows = lean.scores["indptr"], lean.scores["indices"]
    assert all(np.all(np.diff(rows[ptr[c]:ptr[c + 1]]) > 0) for c in range(len(ptr) - 1))


def test_the_retriever_saves_and_memory_maps_like_a_bm25s_index(tmp_path):
    texts, queries = _corpus(200, seed=1)
    r = BM25Retriever(texts, chunk=33)
    r.model.save(str(tmp_path / "bm25"))
    loaded = bm25s.BM25.load(str(tmp_path / "bm25"), mmap=True)
    q = bm25s.tokenize(queries, stopwords="en", show_progress=False)
    np.testing.assert_array_equal(loaded.retrieve(q, k=5, show_progress=False)[0],
                                  r.model.retrieve(q, k=5, show_progress=False)[0])
    s, i = r.search(None, queries, 5)
    assert s.dtype == np.float32 and i.dtype == np.int64 and i.shape == (len(queries), 5)


def test_kb_texts_read_the_kb_lazily():
    import datasets

    kb = datasets.Dataset.from_dict({"title": ["A", "", "C"], "text": ["x y", "z", "w"]})
    t = KBTexts(kb)
    assert len(t) == 3 and t[0:2] == ["A x y", " z"] and t[2] == "C w"
    assert list(text_chunks(t, 2)) == [["A x y", " z"], ["C w"]]
