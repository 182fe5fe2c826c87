"""Scale benchmark: where a refresh's time and memory go as the knowledge base grows, extrapolated to 21M passages.

Synthetic KBs of random-word passages (``--sizes``, default 100k,1M), a tiny randomly initialised BERT context
encoder (``--dim``, default 64) on CPU, one thread.  Per size, each measured in the same run:

* **KB build**: ``ragtrain.data.kb.build_kb`` over a JSONL of ``--words``-word documents (one passage each);
* **first tokenization**: the KB token cache a first refresh builds (``PassageTokens``, the trainer's own);
* **refresh encode**: the tiny encoder over every passage, written to a memory-mapped shard (``ShardWriter``);
* **index build** per kind (flat / ivf / ivfpq / hnsw) from that shard (``DenseIndex.build_chunked``) and the
  index's size on disk;
* **search latency** (a batch of ``--queries`` query vectors, top-10) and the **per-step retrieval overhead** (what
  rank 0 does for one training step: search a batch of 8 questions for 5 passages, read their stored vectors from
  the memory map and their title/text from the KB);
* **peak RSS of every rank during a refresh**, 2 CPU ranks (torchrun, gloo), old all-gather path vs the sharded
  path, each process running two refreshes: RSS between refreshes (after the first) and peak RSS during the second
  (``VmHWM`` after resetting it via ``/proc/self/clear_refs``).  The encoder is replaced here by deterministic
  random vectors (its activations cost the same on both paths; the paths differ in what happens to the vectors);
* **BM25** (bm25s, ``ragtrain.retrieval.BM25Retriever``): build time and peak RSS increase in a fresh process, and
  the RSS increase of loading the saved index with ``mmap=True`` (bm25s can memory-map it) and querying it.

Every time is CPU seconds of the one thread (wall seconds alongside).  Each stage is fitted linearly in N over the
measured sizes and extrapolated to 21M passages (``--extrapolate``); the report says which stage dominates.

    python benchmarks/scale.py --sizes 20000,100000            # a few minutes on one core
    python benchmarks/scale.py --sizes 100000,1000000,3000000  # a quiet host: ~1 h and ~10 GB of scratch disk

Results: ``benchmarks/results/scale-cpu/`` (``results.json``, ``results.md``, ``scale.png``; ``--out`` to change).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
for _k, _v in (("HF_HUB_OFFLINE", "1"), ("TRANSFORMERS_OFFLINE", "1"), ("HF_DATASETS_OFFLINE", "1"),
               ("TOKENIZERS_PARALLELISM", "false")):
    os.environ.setdefault(_k, _v)
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import numpy as np  # noqa: E402

log = logging.getLogger("bench.scale")
KINDS = ("flat", "ivf", "ivfpq", "hnsw", "ivf-auto", "ivfpq-auto")
# ivf-auto / ivfpq-auto: index.nlist=auto and index.nprobe=auto (tuned at build time to TARGET_RECALL of top-10)
TARGET_RECALL, RECALL_K = 0.9, 10
# (index kind, refresh path): gather = all-gather into RAM, shards = memory-mapped shards indexed by rank 0,
# ranks = memory-mapped shards, every rank indexing its own slice (index.placement=ranks)
RSS_CASES = (("ivfpq", "gather"), ("ivfpq", "shards"), ("flat", "gather"), ("flat", "shards"), ("flat", "ranks"))
STEP_BATCH, STEP_DOCS = 8, 5  # per-step retrieval: questions per step, passages per question


# ------------------------------------------------------------------------------------------------ measuring
def _status_kb(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise KeyError(field)


def rss_mb() -> float:
    return _status_kb("VmRSS") / 1024


def peak_mb() -> float:
    return _status_kb("VmHWM") / 1024


def reset_peak() -> bool:
    """Reset VmHWM to the current RSS (Linux >= 4.0); False where not allowed."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


class Clock:
    def __enter__(self):
        self.w0, self.c0 = time.perf_counter(), time.process_time()
        return self

    def __exit__(self, *exc):
        self.wall, self.cpu = time.perf_counter() - self.w0, time.process_time() - self.c0


def _dir_bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in Path(path).rglob("*") if p.is_file())


# ------------------------------------------------------------------------------------------------ data
def write_corpus(path: Path, n: int, words: int, seed: int = 0, vocab: int = 30000) -> None:
    """``n`` documents of ``words`` random pseudo-words (Zipf-like frequencies, so BM25 postings look like text)."""
    rng = np.random.default_rng(seed)
    letters = np.array(list("abcdefghijklmnopqrstuvwxyz"))
    lex = ["".join(rng.choice(letters, size=int(rng.integers(3, 10)))) for _ in range(vocab)]
    weights = 1.0 / np.arange(1, vocab + 1) ** 1.05
    weights /= weights.sum()
    tmp = path.with_suffix(".tmp")
    with open(tmp, "w") as f:
        for lo in range(0, n, 10000):
            m = min(10000, n - lo)
            ids = rng.choice(vocab, size=(m, words), p=weights)
            for j in range(m):
                f.write(json.dumps({"title": f"doc {lo + j}", "text": " ".join(lex[i] for i in ids[j])}) + "\n")
    os.replace(tmp, path)


