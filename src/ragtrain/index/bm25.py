"""A bm25s BM25 index built in bounded memory: the KB's texts are read and tokenized chunk by chunk and the score
matrix is assembled from NumPy arrays, never from Python lists of the whole corpus's tokens.

``bm25s.BM25().index(bm25s.tokenize(texts))`` holds every text, then every token as a Python ``int`` in
per-document lists (about 36 bytes a token), then three score/row/column arrays and the COO to CSC conversion
copies: about 5.6 GB of RSS for a 1M-passage KB.  Here each chunk of texts becomes (document, token, tf) triplets
(10 bytes per distinct token of a document) right away; document frequencies come from those, and the scores
(bm25s's own idf and tf formulas, ``method="lucene"``) are placed column by column into the CSC arrays chunk by
chunk.  The result is an ordinary ``bm25s.BM25`` (same ``scores`` layout and ``vocab_dict``): it retrieves, saves
and memory-maps (``BM25.load(dir, mmap=True)``) like one built by ``index``, with the same scores.
"""

from __future__ import annotations

from pathlib import Path
from typing import Iterable, Sequence

import numpy as np

__all__ = ["build_bm25", "text_chunks"]


def text_chunks(texts: Sequence[str], chunk: int) -> Iterable[list[str]]:
    for lo in range(0, len(texts), chunk):
        yield list(texts[lo: lo + chunk])


