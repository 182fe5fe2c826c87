"""Tokenization for the encoders and the generator.

* questions -> question-encoder inputs;
* (title, text) passages -> context-encoder inputs: the string ``title [SEP] text`` (or the text alone when the
  title is empty) through the ordinary tokenizer call (:func:`passage_text`);
* (question, passage, answer) rows -> generator inputs.  Causal LMs get a left-padded prompt
  ``Context: <title>. <text>\\nQuestion: <q>\\nAnswer:`` followed by `` <answer><eos>`` so that the answer columns
  line up across rows (see :mod:`ragtrain.model.generator`); the passage is truncated, never the question.
  Seq2seq models get ``question: <q> context: <title>. <text>`` as encoder input and the answer as labels.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np
import torch

Passage = tuple[str, str]  # (title, text)


def _titled(title: str, text: str) -> str:
    """``"<title>. <text>"``, or the text alone for a passage without a title."""
    return f"{title}. {text}" if title else text


def passage_text(title: str, text: str, sep_token: str | None) -> str:
    """The string a passage is encoded as: ``"<title> [SEP] <text>"`` (the tokenizer's separator; the same token ids
    as the pair ``(title, text)``, with one segment, so no ``token_type_ids`` are needed), or the text alone when
    the passage has no title.  Recorded in exports as ``passage_format``."""
    if not title:
        return text
    return f"{title} {sep_token} {text}" if sep_token else f"{title}. {text}"


def passage_format(tokenizer) -> str:
    return passage_text("{title}", "{text}", tokenizer.sep_token)


def passage_ids(tokenizer, titles: Sequence[str], texts: Sequence[str], max_length: int) -> list[list[int]]:
    """Context-encoder ids of each passage (unpadded, truncated at the end: the text, never the title)."""
    strings = [passage_text(t, x, tokenizer.sep_token) for t, x in zip(titles, texts)]
    return tokenizer(strings, truncation=True, max_length=max_length).input_ids if strings else []


def pad_passage_ids(tokenizer, rows: Sequence[Sequence[int]]) -> dict:
    """Context-encoder batch ``{"input_ids", "attention_mask"}`` from unpadded id rows, padded on the tokenizer's
    side with its pad id (what the trainer and the async-refresh encoder both feed the context encoder)."""
    ids, mask = _pad(rows, tokenizer.pad_token_id or 0, left=tokenizer.padding_side == "left")
    return {"input_ids": ids, "attention_mask": mask}


def _pad(rows: Sequence[Sequence[int]], pad_id: int, left: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    width = max((len(r) for r in rows), default=0) or 1
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, r in enumerate(rows):
        if not len(r):
            continue
        sl = slice(width - len(r), width) if left else slice(0, len(r))
        ids[i, sl] = torch.as_tensor(r if isinstance(r, list) else np.array(r, dtype=np.int64))  # (read-only maps)
        mask[i, sl] = 1
    return ids, mask


class RagCollator:
    def __init__(self, question_tokenizer, context_tokenizer, generator_tokenizer, *, is_seq2seq: bool,
                 max_query_length: int = 64, max_passage_length: int = 128, max_prompt_length: int = 256,
                 max_answer_length: int = 32, chat_template: bool = False, stop_strings: Sequence[str] = ()):
        self.q_tok = question_tokenizer
        self.c_tok = context_tokenizer
        self.g_tok = generator_tokenizer
        self.is_seq2seq = is_seq2seq
        self.max_query_length = max_query_length
        self.max_passage_length = max_passage_length
        self.max_prompt_length = max_prompt_length
        self.max_answer_length = max_answer_length
        g = generator_tokenizer
        if g.pad_token_id is None:
            raise ValueError("the generator tokenizer has no pad token (set tokenizer.pad_token = eos_token)")
        self.g_pad = g.pad_token_id
        self.g_eos = g.eos_token_id
        # a causal tokenizer that natively starts sequences with BOS keeps doing so in our prompts
        probe = g("a").input_ids
        self.g_prefix = [g.bos_token_id] if (not is_seq2seq and g.bos_token_id is not None and probe
                                             and probe[0] == g.bos_token_id) else []
        self.stop_strings = [s for s in stop_strings if s]
        # the ones the tokenizer can spell stop generation early (transformers' stop_strings); all cut the answer
        self.generation_stop_strings = [s for s in self.stop_strings
                                        if s in g.decode(g(s, add_special_tokens=False).input_ids)]
        self.chat_template = bool(chat_template) and not is_seq2seq
        self.chat_prefix: list[int] = []
        self.chat_suffix: list[int] = []
        if self.chat_template:
            if not getattr(g, "chat_template", None):
                raise ValueError("model.chat_template=yes: the generator's tokenizer has no chat template")
            # the template around one user message, split at the message: prompt = prefix + message + suffix
            rendered = g.apply_chat_template([{"role": "user", "content": "\x00"}], tokenize=False,
                                             add_generation_prompt=True)
            before, after = rendered.split("\x00")
            self.chat_prefix = g(before, add_special_tokens=False).input_ids
            self.chat_suffix = g(after, add_special_tokens=False).input_ids
            self.g_prefix = []

    # ---------------------------------------------------------------------------------- encoders
    def questions(self, questions: Sequence[str]) -> dict:
        enc = self.q_tok(list(questions), truncation=True, max_length=self.max_query_length, padding=True,
                         return_tensors="pt")
        return {"q_input_ids": enc["input_ids"], "q_attention_mask": enc["attention_mask"]}

    def passage_ids(self, titles: list[str], texts: list[str]) -> list[list[int]]:
        """Unpadded context-encoder ids, the same as :meth:`passages` gives before padding: the ordinary tokenizer
        call on :func:`passage_text` (what ``SentenceTransformer(export).encode(passage_text(...))`` does)."""
        return passage_ids(self.c_tok, titles, texts, self.max_passage_length)

    def pad_passage_ids(self, rows: Sequence[Sequence[int]]) -> dict:
        """Context-encoder batch from unpadded id rows (:meth:`passage_ids`, or the KB token cache)."""
        return pad_passage_ids(self.c_tok, rows)

    def passages(self, passages: Sequence[Passage]) -> dict:
        return self.pad_passage_ids(self.passage_ids([t for t, _ in passages], [x for _, x in passages]))

    # --------------------------------------------------------------------------------- generator
    def _prompt_rows(self, questions: Sequence[str], passages: Sequence[Sequence[Passage]]) -> list[list[int]]:
        """Prompt ids of every (question_b, passage_bk) row, b-major, in a few batched tokenizer calls."""
        if self.is_seq2seq:
            texts = [f"question: {q} context: {_titled(t, x)}" for q, docs in zip(questions, passages) for t, x in docs]
            return self.g_tok(texts, truncation=True, max_length=self.max_prompt_length).input_ids if texts else []
        tail = "" if self.chat_template else "\nAnswer:"  # the chat template's assistant header takes its place
        q_rows = self.g_tok([f"\nQuestion: {q}{tail}" for q in questions], add_special_tokens=False).input_ids
        ctx_rows = iter(self.g_tok([f"Context: {_titled(t, x)}" for docs in passages for t, x in docs],
                                   add_special_tokens=False).input_ids if passages else [])
        head = self.g_prefix + self.chat_prefix
        rows = []
        for q_ids, docs in zip(q_rows, passages):
            q_ids = q_ids + self.chat_suffix
            budget = max(self.max_prompt_length - len(q_ids) - len(head), 0)
            for _ in docs:
                rows.append((head + next(ctx_rows)[:budget] + q_ids)[-self.max_prompt_length:])
        return rows

    def _answer_ids(self, answers: Sequence[str]) -> list[list[int]]:
        if not answers:
            return []
        if self.is_seq2seq:
            return self.g_tok(list(answers), truncation=True, max_length=self.max_answer_length).input_ids
        lead = "" if self.chat_template else " "  # the assistant header ends with a newline
        rows = self.g_tok([lead + a for a in answers], add_special_tokens=False).input_ids
        return [r[: self.max_answer_length - 1] + [self.g_eos] for r in rows]

    def generator_inputs(self, questions: Sequence[str], passages: Sequence[Sequence[Passage]],
                         answers: Sequence[str]) -> dict:
        """Rows ``(question_b, passage_bk, answer_b)`` in b-major order -> generator tensors.

        Returns ``gen_input_ids``/``gen_attention_mask`` (B*K, L), ``target_ids`` (B*K, T) and
        ``target_mask`` (B, T)."""
        prompts = self._prompt_rows(questions, passages)
        targets = [a for a, docs in zip(self._answer_ids(answers), passages) for _ in docs]
        target_ids, target_mask_rows = _pad(targets, self.g_pad)
        k = len(passages[0]) if passages else 1
        target_mask = target_mask_rows[::k].clone()
        if self.is_seq2seq:
            gen_ids, gen_mask = _pad(prompts, self.g_pad)
        else:
            prompt_ids, prompt_mask = _pad(prompts, self.g_pad, left=True)
            gen_ids = torch.cat([prompt_ids, target_ids], dim=1)
            gen_mask = torch.cat([prompt_mask, target_mask_rows], dim=1)
        return {"gen_input_ids": gen_ids, "gen_attention_mask": gen_mask, "target_ids": target_ids,
                "target_mask": target_mask}

    def generation_prompts(self, questions: Sequence[str], passages: Sequence[Sequence[Passage]]) -> dict:
        """Prompts only (left-padded for causal LMs), rows in b-major order."""
        rows = self._prompt_rows(questions, passages)
        ids, mask = _pad(rows, self.g_pad, left=not self.is_seq2seq)
        return {"input_ids": ids, "attention_mask": mask}

    def decode(self, token_ids: torch.Tensor) -> list[str]:
        """Generated ids -> answers: special tokens dropped, cut before the first stop string, stripped."""
        out = []
        for s in self.g_tok.batch_decode(token_ids, skip_special_tokens=True):
            s = s.lstrip()
            for stop in self.stop_strings:
                s = s.split(stop, 1)[0]
            out.append(s.strip())
        return out
