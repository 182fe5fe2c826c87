"""RagModel with tiny models: which sub-models get gradients in each mode, both loss types, the retrieval loss,
causal (Llama) and seq2seq (BART) generators.  Retrieval is a fake callable with fixed passages per question."""

from __future__ import annotations

import sys

import pytest
import torch

from ragtrain.data.collate import RagCollator
from ragtrain.model import tiny
from ragtrain.model.encoders import Encoder
from ragtrain.model.generator import Generator
from ragtrain.model.losses import rag_nll
from ragtrain.model.rag import RagModel

KB = [
    ("Paris", "Paris is the capital of France."),
    ("Berlin", "Berlin is the capital of Germany."),
    ("Rome", "Rome is the capital of Italy."),
    ("Sky", "The sky is blue on a clear day."),
    ("Grass", "Grass is green because of chlorophyll."),
    ("Water", "Water boils at one hundred degrees."),
    ("Ice", "Ice melts at zero degrees."),
    ("Cat", "The cat sat on the mat."),
    ("Hamlet", "Shakespeare wrote Hamlet and Macbeth."),
    ("Nile", "The Nile is a long river in Africa."),
]
EXTRA = [
    "What is the capital of France?", "Which colour is the sky?", "Who wrote the play Hamlet?",
    "Context: Question: Answer:", "Madrid is the capital of Spain.", "The sun rises in the east.",
    "The moon orbits the earth.", "Bees make honey from nectar.", "A dog barked at the mailman.",
    "Mount Everest is the highest mountain.",
]
QUESTIONS = ["What is the capital of France?", "Which colour is the sky?"]
ANSWERS = ["Paris", "blue"]
DOC_IDS = [[0, 1, 7], [3, 6, 9]]  # K = 3 fixed passages per question
GOLD_IDS = [0, 4]  # question 0's gold is among its retrieved passages, question 1's is not
DIM = 32


@pytest.fixture(scope="module")
def toks():
    base = tiny.train_word_tokenizer([f"{t}. {x}" for t, x in KB] + EXTRA, vocab_size=400)
    return base, tiny.encoder_tokenizer(base)


class FakeRetrieve:
    """Fixed doc ids per question; stored (index) embeddings are random vectors."""

    def __init__(self, collator: RagCollator, gold_ids=GOLD_IDS):
        self.collator = collator
        self.gold_ids = gold_ids
        self.stored = torch.randn(len(KB), DIM, generator=torch.Generator().manual_seed(0))
        self.calls = []

    def __call__(self, q: torch.Tensor, live_context: bool, with_gold: bool) -> dict:
        self.calls.append((live_context, with_gold, q is not None and q.requires_grad))
        ids = torch.tensor(DOC_IDS)
        out = {"doc_ids": ids}
        if live_context:
            enc = self.collator.passages([KB[i] for i in ids.flatten().tolist()])
            out["ctx_input_ids"], out["ctx_attention_mask"] = enc["input_ids"], enc["attention_mask"]
        else:
            out["doc_embeddings"] = self.stored[ids]
        passages = [[KB[i] for i in row] for row in ids.tolist()]
        out.update(self.collator.generator_inputs(QUESTIONS, passages, ANSWERS))
        if with_gold:
            gold = torch.tensor(self.gold_ids)
            out["gold_ids"] = gold
            if live_context:
                enc = self.collator.passages([KB[max(i, 0)] for i in self.gold_ids])
                out["gold_input_ids"], out["gold_attention_mask"] = enc["input_ids"], enc["attention_mask"]
            else:
                out["gold_embeddings"] = self.stored[gold.clamp(min=0)]
        return out


def build(toks, family: str, mode: str, loss_type: str = "sequence", weight: float = 0.0):
    base, etok = toks
    gtok = tiny.generator_tokenizer(base, family)
    q_enc = Encoder(tiny.build_tiny_model("bert", etok, hidden=DIM, layers=1, seed=0))
    c_enc = Encoder(tiny.build_tiny_model("bert", etok, hidden=DIM, layers=1, seed=1))
    gen = Generator(tiny.build_tiny_model(family, gtok, hidden=DIM, layers=1, seed=2), is_seq2seq=family != "llama")
    rag = RagModel(q_enc, c_enc, gen, mode=mode, loss_type=loss_type, n_docs=3, retrieval_loss_weight=weight)
    rag.eval()  # no dropout: runs are comparable; gradients still flow
    collator = RagCollator(etok, etok, gtok, is_seq2seq=gen.is_seq2seq, max_prompt_length=48)
    q = collator.questions(QUESTIONS)
    return rag, FakeRetrieve(collator), q


