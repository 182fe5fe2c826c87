"""Retrieve + generate over a QA set -> EM/F1/BLEU/ROUGE-L and recall@k/MRR.

:func:`predict` takes a ``search(question_vectors, questions, k) -> {"scores", "ids"[, "doc_embeddings"]}``
callable, so the same code serves a single process (direct FAISS search) and the trainer's rank-0 routed search.
Answers are decoded with the model's own p(z|x) over the top ``n_docs`` passages (:mod:`ragtrain.eval.decoding`:
RAG-Sequence fast / thorough, RAG-Token).
"""

from __future__ import annotations

import math
from typing import Callable, Sequence

import numpy as np
import torch
from tqdm.auto import tqdm

from ragtrain.data.collate import RagCollator
from ragtrain.eval.decoding import pick_fast, pick_thorough, resolve_decoding, unique_candidates
from ragtrain.eval.metrics import qa_metrics, retrieval_hits, retrieval_metrics
from ragtrain.model.rag import RagModel

Search = Callable[[torch.Tensor, Sequence[str], int], dict]


def doc_logprobs(rag: RagModel, collator: RagCollator, q: torch.Tensor, res: dict, passages: list, n_docs: int,
                 device) -> torch.Tensor:
    """log p(z|x) (B, n_docs) over the top ``n_docs`` retrieved passages, as the loss computed it: question
    vectors against the live context encoder's vectors of those passages in modes that train it, else against
    the stored vectors ``res["doc_embeddings"]`` (or, when the search returned none, the index's inner-product
    scores, which are those same dot products for an exact index); divided by the temperature; padding masked."""
    ids = torch.as_tensor(np.asarray(res["ids"]))[:, :n_docs]
    mask = ids >= 0
    if rag.live_context:
        enc = collator.passages([p for ps in passages for p in ps[:n_docs]])
        c = rag.encode_passages(enc["input_ids"].to(device), enc["attention_mask"].to(device))
        logits = rag.doc_scores(q, c.view(q.shape[0], n_docs, -1), mask)
    elif res.get("doc_embeddings") is not None:
        c = torch.as_tensor(np.asarray(res["doc_embeddings"]))[:, :n_docs]
        logits = rag.doc_scores(q, c.to(q.device), mask)
    else:
        scores = torch.as_tensor(np.asarray(res["scores"]), dtype=torch.float32)[:, :n_docs]
        logits = (scores / rag.retrieval_temperature).masked_fill(~mask, float("-inf"))
    return torch.log_softmax(logits.float().cpu(), dim=-1)


@torch.no_grad()
def predict(rag: RagModel, collator: RagCollator, search: Search, kb, examples: Sequence[dict], *, n_docs: int,
            recall_depth: int, batch_size: int = 8, num_beams: int = 1, max_new_tokens: int = 24,
            decoding: str = "auto", device: torch.device | str = "cpu", synced_gpus: bool = False,
            show_progress: bool = True, pad_to_batches: int | None = None, generate: bool = True) -> list[dict]:
    """Per example: ``{"id", "prediction", "retrieved_ids", "hits"}``.

    ``decoding``: see :mod:`ragtrain.eval.decoding` (``auto`` follows ``rag.loss_type``).
    ``generate=False``: retrieval only (``prediction`` is None; the generator is never called).
    ``pad_to_batches``: run this many batches even if ``examples`` needs fewer (repeating the last batch and
    dropping its outputs) so that every rank calls a ZeRO-3 partitioned model the same number of times."""
    decoding = resolve_decoding(decoding, rag.loss_type)
    if decoding == "token" and num_beams > 1:
        raise ValueError("RAG-Token decoding is greedy: num_beams must be 1")
    was_training = rag.training
    rag.eval()
    depth = max(recall_depth, n_docs)
    g = collator.g_tok
    out: list[dict] = []
    n_real = math.ceil(len(examples) / batch_size)
    total = max(n_real, pad_to_batches or 0)
    for bi in tqdm(range(total), desc="eval", disable=not show_progress):
        real = bi < n_real
        start = (bi if real else max(n_real - 1, 0)) * batch_size
        batch = list(examples[start: start + batch_size])
        if not batch:
            batch = [{"id": "pad", "question": "?", "answers": ["?"], "gold_passage_id": -1}]
        questions = [e["question"] for e in batch]
        q_in = {k: v.to(device) for k, v in collator.questions(questions).items()}
        q = rag.encode_questions(q_in["q_input_ids"], q_in["q_attention_mask"]).float()
        res = search(q, questions, depth)
        ids = np.asarray(res["ids"])
        rows = kb[ids.reshape(-1).clip(min=0).tolist()]
        titles, texts = rows["title"], rows["text"]
        passages = [[(titles[i * depth + j], texts[i * depth + j]) for j in range(depth)] for i in range(len(batch))]
        if not generate:
            if real:
                out.extend(_record(ex, None, ids[i], passages[i]) for i, ex in enumerate(batch))
            continue
        top = [p[:n_docs] for p in passages]
        doc_lp = doc_logprobs(rag, collator, q, res, passages, n_docs, device)
        prompts = {k: v.to(device) for k, v in collator.generation_prompts(questions, top).items()}
        if decoding == "token":
            gen = rag.generator.generate_marginal(prompts["input_ids"], prompts["attention_mask"], doc_lp,
                                                  max_new_tokens=max_new_tokens, pad_token_id=g.pad_token_id,
                                                  eos_token_id=g.eos_token_id, synced_gpus=synced_gpus)
            answers = collator.decode(gen)
        else:
            gen = rag.generator.generate(prompts["input_ids"], prompts["attention_mask"], num_beams=num_beams,
                                         max_new_tokens=max_new_tokens, pad_token_id=g.pad_token_id,
                                         eos_token_id=g.eos_token_id, synced_gpus=synced_gpus,
                                         stop_strings=collator.generation_stop_strings, tokenizer=g)
            answers = _sequence_answers(rag, collator, questions, top, collator.decode(gen), doc_lp, decoding,
                                        device)
        if real:
            out.extend(_record(ex, answers[i], ids[i], passages[i]) for i, ex in enumerate(batch))
    rag.train(was_training)
    return out


