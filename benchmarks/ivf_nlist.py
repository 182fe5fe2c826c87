"""Can IVF's per-step retrieval cost stay flat from 100k to 1M passages at a fixed recall if ``nlist`` grows with N?

The scale benchmark (``scale.py``) measured ``index.nlist=auto`` (4 x sqrt(N)): with ``nprobe=auto`` tuned to a
recall target, the per-step cost grew 3.3x from 100k to 1M.  This benchmark asks whether another list-count policy
keeps it within 2x: it builds ``DenseIndex(kind="ivf", nprobe="auto")`` -- the product's own index -- for each
policy and size over the same vectors, finds the fewest lists that reach ``--target`` of the exact top-10 on the
benchmark's queries (bisected to the list, so that a ratio is not blurred by ``nprobe=auto``'s x1.5 grid; what
``auto`` chose is reported beside it), and counts the work a query then costs: distance computations in the lists it scans (FAISS's ``indexIVF_stats.ndis``) plus the
coarse quantizer's (``nlist`` with the flat quantizer ragtrain uses; an HNSW quantizer would make that part
logarithmic, so the scanned count alone is the floor any quantizer leaves).  Counts are exact and do not depend on
the machine's load; the CPU seconds of a training step's search (8 questions, top-5) are printed beside them.

Policies: ``auto`` (ragtrain's ``nlist=auto``: 4 x sqrt(N), a power of two, clipped to ``train_size / 39``),
``n256`` (N / 256 lists: list length constant) and ``n64`` (N / 64).  The fixed-length policies train on
``min(N, 64 x nlist)`` vectors.

Vectors: the tiny encoder's raw outputs that ``scale.py --keep-vectors DIR`` keeps (``DIR/n<N>.npy``), centred and
L2-normalised as ``scale.py`` indexes them; each size is the first N of them (synthetic passages, i.i.d.; the
synthetic corpus is prefix-stable, so the first 20k rows of the 1M run equal a 20k run's to float rounding).
Queries: KB vectors plus noise (``scale.py``'s), recall@10 against exact search.

    python benchmarks/scale.py --sizes 1000000 --index-only --keep-vectors /tmp/vec   # ~15 min on one core
    python benchmarks/ivf_nlist.py --vectors /tmp/vec/n1000000.npy                   # ~5 min on one core

Results: ``benchmarks/results/ivf-nlist-cpu/`` (``results.json``, ``results.md``, ``ivf_nlist.png``).
"""

from __future__ import annotations

import argparse
import logging
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import numpy as np  # noqa: E402

POLICIES = ("auto", "n256", "n64")
STEP_BATCH, STEP_DOCS, RECALL_K = 8, 5, 10  # as scale.py