def tiny_encoder(dim: int, corpus: list[str], vocab: int, max_len: int):
    """The trainer's tiny-model path: a word tokenizer trained on ``corpus`` and a 1-layer BERT of width ``dim``,
    wrapped in ragtrain's Encoder; plus a RagCollator for passage ids."""
    from ragtrain.config import load_config
    from ragtrain.data.collate import RagCollator
    from ragtrain.model.loading import build_rag_model

    cfg = load_config(None, [f"model.tiny_hidden={dim}", "model.tiny_layers=1", f"model.tiny_vocab={vocab}",
                             f"model.max_passage_length={max_len}", "model.dropout=0.0"], check_files=False)
    rag, toks = build_rag_model(cfg.model, cfg.rag, corpus, seed=0)
    collator = RagCollator(toks.question, toks.context, toks.generator, is_seq2seq=rag.generator.is_seq2seq,
                           max_passage_length=max_len)
    return rag.context_encoder.eval(), collator


# ------------------------------------------------------------------------------------------------ one size
def bench_size(n: int, args, work: Path) -> dict:
    import torch

    from ragtrain.data.kb import build_kb, load_kb
    from ragtrain.data.kb_tokens import PassageTokens
    from ragtrain.index.faiss_index import DenseIndex
    from ragtrain.index.shards import ShardWriter

    res: dict = {"passages": n}
    d = work / f"n{n}"
    shutil.rmtree(d, ignore_errors=True)
    d.mkdir(parents=True)
    with Clock() as c:
        write_corpus(d / "docs.jsonl", n, args.words)
    res["corpus_write_s"] = round(c.wall, 2)
    log.info("n=%d: corpus written in %.1fs", n, c.wall)

    with Clock() as c:
        build_kb(d / "docs.jsonl", d / "kb", passage_words=args.words)
    kb = load_kb(d / "kb")
    assert len(kb) == n, (len(kb), n)
    res["kb_build"] = {"cpu_s": round(c.cpu, 2), "wall_s": round(c.wall, 2)}
    (d / "docs.jsonl").unlink()

    enc, collator = tiny_encoder(args.dim, list(kb.select(range(min(n, 5000)))["text"]), args.vocab, args.max_len)
    with Clock() as c:
        tokens = PassageTokens(kb, range(n), collator.passage_ids, collator.pad_passage_ids)
    res["first_tokenization"] = {"cpu_s": round(c.cpu, 2), "wall_s": round(c.wall, 2),
                                 "mean_tokens": round(float(tokens.lengths.mean()), 1)}
    log.info("n=%d: tokenized in %.1fs", n, c.wall)

    shard = d / "shard_00000.npy"
    with Clock() as c, torch.no_grad():
        w = ShardWriter(shard, n, enc.dim)
        for pos, ids, mask in tokens.batches(args.encode_batch_size):
            w.write(pos, enc(ids, mask).float().numpy())
        w.close()
    res["refresh_encode"] = {"cpu_s": round(c.cpu, 2), "wall_s": round(c.wall, 2)}
    log.info("n=%d: encoded in %.1fs", n, c.wall)
    if args.keep_vectors:  # the encoder's raw vectors, for benchmarks/ivf_nlist.py
        Path(args.keep_vectors).mkdir(parents=True, exist_ok=True)
        shutil.copyfile(shard, Path(args.keep_vectors) / f"n{n}.npy")
    del tokens

    emb = centred_unit_vectors(np.load(shard, mmap_mode="r"), d / "vectors.npy")
    rng = np.random.default_rng(1)
    # KB vectors plus noise of norm ~0.1 (the vectors are unit-length)
    queries = (emb[rng.integers(0, n, args.queries)] + 0.1 / np.sqrt(enc.dim) * rng.standard_normal((args.queries, enc.dim))
               ).astype(np.float32)
    kw = dict(nlist=args.nlist, nprobe=args.nprobe, pq_m=args.pq_m, pq_bits=8, hnsw_m=32)
    auto = dict(kw, nlist="auto", nprobe="auto", target_recall=TARGET_RECALL, tune_k=RECALL_K)
    res["index"] = {}
    exact = None
    for kind in KINDS:
        with Clock() as c:
            index = DenseIndex.build_chunked([emb], kind=kind.removesuffix("-auto"),
                                             **(auto if kind.endswith("-auto") else kw))
        index.save(d / f"ix-{kind}")
        size = _dir_bytes(d / f"ix-{kind}")
        shutil.rmtree(d / f"ix-{kind}")
        lat = []
        for _ in range(args.reps):
            with Clock() as s:
                index.search(queries, 10)
            lat.append(s.cpu)
        step = []
        for r in range(args.reps):
            q = queries[(r * STEP_BATCH) % (args.queries - STEP_BATCH):][:STEP_BATCH]
            with Clock() as s:
                _, ids = index.search(q, STEP_DOCS)
                flat = ids.reshape(-1).clip(min=0)
                np.asarray(emb[np.sort(flat)], dtype=np.float32)  # stored vectors (rag.mode=original)
                rows = kb[flat.tolist()]
                _ = (rows["title"], rows["text"])
            step.append(s.cpu)
        found = index.search(queries, RECALL_K)[1]
        if kind == "flat":
            exact = found
        recall = float(np.mean([len(set(a) & set(b)) / RECALL_K for a, b in zip(found, exact)]))
        res["index"][kind] = {"recall_at_10": round(recall, 4),
                              "nlist": index._effective_nlist_value, "nprobe": index.effective_nprobe,
                              "tuned": index.tuned,
                              "build_cpu_s": round(c.cpu, 2), "build_wall_s": round(c.wall, 2),
                              "bytes": size, "bytes_per_vector": round(size / n, 1),
                              "search_ms": round(1000 * float(np.median(lat)), 3),
                              "search_queries": args.queries,
                              "step_retrieval_ms": round(1000 * float(np.median(step)), 3)}
        log.info("n=%d: %s index built in %.1fs", n, kind, c.wall)
        del index
    del emb

    if args.index_only:
        shutil.rmtree(d, ignore_errors=True)
        return res
    res["refresh_rss"] = {}
    for kind, path in RSS_CASES:
        res["refresh_rss"][f"{kind}/{path}"] = run_rss(n, kind, path, args, d)
        log.info("n=%d: refresh RSS %s/%s: %s", n, kind, path, res["refresh_rss"][f"{kind}/{path}"])
    res["bm25"] = run_bm25(d, args)
    log.info("n=%d: bm25 %s", n, res["bm25"])
    shutil.rmtree(d, ignore_errors=True)
    return res