def build_bm25(chunks: Iterable[Sequence[str]], stopwords: str = "en", k1: float = 1.5, b: float = 0.75,
               scratch_dir: Path | None = None):
    """A ``bm25s.BM25`` (``method="lucene"``, bm25s's defaults) over the documents of ``chunks`` (an iterable of
    lists of texts, in document order), tokenized as ``bm25s.tokenize(texts, stopwords=stopwords)`` does.

    ``scratch_dir``: the per-chunk triplets and the score matrix live in ``.npy`` files there, written through
    memory maps whose pages are released chunk by chunk, and the returned index searches the score matrix from
    its read-only memory map (as ``BM25.load(dir, mmap=True)`` would): the index never sits in anonymous RAM."""
    import bm25s
    from bm25s.scoring import _select_idf_scorer, _select_tfc_scorer
    from bm25s.tokenization import Tokenizer

    from ragtrain.index.faiss_index import drop_pages

    if scratch_dir is not None:
        scratch_dir = Path(scratch_dir)
        scratch_dir.mkdir(parents=True, exist_ok=True)

    def keep(name: str, arr: np.ndarray):  # a chunk's triplet array: in RAM, or a file until it is placed
        if scratch_dir is None:
            return arr
        path = scratch_dir / f"{name}.npy"
        np.save(path, arr)
        return path

    def take(item) -> np.ndarray:
        if isinstance(item, Path):
            arr = np.array(np.load(item, mmap_mode="r"))
            item.unlink()
            return arr
        return item

    def alloc(name: str, n: int, dtype) -> np.ndarray:
        if scratch_dir is None:
            return np.empty(n, dtype=dtype)
        return np.lib.format.open_memmap(scratch_dir / f"{name}.npy", mode="w+", dtype=dtype, shape=(n,))

    tokenizer = Tokenizer(stopwords=stopwords)
    docs, toks, tfs, lengths = [], [], [], []
    df = np.zeros(0, dtype=np.int64)
    n_docs = 0
    for texts in chunks:
        # allow_empty=False: a text with no token is an empty document, as bm25s.tokenize makes it
        ids = tokenizer.tokenize(list(texts), update_vocab=True, return_as="ids", show_progress=False,
                                 allow_empty=False)
        lens = np.fromiter((len(x) for x in ids), dtype=np.int64, count=len(ids))
        flat = np.fromiter((t for x in ids for t in x), dtype=np.int64, count=int(lens.sum()))
        del ids
        local = np.repeat(np.arange(len(lens), dtype=np.int64), lens)
        width = int(flat.max()) + 1 if flat.size else 1
        keys, counts = np.unique(local * width + flat, return_counts=True)  # sorted: document, then token
        c = len(lengths)
        tok = (keys % width).astype(np.int32)
        docs.append(keep(f"doc{c}", (keys // width + n_docs).astype(np.int32)))
        tfs.append(keep(f"tf{c}", np.minimum(counts, np.iinfo(np.uint16).max).astype(np.uint16)))
        counts_here = np.bincount(tok)  # document frequencies of this chunk's tokens
        toks.append(keep(f"tok{c}", tok))
        if len(counts_here) > len(df):
            df = np.concatenate([df, np.zeros(len(counts_here) - len(df), dtype=np.int64)])
        df[: len(counts_here)] += counts_here
        lengths.append(lens.astype(np.int32))
        n_docs += len(lens)
        del flat, local, keys, counts, tok
    vocab = tokenizer.get_vocab_dict()
    n_vocab = len(vocab)
    lengths = np.concatenate(lengths) if lengths else np.zeros(0, np.int32)
    avg_len = float(lengths.mean()) if n_docs else 0.0
    df = np.concatenate([df, np.zeros(n_vocab - len(df), dtype=np.int64)])
    idf_fn = _select_idf_scorer("lucene")
    idf = np.zeros(n_vocab, dtype=np.float32)
    for v in np.flatnonzero(df):
        idf[v] = idf_fn(int(df[v]), N=n_docs)
    tfc = _select_tfc_scorer("lucene")
    indptr = np.zeros(n_vocab + 1, dtype=np.int64)
    np.cumsum(df, out=indptr[1:])
    nnz = int(indptr[-1])
    data = alloc("data.csc.index", nnz, np.float32)
    indices = alloc("indices.csc.index", nnz, np.int32)
    fill = indptr[:-1].copy()  # next free slot of every column
    while docs:  # in document order, so every column's rows come out ascending (as scipy's CSC has them)
        d, t, f = take(docs.pop(0)), take(toks.pop(0)), take(tfs.pop(0))
        # in float64, then stored as float32: bm25s's arithmetic (its per-document lengths are Python ints)
        scores = (idf[t] * tfc(tf_array=f.astype(np.float64), l_d=lengths[d].astype(np.float64),
                               l_avg=np.float64(avg_len), k1=k1, b=b)).astype(np.float32)
        order = np.argsort(t, kind="stable")
        t_sorted = t[order]
        starts = np.searchsorted(t_sorted, t_sorted, side="left")  # first slot of each token's run in this chunk
        dest = fill[t_sorted] + (np.arange(len(t_sorted)) - starts)
        data[dest] = scores[order]
        indices[dest] = d[order]
        fill += np.bincount(t, minlength=n_vocab)
        del d, t, f, scores, order, t_sorted, starts, dest
        drop_pages(data)
        drop_pages(indices)
    if scratch_dir is not None:  # searched from the read-only memory maps from now on
        del data, indices
        data = np.load(scratch_dir / "data.csc.index.npy", mmap_mode="r")
        indices = np.load(scratch_dir / "indices.csc.index.npy", mmap_mode="r")
    model = bm25s.BM25(k1=k1, b=b, method="lucene")
    if "" not in vocab:  # as BM25.index(create_empty_token=True): queries with no known token score 0
        vocab[""] = max(vocab.values(), default=-1) + 1
    if len(vocab) > n_vocab:  # the empty token's column (no documents)
        indptr = np.concatenate([indptr, np.full(len(vocab) - n_vocab, indptr[-1])])
    model.nonoccurrence_array = None  # lucene: no non-occurrence scores (bm25l / bm25+ only)
    model.scores = {"data": data, "indices": indices, "indptr": indptr, "num_docs": n_docs}
    model.vocab_dict = vocab
    model.unique_token_ids_set = set(vocab.values())
    return model
