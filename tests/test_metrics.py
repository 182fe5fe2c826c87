"""Tests for ragtrain.eval.metrics."""

from __future__ import annotations

import math

import pytest

from ragtrain.eval.metrics import (
    answer_in_passage,
    bleu,
    exact_match,
    f1_score,
    max_over_gold,
    mrr,
    normalize_answer,
    qa_metrics,
    recall_at_k,
    retrieval_hits,
    retrieval_metrics,
    rouge_l,
)


def test_normalize_answer_squad():
    assert normalize_answer("The Eiffel Tower!") == "eiffel tower"
    assert normalize_answer("  An   apple, a day. ") == "apple day"
    assert normalize_answer("theater") == "theater"  # article removal is whole-word only


def test_exact_match():
    assert exact_match("The Eiffel Tower!", "eiffel tower") == 1.0
    assert exact_match("Eiffel", "eiffel tower") == 0.0
    assert exact_match("", "") == 1.0


def test_f1_partial_overlap_by_hand():
    # pred tokens: [barack, obama, jr] ; gold tokens: [obama]  -> P = 1/3, R = 1, F1 = 0.5
    assert f1_score("Barack Obama Jr.", "Obama") == pytest.approx(0.5)
    # pred [new, york, city], gold [new, york] -> P = 2/3, R = 1 -> F1 = 0.8
    assert f1_score("New York City", "the New York") == pytest.approx(0.8)
    # repeated tokens count with multiplicity: pred [a1 a1], gold [a1] -> P=1/2, R=1 -> 2/3
    assert f1_score("paris paris", "paris") == pytest.approx(2 / 3)
    assert f1_score("london", "paris") == 0.0
    assert f1_score("", "") == 1.0
    assert f1_score("the", "paris") == 0.0


def test_max_over_gold():
    golds = ["Paris", "City of Paris", "London"]
    assert max_over_gold(exact_match, "paris", golds) == 1.0
    assert max_over_gold(f1_score, "city paris france", golds) == pytest.approx(
        max(f1_score("city paris france", g) for g in golds)
    )
    assert max_over_gold(exact_match, "x", []) == 0.0
    assert max_over_gold(exact_match, "paris", "Paris") == 1.0  # bare string treated as one gold


def test_answer_in_passage_token_sequence():
    p = "The Eiffel Tower, located in Paris, was completed in 1889."
    assert answer_in_passage(p, ["eiffel tower"])
    assert answer_in_passage(p, ["nope", "1889"])
    assert not answer_in_passage(p, ["tower eiffel"])
    assert not answer_in_passage(p, ["par"])  # whole tokens only
    assert not answer_in_passage(p, ["the", ""])  # normalizes to nothing -> ignored


def test_retrieval_hits():
    assert retrieval_hits([3, 7, 9], None, 7, []) == [False, True, False]
    texts = ["nothing here", "the answer is Paris", "paris again"]
    assert retrieval_hits([1, 2, 3], texts, -1, ["Paris"]) == [False, True, True]
    with pytest.raises(ValueError):
        retrieval_hits([1, 2], ["a"], -1, ["a"])


HITS = [
    [True, False, False],   # first hit rank 1
    [False, False, True],   # rank 3
    [False, False, False],  # none
    [False, True],          # rank 2 (shorter list)
]


def test_recall_at_k_by_hand():
    assert recall_at_k(HITS, 1) == pytest.approx(1 / 4)
    assert recall_at_k(HITS, 2) == pytest.approx(2 / 4)
    assert recall_at_k(HITS, 3) == pytest.approx(3 / 4)
    assert recall_at_k(HITS, 100) == pytest.approx(3 / 4)
    assert recall_at_k([], 5) == 0.0
    with pytest.raises(ValueError):
        recall_at_k(HITS, 0)


def test_mrr_by_hand():
    assert mrr(HITS) == pytest.approx((1 + 1 / 3 + 0 + 1 / 2) / 4)
    assert mrr(HITS, k=2) == pytest.approx((1 + 0 + 0 + 1 / 2) / 4)
    assert mrr([]) == 0.0


def test_retrieval_metrics_percent():
    out = retrieval_metrics(HITS, ks=(1, 5, 20))
    assert set(out) == {"recall@1", "recall@5", "recall@20", "mrr"}
    assert out["recall@1"] == pytest.approx(25.0)
    assert out["recall@5"] == pytest.approx(75.0)
    assert out["recall@20"] == pytest.approx(75.0)
    assert out["mrr"] == pytest.approx(100 * (1 + 1 / 3 + 1 / 2) / 4)


def test_bleu_identical_is_100():
    preds = ["the quick brown fox jumps over the lazy dog", "a stitch in time saves nine"]
    assert bleu(preds, [[p] for p in preds]) == pytest.approx(100.0)


def test_bleu_ragged_references():
    preds = ["the quick brown fox jumps over the lazy dog", "a stitch in time saves nine"]
    refs = [["the quick brown fox jumps over the lazy dog"], ["something else entirely", preds[1], "x y z"]]
    assert bleu(preds, refs) == pytest.approx(100.0)
    assert bleu(["completely unrelated words here"], [["the quick brown fox jumps"]]) < 10.0
    assert bleu([], []) == 0.0
    with pytest.raises(ValueError):
        bleu(["a"], [])


def test_rouge_l():
    assert rouge_l(["the cat sat on the mat"], [["the cat sat on the mat"]]) == pytest.approx(100.0)
    # max over golds
    assert rouge_l(["the cat"], [["dog", "the cat"]]) == pytest.approx(100.0)
    # LCS("a b c d", "a c") = 2 -> P = 2/4, R = 2/2 -> F = 2/3; averaged with a perfect example
    assert rouge_l(["a b c d", "x"], [["a c"], ["x"]]) == pytest.approx(100 * (2 / 3 + 1) / 2)


def test_qa_metrics():
    preds = ["The Eiffel Tower!", "Barack Obama Jr."]
    answers = [["eiffel tower", "paris"], ["Obama"]]
    out = qa_metrics(preds, answers)
    assert set(out) == {"em", "f1", "bleu", "rougeL"}
    assert out["em"] == pytest.approx(50.0)
    assert out["f1"] == pytest.approx(75.0)
    assert 0.0 <= out["bleu"] <= 100.0 and 0.0 <= out["rougeL"] <= 100.0
    assert all(math.isfinite(v) for v in out.values())
    assert qa_metrics([], []) == {"em": 0.0, "f1": 0.0, "bleu": 0.0, "rougeL": 0.0}