def centred_unit_vectors(raw: np.ndarray, path: Path, chunk: int = 1 << 16) -> np.ndarray:
    """The vectors the index stages measure: the untrained tiny encoder's outputs are nearly collinear (cosine to
    their mean direction 0.999999, inner products equal to 6 digits, so neighbours would be float-rounding ties
    and every approximate index's recall noise); minus their mean (over the first 100k) and L2-normalised, they
    keep each passage's own variation: anisotropic (the top 20 of 64 directions hold ~88% of the variance), as
    trained passage embeddings are.  Written chunk by chunk to the memory-mapped ``path``."""
    from ragtrain.index.shards import ShardWriter

    mean = np.asarray(raw[: 100_000], dtype=np.float64).mean(axis=0)
    w = ShardWriter(path, raw.shape[0], raw.shape[1])
    for lo in range(0, raw.shape[0], chunk):
        x = np.asarray(raw[lo: lo + chunk], dtype=np.float64) - mean
        x /= np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)
        w.write(np.arange(lo, lo + x.shape[0]), x.astype(np.float32))
    w.close()
    return np.load(path, mmap_mode="r")


# ------------------------------------------------------------------------------------------------ subprocesses
def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_rss(n: int, kind: str, path: str, args, d: Path) -> dict:
    out = d / f"rss-{kind}-{path}"
    out.mkdir()
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", f"--master_port={_port()}",
           str(Path(__file__).resolve()), "--worker", "refresh-rss", "--worker-dir", str(out), "--worker-args",
           json.dumps({"n": n, "kind": kind, "path": path, "dim": args.dim, "nlist": args.nlist,
                       "nprobe": args.nprobe, "pq_m": args.pq_m})]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": os.pathsep.join([str(ROOT / "src"), str(ROOT)])}
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=3600)
    if proc.returncode != 0:
        raise RuntimeError(f"refresh-rss worker failed: {proc.stderr[-3000:]}")
    ranks = [json.loads((out / f"rank{r}.json").read_text()) for r in range(2)]
    return {"ranks": ranks, "matrix_mb": round(n * args.dim * 4 / 2**20, 2),
            "max_peak_over_between": max(r["peak_over_between"] for r in ranks),
            "max_increase_over_matrix": max(r["increase_over_matrix"] for r in ranks)}


