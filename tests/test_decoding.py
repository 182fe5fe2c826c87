"""Decoding with the trained p(z|x): RAG-Sequence fast / thorough, RAG-Token, temperature, row bookkeeping.

``predict`` runs with a real RagModel (tiny encoders, its ``doc_scores``/temperature) around a scripted generator
whose candidates and log-likelihoods are set per (question, passage), so each expected answer is known by hand.
The generator's own decoding (the marginal RAG-Token loop, prompt stripping) is checked on real tiny Llama/BART.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from torch import nn

from ragtrain.data.collate import RagCollator
from ragtrain.eval.decoding import pick_fast, pick_thorough, resolve_decoding, unique_candidates
from ragtrain.eval.evaluate import predict
from ragtrain.model import tiny
from ragtrain.model.encoders import Encoder
from ragtrain.model.generator import Generator
from ragtrain.model.rag import RagModel

TITLES = ["paris", "berlin", "rome", "madrid", "lisbon", "vienna"]
KB = {"title": TITLES, "text": [f"{t} is a capital city." for t in TITLES]}
WORDS = TITLES + ["is", "a", "capital", "city", "Context", "Question", "Answer", "what", "which", "one", "two"]


class ListKB:
    """``kb[ids]`` -> columns, like a ``datasets.Dataset``."""

    def __getitem__(self, ids):
        return {k: [v[i] for i in ids] for k, v in KB.items()}

    def __len__(self):
        return len(TITLES)


@pytest.fixture(scope="module")
def toks():
    base = tiny.train_word_tokenizer([" ".join(WORDS)] * 3 + list(KB["text"]), vocab_size=200)
    return base, tiny.encoder_tokenizer(base), tiny.generator_tokenizer(base, "llama")


class ScriptedGenerator(nn.Module):
    """Lower-case words only (the tiny tokenizer's round trip).  ``answers[(question, title)]``: the candidate generated from that passage; ``logp[(question, title,
    answer)]``: log p(answer | question, passage) (default -30); ``marginal[question]``: what RAG-Token returns."""

    is_seq2seq = False

    def __init__(self, g_tok, answers, logp, marginal=None):
        super().__init__()
        self.g_tok, self.answers, self.logp, self.marginal = g_tok, answers, logp, marginal or {}
        self.rescored = []
        self.model = nn.Linear(1, 1)  # what RagModel inspects (LoRA or not); never called

    def _rows(self, input_ids):
        """(question, title) of each prompt row, read back from its tokens."""
        out = []
        for text in self.g_tok.batch_decode(input_ids, skip_special_tokens=True):
            # the tiny word tokenizer lower-cases and drops punctuation: "context paris. ... question q answer"
            title = text.split()[1].rstrip(".")
            out.append((text.split("question")[1].split("answer")[0].strip(), title))
        return out

    def _ids(self, texts):
        rows = [self.g_tok(" " + t, add_special_tokens=False).input_ids for t in texts]
        width = max(map(len, rows))
        return torch.tensor([r + [self.g_tok.pad_token_id] * (width - len(r)) for r in rows])

    def generate(self, input_ids, attention_mask, **kw):
        return self._ids([self.answers[row] for row in self._rows(input_ids)])

    def generate_marginal(self, input_ids, attention_mask, doc_logprobs, **kw):
        k = doc_logprobs.shape[1]
        return self._ids([self.marginal[q] for q, _ in self._rows(input_ids)[::k]])

    def target_logprobs(self, batch):
        rows = self._rows(batch["gen_input_ids"][:, : -batch["target_ids"].shape[1]])
        answers = [a.strip() for a in self.g_tok.batch_decode(batch["target_ids"], skip_special_tokens=True)]
        lp = torch.zeros(batch["target_ids"].shape, dtype=torch.float32)
        for i, ((q, title), a) in enumerate(zip(rows, answers)):
            lp[i, 0] = self.logp.get((q, title, a), -30.0)
            self.rescored.append((q, title, a))
        return lp


def build(toks, gen, *, mode="original", loss_type="sequence", temperature=1.0):
    base, etok, gtok = toks
    enc = [Encoder(tiny.build_tiny_model("bert", etok, hidden=16, layers=1, seed=s)) for s in (0, 1)]
    rag = RagModel(enc[0], enc[1], gen, mode=mode, loss_type=loss_type, n_docs=3,
                   retrieval_temperature=temperature)
    return rag, RagCollator(etok, etok, gtok, is_seq2seq=False, max_prompt_length=64)


def scripted_search(doc_ids, doc_scores, with_embeddings=True):
    """Retrieves ``doc_ids[b]`` for question b with the dot products ``doc_scores[b]``: the stored vector of
    passage j is ``s_j * q / |q|^2``, so q . c_j = s_j exactly."""

    def search(q, questions, k):
        ids = np.array([doc_ids[i][:k] for i in range(len(questions))])
        scores = np.array([doc_scores[i][:k] for i in range(len(questions))], dtype=np.float32)
        res = {"scores": scores, "ids": ids}
        if with_embeddings:
            unit = q.detach().float() / (q.detach().float() ** 2).sum(-1, keepdim=True)
            res["doc_embeddings"] = torch.as_tensor(scores).unsqueeze(-1) * unit.unsqueeze(1)
        return res

    return search


def run(rag, collator, search, questions, **kw):
    examples = [{"id": str(i), "question": q, "answers": ["x"]} for i, q in enumerate(questions)]
    recs = predict(rag, collator, search, ListKB(), examples, n_docs=3, recall_depth=3, batch_size=4,
                   show_progress=False, **kw)
    return [r["prediction"] for r in recs]


# ------------------------------------------------------------------------------------------ pure choices
def test_fast_decoding_sums_passages_that_gave_the_same_answer():
    # "a" from z0: 0.4 * 0.5 = 0.20; "b" from z1 and z2: 0.3 * 0.5 + 0.3 * 0.5 = 0.30 (a max would pick "a")
    doc_lp = torch.tensor([[0.4, 0.3, 0.3]]).log()
    seq_lp = torch.full((1, 3), math.log(0.5))
    assert pick_fast(["a", "b", "b"], seq_lp, doc_lp) == [1]
    # two questions: the returned index points into the flat (B*K) candidate list, question-major
    assert pick_fast(["a", "b", "b", "c", "d", "e"], seq_lp.repeat(2, 1),
                     torch.tensor([[0.4, 0.3, 0.3], [0.1, 0.1, 0.8]]).log()) == [1, 5]


def test_thorough_decoding_marginalises_every_candidate_over_every_passage():
    doc_lp = torch.tensor([[0.45, 0.55]]).log()
    # rows: candidate "paris" under (z0, z1), candidate "berlin" under (z0, z1)
    seq_lp = torch.tensor([[0.5, 0.4], [0.01, 0.5]]).log()
    # p(Paris) = .45*.5 + .55*.4 = .445 ; p(Berlin) = .45*.01 + .55*.5 = .2795
    assert pick_thorough(seq_lp, doc_lp, [2]) == [0]
    assert unique_candidates(["a", "b", "a", "c", "c", "c"], 3) == [["a", "b"], ["c"]]


def test_decoding_follows_the_loss_type_unless_set():
    assert resolve_decoding("auto", "token") == "token"
    assert resolve_decoding("auto", "sequence") == "fast"
    assert resolve_decoding("thorough", "token") == "thorough"
    with pytest.raises(ValueError, match="unknown decoding"):
        resolve_decoding("beam", "sequence")


# --------------------------------------------------------------------------------------- predict + p(z|x)
Q1, Q2 = "what one", "which two"
ANSWERS = {(Q1, "paris"): "paris", (Q1, "berlin"): "rome", (Q1, "rome"): "rome",
           (Q2, "madrid"): "lisbon", (Q2, "lisbon"): "vienna", (Q2, "vienna"): "madrid"}
LOGP = {(Q1, "paris", "paris"): math.log(0.5), (Q1, "berlin", "rome"): math.log(0.5),
        (Q1, "rome", "rome"): math.log(0.5),
        (Q2, "madrid", "lisbon"): math.log(0.1), (Q2, "lisbon", "vienna"): math.log(0.2),
        (Q2, "vienna", "madrid"): math.log(0.9)}
IDS = [[0, 1, 2], [3, 4, 5]]
SCORES = [[2.0, 1.6, 1.6], [1.0, 1.0, 1.0]]


@pytest.mark.parametrize("with_embeddings", [True, False])
def test_temperature_changes_the_answer(toks, with_embeddings):
    """Q1: T=1 -> p(z) = (.43, .29, .29): "rome" (two passages, .29 total) beats "paris" (.21); T=0.1 -> p(z0) ~ .96:
    "paris".  Q2 (equal scores): the answer of the third passage, the most likely one ("madrid"): the candidate is
    read from its own row.  With or without stored vectors in the search result (without: the index scores)."""
    search = scripted_search(IDS, SCORES, with_embeddings)
    preds = {}
    for t in (1.0, 0.1):
        rag, collator = build(toks, ScriptedGenerator(toks[2], ANSWERS, LOGP), temperature=t)
        preds[t] = run(rag, collator, search, [Q1, Q2])
    assert preds[1.0] == ["rome", "madrid"]
    assert preds[0.1] == ["paris", "madrid"]


def test_fast_rescoring_uses_each_candidate_with_its_own_passage(toks):
    gen = ScriptedGenerator(toks[2], ANSWERS, LOGP)
    rag, collator = build(toks, gen)
    run(rag, collator, scripted_search(IDS, SCORES), [Q1, Q2])
    assert sorted(gen.rescored) == sorted((q, t, a) for (q, t), a in ANSWERS.items())


def test_thorough_decoding_can_overturn_fast(toks):
    """Q1: fast picks "rome" (above); thorough also scores "paris" under Berlin and Rome: .43*.5 + .29*.45 + .29*.45
    = .47 against "rome" .29*.5*2 + .43*.01 = .29 -> "paris"."""
    logp = {**LOGP, (Q1, "berlin", "paris"): math.log(0.45), (Q1, "rome", "paris"): math.log(0.45),
            (Q1, "paris", "rome"): math.log(0.01)}
    search = scripted_search(IDS, SCORES)
    rag, collator = build(toks, ScriptedGenerator(toks[2], ANSWERS, logp))
    assert run(rag, collator, search, [Q1, Q2], decoding="fast")[0] == "rome"
    gen = ScriptedGenerator(toks[2], ANSWERS, logp)
    rag, collator = build(toks, gen)
    assert run(rag, collator, search, [Q1, Q2], decoding="thorough")[0] == "paris"
    assert (Q1, "berlin", "paris") in gen.rescored and (Q2, "madrid", "madrid") in gen.rescored


def test_token_loss_decodes_with_the_token_marginal(toks):
    gen = ScriptedGenerator(toks[2], ANSWERS, LOGP, marginal={Q1: "vienna", Q2: "berlin"})
    rag, collator = build(toks, gen, loss_type="token")
    assert run(rag, collator, scripted_search(IDS, SCORES), [Q1, Q2]) == ["vienna", "berlin"]
    rag, collator = build(toks, ScriptedGenerator(toks[2], ANSWERS, LOGP), loss_type="sequence")
    assert run(rag, collator, scripted_search(IDS, SCORES), [Q1, Q2]) == ["rome", "madrid"]


def test_end2end_rescores_passages_with_the_live_context_encoder(toks):
    """In end2end the loss took p(z|x) from the live context encoder, not the (stale) index: decoding too.  The
    index scores here favour one passage overwhelmingly; the live encoder's dot products decide instead."""
    search = scripted_search(IDS, [[50.0, 0.0, 0.0], [0.0, 0.0, 50.0]])
    rag, collator = build(toks, ScriptedGenerator(toks[2], ANSWERS, LOGP), mode="original")
    assert run(rag, collator, search, [Q1, Q2]) == ["paris", "madrid"]
    rag, collator = build(toks, ScriptedGenerator(toks[2], ANSWERS, LOGP), mode="end2end", temperature=1e-3)
    rag.eval()
    with torch.no_grad():
        q = rag.encode_questions(**{k.replace("q_", ""): v for k, v in collator.questions([Q1, Q2]).items()})
        enc = collator.passages([(t, x) for t, x in zip(KB["title"], KB["text"])])
        c = rag.encode_passages(enc["input_ids"], enc["attention_mask"])
    live = (q @ c.T).double()
    expect = []
    for b, (qq, rows) in enumerate(zip([Q1, Q2], IDS)):  # every candidate differs: fast = argmax of the joint
        doc_lp = torch.log_softmax(live[b, rows] / 1e-3, -1)
        joint = [float(doc_lp[j]) + LOGP[(qq, TITLES[z], ANSWERS[(qq, TITLES[z])])] for j, z in enumerate(rows)]
        expect.append(ANSWERS[(qq, TITLES[rows[int(np.argmax(joint))]])])
    assert expect != ["paris", "madrid"]  # the live encoder disagrees with the index on this seed
    assert run(rag, collator, search, [Q1, Q2]) == expect


