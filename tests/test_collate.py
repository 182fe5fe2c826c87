"""Generator inputs: causal layout (left-padded prompt, aligned answer columns, passage truncation) and
``Generator.target_logprobs`` against unpadded single-row runs, for a tiny Llama and a tiny BART."""

from __future__ import annotations

import pytest
import torch

from ragtrain.data.collate import RagCollator
from ragtrain.model import tiny
from ragtrain.model.generator import Generator

SENTENCES = [
    "Paris is the capital of France.",
    "Berlin is the capital of Germany.",
    "Rome is the capital of Italy.",
    "Madrid is the capital of Spain.",
    "The sky is blue on a clear day.",
    "Grass is green because of chlorophyll.",
    "Water boils at one hundred degrees.",
    "Ice melts at zero degrees.",
    "The cat sat on the mat.",
    "A dog barked at the mailman.",
    "The sun rises in the east.",
    "The moon orbits the earth.",
    "Bees make honey from nectar.",
    "Context: Question: Answer: what which who where",
    "What is the capital of France?",
    "Which colour is the sky?",
    "Who wrote the play Hamlet?",
    "Shakespeare wrote Hamlet and Macbeth.",
    "Mount Everest is the highest mountain.",
    "The Nile is a long river in Africa.",
]


@pytest.fixture(scope="module")
def base_tok():
    return tiny.train_word_tokenizer(SENTENCES, vocab_size=400)


@pytest.fixture(scope="module")
def enc_tok(base_tok):
    return tiny.encoder_tokenizer(base_tok)


def _collator(base_tok, enc_tok, family, **kw):
    gtok = tiny.generator_tokenizer(base_tok, family)
    return RagCollator(enc_tok, enc_tok, gtok, is_seq2seq=family != "llama", **kw), gtok


QUESTIONS = ["What is the capital of France?", "Which colour is the sky?"]
PASSAGES = [
    [("Paris", "Paris is the capital of France."),
     ("Berlin", "Berlin is the capital of Germany. The cat sat on the mat. A dog barked at the mailman."),
     ("Nile", "The Nile is a long river.")],
    [("Sky", "The sky is blue on a clear day."),
     ("Ice", "Ice melts at zero degrees."),
     ("Bees", "Bees make honey from nectar. The sun rises in the east. The moon orbits the earth.")],
]
ANSWERS = ["Paris", "blue on a clear day"]