def worker_refresh_rss(args) -> None:
    """One rank: two refreshes of an N x dim KB (vectors = seeded random stand-ins for the encoder's), the old
    all-gather path or the sharded path, as ``Trainer.refresh_index`` runs them; writes this rank's RSS figures."""
    import gc

    import torch  # noqa: F401
    import torch.distributed as dist

    from ragtrain.index.faiss_index import DenseIndex
    from ragtrain.index.refresh import EMBEDDINGS_FILE, IndexStore
    from ragtrain.index.sharded import SliceIndex
    from ragtrain.index.shards import ShardWriter, index_and_publish, shard_path, shard_paths
    from ragtrain.train import distributed as D

    torch.set_num_threads(1)
    dist.init_process_group("gloo")
    rank, world, n, dim, bs = dist.get_rank(), dist.get_world_size(), args.n, args.dim, 256
    my = D.equal_slices(n, world, bs)[rank]
    out = Path(args.worker_dir)
    store = IndexStore(out / "index", keep=2)
    kw = dict(kind=args.kind, nlist=args.nlist, nprobe=args.nprobe, pq_m=args.pq_m, pq_bits=8)
    state: dict = {}  # rank 0 between refreshes: the live index and the stored vectors (Trainer.embeddings)

    def vectors(lo: int, hi: int) -> np.ndarray:
        v = np.random.default_rng(lo).standard_normal((hi - lo, dim)).astype(np.float32)
        return v / np.linalg.norm(v, axis=1, keepdims=True)

    def refresh(step: int) -> None:
        if args.path == "gather":
            local = torch.zeros((len(my), dim))
            for lo in range(0, len(my), bs):
                hi = min(lo + bs, len(my))
                local[lo:hi] = torch.from_numpy(vectors(my.start + lo, my.start + hi))
            allv, _ = D.gather_rows(local)
            if rank == 0:
                state.clear()  # as Trainer._release_index: the old index goes before the new one is built
                emb = allv.cpu().numpy()
                index = DenseIndex.build(emb, **kw)
                store.publish(index, emb, step=step)
                state.update(index=index, emb=emb)
            del local, allv
        else:
            w = ShardWriter(shard_path(out / ".shards", rank), len(my), dim)
            for lo in range(0, len(my), bs):
                hi = min(lo + bs, len(my))
                w.write(np.arange(lo, hi), vectors(my.start + lo, my.start + hi))
            w.close()
            dist.barrier()
            if args.path == "ranks":  # as Trainer._publish_shards + _install_slice with index.placement=ranks
                version = None
                if rank == 0:
                    version = store.publish(None, step=step, shards=shard_paths(out / ".shards", world),
                                            index_kind=args.kind)
                    shutil.rmtree(out / ".shards", ignore_errors=True)
                version = D.broadcast_object(version)
                emb = np.load(store.version_dir(version) / EMBEDDINGS_FILE, mmap_mode="r")
                state.pop("index", None)
                state.update(index=SliceIndex(emb, my, args.kind), emb=emb)
            elif rank == 0:
                state.clear()
                index, emb, _ = index_and_publish(store, shard_paths(out / ".shards", world), step=step, **kw)
                shutil.rmtree(out / ".shards", ignore_errors=True)
                state.update(index=index, emb=emb)
        dist.barrier()
        gc.collect()

    refresh(1)
    between = rss_mb()
    ok = reset_peak()
    refresh(2)
    peak = peak_mb()
    matrix = n * dim * 4 / 2**20
    info = {"rank": rank, "rss_between_mb": round(between, 1), "peak_during_mb": round(peak, 1),
            "peak_over_between": round(peak / between, 3), "increase_mb": round(peak - between, 1),
            "increase_over_matrix": round((peak - between) / matrix, 3), "peak_reset": ok}
    (out / f"rank{rank}.json").write_text(json.dumps(info))
    dist.destroy_process_group()


def run_bm25(d: Path, args) -> dict:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": os.pathsep.join([str(ROOT / "src"), str(ROOT)])}
    res = {}
    for mode in ("bm25-build", "bm25-build-bm25s", "bm25-mmap"):
        cmd = [sys.executable, str(Path(__file__).resolve()), "--worker", mode, "--worker-dir", str(d)]
        proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=7200)
        if proc.returncode != 0:
            raise RuntimeError(f"{mode} worker failed: {proc.stderr[-3000:]}")
        res[mode.split("-", 1)[1]] = json.loads(proc.stdout.strip().splitlines()[-1])
    return res


def worker_bm25(args) -> None:
    """``bm25-build``: ragtrain's BM25Retriever over the KB in a fresh process (time, peak RSS increase over the
    process with the KB opened), saved; ``bm25-build-bm25s``: the same index the way bm25s builds it itself
    (``BM25().index(bm25s.tokenize(texts))`` over a list of the KB's texts, the list included: ragtrain's former
    path); ``bm25-mmap``: the saved index loaded with ``mmap=True`` and queried (RSS increase, latency)."""
    d = Path(args.worker_dir)
    if args.worker in ("bm25-build", "bm25-build-bm25s"):
        import bm25s

        from ragtrain.data.kb import load_kb
        from ragtrain.retrieval import BM25Retriever, bm25_texts

        kb = load_kb(d / "kb")
        loaded = rss_mb()
        reset_peak()
        with Clock() as c:
            if args.worker == "bm25-build":  # as the trainer builds it: its score matrix memory-mapped on disk
                model = BM25Retriever(bm25_texts(kb), scratch_dir=d / "bm25-scratch").model
            else:
                texts = list(bm25_texts(kb)[0:len(kb)])
                model = bm25s.BM25()
                model.index(bm25s.tokenize(texts, stopwords="en", show_progress=False), show_progress=False)
        peak = peak_mb()
        out = {"build_cpu_s": round(c.cpu, 2), "build_wall_s": round(c.wall, 2), "rss_before_mb": round(loaded, 1),
               "peak_increase_mb": round(peak - loaded, 1), "peak_mb": round(peak, 1),
               "rss_after_mb": round(rss_mb(), 1)}
        if args.worker == "bm25-build":
            model.save(str(d / "bm25"))
            out["disk_mb"] = round(_dir_bytes(d / "bm25") / 2**20, 1)
    else:
        import bm25s

        before = rss_mb()
        model = bm25s.BM25.load(str(d / "bm25"), mmap=True)
        words = list(model.vocab_dict)
        q = bm25s.tokenize([" ".join(words[(i * 131 + j * 977) % len(words)] for j in range(8)) for i in range(16)],
                           stopwords="en", show_progress=False)
        with Clock() as c:
            model.retrieve(q, k=5, show_progress=False, n_threads=0)
        out = {"rss_increase_mb": round(rss_mb() - before, 1), "query_ms_16": round(1000 * c.cpu, 2)}
    print(json.dumps(out))


