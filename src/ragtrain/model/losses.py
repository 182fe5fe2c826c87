"""RAG objectives (Lewis et al., 2020) and the optional retrieval loss.

Notation: ``B`` questions, ``K`` retrieved passages each, ``T`` answer tokens.

* RAG-Sequence:  p(y|x) = sum_z p(z|x) prod_t p(y_t | x, z, y_<t)
* RAG-Token:     p(y|x) = prod_t sum_z p(z|x) p(y_t | x, z, y_<t)

with p(z|x) = softmax over the K passages of the question.passage scores.  Both are computed in log space
with ``logsumexp``; the gradient of p(z|x) is what trains the retriever.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def _check(token_logprobs: torch.Tensor, target_mask: torch.Tensor, doc_scores: torch.Tensor) -> None:
    b, k, t = token_logprobs.shape
    if target_mask.shape != (b, t) or doc_scores.shape != (b, k):
        raise ValueError(f"shape mismatch: token_logprobs {tuple(token_logprobs.shape)}, "
                         f"target_mask {tuple(target_mask.shape)}, doc_scores {tuple(doc_scores.shape)}")


def _upcast(x: torch.Tensor) -> torch.Tensor:
    """Half precision -> float32; float32/float64 kept (``.float()`` would silently round float64)."""
    return x.to(torch.promote_types(x.dtype, torch.float32))


def rag_sequence_nll(token_logprobs: torch.Tensor, target_mask: torch.Tensor, doc_scores: torch.Tensor) -> torch.Tensor:
    """``token_logprobs`` (B, K, T), ``target_mask`` (B, T), ``doc_scores`` (B, K) -> per-question NLL (B,)."""
    _check(token_logprobs, target_mask, doc_scores)
    mask = target_mask.unsqueeze(1).to(token_logprobs.dtype)
    seq_logprob = (token_logprobs * mask).sum(-1)  # (B, K)
    doc_logprob = F.log_softmax(_upcast(doc_scores), dim=-1)
    return -torch.logsumexp(seq_logprob + doc_logprob, dim=-1)


def rag_token_nll(token_logprobs: torch.Tensor, target_mask: torch.Tensor, doc_scores: torch.Tensor) -> torch.Tensor:
    """RAG-Token: marginalise over passages at every answer token, then sum over tokens -> (B,)."""
    _check(token_logprobs, target_mask, doc_scores)
    doc_logprob = F.log_softmax(_upcast(doc_scores), dim=-1)
    token_marginal = torch.logsumexp(token_logprobs + doc_logprob.unsqueeze(-1), dim=1)  # (B, T)
    return -(token_marginal * target_mask.to(token_marginal.dtype)).sum(-1)


def rag_nll(loss_type: str, token_logprobs: torch.Tensor, target_mask: torch.Tensor,
            doc_scores: torch.Tensor) -> torch.Tensor:
    if loss_type == "sequence":
        return rag_sequence_nll(token_logprobs, target_mask, doc_scores)
    if loss_type == "token":
        return rag_token_nll(token_logprobs, target_mask, doc_scores)
    raise ValueError(f"unknown loss_type {loss_type!r}")


def contrastive_retrieval_loss(queries: torch.Tensor, candidates: torch.Tensor, candidate_ids: torch.Tensor,
                               gold_ids: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """In-batch contrastive (DPR-style) loss against the gold passages.

    ``queries`` (B, d); ``candidates`` (C, d) whose first B rows are the gold passages of the B questions (in
    order) and the rest extra negatives (e.g. the retrieved passages); ``candidate_ids`` (C,) their KB ids;
    ``gold_ids`` (B,) with -1 where the gold passage is unknown (those questions are left out).  A candidate
    that *is* a question's gold passage under another column (same KB id) is masked, so duplicates are never
    counted as negatives; nor is a candidate with a negative id (the placeholder gold of a question without
    one, FAISS's -1 padding).  Returns the mean cross-entropy, or 0 when no question has a gold passage.
    """
    b = queries.shape[0]
    valid = gold_ids >= 0
    if not bool(valid.any()):
        return queries.sum() * 0.0
    logits = (queries @ candidates.T).float() / temperature  # (B, C)
    labels = torch.arange(b, device=queries.device)
    same = candidate_ids.unsqueeze(0) == gold_ids.unsqueeze(1)  # (B, C)
    same |= (candidate_ids < 0).unsqueeze(0)  # placeholders (unknown gold, FAISS -1 padding) are no negatives
    same[labels, labels] = False
    logits = logits.masked_fill(same, float("-inf"))
    return F.cross_entropy(logits[valid], labels[valid])