# ------------------------------------------------------------------------------------------- layout
def test_causal_layout(base_tok, enc_tok):
    col, gtok = _collator(base_tok, enc_tok, "llama")
    out = col.generator_inputs(QUESTIONS, PASSAGES, ANSWERS)
    ids, mask, tgt, tmask = out["gen_input_ids"], out["gen_attention_mask"], out["target_ids"], out["target_mask"]
    n, k = len(QUESTIONS) * 3, 3
    t = tgt.shape[1]
    assert ids.shape[0] == mask.shape[0] == tgt.shape[0] == n
    assert tmask.shape == (len(QUESTIONS), t)
    pad, eos, bos = gtok.pad_token_id, gtok.eos_token_id, gtok.bos_token_id

    answers = [gtok(" " + a, add_special_tokens=False).input_ids + [eos] for a in ANSWERS]
    assert t == max(len(a) for a in answers)
    assert len(answers[0]) != len(answers[1])  # right padding of targets is exercised
    prompt_lens = []
    for row in range(n):
        a = answers[row // k]
        # target ids: the tokenized answer + eos, right-padded
        assert tgt[row, :len(a)].tolist() == a
        assert torch.all(tgt[row, len(a):] == pad)
        assert tmask[row // k].tolist() == [1] * len(a) + [0] * (t - len(a))
        # the answer occupies the same last T columns in every row
        assert ids[row, -t:].tolist() == tgt[row].tolist()
        assert mask[row, -t:].tolist() == tmask[row // k].tolist()
        # the prompt is left-padded and ends right before the answer columns
        prompt_mask = mask[row, :-t]
        plen = int(prompt_mask.sum())
        prompt_lens.append(plen)
        width = prompt_mask.shape[0]
        assert prompt_mask.tolist() == [0] * (width - plen) + [1] * plen
        assert torch.all(ids[row, :width - plen] == pad)
        prompt = ids[row, width - plen:width].tolist()
        q, (title, text) = QUESTIONS[row // k], PASSAGES[row // k][row % k]
        expected = [bos] + gtok(f"Context: {title}. {text}\nQuestion: {q}\nAnswer:",
                                add_special_tokens=False).input_ids
        assert prompt == expected
    assert len(set(prompt_lens)) > 1  # rows really have different prompt lengths
    # the prompts of one question repeat the same answer; target_mask is per question
    assert torch.equal(tgt[0], tgt[1]) and torch.equal(tgt[3], tgt[5])


def test_causal_truncates_passage_not_question(base_tok, enc_tok):
    max_prompt = 24
    col, gtok = _collator(base_tok, enc_tok, "llama", max_prompt_length=max_prompt)
    long_text = " ".join(SENTENCES[:8])
    question = "What is the capital of France?"
    out = col.generator_inputs([question], [[("Paris", long_text), ("Nile", "The Nile is long.")]], ["Paris"])
    t = out["target_ids"].shape[1]
    q_ids = gtok(f"\nQuestion: {question}\nAnswer:", add_special_tokens=False).input_ids
    ctx_ids = gtok(f"Context: Paris. {long_text}", add_special_tokens=False).input_ids
    assert 1 + len(ctx_ids) + len(q_ids) > max_prompt  # the row really is too long

    row0 = out["gen_input_ids"][0, :-t][out["gen_attention_mask"][0, :-t].bool()].tolist()
    assert len(row0) == max_prompt
    assert row0[0] == gtok.bos_token_id
    assert row0[-len(q_ids):] == q_ids  # question intact at the end
    budget = max_prompt - len(q_ids) - 1
    assert row0[1:1 + budget] == ctx_ids[:budget]  # passage cut at its end
    # the short row is untouched
    row1 = out["gen_input_ids"][1, :-t][out["gen_attention_mask"][1, :-t].bool()].tolist()
    assert row1 == [gtok.bos_token_id] + gtok("Context: Nile. The Nile is long.\nQuestion: " + question
                                              + "\nAnswer:", add_special_tokens=False).input_ids
    # the generation prompts are the same left-padded prompts
    gp = col.generation_prompts([question], [[("Paris", long_text), ("Nile", "The Nile is long.")]])
    assert gp["input_ids"][0][gp["attention_mask"][0].bool()].tolist() == row0
    assert gp["attention_mask"][1, 0] == 0  # left padding


def test_seq2seq_layout(base_tok, enc_tok):
    col, gtok = _collator(base_tok, enc_tok, "bart", max_prompt_length=20)
    out = col.generator_inputs(QUESTIONS, PASSAGES, ANSWERS)
    ids, mask, tgt, tmask = out["gen_input_ids"], out["gen_attention_mask"], out["target_ids"], out["target_mask"]
    for row in range(6):
        n = int(mask[row].sum())
        assert mask[row].tolist() == [1] * n + [0] * (ids.shape[1] - n)  # right padded
        q = QUESTIONS[row // 3]
        title, text = PASSAGES[row // 3][row % 3]
        full = gtok(f"question: {q} context: {title}. {text}").input_ids
        enc = ids[row, :n].tolist()
        assert n <= 20 and enc[-1] == gtok.eos_token_id
        assert enc[:-1] == full[:n - 1]  # question first, so any cut falls in the passage
        a = gtok(ANSWERS[row // 3]).input_ids
        assert tgt[row, :len(a)].tolist() == a
        assert tmask[row // 3].sum() == len(a)


# ---------------------------------------------------------------------------------- target_logprobs
def _direct_causal(model, prompt: list[int], answer: list[int]) -> torch.Tensor:
    ids = torch.tensor([prompt + answer])
    with torch.no_grad():
        logits = model(input_ids=ids).logits[0].float()
    logp = torch.log_softmax(logits, -1)
    return torch.stack([logp[len(prompt) - 1 + i, tok] for i, tok in enumerate(answer)])


def _causal_model(arch: str, gtok):
    if arch == "llama":
        return tiny.build_tiny_model("llama", gtok, seed=3).eval()
    # RoPE (Llama) is blind to a constant shift of position ids; GPT-2's absolute positions are not, so this
    # variant catches prompts whose first real token does not get position 0 under left padding
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(3)
    cfg = GPT2Config(vocab_size=len(gtok), n_positions=256, n_embd=32, n_layer=2, n_head=2,
                     bos_token_id=gtok.bos_token_id, eos_token_id=gtok.eos_token_id, pad_token_id=gtok.pad_token_id)
    return GPT2LMHeadModel(cfg).eval()


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_causal_target_logprobs_match_unpadded_rows(base_tok, enc_tok, arch):
    col, gtok = _collator(base_tok, enc_tok, "llama")
    model = _causal_model(arch, gtok)
    gen = Generator(model, is_seq2seq=False)
    batch = col.generator_inputs(QUESTIONS, PASSAGES, ANSWERS)
    with torch.no_grad():
        got = gen.target_logprobs(batch)
    assert got.shape == batch["target_ids"].shape and got.dtype == torch.float32
    t = batch["target_ids"].shape[1]
    for row in range(got.shape[0]):
        pmask = batch["gen_attention_mask"][row, :-t].bool()
        prompt = batch["gen_input_ids"][row, :-t][pmask].tolist()
        n = int(batch["target_mask"][row // 3].sum())
        answer = batch["target_ids"][row, :n].tolist()
        torch.testing.assert_close(got[row, :n], _direct_causal(model, prompt, answer), rtol=1e-4, atol=1e-4)


def test_causal_target_logprobs_grad_flows(base_tok, enc_tok):
    col, gtok = _collator(base_tok, enc_tok, "llama")
    gen = Generator(tiny.build_tiny_model("llama", gtok), is_seq2seq=False)
    batch = col.generator_inputs(QUESTIONS, PASSAGES, ANSWERS)
    lp = gen.target_logprobs(batch)
    (lp * batch["target_mask"].repeat_interleave(3, 0)).sum().backward()
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in gen.parameters())


@pytest.mark.parametrize("family", ["bart", "t5"])  # T5 rescales the hidden states before its output head
def test_seq2seq_target_logprobs_match_unpadded_rows(base_tok, enc_tok, family):
    col, gtok = _collator(base_tok, enc_tok, family)
    model = tiny.build_tiny_model(family, gtok, seed=4).eval()
    gen = Generator(model, is_seq2seq=True)
    batch = col.generator_inputs(QUESTIONS, PASSAGES, ANSWERS)
    assert batch["target_mask"].shape[0] != batch["target_ids"].shape[0]  # B != B*K
    with torch.no_grad():
        got = gen.target_logprobs(batch)
    assert got.shape == batch["target_ids"].shape
    start = model.config.decoder_start_token_id
    for row in range(got.shape[0]):
        enc = batch["gen_input_ids"][row][batch["gen_attention_mask"][row].bool()]
        n = int(batch["target_mask"][row // 3].sum())
        answer = batch["target_ids"][row, :n]
        dec_in = torch.cat([torch.tensor([start]), answer[:-1]])
        with torch.no_grad():
            logits = model(input_ids=enc[None], decoder_input_ids=dec_in[None]).logits[0].float()
        direct = torch.log_softmax(logits, -1).gather(-1, answer[:, None]).squeeze(-1)
        torch.testing.assert_close(got[row, :n], direct, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("family", ["llama", "bart", "t5"])
def test_output_head_projects_only_answer_tokens(base_tok, enc_tok, family):
    """The vocabulary projection sees one hidden state per real answer token (answers are padded to the longest
    of the batch), and the padded positions come back as 0."""
    col, gtok = _collator(base_tok, enc_tok, family)
    gen = Generator(tiny.build_tiny_model(family, gtok, seed=5).eval(), is_seq2seq=family != "llama")
    answers = ["Paris", "blue sky on a clear summer day"]  # unequal answer lengths -> answer padding
    batch = col.generator_inputs(QUESTIONS, PASSAGES, answers)
    rows = batch["target_mask"].repeat_interleave(3, 0)
    assert not rows.bool().all(), "needs padded answer positions"
    seen = []
    gen.model.get_output_embeddings().register_forward_hook(lambda m, a, out: seen.append(tuple(a[0].shape)))
    lp = gen.target_logprobs(batch)
    assert seen == [(int(rows.sum()), gen.config.hidden_size)]
    assert torch.all(lp[rows == 0] == 0) and torch.all(lp[rows == 1] < 0)


@pytest.mark.parametrize("arch", ["llama", "gpt2", "bart"])
@pytest.mark.parametrize("buckets", [2, 3, 8])
def test_length_buckets_equal_one_call_and_make_a_fixed_number_of_calls(base_tok, enc_tok, arch, buckets):
    """Rows sorted by length and run in ``buckets`` trimmed calls give the one-call log-probs and gradients;
    always exactly ``buckets`` forward calls, even with fewer rows (8 > 6 rows), as ZeRO-3 ranks need."""
    family = "bart" if arch == "bart" else "llama"
    col, gtok = _collator(base_tok, enc_tok, family)
    model = (tiny.build_tiny_model("bart", gtok, seed=6) if arch == "bart" else _causal_model(arch, gtok)).eval()
    batch = col.generator_inputs(QUESTIONS, PASSAGES, ["Paris", "blue sky on a clear summer day"])
    lengths = batch["gen_attention_mask"].sum(-1)
    assert len(set(lengths.tolist())) > 2, "needs rows of different lengths"
    results = []
    for b in (1, buckets):
        gen = Generator(model, is_seq2seq=arch == "bart", buckets=b)
        widths = []
        handle = model.register_forward_pre_hook(lambda m, a, kw: widths.append(kw["input_ids"].shape),
                                                 with_kwargs=True)
        model.zero_grad()
        lp = gen.target_logprobs(batch)
        lp.sum().backward()
        handle.remove()
        results.append((lp.detach(), [p.grad.clone() for p in model.parameters() if p.grad is not None]))
        assert len(widths) == b
        if b > 1:  # the shortest rows' call is narrower than the batch
            assert min(w[1] for w in widths) < batch["gen_input_ids"].shape[1]
    (lp1, g1), (lpb, gb) = results
    torch.testing.assert_close(lpb, lp1, rtol=1e-5, atol=1e-5)
    assert len(g1) == len(gb)
    for a, b in zip(gb, g1):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)


# ------------------------------------------------------------------------------------ title-less passages
def test_untitled_passages_are_text_alone_not_an_empty_pair(base_tok, enc_tok):
    col, gtok = _collator(base_tok, enc_tok, "llama")
    titles, texts = ["Paris", "", "Nile", ""], [p[1] for p in PASSAGES[0]] + ["The sky is blue."]
    ids = col.passage_ids(titles, texts)
    for t, x, row in zip(titles, texts, ids):  # mixed batch: each row as if tokenized alone
        alone = enc_tok(t, x).input_ids if t else enc_tok(x).input_ids
        assert row == alone
    assert ids[1] != enc_tok("", texts[1]).input_ids  # not "[CLS] [SEP] text [SEP]"
    rows = col._prompt_rows(["Q?"], [[("", "Some text.")]])
    titled = col._prompt_rows(["Q?"], [[("T", "Some text.")]])
    text = gtok.decode(rows[0])  # the tiny tokenizer lower-cases and splits punctuation
    assert "context : some text." in text and ". some" not in text  # no ". " left by a missing title
    assert "context : t. some text." in gtok.decode(titled[0])
    seq, stok = _collator(base_tok, enc_tok, "bart")
    text = stok.decode(seq._prompt_rows(["Q?"], [[("", "Some text.")]])[0])
    assert "context : some text." in text and ". some" not in text


CHAT = ("{% for m in messages %}user {{ m['content'] }} {% endfor %}"
        "{% if add_generation_prompt %}assistant{% endif %}")


def test_chat_template_wraps_training_and_decoding_prompts_alike(base_tok):
    g = tiny.generator_tokenizer(base_tok, "llama")
    g.chat_template = CHAT
    plain = RagCollator(g, g, g, is_seq2seq=False, max_prompt_length=40)
    chat = RagCollator(g, g, g, is_seq2seq=False, max_prompt_length=40, chat_template=True)
    qs, docs, ans = ["What is the capital of France?"], [[("Paris", SENTENCES[0]), ("Rome", SENTENCES[2])]], ["Paris"]
    train = chat.generator_inputs(qs, docs, ans)
    prompts = chat.generation_prompts(qs, docs)
    t = train["target_ids"].shape[1]
    for row in range(2):  # the training row = the decoding prompt + the answer
        p_ids = prompts["input_ids"][row][prompts["attention_mask"][row].bool()].tolist()
        tr_ids = train["gen_input_ids"][row, :-t][train["gen_attention_mask"][row, :-t].bool()].tolist()
        assert p_ids == tr_ids
        text = g.decode(p_ids)
        assert text.startswith("user context") and text.endswith("assistant")
        assert "answer" not in text.split("question")[-1]  # the assistant header replaces "Answer:"
    # the answer follows the header without a leading space and ends with eos
    answer = train["target_ids"][0][train["target_mask"][0].bool()].tolist()
    assert answer == g("Paris", add_special_tokens=False).input_ids + [g.eos_token_id]
    assert plain.generation_prompts(qs, docs)["input_ids"].shape != prompts["input_ids"].shape
    with pytest.raises(ValueError, match="no chat template"):
        RagCollator(g, g, tiny.generator_tokenizer(base_tok, "llama"), is_seq2seq=False, chat_template=True)


def test_decoded_answers_stop_at_the_first_stop_string(base_tok):
    g = tiny.generator_tokenizer(base_tok, "llama")
    c = RagCollator(g, g, g, is_seq2seq=False, stop_strings=["question", "who"])
    ids = g(["paris question what is", "blue sky", "who wrote hamlet"], add_special_tokens=False, padding=True,
            return_tensors="pt").input_ids
    assert c.decode(ids) == ["paris", "blue sky", ""]
    assert RagCollator(g, g, g, is_seq2seq=False).decode(ids)[0] == "paris question what is"
