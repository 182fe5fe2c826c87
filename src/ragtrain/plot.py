"""Training curves of one run as a picture: ``ragtrain plot runs/x`` -> ``runs/x/curves.png``.

Three panels against the optimizer step: the training loss (``train_log.jsonl``, one row a step), retrieval
(recall@k and MRR) and answers (EM and F1) of every evaluation (``metrics.jsonl``: validation rows as lines, the
final test row as stars). Index refreshes are dotted vertical lines in every panel: a refresh after step s shows
up as the ``index_version`` of ``train_log.jsonl`` rising from row s to row s+1, and as the
``last_refresh_step`` of the metrics rows (which also catches a refresh at the last step). The trainer draws it at
the end of every run (main process; a failure is only a warning).
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from ragtrain.data.errors import DataError


def _rows(path: Path) -> list[dict]:
    if not path.is_file():
        return []
    out = []
    for n, line in enumerate(path.read_text().splitlines(), start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except ValueError:
            raise DataError(f"{path} line {n}: not JSON") from None
        if isinstance(row, dict) and isinstance(row.get("step"), (int, float)):
            out.append(row)
    return out


def refresh_steps(train_log: list[dict], metrics: list[dict]) -> list[int]:
    """Steps after which the index was rebuilt (the initial build at step 0 excluded)."""
    steps = {int(r["last_refresh_step"]) for r in metrics if r.get("last_refresh_step")}
    for prev, cur in zip(train_log, train_log[1:]):
        if cur.get("index_version", 0) > prev.get("index_version", 0):
            steps.add(int(prev["step"]))
    return sorted(s for s in steps if s > 0)


def plot_run(run_dir: str | Path, out_png: str | Path | None = None) -> Path:
    """Draw ``run_dir``'s curves to ``out_png`` (default ``run_dir/curves.png``), atomically; returns the path.

    Raises :class:`DataError` when ``run_dir`` has neither ``train_log.jsonl`` nor ``metrics.jsonl`` rows."""
    run = Path(run_dir)
    if not run.is_dir():
        raise DataError(f"{run}: run folder not found")
    log, metrics = _rows(run / "train_log.jsonl"), _rows(run / "metrics.jsonl")
    if not log and not metrics:
        raise DataError(f"{run}: no train_log.jsonl or metrics.jsonl rows to plot (is it a ragtrain output_dir?)")
    out = Path(out_png) if out_png else run / "curves.png"

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    recall_keys = sorted({k for r in metrics for k in r if k.startswith("recall@")}, key=lambda k: int(k[7:]))
    panels = [("loss", "training loss", [("loss", "loss")]),
              ("retrieval", "retrieval (%)", [(k, k) for k in recall_keys] + [("mrr", "MRR")]),
              ("answers", "answers (%)", [("em", "EM"), ("f1", "F1")])]
    fig, axes = plt.subplots(1, 3, figsize=(15, 4.2), sharex=True)
    refreshes = refresh_steps(log, metrics)
    for ax, (name, ylabel, series) in zip(axes, panels):
        if name == "loss":
            if log:
                ax.plot([r["step"] for r in log], [r["loss"] for r in log], lw=1, label="loss (per step)")
            evals = [r for r in metrics if r.get("split") == "validation" and "loss" in r]
            if evals:  # the running mean since the previous evaluation
                ax.plot([r["step"] for r in evals], [r["loss"] for r in evals], "o-", ms=4, label="mean since last eval")
        else:
            for key, label in series:
                val = [(r["step"], r[key]) for r in metrics if r.get("split") == "validation" and key in r]
                test = [(r["step"], r[key]) for r in metrics if r.get("split") == "test" and key in r]
                line = None
                if val:
                    (line,) = ax.plot([s for s, _ in val], [v for _, v in val], "o-", ms=4, label=f"{label} (validation)")
                if test:
                    ax.plot([s for s, _ in test], [v for _, v in test], "*", ms=13, markeredgecolor="black",
                            markeredgewidth=0.5, color=line.get_color() if line else None, label=f"{label} (test)")
            if not ax.lines:
                ax.text(0.5, 0.5, "no evaluation rows", ha="center", va="center", transform=ax.transAxes)
        for i, s in enumerate(refreshes):
            ax.axvline(s, color="grey", ls=":", lw=1, label="index refresh" if i == 0 else None)
        ax.set_xlabel("optimizer step")
        ax.set_xlim(left=0)
        ax.set_ylabel(ylabel)
        ax.grid(alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=7)
    fig.suptitle(f"ragtrain: {run.resolve().name}")
    fig.tight_layout()
    tmp = out.with_name(f".{out.name}.tmp{os.getpid()}.png")
    try:
        fig.savefig(tmp, dpi=100)
        os.replace(tmp, out)
    finally:
        plt.close(fig)
        tmp.unlink(missing_ok=True)
    return out