# ----------------------------------------------------------------------------- the generator's decoding
@pytest.fixture(scope="module")
def gens(toks):
    base, _, _ = toks
    out = {}
    for family in ("llama", "bart"):
        gtok = tiny.generator_tokenizer(base, family)
        model = tiny.build_tiny_model(family, gtok, hidden=32, layers=2, seed=3).eval()
        with torch.no_grad():  # weights x 8: a random tiny model's greedy output then depends on its input
            for p in model.parameters():
                if p.dim() > 1:
                    p.mul_(8)
        out[family] = (Generator(model, is_seq2seq=family != "llama"), gtok)
    return out


def _prompts(gtok, family, texts):
    collator = RagCollator(gtok, gtok, gtok, is_seq2seq=family != "llama", max_prompt_length=64)
    return collator.generation_prompts(texts, [[(t, f"{t} is a capital city.")] for t in TITLES[: len(texts)]])


@pytest.mark.parametrize("family", ["llama", "bart"])
def test_token_marginal_with_one_passage_is_greedy_decoding(gens, family):
    gen, gtok = gens[family]
    p = _prompts(gtok, family, [Q1, Q2, "what two"])
    greedy = gen.generate(p["input_ids"], p["attention_mask"], max_new_tokens=6, pad_token_id=gtok.pad_token_id,
                          eos_token_id=gtok.eos_token_id)
    marg = gen.generate_marginal(p["input_ids"], p["attention_mask"], torch.zeros(3, 1), max_new_tokens=6,
                                 pad_token_id=gtok.pad_token_id, eos_token_id=gtok.eos_token_id)
    n = min(greedy.shape[1], marg.shape[1])
    if family == "bart":  # generate returns the decoder start token first, and forces eos at the length limit
        greedy, n = greedy[:, 1:], n - 1
    assert n > 0 and torch.equal(marg[:, :n], greedy[:, :n])
    assert len({tuple(r) for r in marg.tolist()}) > 1  # the questions' answers differ: rows cannot be swapped