# ------------------------------------------------------------------------------------------------ report
def kinds(r: dict) -> list[str]:
    """The index kinds measured at one size (runs before the -auto kinds existed lack them)."""
    return [k for k in KINDS if k in r["index"]]


def stage_times(r: dict) -> dict[str, float]:
    """CPU seconds of each stage at one size."""
    t = {"KB build": r["kb_build"]["cpu_s"], "first tokenization": r["first_tokenization"]["cpu_s"],
         "refresh encode": r["refresh_encode"]["cpu_s"]}
    for kind in kinds(r):
        t[f"index build ({kind})"] = r["index"][kind]["build_cpu_s"]
    if "bm25" in r:  # absent with --index-only
        t["BM25 build"] = r["bm25"]["build"]["build_cpu_s"]
    return t


def linear_fit(xs: list[float], ys: list[float], at: float) -> float | None:
    """``a + b * at`` of the least-squares line through the points; None with fewer than two sizes or a negative
    slope (a figure that did not grow with N is noise at these sizes, not something to extrapolate)."""
    if len(xs) < 2:
        return None
    b, a = np.polyfit(np.asarray(xs, float), np.asarray(ys, float), 1)
    return float(a + b * at) if b >= 0 else None


def extrapolate(results: list[dict], at: int) -> dict:
    ns = [r["passages"] for r in results]
    per = [stage_times(r) for r in results]
    out = {"passages": at, "cpu_s": {}, "step_retrieval_ms": {}, "memory_mb": {}}
    for k in per[0]:
        out["cpu_s"][k] = linear_fit(ns, [p[k] for p in per], at)
    for kind in kinds(results[0]):
        out["step_retrieval_ms"][kind] = linear_fit(ns, [r["index"][kind]["step_retrieval_ms"] for r in results], at)
        out["memory_mb"][f"index ({kind})"] = linear_fit(ns, [r["index"][kind]["bytes"] / 2**20 for r in results], at)
    if "bm25" in results[0]:
        out["memory_mb"]["BM25 build peak increase"] = linear_fit(
            ns, [r["bm25"]["build"]["peak_increase_mb"] for r in results], at)
    out["memory_mb"]["embeddings fp32 (N x d)"] = at * results[0]["dim"] * 4 / 2**20
    for key in results[0].get("refresh_rss", {}):
        out["memory_mb"][f"refresh peak increase, {key}"] = linear_fit(
            ns, [max(x["increase_mb"] for x in r["refresh_rss"][key]["ranks"]) for r in results], at)
    refresh_stages = {k: v for k, v in out["cpu_s"].items() if k in ("refresh encode", "index build (ivfpq)")}
    out["dominant_stage"] = max(out["cpu_s"], key=lambda k: out["cpu_s"][k] or 0)
    out["dominant_refresh_stage_ivfpq"] = max(refresh_stages, key=lambda k: refresh_stages[k] or 0)
    return out


def plot(results: list[dict], ext: dict, png: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ns = [r["passages"] for r in results]
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(13, 5))
    per = [stage_times(r) for r in results]
    for k in per[0]:
        line, = ax1.plot(ns, [p[k] for p in per], "o-", label=k)
        if ext["cpu_s"][k] is not None:
            ax1.plot([ns[-1], ext["passages"]], [per[-1][k], max(ext["cpu_s"][k], 1e-3)], "--", color=line.get_color(),
                     alpha=0.5)
    ax1.set_xscale("log")
    ax1.set_yscale("log")
    ax1.set_xlabel("passages")
    ax1.set_ylabel("CPU seconds (1 thread)")
    ax1.set_title("measured (solid) and linear extrapolation to 21M (dashed)")
    ax1.legend(fontsize=7)
    items = sorted(((k, v / 3600) for k, v in ext["cpu_s"].items() if v is not None), key=lambda kv: kv[1])
    ax2.barh([k for k, _ in items], [v for _, v in items], color="tab:blue")
    ax2.set_xscale("log")
    ax2.set_xlabel(f"CPU hours at {ext['passages'] / 1e6:.0f}M passages (linear fit)")
    ax2.set_title("extrapolated stage cost")
    fig.tight_layout()
    png.parent.mkdir(parents=True, exist_ok=True)
    tmp = png.with_name(png.stem + ".tmp.png")
    fig.savefig(tmp, dpi=110)
    plt.close(fig)
    os.replace(tmp, png)
    return png