def grad_mass(module: torch.nn.Module) -> float:
    return sum(float(p.grad.abs().sum()) for p in module.parameters() if p.grad is not None)


def run(rag, retrieve, q, with_gold=None):
    out = rag(q["q_input_ids"], q["q_attention_mask"], retrieve, with_gold=with_gold)
    out.loss.backward()
    return out


FAMILIES = ["llama", "bart"]


# ------------------------------------------------------------------------------------------------ modes
@pytest.mark.parametrize("family", FAMILIES)
def test_end2end_trains_everything(toks, family):
    rag, retrieve, q = build(toks, family, "end2end")
    out = run(rag, retrieve, q)
    assert retrieve.calls == [(True, False, False)]  # live passages, no gold, detached query vectors
    assert grad_mass(rag.context_encoder) > 0
    assert grad_mass(rag.question_encoder) > 0
    assert grad_mass(rag.generator) > 0
    assert out.doc_scores.shape == (2, 3) and out.doc_scores.requires_grad
    assert torch.equal(out.doc_ids, torch.tensor(DOC_IDS))


@pytest.mark.parametrize("family", FAMILIES)
def test_original_freezes_context_encoder(toks, family):
    rag, retrieve, q = build(toks, family, "original")
    run(rag, retrieve, q)
    assert retrieve.calls[0][0] is False  # stored embeddings, no live re-encoding
    assert all(not p.requires_grad for p in rag.context_encoder.parameters())
    assert grad_mass(rag.context_encoder) == 0
    assert grad_mass(rag.question_encoder) > 0
    assert grad_mass(rag.generator) > 0


@pytest.mark.parametrize("family", FAMILIES)
def test_generator_only(toks, family):
    rag, retrieve, q = build(toks, family, "generator_only")
    out = run(rag, retrieve, q)
    assert retrieve.calls[0][0] is False
    assert grad_mass(rag.generator) > 0
    assert grad_mass(rag.question_encoder) == 0
    assert grad_mass(rag.context_encoder) == 0
    assert not out.doc_scores.requires_grad


@pytest.mark.parametrize("family", FAMILIES)
def test_retriever_only(toks, family):
    rag, retrieve, q = build(toks, family, "retriever_only")
    run(rag, retrieve, q)
    assert retrieve.calls[0][0] is True
    assert all(p.grad is None for p in rag.generator.parameters())
    assert grad_mass(rag.question_encoder) > 0
    assert grad_mass(rag.context_encoder) > 0


def test_set_mode_switches_and_rejects_unknown(toks):
    rag, _, _ = build(toks, "llama", "end2end")
    rag.set_mode("original")
    assert not rag.live_context
    assert all(p.requires_grad for p in rag.question_encoder.parameters())
    assert not any(p.requires_grad for p in rag.context_encoder.parameters())
    rag.set_mode("retriever_only")
    assert rag.live_context and not any(p.requires_grad for p in rag.generator.parameters())
    with pytest.raises(ValueError):
        rag.set_mode("everything")


class DedupRetrieve(FakeRetrieve):
    """Returns each unique live passage once plus ``ctx_index``, as the trainer's retriever does."""

    def __call__(self, q, live_context, with_gold):
        out = super().__call__(q, live_context, with_gold)
        if live_context:
            uniq, inverse = torch.unique(out["doc_ids"].reshape(-1), return_inverse=True)
            enc = self.collator.passages([KB[i] for i in uniq.tolist()])
            out["ctx_input_ids"], out["ctx_attention_mask"] = enc["input_ids"], enc["attention_mask"]
            out["ctx_index"] = inverse
        return out


