"""Sync vs async refresh: the training step rate while the KB is being re-encoded, and the stall at the swap.

The same tiny RAG-end2end run (tiny BERT encoders, tiny Llama generator; the shipped sample's questions over the
sample KB plus ``--kb-size`` synthetic passages) trains ``--steps`` steps with one refresh at ``--refresh-at``:

* ``sync``: every rank stops, encodes the KB and rebuilds the index, then training resumes;
* ``async`` (``index.refresh_mode=async``): a child process with its own thread (``index.async_threads``) encodes a
  snapshot while training goes on; the index is swapped in ``index.async_lag`` steps later.  The lag is calibrated
  from the sync arm: the encode time over the steady step time, times ``--lag-margin``.

Training runs with ``--threads`` torch threads (default 1), so on a 2-core host the child gets the other core.
Reported, from per-step wall-clock times taken in this process: the steady-state step time (median of the steps
outside the refresh), the mean step time while the async encode runs and its ratio to the steady rate (goal >= 0.8),
the wait at the swap step in steps (goal <= 1), and the sync refresh's stall in steps.

    python benchmarks/async_refresh.py                       # ~5 min on 2 cores
    python benchmarks/async_refresh.py --kb-size 50000 --steps 80

Results: ``benchmarks/results/async-refresh-cpu/`` (results.json, results.md, steps.png).
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from benchmarks.plots import command_line, machine_info, machine_markdown, md_table, write_json  # noqa: E402
from benchmarks.scale import write_corpus  # noqa: E402

SAMPLE = ROOT / "src" / "ragtrain" / "sample"


def run_arm(name: str, work: Path, kb_files: list[str], args, extra: dict) -> dict:
    import torch

    from ragtrain.config import load_config
    from ragtrain.train.trainer import Trainer

    torch.set_num_threads(args.threads)
    keys = {"output_dir": str(work / name), "data.kb": "[" + ",".join(kb_files) + "]",
            "data.kb_dir": str(work / "kb"), "data.train": str(SAMPLE / "qa.jsonl"), "data.passage_words": 60,
            "data.split_by_article": "false", "model.tiny_hidden": args.hidden, "model.tiny_layers": 2,
            "model.dropout": 0.0, "rag.mode": "end2end", "rag.n_docs": 4, "train.batch_size": 8,
            "train.max_steps": args.steps, "train.log_every": 1000, "train.save_every": 0, "train.eval_every": 0,
            "train.mixed_precision": "no", "train.report_to": "none", "index.refresh_every": f"{args.refresh_at}-{args.refresh_at + 1}:{args.refresh_at}",
            "index.encode_batch_size": 256, "model.max_passage_length": 96, **extra}
    cfg = load_config(None, [f"{k}={v}" for k, v in keys.items()])
    tr = Trainer(cfg)
    stamps = []
    original = tr._after_step

    def timed(out):
        stamps.append(time.perf_counter())  # the step's forward/backward/update is done; before its refresh work
        original(out)
        stamps.append(time.perf_counter())

    tr._after_step = timed
    t0 = time.perf_counter()
    tr.train()
    # step i's time: from the end of step i-1's bookkeeping (refresh, swap) to the end of step i's update
    ends, starts = stamps[0::2], [t0] + stamps[1::2][:-1]
    step_s = [e - s for s, e in zip(starts, ends)]
    after_s = [b - a for a, b in zip(stamps[0::2], stamps[1::2])]  # refresh / swap work done after each step
    return {"step_seconds": step_s, "after_step_seconds": after_s, "refresh_seconds": tr.refresh_seconds,
            "async_wait_seconds": tr.async_wait_seconds, "async_timings": tr.async_timings}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--kb-size", type=int, default=20000, help="synthetic passages added to the sample KB")
    ap.add_argument("--steps", type=int, default=60)
    ap.add_argument("--refresh-at", type=int, default=10)
    ap.add_argument("--hidden", type=int, default=128, help="model.tiny_hidden of all three tiny models")
    ap.add_argument("--threads", type=int, default=1, help="torch threads of the training process")
    ap.add_argument("--lag-margin", type=float, default=1.3)
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "async-refresh-cpu"))
    ap.add_argument("--work-dir", default=str(ROOT / "runs" / "bench" / "async-refresh"))
    args = ap.parse_args(argv)
    import shutil

    work, out = Path(args.work_dir), Path(args.out)
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    out.mkdir(parents=True, exist_ok=True)
    info = machine_info()
    t_start = time.time()
    write_corpus(work / "synthetic.jsonl", args.kb_size, 60)
    kb_files = [str(SAMPLE / "kb.jsonl"), str(work / "synthetic.jsonl")]

    r, final_steps = args.refresh_at, args.steps
    args.steps = r + 4  # calibration: the sync refresh's encode time against the steady step time
    cal = run_arm("calibrate", work, kb_files, args, {})
    steady = statistics.median([s for i, s in enumerate(cal["step_seconds"], 1) if i not in (1, r, r + 1)])
    encode_s = cal["after_step_seconds"][r - 1]  # step r's refresh
    # the child also starts Python, imports torch/transformers and loads the snapshot and the KB: time that too
    import subprocess

    t = time.perf_counter()
    subprocess.run([sys.executable, "-c", "import torch, transformers, ragtrain.eval.exported, ragtrain.data.kb"],
                   check=True)
    startup_s = time.perf_counter() - t
    lag = max(2, math.ceil(args.lag_margin * (encode_s + startup_s) / steady))
    steps = max(final_steps, r + lag + 10)
    args.steps = steps
    sync = run_arm("sync", work, kb_files, args, {})
    asy = run_arm("async", work, kb_files, args, {"index.refresh_mode": "async", "index.async_lag": lag,
                                                   "index.async_threads": 1})
    a_steps = asy["step_seconds"]
    outside = [s for i, s in enumerate(a_steps, 1) if not (r < i <= r + lag + 1)]
    a_steady = statistics.median(outside)
    during = a_steps[r: r + lag]  # steps r+1 .. r+lag run while the child encodes (the swap follows step r+lag)
    swap_wait = asy["after_step_seconds"][r + lag - 1]
    s_steady = statistics.median([s for i, s in enumerate(sync["step_seconds"], 1) if i not in (r, r + 1)])
    res = {
        "command": command_line(), "machine": info, "kb_passages": args.kb_size + 80, "steps": steps,
        "refresh_at": r, "async_lag": lag, "child_startup_estimate_s": startup_s,
        "child_timing": asy["async_timings"][0] if asy["async_timings"] else None, "threads": args.threads, "hidden": args.hidden,
        "sync": {**sync, "steady_step_s": s_steady, "refresh_stall_s": sync["after_step_seconds"][r - 1],
                 "refresh_stall_steps": sync["after_step_seconds"][r - 1] / s_steady},
        "async": {**asy, "steady_step_s": a_steady, "mean_step_during_encode_s": statistics.mean(during),
                  "rate_during_over_steady": a_steady / statistics.mean(during),
                  "snapshot_and_launch_s": asy["after_step_seconds"][r - 1],
                  "swap_wait_s": swap_wait, "swap_wait_steps": swap_wait / a_steady},
        "wall_seconds": round(time.time() - t_start, 1),
    }
    write_json(out / "results.json", res)
    png = plot(res, out / "steps.png")
    a, s = res["async"], res["sync"]
    rows = [("sync", f"{s['steady_step_s']:.3f}", "–", f"{s['refresh_stall_s']:.1f} s = {s['refresh_stall_steps']:.1f} steps", "–"),
            ("async", f"{a['steady_step_s']:.3f}", f"{a['mean_step_during_encode_s']:.3f} ({a['rate_during_over_steady']:.2f}x the steady rate)",
             f"snapshot + launch {a['snapshot_and_launch_s']:.2f} s", f"{a['swap_wait_s']:.2f} s = {a['swap_wait_steps']:.2f} steps")]
    md = [f"# Sync vs async refresh (CPU)\n",
          f"Command: `{res['command']}`  ", f"Machine: {machine_markdown(info)}  ",
          f"Total wall time {res['wall_seconds'] / 60:.1f} min.\n",
          f"KB: {res['kb_passages']} passages (sample + synthetic); tiny models (hidden {args.hidden}); one refresh at "
          f"step {r} of {steps}; training {args.threads} thread(s), the async encoder its own thread; async lag "
          f"{lag} steps (calibrated: {args.lag_margin} x (the sync encode time + the child's start-up) / the steady step "
          f"time). The child's own timing: {res['child_timing']}.\n",
          md_table(["mode", "steady step s", "step s while encoding", "refresh cost", "wait at the swap"], rows), "",
          f"* goal: throughput while a refresh runs >= 0.8x the steady rate: **{a['rate_during_over_steady']:.2f}x** "
          f"({'met' if a['rate_during_over_steady'] >= 0.8 else 'not met'})",
          f"* goal: stall at the swap <= 1 step: **{a['swap_wait_steps']:.2f} steps** "
          f"({'met' if a['swap_wait_steps'] <= 1 else 'not met'}); sync stalls {s['refresh_stall_steps']:.1f} steps",
          "", f"![step times]({png.name})"]
    (out / "results.md").write_text("\n".join(md) + "\n")
    print("\n".join(md))
    return 0


def plot(res: dict, png: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 3.5))
    for name in ("sync", "async"):
        st = res[name]["step_seconds"]
        total = [a + b for a, b in zip(st, res[name]["after_step_seconds"])]
        ax.plot(range(1, len(total) + 1), total, marker=".", label=f"{name}: step + refresh/swap work")
    r, lag = res["refresh_at"], res["async_lag"]
    ax.axvspan(r, r + lag, color="grey", alpha=0.15, label="async encode window")
    ax.set_yscale("log")
    ax.set_xlabel("step")
    ax.set_ylabel("seconds")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(png, dpi=110)
    plt.close(fig)
    return png


if __name__ == "__main__":
    sys.exit(main())
