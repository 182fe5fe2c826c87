"""The Hugging Face end-to-end RAG baseline (benchmarks/hf_rag_baseline.py) at toy size on CPU, offline."""

import math
import os
import random
import sys
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

import pytest  # noqa: E402

torch = pytest.importorskip("torch")
pytest.importorskip("faiss")
pytest.importorskip("datasets")

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.hf_rag_baseline import (  # noqa: E402
    HFTokenizers,
    TinySizes,
    build_hf_rag_e2e,
    hf_train_step,
    load_tokenizers,
    padding_share,
    retrieve,
    time_hf_steps,
)

WORDS = (
    "river mountain city king queen war peace music art science paris london rome berlin tower bridge castle "
    "empire ocean forest desert island harbor temple library painter poet treaty battle railway"
).split()
N_DOCS = 4
QUESTIONS = ["where is the tower bridge?", "which king signed the treaty?", "who painted the temple?"]
ANSWERS = ["london", "the king of rome", "a poet"]


def _passages(n=16, words=40, seed=0):
    rng = random.Random(seed)
    return [{"title": f"Article {i}", "text": " ".join(rng.choice(WORDS) for _ in range(words))} for i in range(n)]


@pytest.fixture(scope="module")
def setup():
    return build_hf_rag_e2e(
        _passages(),
        None,
        TinySizes(hidden=32, layers=1, heads=2, ffn=64),
        n_docs=N_DOCS,
        seed=0,
        index_type="flat",
    )


def test_retriever_returns_n_docs_padded_to_max_combined_length(setup):
    out = retrieve(setup, QUESTIONS)
    b = len(QUESTIONS)
    assert tuple(out["doc_ids"].shape) == (b, N_DOCS)
    for row in out["doc_ids"].tolist():
        assert len(set(row)) == N_DOCS and all(0 <= i < len(setup.dataset) for i in row)
    assert tuple(out["retrieved_doc_embeds"].shape) == (b, N_DOCS, 32)
    # HF pads every passage+question generator input to max_combined_length (300 by default).
    assert tuple(out["context_input_ids"].shape) == (b * N_DOCS, 300)
    # end-to-end mode: the retriever also returns the passages tokenized for the live context encoder
    assert out["tokenized_doc_ids"].shape[0] == b * N_DOCS
    assert 0.5 < padding_share(setup, QUESTIONS) < 1.0


def test_two_e2e_steps_train_all_three_models(setup):
    opt = setup.make_optimizer(lr=1e-3)
    ctx_before = [p.detach().clone() for p in setup.ctx_encoder.parameters()]
    losses = []
    for _ in range(2):
        losses.append(hf_train_step(setup, QUESTIONS, ANSWERS, opt))
        # grads are zeroed at the start of a step, so they are still there after it
        ctx_grad = sum(float(p.grad.abs().sum()) for p in setup.ctx_encoder.parameters() if p.grad is not None)
        q_grad = sum(float(p.grad.abs().sum()) for p in setup.question_encoder.parameters() if p.grad is not None)
        g_grad = sum(float(p.grad.abs().sum()) for p in setup.generator.parameters() if p.grad is not None)
        assert ctx_grad > 0, "context encoder got no gradient through the doc scores"
        assert q_grad > 0 and g_grad > 0
    assert all(math.isfinite(x) and x > 0 for x in losses)
    changed = any(not torch.equal(a, p.detach()) for a, p in zip(ctx_before, setup.ctx_encoder.parameters()))
    assert changed, "optimizer did not update the context encoder"


def test_time_hf_steps_one_entry_per_batch(setup):
    batches = [(QUESTIONS[:2], ANSWERS[:2]), (QUESTIONS[1:], ANSWERS[1:])]
    times = time_hf_steps(setup, batches, warmup=1)
    assert len(times) == 2 and all(t > 0 for t in times)


def test_tokenizers_round_trip_and_vocab_padding(setup, tmp_path):
    setup.tokenizers.save_pretrained(tmp_path)
    toks = load_tokenizers(tmp_path)
    assert isinstance(toks, HFTokenizers)
    assert len(toks.question) == len(setup.tokenizers.question) > 5
    assert len(toks.generator) == len(setup.tokenizers.generator) > 5
    s2 = build_hf_rag_e2e(
        _passages(n=10, seed=1),
        (toks.question, toks.context, toks.generator),
        TinySizes(hidden=32, layers=1, heads=2, ffn=64, vocab=1000),
        n_docs=3,
        max_combined_length=64,
    )
    assert s2.generator.config.vocab_size == 1000 and s2.question_encoder.config.vocab_size == 1000
    out = retrieve(s2, QUESTIONS[:2])
    assert tuple(out["context_input_ids"].shape) == (6, 64)
    loss = hf_train_step(s2, QUESTIONS[:2], ANSWERS[:2], s2.make_optimizer())
    assert math.isfinite(loss)