def _candidate_logprobs(rag: RagModel, collator: RagCollator, questions: list[str], passages: list,
                        answers: list[str], device) -> torch.Tensor:
    """log p(answer_i | question_i, passage_ij) summed over answer tokens: (len(questions), K)."""
    cand_in = collator.generator_inputs(questions, passages, [a if a else " " for a in answers])
    cand_in = {k: v.to(device) for k, v in cand_in.items()}
    tok_lp = rag.generator.target_logprobs(cand_in)  # 0 on padding
    return tok_lp.sum(-1).view(len(questions), len(passages[0])).float().cpu()


def _sequence_answers(rag: RagModel, collator: RagCollator, questions: list[str], top: list, cands: list[str],
                      doc_lp: torch.Tensor, decoding: str, device) -> list[str]:
    """RAG-Sequence: one candidate per (question, passage) row -> the answer per question (fast / thorough)."""
    k = doc_lp.shape[1]
    if decoding == "fast":  # each candidate scored under the passage it was generated from
        flat_q = [q_ for q_ in questions for _ in range(k)]
        flat_p = [[p] for ps in top for p in ps]
        seq_lp = _candidate_logprobs(rag, collator, flat_q, flat_p, cands, device).view(len(questions), k)
        return [cands[i] for i in pick_fast(cands, seq_lp, doc_lp)]
    uniq = unique_candidates(cands, k)  # thorough: every distinct candidate under every passage
    flat_q = [q_ for q_, u in zip(questions, uniq) for _ in u]
    flat_p = [ps for ps, u in zip(top, uniq) for _ in u]
    seq_lp = _candidate_logprobs(rag, collator, flat_q, flat_p, [y for u in uniq for y in u], device)
    return [u[j] for u, j in zip(uniq, pick_thorough(seq_lp, doc_lp, [len(u) for u in uniq]))]


def _record(ex: dict, prediction: str | None, ids: np.ndarray, passages: list) -> dict:
    hits = retrieval_hits(ids.tolist(), [t for _, t in passages], ex.get("gold_passage_id", -1), ex["answers"])
    hits = [bool(h) and int(i) >= 0 for h, i in zip(hits, ids.tolist())]  # a padding slot (-1) is never a hit
    return {"id": ex["id"], "question": ex["question"], "answers": ex["answers"], "prediction": prediction,
            "retrieved_ids": ids.tolist(), "hits": hits}


def summarize(records: Sequence[dict], recall_ks: Sequence[int]) -> dict:
    """EM/F1/BLEU/ROUGE-L (over the records with a prediction; ``n_generated`` of them) and recall@k/MRR (over all
    ``n`` records), percent."""
    gen = [r for r in records if r["prediction"] is not None]
    res = {"n": len(records), "n_generated": len(gen)}
    if gen:
        res.update(qa_metrics([r["prediction"] for r in gen], [r["answers"] for r in gen]))
    res.update(retrieval_metrics([r["hits"] for r in records], ks=tuple(recall_ks)))
    return res
