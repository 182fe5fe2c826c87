"""Paired bootstrap intervals (ragtrain.eval.significance) against cases with a known answer."""

from __future__ import annotations

import numpy as np
import pytest

from ragtrain.eval.significance import align, paired_bootstrap, per_question_scores


def test_identical_arms_give_an_interval_at_zero():
    a = np.random.default_rng(1).integers(0, 2, 300) * 100.0
    ci = paired_bootstrap(a, a.copy(), n_resamples=1000)
    assert ci["diff"] == 0 and ci["low"] == 0 and ci["high"] == 0 and ci["p_le_0"] == 1.0


def test_constant_shift_gives_an_interval_around_it():
    a = np.random.default_rng(2).normal(50, 20, 400)
    ci = paired_bootstrap(a + 5.0, a, n_resamples=1000)
    assert ci["diff"] == pytest.approx(5.0) and ci["low"] == pytest.approx(5.0) and ci["high"] == pytest.approx(5.0)
    assert ci["p_le_0"] == 0.0


def test_noisy_difference_interval_matches_the_normal_approximation():
    rng = np.random.default_rng(3)
    n = 2000
    a, b = rng.integers(0, 2, n) * 100.0, rng.integers(0, 2, n) * 100.0
    ci = paired_bootstrap(a, b, n_resamples=4000, seed=0)
    d = a - b
    se = d.std(ddof=1) / np.sqrt(n)
    assert ci["low"] < d.mean() < ci["high"]
    assert ci["high"] - ci["low"] == pytest.approx(2 * 1.96 * se, rel=0.1)  # width of a 95% interval
    assert ci["n"] == n and ci["resamples"] == 4000


def test_pairing_is_kept():
    """Large per-question variation shared by both arms cancels: a paired interval is narrow, an unpaired one not."""
    base = np.random.default_rng(4).normal(0, 100, 500)
    ci = paired_bootstrap(base + 1.0, base, n_resamples=500)
    assert ci["high"] - ci["low"] < 1e-9


def test_bad_input_is_rejected():
    with pytest.raises(ValueError, match="one length"):
        paired_bootstrap([1.0, 2.0], [1.0])
    with pytest.raises(ValueError, match="confidence"):
        paired_bootstrap([1.0], [1.0], confidence=1.5)
    assert paired_bootstrap([], [])["diff"] is None


def test_per_question_scores_and_align():
    records = [
        {"id": "a", "hits": [False, True, False], "prediction": "the Blue lagoon", "answers": ["Blue Lagoon", "x"]},
        {"id": "b", "hits": [False, False, False], "prediction": None, "answers": ["y"]},
        {"id": "c", "hits": [True, False, False], "prediction": "red house", "answers": ["red car"]},
    ]
    s = per_question_scores(records, ks=(1, 2))
    assert s["recall@1"] == {"a": 0.0, "b": 0.0, "c": 100.0} and s["recall@2"]["a"] == 100.0
    assert s["rr"] == {"a": 50.0, "b": 0.0, "c": 100.0}
    assert s["em"] == {"a": 100.0, "c": 0.0}  # no prediction -> not scored
    assert s["f1"]["c"] == pytest.approx(50.0)
    xa, xb = align({"q1": 1.0, "q2": 2.0, "q3": 3.0}, {"q3": 30.0, "q1": 10.0})
    assert xa.tolist() == [1.0, 3.0] and xb.tolist() == [10.0, 30.0]
