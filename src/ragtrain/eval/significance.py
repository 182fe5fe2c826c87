"""Paired bootstrap confidence intervals for comparing two systems on the same questions.

Two runs evaluated on the same test questions give per-question scores (EM, F1, recall@k hit, reciprocal rank);
the difference of their means is the effect, and resampling *questions* with replacement (the same resample for
both systems, which keeps the pairing) gives its sampling distribution (Efron & Tibshirani 1993; Koehn 2004 for
MT). The percentile interval of the resampled mean differences is the confidence interval.

    from ragtrain.eval.significance import paired_bootstrap, per_question_scores
    a = per_question_scores(records_a)          # records: ``predictions_test.jsonl`` rows
    b = per_question_scores(records_b)
    ci = paired_bootstrap(a["recall@5"], b["recall@5"])    # {"diff", "low", "high", ...} in the scores' unit
"""

from __future__ import annotations

from typing import Sequence

import numpy as np

from ragtrain.eval.metrics import exact_match, f1_score, max_over_gold

__all__ = ["paired_bootstrap", "per_question_scores", "align"]


def per_question_scores(records: Sequence[dict], ks: Sequence[int] = (1, 5, 20)) -> dict[str, dict[str, float]]:
    """Per-question scores in percent, keyed by metric then question id: ``recall@k`` (100 when a hit is among the
    first k ranks), ``rr`` (100 / rank of the first hit, 0 without one) for every record; ``em`` / ``f1``
    (max over gold answers) for the records that have a generated ``prediction``."""
    out: dict[str, dict[str, float]] = {f"recall@{k}": {} for k in ks}
    out.update({"rr": {}, "em": {}, "f1": {}})
    for r in records:
        qid, hits = str(r["id"]), list(r["hits"])
        for k in ks:
            out[f"recall@{k}"][qid] = 100.0 * bool(any(hits[:k]))
        first = next((i for i, h in enumerate(hits, start=1) if h), None)
        out["rr"][qid] = 100.0 / first if first else 0.0
        if r.get("prediction") is not None:
            out["em"][qid] = 100.0 * max_over_gold(exact_match, r["prediction"], r["answers"])
            out["f1"][qid] = 100.0 * max_over_gold(f1_score, r["prediction"], r["answers"])
    return out


def align(a: dict[str, float], b: dict[str, float]) -> tuple[np.ndarray, np.ndarray]:
    """The scores of the questions both systems have, in one order (sorted ids)."""
    common = sorted(set(a) & set(b))
    return np.array([a[q] for q in common], dtype=np.float64), np.array([b[q] for q in common], dtype=np.float64)


def paired_bootstrap(a: Sequence[float] | np.ndarray, b: Sequence[float] | np.ndarray, *, n_resamples: int = 2000,
                     confidence: float = 0.95, seed: int = 0) -> dict:
    """Mean of ``a - b`` and its percentile bootstrap interval over questions resampled with replacement.

    Returns ``{"n", "diff", "low", "high", "confidence", "resamples", "p_le_0"}`` where ``p_le_0`` is the share of
    resampled differences <= 0 (a one-sided bootstrap p-value for "a is better than b")."""
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    if a.shape != b.shape or a.ndim != 1:
        raise ValueError(f"paired_bootstrap: need two 1-D score arrays of one length, got {a.shape} and {b.shape}")
    if not 0 < confidence < 1:
        raise ValueError(f"paired_bootstrap: confidence must be in (0, 1), got {confidence}")
    if n_resamples < 1:
        raise ValueError(f"paired_bootstrap: n_resamples must be >= 1, got {n_resamples}")
    n = len(a)
    if n == 0:
        return {"n": 0, "diff": None, "low": None, "high": None, "confidence": confidence,
                "resamples": n_resamples, "p_le_0": None}
    d = a - b
    rng = np.random.default_rng(seed)
    means = np.empty(n_resamples)
    for start in range(0, n_resamples, 256):  # chunks keep the index matrix small for large n
        stop = min(start + 256, n_resamples)
        means[start:stop] = d[rng.integers(0, n, size=(stop - start, n))].mean(axis=1)
    alpha = (1 - confidence) / 2
    low, high = np.quantile(means, [alpha, 1 - alpha])
    return {"n": n, "diff": float(d.mean()), "low": float(low), "high": float(high), "confidence": confidence,
            "resamples": n_resamples, "p_le_0": float((means <= 0).mean())}
