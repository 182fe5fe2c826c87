"""``ragtrain ask``: put questions to an exported run and show what it retrieves and answers.

    ragtrain ask --checkpoint runs/tiny/final "Which river flows through the town?"
    printf 'first question\\nsecond question\\n' | ragtrain ask --checkpoint runs/tiny/final --json

The export is loaded once (models, its index ``final/index`` and the KB recorded in ``final/ragtrain.json``);
each question is then one question-encoder call, one FAISS search and one decode -- the KB is never re-encoded.
Retrieval and decoding are :func:`ragtrain.eval.evaluate.predict`'s, with the run's own p(z|x), so an answer here
is the answer ``ragtrain eval`` scores.
"""

from __future__ import annotations

from pathlib import Path
from typing import Iterable, Sequence

import numpy as np

from ragtrain.data.errors import DataError


class Asker:
    """An exported run, loaded for questions: :meth:`ask` returns per question the answer and the top passages."""

    def __init__(self, checkpoint: str | Path, kb: str | Path | None = None, index: str | Path | None = None,
                 n_docs: int | None = None, decoding: str | None = None, num_beams: int | None = None,
                 max_new_tokens: int | None = None, retriever: str | None = None, device: str = "auto"):
        """Options left None take the run's own evaluation settings and retriever (recorded in the export)."""
        from ragtrain.cli import _load_checkpoint
        from ragtrain.data.kb import load_kb
        from ragtrain.eval.exported import (eval_settings, kb_dir_of, load_index, make_search, resolve_device,
                                            retriever_kind)

        ckpt = Path(checkpoint)
        self.device = resolve_device(device)
        self.rag, self.collator, self.meta = _load_checkpoint(ckpt)
        self.rag.to(self.device)
        kb_dir = kb_dir_of(ckpt, self.meta, kb)
        self.kb = load_kb(kb_dir)
        self.index, self.emb = load_index(ckpt, str(index) if index else None)
        if self.index is None:
            raise FileNotFoundError(f"{ckpt}/index: the export holds no index; build one with `ragtrain index "
                                    f"--checkpoint {ckpt} --kb KB --out DIR` and pass --index DIR")
        if self.index.ntotal != len(self.kb):
            raise ValueError(f"index has {self.index.ntotal} vectors but the KB {kb_dir} has {len(self.kb)} passages "
                             "(pass the KB the index was built from with --kb)")
        s = eval_settings(self.meta, {"n_docs": n_docs or None, "decoding": decoding, "num_beams": num_beams,
                                      "max_new_tokens": max_new_tokens})
        self.n_docs = min(int(s["n_docs"]), len(self.kb))
        self.decoding, self.num_beams, self.max_new_tokens = s["decoding"], s["num_beams"], s["max_new_tokens"]
        self._search = make_search(retriever_kind(self.meta, retriever), self.index, self.emb, self.kb)  # the run's retriever (dense/bm25/hybrid)

    def ask(self, questions: Sequence[str], top: int = 3, batch_size: int = 8) -> list[dict]:
        """``[{"question", "answer", "passages": [{"rank", "id", "score", "title", "text"}, ...]}]``: the generated
        answer and the ``top`` passages the run's retriever returns, with its scores (dense: inner products)."""
        from ragtrain.eval.evaluate import predict

        top = max(1, min(top, len(self.kb)))
        scores: list[np.ndarray] = []

        def search(q, qs, k):  # predict's retrieval, its scores kept for display (one call per batch, in order)
            res = self._search(q, qs, k)
            scores.append(np.asarray(res["scores"]))
            return res

        examples = [{"id": str(i), "question": q, "answers": [], "gold_passage_id": -1} for i, q in enumerate(questions)]
        records = predict(self.rag, self.collator, search, self.kb, examples, n_docs=self.n_docs, recall_depth=top,
                          batch_size=batch_size, num_beams=self.num_beams, max_new_tokens=self.max_new_tokens,
                          decoding=self.decoding, device=self.device, show_progress=False)
        all_scores = np.concatenate(scores) if scores else np.zeros((0, top))
        out = []
        for rec, row_scores in zip(records, all_scores):
            ids = [i for i in rec["retrieved_ids"][:top] if i >= 0]
            rows = self.kb[ids] if ids else {"title": [], "text": []}
            passages = [{"rank": r + 1, "id": int(i), "score": round(float(s), 4), "title": t, "text": x}
                        for r, (i, s, t, x) in enumerate(zip(ids, row_scores, rows["title"], rows["text"]))]
            out.append({"question": rec["question"], "answer": rec["prediction"], "passages": passages})
        return out


def read_questions(argv_questions: Sequence[str], stdin: Iterable[str] | None) -> list[str]:
    """The questions: the command-line ones, else one per non-blank line of ``stdin`` (unless it is a terminal)."""
    qs = [q.strip() for q in argv_questions if q.strip()]
    isatty = getattr(stdin, "isatty", None)
    if not qs and stdin is not None and not (isatty and isatty()):
        qs = [line.strip() for line in stdin if line.strip()]
    if not qs:
        raise DataError("no question given (pass one as an argument, or several on stdin, one per line)")
    return qs


def format_answer(result: dict, width: int = 160) -> str:
    """Human-readable block: the question, the answer, then one line per passage (rank, score, id, title, text)."""
    lines = [f"Q: {result['question']}", f"A: {result['answer']}"]
    for p in result["passages"]:
        text = " ".join(p["text"].split())
        head = f"  [{p['rank']}] {p['score']:.3f}  #{p['id']}"
        body = (f"{p['title']}: " if p["title"] else "") + text
        room = max(width - len(head) - 2, 20)
        lines.append(f"{head}  {body if len(body) <= room else body[: room - 3] + '...'}")
    return "\n".join(lines)
