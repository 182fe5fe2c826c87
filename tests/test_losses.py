"""RAG-Sequence / RAG-Token marginal NLLs and the contrastive retrieval loss against direct computations."""

from __future__ import annotations

import math

import pytest
import torch

from ragtrain.model.losses import contrastive_retrieval_loss, rag_nll, rag_sequence_nll, rag_token_nll

B, K, T = 2, 3, 4


def _inputs(dtype=torch.float64, seed=0):
    g = torch.Generator().manual_seed(seed)
    # log-probabilities of real tokens: log of values in (0.05, 0.95)
    token_logprobs = torch.log(torch.rand(B, K, T, generator=g, dtype=dtype) * 0.9 + 0.05)
    target_mask = torch.tensor([[1, 1, 1, 1], [1, 1, 0, 0]])
    # garbage (finite, large) where masked: it must not influence anything
    token_logprobs[1, :, 2] = 7.5
    token_logprobs[1, :, 3] = -60.0
    doc_scores = torch.randn(B, K, generator=g, dtype=dtype) * 2.0
    return token_logprobs, target_mask, doc_scores


def _softmax_py(row):
    m = max(row)
    e = [math.exp(x - m) for x in row]
    s = sum(e)
    return [x / s for x in e]


def direct_sequence_nll(token_logprobs, target_mask, doc_scores):
    """-log(sum_z p(z|x) prod_t p_t), with explicit loops in probability space."""
    out = []
    for b in range(token_logprobs.shape[0]):
        pz = _softmax_py(doc_scores[b].tolist())
        total = 0.0
        for z in range(token_logprobs.shape[1]):
            prod = 1.0
            for t in range(token_logprobs.shape[2]):
                if target_mask[b, t]:
                    prod *= math.exp(token_logprobs[b, z, t].item())
            total += pz[z] * prod
        out.append(-math.log(total))
    return torch.tensor(out, dtype=torch.float64)


def direct_token_nll(token_logprobs, target_mask, doc_scores):
    """-sum_t log(sum_z p(z|x) p_{z,t}), with explicit loops in probability space."""
    out = []
    for b in range(token_logprobs.shape[0]):
        pz = _softmax_py(doc_scores[b].tolist())
        nll = 0.0
        for t in range(token_logprobs.shape[2]):
            if not target_mask[b, t]:
                continue
            marg = sum(pz[z] * math.exp(token_logprobs[b, z, t].item()) for z in range(token_logprobs.shape[1]))
            nll -= math.log(marg)
        out.append(nll)
    return torch.tensor(out, dtype=torch.float64)


# differentiable direct formulas (probability space, no logsumexp) for gradient comparisons
def torch_direct_sequence(token_logprobs, target_mask, doc_scores):
    pz = torch.exp(doc_scores) / torch.exp(doc_scores).sum(-1, keepdim=True)
    rows = []
    for b in range(token_logprobs.shape[0]):
        total = 0.0
        for z in range(token_logprobs.shape[1]):
            prod = 1.0
            for t in range(token_logprobs.shape[2]):
                if target_mask[b, t]:
                    prod = prod * torch.exp(token_logprobs[b, z, t])
            total = total + pz[b, z] * prod
        rows.append(-torch.log(total))
    return torch.stack(rows)


def torch_direct_token(token_logprobs, target_mask, doc_scores):
    pz = torch.exp(doc_scores) / torch.exp(doc_scores).sum(-1, keepdim=True)
    rows = []
    for b in range(token_logprobs.shape[0]):
        nll = 0.0
        for t in range(token_logprobs.shape[2]):
            if target_mask[b, t]:
                marg = sum(pz[b, z] * torch.exp(token_logprobs[b, z, t]) for z in range(token_logprobs.shape[1]))
                nll = nll - torch.log(marg)
        rows.append(nll)
    return torch.stack(rows)


# ------------------------------------------------------------------------------------------------ values
def test_sequence_nll_matches_direct_probability_space():
    lp, mask, scores = _inputs()
    got = rag_sequence_nll(lp, mask, scores)
    assert got.shape == (B,)
    torch.testing.assert_close(got.double(), direct_sequence_nll(lp, mask, scores), rtol=1e-10, atol=1e-10)


def test_token_nll_matches_direct_probability_space():
    lp, mask, scores = _inputs()
    got = rag_token_nll(lp, mask, scores)
    assert got.shape == (B,)
    torch.testing.assert_close(got.double(), direct_token_nll(lp, mask, scores), rtol=1e-10, atol=1e-10)


def test_sequence_and_token_differ_when_passages_disagree():
    # the two objectives are different functions of the same inputs
    lp, mask, scores = _inputs()
    assert not torch.allclose(rag_sequence_nll(lp, mask, scores), rag_token_nll(lp, mask, scores))


