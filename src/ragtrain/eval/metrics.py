"""Evaluation metrics for open-domain QA and dense retrieval.

Answer metrics follow the official SQuAD v1.1 evaluation script (answer normalization, exact match,
token-level F1, each maximised over the gold answers).  Generation metrics wrap ``sacrebleu`` (corpus
BLEU) and ``rouge_score`` (ROUGE-L F-measure) directly -- nothing is fetched from a hub.  Retrieval
metrics (recall@k, MRR) are computed from per-question lists of per-rank "hit" booleans, produced by
:func:`retrieval_hits` either from a gold passage id or, when none is known, from whether a normalized
gold answer occurs in the retrieved passage (the DPR "has answer" criterion).

All aggregate functions (:func:`qa_metrics`, :func:`retrieval_metrics`, :func:`bleu`, :func:`rouge_l`)
return values in percent (0-100); the per-example functions return values in [0, 1].
"""

from __future__ import annotations

import logging
import re
import string
from collections import Counter
from collections.abc import Callable, Sequence
from functools import lru_cache

logger = logging.getLogger(__name__)

__all__ = [
    "normalize_answer",
    "exact_match",
    "f1_score",
    "max_over_gold",
    "answer_in_passage",
    "retrieval_hits",
    "recall_at_k",
    "mrr",
    "bleu",
    "rouge_l",
    "qa_metrics",
    "retrieval_metrics",
]

_PUNCT = frozenset(string.punctuation)
_ARTICLES = re.compile(r"\b(a|an|the)\b")


# --------------------------------------------------------------------------------------------------
# SQuAD answer metrics
# --------------------------------------------------------------------------------------------------
def normalize_answer(s: str) -> str:
    """Official SQuAD v1.1 normalization: lower-case, drop ASCII punctuation, drop the articles
    a/an/the, and collapse whitespace."""
    s = s.lower()
    s = "".join(ch for ch in s if ch not in _PUNCT)
    s = _ARTICLES.sub(" ", s)
    return " ".join(s.split())


def exact_match(prediction: str, gold: str) -> float:
    """1.0 when the normalized prediction equals the normalized gold answer, else 0.0."""
    return float(normalize_answer(prediction) == normalize_answer(gold))


def f1_score(prediction: str, gold: str) -> float:
    """Token-level SQuAD F1 between normalized prediction and gold.

    When either side normalizes to no tokens the score is 1.0 if both are empty and 0.0 otherwise
    (the SQuAD v2.0 convention; the v1.1 script returns 0.0 for empty-vs-empty)."""
    pred_tokens = normalize_answer(prediction).split()
    gold_tokens = normalize_answer(gold).split()
    if not pred_tokens or not gold_tokens:
        return float(pred_tokens == gold_tokens)
    common = Counter(pred_tokens) & Counter(gold_tokens)
    num_same = sum(common.values())
    if num_same == 0:
        return 0.0
    precision = num_same / len(pred_tokens)
    recall = num_same / len(gold_tokens)
    return 2 * precision * recall / (precision + recall)


def max_over_gold(metric: Callable[[str, str], float], prediction: str, golds: Sequence[str]) -> float:
    """``max(metric(prediction, g) for g in golds)``; 0.0 when there are no gold answers."""
    if isinstance(golds, str):  # a bare string would otherwise be iterated character by character
        golds = [golds]
    return max((metric(prediction, g) for g in golds), default=0.0)


# --------------------------------------------------------------------------------------------------
# Retrieval metrics
# --------------------------------------------------------------------------------------------------
def _contains_subsequence(haystack: Sequence[str], needle: Sequence[str]) -> bool:
    n = len(needle)
    if n == 0 or n > len(haystack):
        return False
    first = needle[0]
    for i in range(len(haystack) - n + 1):
        if haystack[i] == first and list(haystack[i : i + n]) == list(needle):
            return True
    return False


def answer_in_passage(passage_text: str, answers: Sequence[str]) -> bool:
    """True when some gold answer, normalized with :func:`normalize_answer`, occurs as a contiguous
    *token sequence* in the normalized passage (whole tokens only: "art" does not match "party").
    Answers that normalize to nothing are ignored."""
    if isinstance(answers, str):
        answers = [answers]
    passage_tokens = normalize_answer(passage_text).split()
    for ans in answers:
        ans_tokens = normalize_answer(ans).split()
        if ans_tokens and _contains_subsequence(passage_tokens, ans_tokens):
            return True
    return False


def retrieval_hits(
    retrieved_ids: Sequence[int],
    retrieved_texts: Sequence[str] | None,
    gold_id: int,
    answers: Sequence[str],
) -> list[bool]:
    """Per-rank hit flags for one question.

    With ``gold_id >= 0`` a rank is a hit when its id equals ``gold_id`` (texts may be ``None``);
    otherwise a rank is a hit when :func:`answer_in_passage` holds for its text."""
    ids = [int(i) for i in retrieved_ids]
    if gold_id is not None and int(gold_id) >= 0:
        return [i == int(gold_id) for i in ids]
    if retrieved_texts is None:
        raise ValueError("retrieval_hits: retrieved_texts are required when gold_id < 0")
    if len(retrieved_texts) != len(ids):
        raise ValueError(
            f"retrieval_hits: {len(ids)} retrieved ids but {len(retrieved_texts)} retrieved texts"
        )
    return [answer_in_passage(t, answers) for t in retrieved_texts]


