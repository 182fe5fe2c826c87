"""Retrieve + generate over a QA set -> EM/F1/BLEU/ROUGE-L and recall@k/MRR.

:func:`run_eval` takes a ``search(question_vectors, questions, k) -> (scores, ids)`` callable, so the same code
serves a single process (direct FAISS search) and the trainer's rank-0 routed search.

Decoding is RAG "fast decoding": a candidate answer is generated (greedy or beam) from each of the top
``n_docs`` passages, and the candidate maximising ``log p(z|x) + log p(y|x,z)`` is returned.
"""

from __future__ import annotations

import math
from typing import Callable, Sequence

import numpy as np
import torch
from tqdm.auto import tqdm

from ragtrain.data.collate import RagCollator
from ragtrain.eval.metrics import qa_metrics, retrieval_hits, retrieval_metrics
from ragtrain.model.rag import RagModel

Search = Callable[[torch.Tensor, Sequence[str], int], tuple[np.ndarray, np.ndarray]]


@torch.no_grad()
def predict(rag: RagModel, collator: RagCollator, search: Search, kb, examples: Sequence[dict], *, n_docs: int,
            recall_depth: int, batch_size: int = 8, num_beams: int = 1, max_new_tokens: int = 24,
            device: torch.device | str = "cpu", synced_gpus: bool = False, show_progress: bool = True,
            pad_to_batches: int | None = None, generate: bool = True) -> list[dict]:
    """Per example: ``{"id", "prediction", "retrieved_ids", "hits"}``.

    ``generate=False``: retrieval only (``prediction`` is None; the generator is never called).
    ``pad_to_batches``: run this many batches even if ``examples`` needs fewer (repeating the last batch and
    dropping its outputs) so that every rank calls a ZeRO-3 partitioned model the same number of times."""
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
        scores, ids = search(q, questions, depth)
        ids = np.asarray(ids)
        rows = kb[ids.reshape(-1).clip(min=0).tolist()]
        titles, texts = rows["title"], rows["text"]
        passages = [[(titles[i * depth + j], texts[i * depth + j]) for j in range(depth)] for i in range(len(batch))]
        if not generate:
            if real:
                out.extend(_record(ex, None, ids[i], passages[i]) for i, ex in enumerate(batch))
            continue
        top = [p[:n_docs] for p in passages]
        prompts = {k: v.to(device) for k, v in collator.generation_prompts(questions, top).items()}
        gen = rag.generator.generate(prompts["input_ids"], prompts["attention_mask"], num_beams=num_beams,
                                     max_new_tokens=max_new_tokens, pad_token_id=g.pad_token_id,
                                     eos_token_id=g.eos_token_id, synced_gpus=synced_gpus)
        cands = collator.decode(gen)  # (B * n_docs)
        # rescore each candidate with its own passage: log p(z|x) + log p(y|x,z)
        flat_q = [q_ for q_ in questions for _ in range(n_docs)]
        flat_p = [[p] for ps in top for p in ps]
        cand_in = collator.generator_inputs(flat_q, flat_p, [c if c else " " for c in cands])
        cand_in = {k: v.to(device) for k, v in cand_in.items()}
        tok_lp = rag.generator.target_logprobs(cand_in)
        seq_lp = (tok_lp * cand_in["target_mask"].to(tok_lp.dtype)).sum(-1).view(len(batch), n_docs)
        top_scores = torch.as_tensor(np.asarray(scores)[:, :n_docs], dtype=torch.float32)
        top_scores = top_scores.masked_fill(torch.as_tensor(ids[:, :n_docs] < 0), float("-inf"))  # padding
        doc_lp = torch.log_softmax(top_scores, -1)
        best = (seq_lp.cpu() + doc_lp).argmax(-1)
        if not real:
            continue
        out.extend(_record(ex, cands[i * n_docs + int(best[i])], ids[i], passages[i]) for i, ex in enumerate(batch))
    rag.train(was_training)
    return out


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