@pytest.mark.parametrize("loss_type", ["sequence", "token"])
def test_passages_retrieved_twice_are_encoded_once_with_the_same_loss_and_gradients(toks, loss_type, monkeypatch):
    """Questions sharing retrieved passages: encoding the unique ones once and mapping them back with
    ``ctx_index`` gives the per-slot loss and every gradient (the shared rows' gradients add up)."""
    monkeypatch.setattr(sys.modules[__name__], "DOC_IDS", [[0, 1, 7], [1, 7, 9]])  # passages 1 and 7 twice
    grads, losses = [], []
    for cls in (FakeRetrieve, DedupRetrieve):
        rag, plain, q = build(toks, "bart", "end2end", loss_type=loss_type)
        retrieve = cls(plain.collator)
        rows = []
        orig = rag.context_encoder.forward
        rag.context_encoder.forward = lambda ids, mask: rows.append(ids.shape[0]) or orig(ids, mask)
        out = run(rag, retrieve, q)
        assert rows == ([6] if cls is FakeRetrieve else [4])
        losses.append(out.loss.detach())
        grads.append({n: p.grad.clone() for n, p in rag.named_parameters() if p.grad is not None})
    torch.testing.assert_close(losses[1], losses[0], rtol=1e-6, atol=1e-6)
    assert grads[0].keys() == grads[1].keys() and any(n.startswith("context_encoder") for n in grads[0])
    for n in grads[0]:
        torch.testing.assert_close(grads[1][n], grads[0][n], rtol=1e-5, atol=1e-7, msg=n)


