"""Peak memory of the async-refresh encoding process (``index.refresh_mode=async``) on a synthetic KB.

One worker (``python -m ragtrain.index.async_refresh``, one thread) encodes every passage of an N-passage KB
(``scale.py``'s synthetic corpus and tiny width-``--dim`` encoder, saved as a snapshot the way the trainer saves
one) into its memory-mapped shard, three times, each under ``/usr/bin/time`` (peak RSS = its ``%M``):

* **start-up**: the same process encoding a single passage (imports, model, memory-mapped KB: the fixed cost);
* **first refresh**: it tokenizes its slice and saves the ids (``OUTPUT_DIR/refresh/tokens/``), then encodes;
* **later refresh**: the ids come memory-mapped from that cache.

The increase of each over the start-up is reported against the N x d float32 matrix the worker writes, which
no process should hold whole.  ``--compare-src DIR`` also runs the encoding process of another source tree with
its own command line (``--snapshot S --kb KB``: the single-process child before 7c632de, which tokenized the KB
into Python lists and encoded it into one in-RAM matrix) for a before/after figure.

    python benchmarks/async_rss.py --size 1000000            # ~15 min on one core
Results: ``benchmarks/results/async-rss-cpu/`` (``results.json``, ``results.md``).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))
for _k, _v in (("HF_HUB_OFFLINE", "1"), ("TRANSFORMERS_OFFLINE", "1"), ("HF_DATASETS_OFFLINE", "1"),
               ("TOKENIZERS_PARALLELISM", "false")):
    os.environ.setdefault(_k, _v)


def timed(cmd: list[str], log: Path, env: dict, limit_mb: float | None = None) -> dict:
    """Run ``cmd`` under /usr/bin/time; its peak RSS (MB), wall and user seconds.  ``limit_mb``: stop it (and
    record so) once its RSS passes that, instead of letting the kernel's OOM killer choose a victim; without a
    limit a failure raises."""
    import psutil

    stats = log.with_suffix(".time")
    stopped = None
    with open(log, "w") as f:
        proc = subprocess.Popen(["/usr/bin/time", "-f", "%M %e %U", "-o", str(stats), *cmd], stdout=f,
                                stderr=subprocess.STDOUT, env=env)
        t0 = time.time()
        while proc.poll() is None:
            time.sleep(0.2)
            if limit_mb is None:
                continue
            try:
                kids = psutil.Process(proc.pid).children(recursive=True)
                rss = sum(k.memory_info().rss for k in kids) / 2**20
            except psutil.Error:
                continue
            if rss > limit_mb:
                stopped = {"stopped_at_rss_mb": round(rss, 1), "stopped_after_s": round(time.time() - t0, 1)}
                for k in kids:
                    k.kill()
                proc.wait()
    if proc.returncode != 0 and stopped is None:
        if limit_mb is None:
            raise RuntimeError(f"{' '.join(cmd)} failed (exit {proc.returncode}); see {log}")
        stopped = {"exit": proc.returncode}
    kb, wall, user = stats.read_text().split()[-3:]
    return {"peak_rss_mb": round(int(kb) / 1024, 1), "wall_s": float(wall), "user_s": float(user),
            **({"completed": False, **stopped} if stopped else {"completed": True})}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--size", type=int, default=1_000_000)
    p.add_argument("--dim", type=int, default=64)
    p.add_argument("--words", type=int, default=100)
    p.add_argument("--vocab", type=int, default=8000)
    p.add_argument("--max-len", type=int, default=128)
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--kb", default=None, help="an already built KB of --size synthetic passages (scale.py's)")
    p.add_argument("--compare-src", default=None, help="another source tree's src/ whose child to run too")
    p.add_argument("--compare-limit-gb", type=float, default=16.0,
                   help="stop the --compare-src process once its RSS passes this (recorded as not completed)")
    p.add_argument("--work-dir", default=None)
    p.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "async-rss-cpu"))
    p.add_argument("--note", default="")
    args = p.parse_args(argv)
    if not Path("/usr/bin/time").is_file():
        print("async_rss.py: needs /usr/bin/time (GNU time) for the peak RSS of each process", file=sys.stderr)
        return 2
    import tempfile

    import torch

    from benchmarks.plots import command_line, machine_info, md_table, machine_markdown, write_json
    from benchmarks.scale import tiny_encoder, write_corpus
    from ragtrain.data.kb import build_kb, load_kb
    from ragtrain.index.async_refresh import write_snapshot

    torch.set_num_threads(1)
    work = Path(args.work_dir or tempfile.mkdtemp(prefix="ragtrain-async-rss-"))
    work.mkdir(parents=True, exist_ok=True)
    t0 = time.time()
    kb_dir = Path(args.kb) if args.kb else work / "kb"
    if not args.kb:
        write_corpus(work / "docs.jsonl", args.size, args.words)
        build_kb(work / "docs.jsonl", kb_dir, passage_words=args.words)
        (work / "docs.jsonl").unlink()
    kb = load_kb(kb_dir)
    n = len(kb)
    if n != args.size:
        print(f"async_rss.py: --kb holds {n} passages, not --size {args.size}", file=sys.stderr)
        return 2
    enc, collator = tiny_encoder(args.dim, list(kb.select(range(min(n, 5000)))["text"]), args.vocab, args.max_len)
    snap = work / "refresh" / "step_00000001"
    shutil.rmtree(work / "refresh", ignore_errors=True)
    write_snapshot(snap, enc.model, collator.c_tok, pooling=enc.pooling, normalize=enc.normalize,
                   max_length=args.max_len, mixed_precision="no", step=1)
    del kb, enc, collator
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    child = [sys.executable, "-m", "ragtrain.index.async_refresh", "--snapshot", str(snap), "--kb", str(kb_dir),
             "--threads", "1", "--batch-size", str(args.batch_size)]
    tokens = work / "refresh" / "tokens" / f"rows_0_{n}"
    runs = {}
    shard = snap / "shard_00000.npy"
    (work / "one").mkdir(exist_ok=True)
    runs["start-up"] = timed([*child, "--rows", "0:1", "--out", str(work / "one" / "shard_00000.npy")],
                             work / "startup.log", env)
    for name in ("first refresh", "later refresh"):
        shard.unlink(missing_ok=True)
        runs[name] = timed([*child, "--rows", f"0:{n}", "--out", str(shard), "--tokens", str(tokens)],
                           work / f"{name.replace(' ', '_')}.log", env)
        timing = json.loads((snap / "encode_timing_00000.json").read_text())
        runs[name].update(tokens=timing["tokens"], tokenize_s=timing["tokenize_s"], encode_s=timing["encode_s"])
    if args.compare_src:
        old_env = {**env, "PYTHONPATH": str(Path(args.compare_src).resolve())}
        runs["former child (--compare-src)"] = timed(child, work / "former.log", old_env,
                                                     limit_mb=args.compare_limit_gb * 1024)
    matrix_mb = n * args.dim * 4 / 2**20
    base = runs["start-up"]["peak_rss_mb"]
    for r in runs.values():
        r["increase_mb"] = round(r["peak_rss_mb"] - base, 1)
        r["increase_over_matrix"] = round((r["peak_rss_mb"] - base) / matrix_mb, 2)
    res = {"command": command_line(), "started": time.strftime("%Y-%m-%d %H:%M:%S %Z"), "machine": machine_info(),
           "passages": n, "dim": args.dim, "matrix_mb": round(matrix_mb, 1), "compare_src": args.compare_src,
           "note": args.note, "runs": runs, "wall_s": round(time.time() - t0, 1)}
    out = Path(args.out)
    write_json(out / "results.json", res)
    lines = ["# Peak RSS of the async-refresh encoding process", "", f"Command: `{res['command']}`  ",
             f"Machine: {machine_markdown(res['machine'])}  ", f"Wall {res['wall_s'] / 60:.1f} min.",
             *(["", f"**Note:** {args.note}"] if args.note else []), "",
             f"KB: {n:,} synthetic passages; tiny encoder of width {args.dim}; the N x d float32 matrix the worker "
             f"writes: {matrix_mb:.0f} MB. Increase = peak RSS minus the start-up run's.", "",
             md_table(["run", "peak RSS MB", "increase MB", "increase / matrix", "tokens", "wall s", "completed"],
                      [[k, r["peak_rss_mb"], r["increase_mb"], r["increase_over_matrix"], r.get("tokens", "–"),
                        r["wall_s"], "yes" if r["completed"] else
                        (f"no: stopped at {r['stopped_at_rss_mb']:.0f} MB after {r['stopped_after_s']:.0f} s"
                         if "stopped_at_rss_mb" in r else f"no: exit {r['exit']}")] for k, r in runs.items()]), ""]
    (out / "results.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    if not args.work_dir:
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
