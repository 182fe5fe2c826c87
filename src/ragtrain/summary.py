"""The end-of-run summary: held-out retrieval (and answer) quality at step 0 and at the end, side by side, with a
paired bootstrap interval on each change, and where every output went.

Step-0 figures exist when the run evaluated its final split before training (``train.eval_at_start``); the per-
question records of both evaluations (``predictions_<split>_step0.jsonl`` and ``predictions_<split>.jsonl``) give
the intervals, so a change within noise is called that.
"""

from __future__ import annotations

import json
from pathlib import Path

from ragtrain.eval.significance import align, paired_bootstrap, per_question_scores


def _rows(path: Path) -> list[dict]:
    if not path.is_file():
        return []
    return [json.loads(x) for x in path.read_text().splitlines() if x.strip()]


def compare(out: Path) -> dict | None:
    """``{"split", "n", "step", "metrics": {name: {"start", "end", "diff", "low", "high"}}}`` or None when the run
    has no step-0 evaluation of its final split."""
    rows = _rows(out / "metrics.jsonl")
    if not rows:
        return None
    final = rows[-1]
    split = final["split"]
    start_recs = _rows(out / f"predictions_{split}_step0.jsonl")
    end_recs = _rows(out / f"predictions_{split}.jsonl")
    if not start_recs or not end_recs:
        return None
    ks = sorted({int(k.split("@")[1]) for k in final if k.startswith("recall@")})
    a, b = per_question_scores(end_recs, ks), per_question_scores(start_recs, ks)
    metrics = {}
    for name in [f"recall@{k}" for k in ks] + ["rr", "em", "f1"]:
        end, start = align(a[name], b[name])
        if not len(end):
            continue
        ci = paired_bootstrap(end, start)
        metrics["mrr" if name == "rr" else name] = {"start": float(start.mean()), "end": float(end.mean()),
                                                     "diff": ci["diff"], "low": ci["low"], "high": ci["high"],
                                                     "n": ci["n"]}
    return {"split": split, "n": len(end_recs), "step": final["step"], "metrics": metrics}


def format_summary(out: Path) -> str:
    out = Path(out)
    lines = [f"ragtrain: run finished -> {out}"]
    cmp = compare(out)
    if cmp:
        lines.append(f"held-out {cmp['split']} split ({cmp['n']} questions, never trained on), step 0 -> step "
                     f"{cmp['step']}; change with its 95% paired-bootstrap interval:")
        lines.append(f"  {'metric':<10} {'step 0':>7} {'end':>7}  {'change':>7}  95% CI")
        for name, m in cmp["metrics"].items():
            lines.append(f"  {name:<10} {m['start']:7.1f} {m['end']:7.1f}  {m['diff']:+7.1f}  "
                         f"[{m['low']:+.1f}, {m['high']:+.1f}]" + (f"  (n={m['n']})" if m["n"] != cmp["n"] else ""))
        retrieval = [m for k, m in cmp["metrics"].items() if k.startswith("recall@") or k == "mrr"]
        up = [k for k, m in cmp["metrics"].items() if (k.startswith("recall@") or k == "mrr") and m["low"] > 0]
        down = [k for k, m in cmp["metrics"].items() if (k.startswith("recall@") or k == "mrr") and m["high"] < 0]
        if up:
            lines.append(f"  retrieval improved beyond noise on {', '.join(up)}")
        elif down:
            lines.append(f"  retrieval got worse beyond noise on {', '.join(down)}")
        elif retrieval:
            lines.append(f"  every retrieval change is within noise at this size ({cmp['n']} questions): "
                         "the intervals contain 0")
    else:
        rows = _rows(out / "metrics.jsonl")
        if rows:
            last = rows[-1]
            shown = {k: round(v, 1) for k, v in last.items() if k.startswith("recall@") or k in ("mrr", "em", "f1")}
            lines.append(f"final {last['split']} evaluation at step {last['step']}: {shown} "
                         "(train.eval_at_start=true adds step-0 figures to compare with)")
    described = [("metrics.jsonl", "every evaluation"), ("train_log.jsonl", "loss per step"), ("tensorboard", ""),
                 ("curves.png", ""), ("final", "the three models + the index they encode"),
                 ("checkpoints", "resumable"), ("index", "index versions"), ("splits", "the evaluated questions")]
    present = [f"{name}{'/' if (out / name).is_dir() else ''}" + (f" ({what})" if what else "")
               for name, what in described if (out / name).exists()]
    lines.append(f"outputs in {out}: " + ", ".join(present))
    lines.append(f"next: .venv/bin/ragtrain ask --checkpoint {out / 'final'} \"your question\"   |   "
                 f".venv/bin/ragtrain eval --checkpoint {out / 'final'} --data {out / 'splits' / 'test.jsonl'}")
    return "\n".join(lines)