# ------------------------------------------------------------------------------------------- loss types
@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("loss_type", ["sequence", "token"])
def test_loss_types_finite_and_consistent(toks, family, loss_type):
    rag, retrieve, q = build(toks, family, "original", loss_type=loss_type)
    out = rag(q["q_input_ids"], q["q_attention_mask"], retrieve)
    assert torch.isfinite(out.loss) and out.loss.ndim == 0
    assert out.nll.shape == (2,) and torch.all(torch.isfinite(out.nll)) and torch.all(out.nll > 0)
    torch.testing.assert_close(out.loss, out.nll.mean())
    assert out.retrieval_loss.item() == 0.0
    # recompute by hand: scores against the stored vectors, generator log-probs, marginal NLL
    docs = retrieve(None, False, False)
    with torch.no_grad():
        qv = rag.question_encoder(q["q_input_ids"], q["q_attention_mask"])
        scores = torch.einsum("bd,bkd->bk", qv, docs["doc_embeddings"])
        lp = rag.generator.target_logprobs(docs).view(2, 3, -1)
    torch.testing.assert_close(out.doc_scores.detach(), scores, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(out.nll.detach(), rag_nll(loss_type, lp, docs["target_mask"], scores),
                               rtol=1e-5, atol=1e-5)
    out.loss.backward()
    assert grad_mass(rag.question_encoder) > 0


# ---------------------------------------------------------------------------------------- retrieval loss
@pytest.mark.parametrize("family", FAMILIES)
def test_retrieval_loss_adds_positive_term_and_reaches_context_encoder(toks, family):
    rag0, retrieve0, q = build(toks, family, "end2end", weight=0.0)
    out0 = run(rag0, retrieve0, q)
    assert retrieve0.calls[0][1] is False
    rag1, retrieve1, _ = build(toks, family, "end2end", weight=0.5)
    out1 = run(rag1, retrieve1, q)
    assert retrieve1.calls[0][1] is True  # gold requested when the weight is > 0
    assert out1.retrieval_loss.item() > 0
    torch.testing.assert_close(out1.nll, out0.nll)
    torch.testing.assert_close(out1.loss, out1.nll.mean() + 0.5 * out1.retrieval_loss)
    assert out1.loss.item() > out0.loss.item()
    # the retrieval term sends gradient into the context encoder (through the live-encoded gold passages)
    g0 = torch.cat([p.grad.flatten() for p in rag0.context_encoder.parameters() if p.grad is not None])
    g1 = torch.cat([p.grad.flatten() for p in rag1.context_encoder.parameters() if p.grad is not None])
    assert g0.shape == g1.shape and not torch.allclose(g0, g1)
    q0 = torch.cat([p.grad.flatten() for p in rag0.question_encoder.parameters() if p.grad is not None])
    q1 = torch.cat([p.grad.flatten() for p in rag1.question_encoder.parameters() if p.grad is not None])
    assert not torch.allclose(q0, q1)


def test_retrieval_loss_original_mode_uses_stored_gold(toks):
    rag, retrieve, q = build(toks, "llama", "original", weight=1.0)
    out = run(rag, retrieve, q)
    assert retrieve.calls[0][:2] == (False, True)
    assert out.retrieval_loss.item() > 0
    assert grad_mass(rag.context_encoder) == 0
    assert grad_mass(rag.question_encoder) > 0


def test_retrieval_loss_logged_but_not_added_with_zero_weight(toks):
    rag, retrieve, q = build(toks, "llama", "end2end", weight=0.0)
    out = rag(q["q_input_ids"], q["q_attention_mask"], retrieve, with_gold=True)
    assert out.retrieval_loss.item() > 0
    torch.testing.assert_close(out.loss, out.nll.mean())


def test_retrieval_loss_without_any_gold_is_zero(toks):
    rag, _, q = build(toks, "llama", "end2end", weight=1.0)
    retrieve = FakeRetrieve(RagCollator(*[toks[1]] * 2, tiny.generator_tokenizer(toks[0], "llama"),
                                        is_seq2seq=False), gold_ids=[-1, -1])
    out = run(rag, retrieve, q)
    assert out.retrieval_loss.item() == 0.0
    torch.testing.assert_close(out.loss, out.nll.mean())
    assert torch.isfinite(out.loss)


def test_tiny_tokenizer_is_deterministic():
    # every process of a multi-process run builds its own tiny tokenizer: they must agree token for token
    texts = [f"{t}. {x}" for t, x in KB] + EXTRA
    built = [tiny.train_word_tokenizer(texts, vocab_size=120).to_str() for _ in range(8)]
    assert len(set(built)) == 1
    tok = tiny.train_word_tokenizer(texts, vocab_size=120)
    assert tok.get_vocab_size() == 120
    assert tok.token_to_id("[PAD]") == 0 and tok.token_to_id("</s>") == len(tiny.SPECIALS) - 1
    # words outside the vocabulary still round-trip through characters
    enc = tok.encode("Zanzibar capital")
    assert "[UNK]" not in enc.tokens
    assert tok.decode(enc.ids) == "zanzibar capital"


@pytest.mark.parametrize("generator", ["tiny:llama", "tiny:bart"])
def test_gradient_checkpointing_gives_the_same_gradients(tmp_path, generator):
    """model.gradient_checkpointing recomputes activations in the backward pass: the loss and every gradient
    equal the run without it."""
    from conftest import tiny_overrides
    from ragtrain.config import load_config
    from ragtrain.train.trainer import Trainer

    grads, losses, checked = [], [], []
    for gc in ("[]", "[generator,question_encoder,context_encoder]"):
        cfg = load_config(None, tiny_overrides(tmp_path / gc.strip("[]").replace(",", "-"), **{
            "model.generator": generator, "rag.mode": "end2end", "model.gradient_checkpointing": gc}))
        tr = Trainer(cfg)
        rag = tr.unwrapped
        checked.append([bool(getattr(sub.model, "is_activation_checkpointing",
                                     getattr(sub.model, "is_gradient_checkpointing", False)))
                        for sub in (rag.generator, rag.question_encoder, rag.context_encoder)])
        tr.model.train()  # as Trainer.train() does (checkpointing applies in training mode)
        batch = next(iter(tr.train_loader))
        # a sub-module of the first layer: transformers checkpoints the layer's forward (its own hooks fire once)
        layer = next(m for n, m in rag.generator.model.named_modules() if n.endswith("layers.0.self_attn"))
        calls = []
        layer.register_forward_hook(lambda *_: calls.append(1))
        out = tr.model(batch["q_input_ids"], batch["q_attention_mask"], retrieve=tr._make_retrieve(batch))
        n_forward = len(calls)
        out.loss.backward()
        checked[-1].append(len(calls) - n_forward)  # recomputed in the backward pass only when checkpointing
        losses.append(out.loss.item())
        grads.append({n: p.grad.clone() for n, p in rag.named_parameters() if p.grad is not None})
    assert checked == [[False] * 3 + [0], [True] * 3 + [1]]
    assert losses[0] == pytest.approx(losses[1], rel=1e-6)
    assert grads[0].keys() == grads[1].keys() and any("context_encoder" in n for n in grads[0])
    for n in grads[0]:
        torch.testing.assert_close(grads[0][n], grads[1][n], rtol=1e-5, atol=1e-6)
