"""Answer decoding with the trained model's own posterior p(z|x) (Lewis et al., 2020, section 2.4).

p(z|x) is the distribution the loss marginalised over: ``softmax_z(q . c_z / rag.retrieval_temperature)`` over
the top-K retrieved passages, with ``c_z`` the *live* context encoder's vector of passage z in the modes that
train it (end2end, retriever_only) and the index's stored vector otherwise (original, generator_only) -- the same
vectors :meth:`RagModel.forward` uses.  With ``index.retriever=bm25`` or ``hybrid``, BM25 (or the fused ranking)
only chooses *which* K passages enter; p(z|x) over them is still the dense score above, as in training.

Decoders (``eval.decoding``):

* ``fast`` (RAG-Sequence "fast decoding"): one candidate per passage (greedy or beam search with that passage
  alone); candidate y scores ``sum over the passages z that produced y of p(z|x) p(y|x,z)`` (p(y|x,z) of a
  passage that did not produce y is taken as 0), and the best-scoring *string* wins.
* ``thorough`` (RAG-Sequence "thorough decoding"): the same candidates, each re-scored under every passage:
  ``p(y|x) = sum_z p(z|x) p(y|x,z)``.  K times the rescoring work of ``fast``.
* ``token`` (RAG-Token): greedy decoding of the per-token marginal ``sum_z p(z|x) p(y_t|x,z,y_<t)``
  (:meth:`ragtrain.model.generator.Generator.generate_marginal`).
* ``auto``: ``token`` for ``rag.loss_type=token``, ``fast`` for ``sequence``.
"""

from __future__ import annotations

from typing import Sequence

import torch

DECODINGS = ("auto", "fast", "thorough", "token")


def resolve_decoding(decoding: str, loss_type: str) -> str:
    if decoding not in DECODINGS:
        raise ValueError(f"unknown decoding {decoding!r} (choose from {', '.join(DECODINGS)})")
    if decoding == "auto":
        return "token" if loss_type == "token" else "fast"
    return decoding


def pick_fast(candidates: Sequence[str], seq_logprobs: torch.Tensor, doc_logprobs: torch.Tensor) -> list[int]:
    """RAG-Sequence fast decoding.  ``candidates`` (B*K, b-major): the answer generated from each passage;
    ``seq_logprobs`` (B, K): log p(y_bk | x_b, z_bk) of each candidate under its own passage; ``doc_logprobs``
    (B, K): log p(z|x).  Returns, per question, the index (into ``candidates``) of the first row holding the
    answer string with the largest ``logsumexp`` of ``doc_logprobs + seq_logprobs`` over the rows that produced
    it."""
    b, k = doc_logprobs.shape
    joint = (seq_logprobs.float() + doc_logprobs.float()).cpu()
    best = []
    for i in range(b):
        groups: dict[str, list[int]] = {}
        for j in range(k):
            groups.setdefault(candidates[i * k + j], []).append(j)
        scored = [(torch.logsumexp(joint[i, rows], 0).item(), rows[0]) for rows in groups.values()]
        best.append(i * k + max(scored, key=lambda s: s[0])[1])  # max keeps the first of equal scores
    return best


def unique_candidates(candidates: Sequence[str], k: int) -> list[list[str]]:
    """Per question, its K candidates without repeats, in order of first appearance."""
    return [list(dict.fromkeys(candidates[i: i + k])) for i in range(0, len(candidates), k)]


def pick_thorough(seq_logprobs: torch.Tensor, doc_logprobs: torch.Tensor, sizes: Sequence[int]) -> list[int]:
    """RAG-Sequence thorough decoding.  ``seq_logprobs`` (sum(sizes), K): log p(y|x,z) of question b's
    ``sizes[b]`` distinct candidates under each of its K passages (question-major); ``doc_logprobs`` (B, K).
    Returns per question the index, within its own candidates, of ``argmax_y logsumexp_z(log p(z|x) +
    log p(y|x,z))``."""
    rows = torch.repeat_interleave(torch.arange(len(sizes)), torch.as_tensor(list(sizes)))
    marginal = torch.logsumexp(seq_logprobs.float().cpu() + doc_logprobs.float().cpu()[rows], dim=-1)
    out, start = [], 0
    for m in sizes:
        out.append(int(marginal[start: start + m].argmax()))
        start += m
    return out