def policy_nlist(policy: str, n: int) -> int | str:
    return {"auto": "auto", "n256": n // 256, "n64": n // 64}[policy]


def measure(emb: np.ndarray, policy: str, queries: np.ndarray, exact: np.ndarray, target: float, reps: int) -> dict:
    import faiss

    from ragtrain.index.faiss_index import DEFAULT_TRAIN_SIZE, DenseIndex

    n = emb.shape[0]
    nlist = policy_nlist(policy, n)
    train = DEFAULT_TRAIN_SIZE if nlist == "auto" else min(n, 64 * nlist)
    t = time.process_time()
    index = DenseIndex.build_chunked([emb], kind="ivf", nlist=nlist, nprobe="auto", target_recall=target,
                                     tune_k=RECALL_K, train_size=train)
    build = time.process_time() - t
    eff_nlist = index._effective_nlist_value
    tuned = index.effective_nprobe

    def probe(nprobe: int) -> tuple[float, float]:
        """(recall@10 on the benchmark's queries, distances scanned a query) with ``nprobe`` lists."""
        index.set_search_params(nprobe=nprobe)
        faiss.cvar.indexIVF_stats.reset()
        _, found = index.search(queries, RECALL_K)
        scanned = faiss.cvar.indexIVF_stats.ndis / len(queries)
        return float(np.mean([len(set(a) & set(b)) / RECALL_K for a, b in zip(found, exact)])), scanned

    tuned_recall, tuned_scanned = probe(tuned)
    # the fewest lists reaching the target on these queries, to the list (nprobe=auto steps x1.5, which would
    # blur a ratio by up to 1.5x): recall only grows with nprobe, so bisect
    lo, hi = 0, eff_nlist  # probe(hi) meets the target (every list: exact for ivf)
    while hi - lo > 1:
        mid = (lo + hi) // 2
        lo, hi = (lo, mid) if probe(mid)[0] >= target else (mid, hi)
    recall, scanned = probe(hi)
    below = probe(hi - 1)[0] if hi > 1 else None  # one list fewer misses the target
    step = []
    for r in range(reps):
        q = queries[(r * STEP_BATCH) % (len(queries) - STEP_BATCH):][:STEP_BATCH]
        t = time.process_time()
        index.search(q, STEP_DOCS)
        step.append(time.process_time() - t)
    return {"n": n, "policy": policy, "nlist": eff_nlist, "train_size": min(train, n),
            "nprobe_auto": tuned, "recall_at_10_auto": round(tuned_recall, 4),
            "work_per_query_auto": round(tuned_scanned + eff_nlist, 1),
            "nprobe": hi, "recall_at_10": round(recall, 4), "recall_at_10_one_list_fewer": below,
            "build_cpu_s": round(build, 2),
            "scanned_per_query": round(scanned, 1), "quantizer_per_query": eff_nlist,
            "work_per_query": round(scanned + eff_nlist, 1), "step_cpu_ms": round(1000 * float(np.median(step)), 3)}


def write_report(res: dict, out: Path) -> None:
    from benchmarks.plots import machine_markdown, md_table

    rows = res["rows"]
    sizes = sorted({r["n"] for r in rows})
    lines = [f"# IVF list-count policies: per-query work at a fixed recall, {sizes[0]:,} -> {sizes[-1]:,} passages", "",
             f"Command: `{res['command']}`  ", f"Machine: {machine_markdown(res['machine'])}  ",
             f"Started {res['started']}; wall {res['wall_s'] / 60:.1f} min; nprobe tuned to {res['target']} of the "
             "exact top-10 at build time (`nprobe=auto`).", *(["", f"**Note:** {res['note']}"] if res["note"] else []),
             "", "work = distances computed a query: scanned (in the probed lists) + quantizer (nlist, flat). "
             f"`nprobe` = the fewest lists that reach recall@10 >= {res['target']} on the benchmark's queries "
             "(bisected to the list); `auto` columns = what `nprobe=auto` chose at build time (a x1.5 grid, tuned "
             "on KB vectors) and the recall and work it gives on the same queries. `step CPU ms` = one training "
             "step's search (8 questions, top-5) at `nprobe`.", "",
             md_table(["passages", "policy", "nlist", "train", "nprobe", "recall@10", "scanned", "quantizer", "work",
                       "nprobe auto", "recall auto", "work auto", "step CPU ms", "build CPU s"],
                      [[r["n"], r["policy"], r["nlist"], r["train_size"], r["nprobe"], r["recall_at_10"],
                        r["scanned_per_query"], r["quantizer_per_query"], r["work_per_query"], r["nprobe_auto"],
                        r["recall_at_10_auto"], r["work_per_query_auto"], r["step_cpu_ms"], r["build_cpu_s"]]
                       for r in rows]), ""]
    if len(sizes) >= 2:
        lo, hi = sizes[0], sizes[-1]
        ratio_rows = []
        for p in res["policies"]:
            a = next((r for r in rows if r["n"] == lo and r["policy"] == p), None)
            b = next((r for r in rows if r["n"] == hi and r["policy"] == p), None)
            if a and b:
                ratio_rows.append([p, f"{b['work_per_query'] / a['work_per_query']:.2f}x",
                                   f"{b['scanned_per_query'] / a['scanned_per_query']:.2f}x",
                                   f"{b['step_cpu_ms'] / a['step_cpu_ms']:.2f}x",
                                   f"{a['recall_at_10']:.2f} -> {b['recall_at_10']:.2f}",
                                   "yes" if b["work_per_query"] / a["work_per_query"] <= 2 else "no"])
        lines += [f"## {hi:,} / {lo:,}", "",
                  md_table(["policy", "work", "scanned only (any quantizer)", "step CPU", "recall@10",
                            "work within 2x"], ratio_rows), ""]
    out.joinpath("results.md").write_text("\n".join(lines) + "\n")


def plot(res: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for p in res["policies"]:
        pts = sorted((r["n"], r["work_per_query"], r["scanned_per_query"]) for r in res["rows"] if r["policy"] == p)
        if pts:
            line, = ax.plot([x[0] for x in pts], [x[1] for x in pts], marker="o", label=f"{p}: work")
            ax.plot([x[0] for x in pts], [x[2] for x in pts], marker=".", ls="--", color=line.get_color(),
                    label=f"{p}: scanned")
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("passages")
    ax.set_ylabel(f"distances per query at recall@10 >= {res['target']}")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--vectors", required=True, help="raw (N, d) encoder outputs kept by scale.py --work-dir")
    p.add_argument("--sizes", default="100000,1000000")
    p.add_argument("--policies", default=",".join(POLICIES))
    p.add_argument("--target", type=float, default=0.9)
    p.add_argument("--queries", type=int, default=512)
    p.add_argument("--reps", type=int, default=50)
    p.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "ivf-nlist-cpu"))
    p.add_argument("--note", default="")
    args = p.parse_args(argv)
    policies = args.policies.split(",")
    if unknown := [x for x in policies if x not in POLICIES]:
        print(f"ivf_nlist.py: --policies: unknown {unknown} (choose from {', '.join(POLICIES)})", file=sys.stderr)
        return 2
    vec = Path(args.vectors)
    if not vec.is_file():
        print(f"ivf_nlist.py: --vectors: no such file {vec}", file=sys.stderr)
        return 2
    raw = np.load(vec, mmap_mode="r")
    sizes = sorted(int(x) for x in args.sizes.split(","))
    if sizes[-1] > raw.shape[0]:
        print(f"ivf_nlist.py: --sizes: {sizes[-1]} is more than the {raw.shape[0]} vectors in {vec}", file=sys.stderr)
        return 2
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    import faiss
    import torch

    from benchmarks.plots import command_line, machine_info, write_json
    from benchmarks.scale import centred_unit_vectors

    torch.set_num_threads(1)
    faiss.omp_set_num_threads(1)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.time()
    res = {"command": command_line(), "started": time.strftime("%Y-%m-%d %H:%M:%S %Z"), "machine": machine_info(),
           "target": args.target, "policies": policies, "note": args.note, "rows": []}
    import tempfile

    with tempfile.TemporaryDirectory(prefix="ragtrain-ivf-nlist-") as tmp:
        emb_all = centred_unit_vectors(raw[: sizes[-1]], Path(tmp) / "vectors.npy")
        for n in sizes:
            emb = emb_all[:n]
            rng = np.random.default_rng(1)
            d = emb.shape[1]
            queries = (emb[np.sort(rng.integers(0, n, args.queries))]
                       + 0.1 / np.sqrt(d) * rng.standard_normal((args.queries, d))).astype(np.float32)
            _, exact = faiss.knn(queries, np.ascontiguousarray(emb), RECALL_K, metric=faiss.METRIC_INNER_PRODUCT)
            for policy in policies:
                row = measure(emb, policy, queries, exact, args.target, args.reps)
                logging.info("%s", row)
                res["rows"].append(row)
    res["wall_s"] = round(time.time() - t0, 1)
    write_json(out / "results.json", res)
    write_report(res, out)
    plot(res, out / "ivf_nlist.png")
    print(f"wrote {out}/results.json, results.md, ivf_nlist.png in {res['wall_s'] / 60:.1f} min")
    return 0


if __name__ == "__main__":
    sys.exit(main())