def goals(results: list[dict]) -> list[list]:
    """The issue's scale goals at the largest size measured: [goal, figures, met / not met]."""
    big, small = results[-1], results[0]
    out = []
    for key, v in big.get("refresh_rss", {}).items():
        worst = max(x["peak_over_between"] for x in v["ranks"])
        out.append([f"{big['passages']:,} passages, refresh path {key}: every rank's peak RSS during a refresh "
                    "<= 1.5x its RSS between refreshes", f"worst rank {worst:.2f}x", worst <= 1.5])
    if "bm25" in big:
        b = big["bm25"]["build"]
        out.append([f"BM25 for {big['passages']:,} passages <= 2 GB", f"build peak increase "
                    f"{b['peak_increase_mb']:.0f} MB (process peak {b.get('peak_mb', float('nan')):.0f} MB); serving "
                    f"memory-mapped {big['bm25']['mmap']['rss_increase_mb']:.0f} MB", b["peak_increase_mb"] <= 2048])
    if len(results) > 1:
        # the goal is from 100k to 1M passages: that pair when measured, else the extreme sizes
        by_n = {r["passages"]: r for r in results}
        if 100_000 in by_n and 1_000_000 in by_n:
            small, big = by_n[100_000], by_n[1_000_000]
        for kind in [k for k in kinds(big) if k != "flat"]:
            ratio = big["index"][kind]["step_retrieval_ms"] / small["index"][kind]["step_retrieval_ms"]
            rec = [r["index"][kind].get("recall_at_10") for r in (small, big)]
            out.append([f"per-step retrieval overhead ({kind}) {big['passages']:,} / {small['passages']:,} passages "
                        "<= 2x", f"{ratio:.2f}x" + (f" (recall@10 {rec[0]:.2f} -> {rec[1]:.2f})"
                                                    if None not in rec else ""), ratio <= 2])
    return out


def goals_markdown(results: list[dict]) -> list[str]:
    from benchmarks.plots import md_table

    rows = [[g, f, "met" if ok else "not met"] for g, f, ok in goals(results)]
    return ["## Goals (RSS and BM25: the largest size measured; per-step overhead: 100k to 1M when both were measured)", "", md_table(["goal", "figures", "status"], rows), ""]