@pytest.mark.parametrize("family", ["llama", "bart"])
def test_token_marginal_matches_a_step_by_step_reference(gens, family):
    """Two passages per question with p(z|x) = (.7, .3), (.3, .7), (.5, .5): each step's marginal log sum_z p(z|x) p(y|...) (and so
    its token) equals one computed with full forward passes (no KV cache) over the tokens chosen so far; the
    scores' tolerance catches a wrong position or cache (a tiny random model's argmax rarely would)."""
    gen, gtok = gens[family]
    texts = [Q1, Q1, Q2, Q2, "paris city", "paris city"]
    p = _prompts(gtok, family, texts)
    doc_lp = torch.tensor([[0.7, 0.3], [0.3, 0.7], [0.5, 0.5]]).log()
    out, scores = gen.generate_marginal(p["input_ids"], p["attention_mask"], doc_lp, max_new_tokens=5,
                                        pad_token_id=gtok.pad_token_id, eos_token_id=None, output_scores=True)
    model = gen.model
    ids, mask = p["input_ids"], p["attention_mask"]
    dec = torch.full((6, 1), model.config.decoder_start_token_id or 0) if family == "bart" else None
    for t in range(out.shape[1]):
        with torch.no_grad():
            if family == "bart":
                logits = model(input_ids=ids, attention_mask=mask, decoder_input_ids=dec).logits[:, -1]
            else:
                pos = (mask.cumsum(-1) - 1).clamp(min=0)
                logits = model(input_ids=ids, attention_mask=mask, position_ids=pos).logits[:, -1]
        lp = torch.log_softmax(logits.float(), -1).view(3, 2, -1)
        marginal = torch.logsumexp(lp + doc_lp.unsqueeze(-1), dim=1)
        torch.testing.assert_close(scores[:, t], marginal, rtol=0, atol=2e-6)
        ref = marginal.argmax(-1)
        assert torch.equal(out[:, t], ref), t
        nxt = ref.repeat_interleave(2).unsqueeze(-1)
        if family == "bart":
            dec = torch.cat([dec, nxt], 1)
        else:
            ids, mask = torch.cat([ids, nxt], 1), torch.cat([mask, torch.ones_like(nxt)], 1)