def test_float32_inputs_match_direct():
    lp, mask, scores = _inputs(torch.float32, seed=3)
    torch.testing.assert_close(rag_sequence_nll(lp, mask, scores).double(),
                               direct_sequence_nll(lp, mask, scores), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(rag_token_nll(lp, mask, scores).double(),
                               direct_token_nll(lp, mask, scores), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("fn", [rag_sequence_nll, rag_token_nll])
def test_masked_positions_ignored(fn):
    lp, mask, scores = _inputs()
    base = fn(lp, mask, scores)
    lp2 = lp.clone()
    lp2[1, :, 2:] = torch.tensor([[-3.0, 11.0], [0.5, -200.0], [42.0, -1.0]], dtype=lp.dtype)
    torch.testing.assert_close(fn(lp2, mask, scores), base, rtol=0, atol=1e-12)
    # and unmasking changes the result (the mask is actually used)
    assert not torch.allclose(fn(lp, torch.ones_like(mask), scores), base)


@pytest.mark.parametrize("fn", [rag_sequence_nll, rag_token_nll])
def test_single_passage_reduces_to_plain_nll(fn):
    lp, mask, _ = _inputs()
    lp1 = lp[:, :1]
    scores1 = torch.tensor([[0.7], [-4.0]], dtype=torch.float64)
    expected = -(lp1[:, 0] * mask).sum(-1)
    torch.testing.assert_close(fn(lp1, mask, scores1), expected, rtol=1e-12, atol=1e-12)


def test_rag_nll_dispatch_and_shape_checks():
    lp, mask, scores = _inputs()
    torch.testing.assert_close(rag_nll("sequence", lp, mask, scores), rag_sequence_nll(lp, mask, scores))
    torch.testing.assert_close(rag_nll("token", lp, mask, scores), rag_token_nll(lp, mask, scores))
    with pytest.raises(ValueError):
        rag_nll("tokens", lp, mask, scores)
    with pytest.raises(ValueError):
        rag_sequence_nll(lp, mask[:, :3], scores)
    with pytest.raises(ValueError):
        rag_token_nll(lp, mask, scores[:, :2])


# --------------------------------------------------------------------------------------------- gradients
@pytest.mark.parametrize("fn,direct", [(rag_sequence_nll, torch_direct_sequence), (rag_token_nll, torch_direct_token)])
def test_gradients_match_direct_formula(fn, direct):
    lp, mask, scores = _inputs()
    s1, l1 = scores.clone().requires_grad_(), lp.clone().requires_grad_()
    s2, l2 = scores.clone().requires_grad_(), lp.clone().requires_grad_()
    w = torch.tensor([1.0, 2.5], dtype=torch.float64)  # weight questions differently
    (fn(l1, mask, s1) * w).sum().backward()
    (direct(l2, mask, s2) * w).sum().backward()
    torch.testing.assert_close(s1.grad, s2.grad, rtol=1e-9, atol=1e-10)
    torch.testing.assert_close(l1.grad, l2.grad, rtol=1e-9, atol=1e-10)
    assert s1.grad.abs().sum() > 0  # the retriever gets a learning signal
    assert torch.all(l1.grad[1, :, 2:] == 0)  # masked tokens get none


@pytest.mark.parametrize("fn", [rag_sequence_nll, rag_token_nll])
def test_gradcheck_float64(fn):
    lp, mask, scores = _inputs()
    scores = scores.clone().requires_grad_()
    lp = lp.clone().requires_grad_()
    assert torch.autograd.gradcheck(lambda s, l: fn(l, mask, s), (scores, lp))


# -------------------------------------------------------------------------------------- retrieval loss
def _direct_ce(q, cands, row, gold_col, excluded_cols, temperature=1.0):
    logits = {j: sum(a * b for a, b in zip(q[row], cands[j])) / temperature for j in range(len(cands))
              if j not in excluded_cols}
    m = max(logits.values())
    lse = m + math.log(sum(math.exp(v - m) for v in logits.values()))
    return lse - logits[gold_col]


def test_contrastive_matches_direct_cross_entropy():
    g = torch.Generator().manual_seed(1)
    q = torch.randn(3, 4, generator=g, dtype=torch.float64)
    cands = torch.randn(5, 4, generator=g, dtype=torch.float64)  # 3 golds + 2 negatives
    ids = torch.tensor([10, 11, 12, 20, 21])
    gold = torch.tensor([10, 11, 12])
    got = contrastive_retrieval_loss(q, cands, ids, gold, temperature=0.5)
    ql, cl = q.tolist(), cands.tolist()
    expected = sum(_direct_ce(ql, cl, i, i, set(), 0.5) for i in range(3)) / 3
    assert got.item() == pytest.approx(expected, rel=1e-5)


def test_contrastive_excludes_rows_without_gold():
    g = torch.Generator().manual_seed(2)
    q = torch.randn(3, 4, generator=g, dtype=torch.float64)
    cands = torch.randn(5, 4, generator=g, dtype=torch.float64)
    ids = torch.tensor([10, -1, 12, 20, 21])
    gold = torch.tensor([10, -1, 12])
    got = contrastive_retrieval_loss(q, cands, ids, gold)
    ql, cl = q.tolist(), cands.tolist()
    # row 1 has no gold: left out of the mean; its placeholder column (id -1) is not a negative either
    expected = (_direct_ce(ql, cl, 0, 0, {1}) + _direct_ce(ql, cl, 2, 2, {1})) / 2
    assert got.item() == pytest.approx(expected, rel=1e-5)
    # changing the row without gold (query and placeholder candidate) changes nothing
    q2, c2 = q.clone(), cands.clone()
    q2[1] += 5.0
    c2[1] -= 3.0
    assert contrastive_retrieval_loss(q2, c2, ids, gold).item() == pytest.approx(got.item(), rel=1e-9)


def test_contrastive_masks_duplicate_of_gold():
    g = torch.Generator().manual_seed(3)
    q = torch.randn(2, 4, generator=g, dtype=torch.float64)
    cands = torch.randn(5, 4, generator=g, dtype=torch.float64)
    # column 3 is a retrieved copy of question 0's gold (id 10); column 4 another question's gold id 11
    ids = torch.tensor([10, 11, 10, 11, 30])
    gold = torch.tensor([10, 11])
    got = contrastive_retrieval_loss(q, cands, ids, gold)
    ql, cl = q.tolist(), cands.tolist()
    expected = (_direct_ce(ql, cl, 0, 0, {2}) + _direct_ce(ql, cl, 1, 1, {3})) / 2
    assert got.item() == pytest.approx(expected, rel=1e-5)
    # one question: a duplicate of its gold scoring far above it is not a negative
    c1 = torch.stack([cands[0], q[0] * 100, cands[4]])
    one = contrastive_retrieval_loss(q[:1], c1, torch.tensor([10, 10, 30]), gold[:1])
    assert one.item() == pytest.approx(_direct_ce(ql, c1.tolist(), 0, 0, {1}), rel=1e-5)
    assert one.item() < 50


def test_contrastive_two_questions_same_gold():
    g = torch.Generator().manual_seed(4)
    q = torch.randn(2, 4, generator=g, dtype=torch.float64)
    cands = torch.randn(3, 4, generator=g, dtype=torch.float64)
    ids = torch.tensor([7, 7, 9])
    gold = torch.tensor([7, 7])
    got = contrastive_retrieval_loss(q, cands, ids, gold)
    ql, cl = q.tolist(), cands.tolist()
    expected = (_direct_ce(ql, cl, 0, 0, {1}) + _direct_ce(ql, cl, 1, 1, {0})) / 2
    assert got.item() == pytest.approx(expected, rel=1e-5)


def test_contrastive_no_gold_is_zero_with_grad():
    q = torch.randn(2, 4, requires_grad=True)
    loss = contrastive_retrieval_loss(q, torch.randn(3, 4), torch.tensor([-1, -1, 5]), torch.tensor([-1, -1]))
    assert loss.item() == 0.0
    loss.backward()
    assert torch.all(q.grad == 0)


def test_contrastive_gradient_matches_direct():
    g = torch.Generator().manual_seed(5)
    q = torch.randn(2, 3, generator=g, dtype=torch.float64, requires_grad=True)
    cands = torch.randn(4, 3, generator=g, dtype=torch.float64, requires_grad=True)
    ids = torch.tensor([1, 2, 1, 3])
    gold = torch.tensor([1, 2])
    contrastive_retrieval_loss(q, cands, ids, gold, temperature=2.0).backward()
    q2, c2 = q.detach().clone().requires_grad_(), cands.detach().clone().requires_grad_()
    logits = q2 @ c2.T / 2.0
    l0 = torch.logsumexp(logits[0, [0, 1, 3]], 0) - logits[0, 0]  # column 2 duplicates gold 1
    l1 = torch.logsumexp(logits[1, [0, 1, 2, 3]], 0) - logits[1, 1]
    ((l0 + l1) / 2).backward()
    torch.testing.assert_close(q.grad, q2.grad, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(cands.grad, c2.grad, rtol=1e-5, atol=1e-6)