def write_markdown(res: dict, path: Path) -> None:
    from benchmarks.plots import machine_markdown, md_table

    results, ext = res["results"], res["extrapolation"]
    L = ["# Scale benchmark (CPU)", "", f"Command: `{res['command']}`", "",
         f"Machine: {machine_markdown(res['machine'])}", "",
         f"Started {res['started']}, wall time {res['wall_s'] / 60:.1f} min. Times are CPU seconds of one thread "
         f"(`OMP_NUM_THREADS=1`); the host is shared, so wall times vary with other users' load.", ""]
    if res.get("note"):
        L += [res["note"], ""]
    L += [f"Synthetic KB: documents of {res['args']['words']} random Zipf-distributed pseudo-words (one passage "
          f"each); tiny 1-layer BERT context encoder of width {res['args']['dim']} (untrained, its word tokenizer "
          f"trained on the first 5000 passages), max {res['args']['max_len']} tokens.", "",
          "## Stages (CPU seconds)", ""]
    rows = []
    for r in results:
        t = stage_times(r)
        rows.append([r["passages"], *t.values()])
    rows.append([f"**{ext['passages']:,} (linear fit)**", *(ext["cpu_s"][k] for k in stage_times(results[0]))])
    L += [md_table(["passages", *stage_times(results[0]).keys()], rows), ""]
    hours = {k: v / 3600 for k, v in ext["cpu_s"].items() if v is not None}
    skipped = [k for k, v in ext["cpu_s"].items() if v is None]
    L += [f"At {ext['passages'] / 1e6:.0f}M passages the linear fits give: " + ", ".join(
        f"{k} {v:.2f} CPU-h" for k, v in sorted(hours.items(), key=lambda kv: -kv[1])) + ". "
          + (f"Not extrapolated ({', '.join(skipped)}): the measured time did not grow with N (noise or one-off "
             "costs dominate at these sizes). " if skipped else "")
          + f"**Dominant stage: {ext['dominant_stage']}**; of what every refresh repeats (encode + an ivfpq build), "
          f"**{ext['dominant_refresh_stage_ivfpq']}** dominates. HNSW builds grow like N log N, so the linear fit "
          "understates them; KB build and first tokenization are paid once (the token cache is reused by later "
          "refreshes).", ""]
    L += goals_markdown(results)
    L += ["## Index per kind: build, size, search, per-step retrieval overhead", ""]
    rows = []
    for r in results:
        for kind in kinds(r):
            x = r["index"][kind]
            rows.append([r["passages"], kind, x.get("nlist") or "", x.get("nprobe") or "",
                         x.get("recall_at_10", "–"), x["build_cpu_s"], x["bytes_per_vector"], x["search_ms"],
                         x["step_retrieval_ms"]])
    L += [md_table(["passages", "kind", "nlist", "nprobe", "recall@10", "build CPU s", "bytes/vector",
                    f"search ms ({results[0]['index']['flat']['search_queries']} queries, top-10)",
                    f"step retrieval ms ({STEP_BATCH} q x {STEP_DOCS} docs)"], rows), ""]
    if "recall_at_10" not in results[0]["index"]["flat"]:
        L += ["This run predates the recall column: its indexes held the tiny encoder's raw vectors (nearly "
              "collinear, so neighbours were rounding ties) and no recall was measured.", ""]
    else:
        L += [f"recall@10 = the share of the exact (flat) top-10 that the index returns for the benchmark's queries "
              f"(KB vectors plus Gaussian noise of norm ~0.1). Every index kind indexes the encoder's vectors centred "
              f"and L2-normalised: raw, the untrained tiny encoder's vectors are nearly collinear (cosine 0.999999 to "
              f"their mean direction), so their neighbours would be float-rounding ties. ivf-auto / ivfpq-auto: "
              f"`index.nlist=auto` (4 x sqrt(N), a power of two) and `index.nprobe=auto`, tuned at build time to "
              f"find {TARGET_RECALL} of the exact top-{RECALL_K} of 256 KB vectors (their own id left out); the "
              "others use the fixed `--nlist` / `--nprobe`.", ""]
    if len(results) > 1:
        for a, b in zip(results[:-1], results[1:]):
            L += [f"Per-step retrieval overhead ratio {b['passages']:,} / {a['passages']:,} passages: " + ", ".join(
                f"{k} {b['index'][k]['step_retrieval_ms'] / a['index'][k]['step_retrieval_ms']:.2f}x"
                for k in kinds(b) if k in a["index"]) + ".", ""]
    if "refresh_rss" not in results[0]:
        L += ["Refresh RSS and BM25 were not measured in this run (`--index-only`).", ""]
        tmp = path.with_suffix(".tmp")
        tmp.write_text("\n".join(L) + "\n")
        os.replace(tmp, path)
        return
    L += ["## Peak RSS of each rank during a refresh (2 CPU ranks, gloo)", "",
          "Each rank process runs two refreshes; *between* = its RSS after the first, *peak* = its VmHWM during the "
          "second (reset between them). The N x d vectors are seeded random stand-ins for the encoder's. "
          "`increase / matrix` = (peak - between) / the fp32 N x d matrix.", ""]
    rows = []
    for r in results:
        for key, v in r["refresh_rss"].items():
            for rk in v["ranks"]:
                rows.append([r["passages"], key, rk["rank"], v["matrix_mb"], rk["rss_between_mb"], rk["peak_during_mb"],
                             rk["peak_over_between"], rk["increase_over_matrix"]])
    L += [md_table(["passages", "kind/path", "rank", "N x d MB", "between MB", "peak MB", "peak / between",
                    "increase / matrix"], rows), ""]
    ts = res["args"].get("train_size", 131072)
    L += [f"What the rows show: on the gather path *every* rank's peak rises by about 3-5x the N x d matrix (the "
          "padded all-gather buffers and their concatenation); on the shard path the other ranks' peak rises by "
          "about half a matrix at most (the pages of their own slice while it is written; they are flushed and "
          "released every 64 MB) and rank 0's by what the index build needs. At these sizes N <= the IVF training "
          f"sample ({ts:,} vectors, `index.train_size`), so rank 0's ivfpq training copies the whole matrix (and "
          "FAISS its residuals); above it the sample, not N, bounds that part. A flat (or HNSW) index holds every "
          "vector itself; rank 0 releases the live index before it builds the next (nothing searches during a "
          "refresh), so it holds one index at a time. The "
          "base RSS here is a bare process (torch + faiss, ~250 MB) whereas a trainer also holds its models, so "
          "`peak / between` is closer to 1 than in training; `increase / matrix` is the size-independent figure.",
          ""]
    L += ["## BM25 (bm25s)", ""]
    rows = []
    for r in results:
        b, ref = r["bm25"]["build"], r["bm25"].get("build-bm25s")
        rows.append([r["passages"], b["build_cpu_s"], b["peak_increase_mb"], b.get("peak_mb"),
                     ref and ref["build_cpu_s"], ref and ref["peak_increase_mb"],
                     ref and round(ref["peak_increase_mb"] / max(b["peak_increase_mb"], 1e-9), 2),
                     b["disk_mb"], r["bm25"]["mmap"]["rss_increase_mb"]])
    L += [md_table(["passages", "build CPU s", "build peak RSS increase MB", "build process peak MB",
                    "bm25s own build CPU s", "bm25s own build peak increase MB", "bm25s / ragtrain peak increase",
                    "index on disk MB", "RSS increase of mmap load + 16 queries MB"], rows), "",
          "ragtrain builds the bm25s index chunk by chunk from the KB's Arrow memory map (`ragtrain.index.bm25`: "
          "(document, token, tf) arrays instead of Python lists of every token; the same scores as bm25s's own "
          "build, tested). *bm25s own build* is `BM25().index(bm25s.tokenize(texts))` over a list of the texts, "
          "ragtrain's former path. Increases are over the process with the KB opened. Serving the saved index "
          "memory-mapped (`BM25.load(dir, mmap=True)`) costs little RSS.", ""]
    L += ["## Extrapolated memory at 21M (linear fits, MB)", "",
          md_table(["what", "MB"], [[k, v] for k, v in ext["memory_mb"].items()]), "",
          "The refresh-peak fits are rank 0's (the largest) and extrapolate the whole increase linearly: on the shard "
          "path part of it (the IVF training sample, whole at these sizes) stops growing at `index.train_size`, so "
          "those fits overstate it; the other ranks' increase (the table above) is what the shard path removes.", ""]
    tmp = path.with_suffix(".tmp")
    tmp.write_text("\n".join(L) + "\n")
    os.replace(tmp, path)