class TableLM(nn.Module):
    """A causal LM whose next-token distribution depends only on the row (its passage): row 2b is passage z0 of
    question b, row 2b+1 passage z1.  Vocabulary A, B, C, eos."""

    def __init__(self, table):
        super().__init__()
        self.table = torch.tensor(table).log()  # (rows, V)

    def forward(self, input_ids, attention_mask=None, position_ids=None, use_cache=True, logits_to_keep=1,
                past_key_values=None):
        from types import SimpleNamespace

        logits = self.table[: input_ids.shape[0]].unsqueeze(1)
        return SimpleNamespace(logits=logits, get=lambda key: None)


def test_token_decoding_picks_what_no_single_passage_would():
    """p(z|x) = (.5, .5); z0 says A .6 / B .4, z1 says C .6 / B .4.  Each passage alone (RAG-Sequence candidates)
    gives A or C; the per-token marginal gives B (.4 against .3)."""
    eos = 3
    gen = Generator(TableLM([[0.6, 0.4, 1e-9, 1e-9], [1e-9, 0.4, 0.6, 1e-9]]), is_seq2seq=False)
    first = gen.generate_marginal(torch.ones(2, 3, dtype=torch.long), torch.ones(2, 3, dtype=torch.long),
                                  torch.tensor([[0.5, 0.5]]).log(), max_new_tokens=1, eos_token_id=eos)
    assert first.tolist() == [[1]]
    per_passage = gen.model.table.argmax(-1).tolist()
    assert 1 not in per_passage and per_passage == [0, 2]


def test_causal_generation_returns_the_new_tokens_only(gens):
    gen, gtok = gens["llama"]
    p = _prompts(gtok, "llama", [Q1, Q2])
    full = gen.model.generate(input_ids=p["input_ids"], attention_mask=p["attention_mask"], max_new_tokens=4,
                              do_sample=False, pad_token_id=gtok.pad_token_id, eos_token_id=None)
    new = gen.generate(p["input_ids"], p["attention_mask"], max_new_tokens=4, pad_token_id=gtok.pad_token_id,
                       eos_token_id=None)
    assert new.shape[1] == 4 and torch.equal(new, full[:, p["input_ids"].shape[1]:])