def recall_at_k(hits_per_question: Sequence[Sequence[bool]], k: int) -> float:
    """Fraction (0-1) of questions with at least one hit among the first ``k`` ranks.
    ``k`` larger than a question's list simply uses the whole list; no questions -> 0.0."""
    if k < 1:
        raise ValueError(f"recall_at_k: k must be >= 1, got {k}")
    if not hits_per_question:
        return 0.0
    return sum(bool(any(h[:k])) for h in hits_per_question) / len(hits_per_question)


def mrr(hits_per_question: Sequence[Sequence[bool]], k: int | None = None) -> float:
    """Mean (0-1) reciprocal rank of the first hit, counting only the first ``k`` ranks when ``k``
    is given; a question with no hit contributes 0.  No questions -> 0.0."""
    if k is not None and k < 1:
        raise ValueError(f"mrr: k must be >= 1 or None, got {k}")
    if not hits_per_question:
        return 0.0
    total = 0.0
    for hits in hits_per_question:
        window = hits if k is None else hits[:k]
        for rank, hit in enumerate(window, start=1):
            if hit:
                total += 1.0 / rank
                break
    return total / len(hits_per_question)


# --------------------------------------------------------------------------------------------------
# Generation metrics
# --------------------------------------------------------------------------------------------------
def _as_reference_lists(references: Sequence[Sequence[str] | str], n: int, who: str) -> list[list[str]]:
    if len(references) != n:
        raise ValueError(f"{who}: {n} predictions but {len(references)} reference lists")
    return [[r] if isinstance(r, str) else list(r) for r in references]


def bleu(predictions: Sequence[str], references: Sequence[Sequence[str]]) -> float:
    """sacrebleu corpus BLEU (default 13a tokenization, exp smoothing) in percent.

    ``references[i]`` is the list of gold strings for ``predictions[i]``; all golds are used.
    Ragged lists are handled by padding sacrebleu's transposed reference streams with ``None``,
    which sacrebleu ignores (variable number of references per segment).  A prediction whose gold
    list is empty is scored against a single empty reference.  No predictions -> 0.0."""
    import sacrebleu

    refs = _as_reference_lists(references, len(predictions), "bleu")
    if not predictions:
        return 0.0
    refs = [r if r else [""] for r in refs]
    n_streams = max(len(r) for r in refs)
    streams: list[list[str | None]] = [
        [r[j] if j < len(r) else None for r in refs] for j in range(n_streams)
    ]
    return float(sacrebleu.corpus_bleu(list(predictions), streams).score)  # type: ignore[arg-type]


@lru_cache(maxsize=4)
def _rouge_scorer(use_stemmer: bool):  # noqa: ANN202 - rouge_score has no type hints
    from rouge_score import rouge_scorer

    return rouge_scorer.RougeScorer(["rougeL"], use_stemmer=use_stemmer)


def rouge_l(
    predictions: Sequence[str], references: Sequence[Sequence[str]], *, use_stemmer: bool = False
) -> float:
    """``rouge_score`` ROUGE-L F-measure, max over each prediction's golds, averaged, in percent.

    Note rouge_score's default tokenizer keeps only ``[a-z0-9]`` tokens (non-Latin text scores 0).
    A prediction with no golds scores 0.  No predictions -> 0.0."""
    refs = _as_reference_lists(references, len(predictions), "rouge_l")
    if not predictions:
        return 0.0
    scorer = _rouge_scorer(use_stemmer)
    total = 0.0
    for pred, golds in zip(predictions, refs):
        if golds:
            total += max(scorer.score(g, pred)["rougeL"].fmeasure for g in golds)
    return 100.0 * total / len(predictions)


# --------------------------------------------------------------------------------------------------
# Aggregates
# --------------------------------------------------------------------------------------------------
def qa_metrics(predictions: Sequence[str], answers: Sequence[Sequence[str]]) -> dict[str, float]:
    """``{"em", "f1", "bleu", "rougeL"}`` in percent; EM/F1 are max-over-gold then averaged."""
    refs = _as_reference_lists(answers, len(predictions), "qa_metrics")
    n = len(predictions)
    if n == 0:
        return {"em": 0.0, "f1": 0.0, "bleu": 0.0, "rougeL": 0.0}
    em = sum(max_over_gold(exact_match, p, g) for p, g in zip(predictions, refs)) / n
    f1 = sum(max_over_gold(f1_score, p, g) for p, g in zip(predictions, refs)) / n
    return {
        "em": 100.0 * em,
        "f1": 100.0 * f1,
        "bleu": bleu(predictions, refs),
        "rougeL": rouge_l(predictions, refs),
    }


def retrieval_metrics(
    hits_per_question: Sequence[Sequence[bool]], ks: Sequence[int] = (1, 5, 20)
) -> dict[str, float]:
    """``{"recall@K": ... for K in ks, "mrr": ...}`` in percent.  MRR uses the full hit lists.
    ``k`` larger than the lists is fine (the whole list is used)."""
    out = {f"recall@{k}": 100.0 * recall_at_k(hits_per_question, k) for k in ks}
    out["mrr"] = 100.0 * mrr(hits_per_question)
    return out