# ------------------------------------------------------------------------------------------------ main
def report(out: Path) -> None:
    """(Re)write results.md and scale.png from results.json (no measuring)."""
    res = json.loads((out / "results.json").read_text())
    res["extrapolation"] = extrapolate(res["results"], res["extrapolation"]["passages"])
    from benchmarks.plots import write_json

    write_json(out / "results.json", res)
    plot(res["results"], res["extrapolation"], out / "scale.png")
    write_markdown(res, out / "results.md")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--sizes", default="100000,1000000", help="comma-separated KB sizes (passages)")
    p.add_argument("--dim", type=int, default=64)
    p.add_argument("--words", type=int, default=100)
    p.add_argument("--vocab", type=int, default=8000, help="tiny tokenizer vocabulary")
    p.add_argument("--max-len", type=int, default=128)
    p.add_argument("--encode-batch-size", type=int, default=128)
    p.add_argument("--nlist", type=int, default=1024)
    p.add_argument("--nprobe", type=int, default=32)
    p.add_argument("--pq-m", type=int, default=16)
    p.add_argument("--queries", type=int, default=64)
    p.add_argument("--reps", type=int, default=20)
    p.add_argument("--extrapolate", type=int, default=21_000_000)
    p.add_argument("--work-dir", default=None, help="scratch folder (default: a temporary one)")
    p.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "scale-cpu"))
    p.add_argument("--note", default="", help="a paragraph added to results.md")
    p.add_argument("--index-only", action="store_true", help="measure the stages up to the index kinds; skip "
                   "the refresh-RSS and BM25 stages")
    p.add_argument("--keep-vectors", default=None, metavar="DIR",
                   help="copy each size's raw encoder vectors to DIR/n<N>.npy (input of benchmarks/ivf_nlist.py)")
    p.add_argument("--report-only", action="store_true", help="rewrite results.md and scale.png from --out's "
                   "results.json without measuring")
    # internal: subprocess workers
    p.add_argument("--worker", choices=["refresh-rss", "bm25-build", "bm25-build-bm25s", "bm25-mmap"],
                   help=argparse.SUPPRESS)
    p.add_argument("--worker-dir", help=argparse.SUPPRESS)
    p.add_argument("--worker-args", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.worker == "refresh-rss":
        worker_refresh_rss(argparse.Namespace(**json.loads(args.worker_args), worker_dir=args.worker_dir))
        return 0
    if args.worker:
        worker_bm25(args)
        return 0
    if args.report_only:
        report(Path(args.out))
        return 0
    try:
        sizes = [int(s) for s in args.sizes.split(",") if s.strip()]
    except ValueError:
        print(f"scale.py: --sizes: expected comma-separated integers, got {args.sizes!r}", file=sys.stderr)
        return 2
    if not sizes or min(sizes) < 2000:
        print(f"scale.py: --sizes: every size must be >= 2000 passages, got {args.sizes!r}", file=sys.stderr)
        return 2
    if args.dim % args.pq_m:
        print(f"scale.py: --pq-m: {args.pq_m} does not divide --dim {args.dim}", file=sys.stderr)
        return 2
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    import torch

    from benchmarks.plots import command_line, machine_info, write_json

    torch.set_num_threads(1)
    import tempfile

    work = Path(args.work_dir) if args.work_dir else Path(tempfile.mkdtemp(prefix="ragtrain-scale-"))
    t0 = time.time()
    res = {"command": command_line(), "started": time.strftime("%Y-%m-%d %H:%M:%S %Z"), "machine": machine_info(),
           "args": vars(args), "note": args.note, "results": []}
    for n in sorted(sizes):
        r = bench_size(n, args, work)
        r["dim"] = args.dim
        res["results"].append(r)
    res["extrapolation"] = extrapolate(res["results"], args.extrapolate)
    res["wall_s"] = round(time.time() - t0, 1)
    out = Path(args.out)
    write_json(out / "results.json", res)
    plot(res["results"], res["extrapolation"], out / "scale.png")
    write_markdown(res, out / "results.md")
    if not args.work_dir:
        shutil.rmtree(work, ignore_errors=True)
    print(f"wrote {out}/results.json, results.md, scale.png in {res['wall_s'] / 60:.1f} min")
    return 0


if __name__ == "__main__":
    sys.exit(main())
