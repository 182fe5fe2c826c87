"""Question/answer data: loading (JSONL, SQuAD JSON, RAG ``.source``/``.target`` line files) and
article-disjoint train/validation/test splitting.

Every loader returns a list of example dicts::

    {"id": str, "question": str, "answers": list[str] (non-empty),
     "article": str | None, "gold_passage_id": int (KB ``id``; -1 when unknown)}

Gold passages:

* JSONL ``gold_passage_id`` is taken as is (checked against ``len(kb)`` when a KB is given);
  JSONL ``gold_doc`` (a KB ``doc_id``) resolves, given ``kb``, to the first passage of that
  document containing an answer (case-insensitive, whitespace-normalised), else its first passage.
* SQuAD: the passage of the question's paragraph whose character range contains the first
  answer's ``answer_start`` (ranges come from the KB's ``doc_id``/``char_start`` columns, so they
  agree with :func:`ragtrain.data.kb.build_kb` on the same file). Without ``kb`` the ids refer to
  the KB that ``build_kb(path, passage_words=passage_words)`` would build from this file alone.
* Line files carry no gold (-1).

Bad rows (empty question, no answers, invalid JSON, undecodable bytes) raise
:class:`~ragtrain.data.errors.DataError` naming the file and 1-based row, or are skipped and
counted with ``skip_bad_rows=True``. SQuAD 2.0 unanswerable questions (``is_impossible``) are
always left out and counted separately as ``unanswerable``.
"""

from __future__ import annotations

import json
import logging
import math
import os
import random
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, overload

import datasets
import pyarrow as pa
import pyarrow.compute as pc

from ragtrain.data.errors import DataError
from ragtrain.data.kb import (
    build_kb,
    check_file,
    has_undecodable,
    load_squad_json,
    open_text,
    squad_article_key,
    squad_doc_id,
    strip_compression,
)

__all__ = ["QA_FORMATS", "SPLITS", "detect_qa_format", "load_qa", "qa_gold_docs", "split_by_article"]

logger = logging.getLogger(__name__)

QA_FORMATS = ("jsonl", "squad", "lines")
SPLITS = ("train", "validation", "test")
_UNDECODABLE = "undecodable bytes (file is not valid UTF-8)"


# ----------------------------------------------------------------------------------------------
# Parsed rows before gold resolution
# ----------------------------------------------------------------------------------------------


@dataclass
class _Example:
    id: str
    question: str
    answers: list[str]
    article: str | None
    gold_passage_id: int = -1
    gold_doc: str | None = None  # resolve to the first passage containing an answer
    gold_char: int | None = None  # with gold_doc: resolve to the passage containing this offset

    def as_dict(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "question": self.question,
            "answers": self.answers,
            "article": self.article,
            "gold_passage_id": self.gold_passage_id,
        }


@dataclass(frozen=True)
class _Bad:
    path: Path
    where: str
    reason: str

    def message(self) -> str:
        return f"{self.path} {self.where}: {self.reason}"


@dataclass
class _Stats:
    examples: int = 0
    skipped: int = 0
    skipped_rows: list[str] = field(default_factory=list)
    unanswerable: int = 0
    gold_unresolved: int = 0
    gold_docs: int = 0


def _clean_answers(raw: Any) -> list[str] | None:
    """Normalise an ``answers`` value to a de-duplicated list of non-empty strings; None if invalid."""
    items = raw if isinstance(raw, list) else [raw]
    out: list[str] = []
    for a in items:
        if isinstance(a, bool) or not isinstance(a, (str, int, float)):
            return None
        s = str(a).strip()
        if s and s not in out:
            out.append(s)
    return out


def detect_qa_format(path: str | os.PathLike[str], fmt: str | None = None) -> str:
    """``jsonl``, ``squad`` or ``lines`` from ``fmt`` or the extension (``.gz`` ignored)."""
    path = Path(path)
    if fmt is not None:
        if fmt not in QA_FORMATS:
            raise DataError(f"{path}: unknown QA format {fmt!r} (expected one of {', '.join(QA_FORMATS)})")
        return fmt
    suffix = strip_compression(path)[1]
    by_suffix = {".jsonl": "jsonl", ".json": "squad", ".source": "lines"}
    if suffix not in by_suffix:
        raise DataError(
            f"{path}: cannot tell the QA format from the extension {suffix or '(none)'!r}; "
            f"use .jsonl/.json/.source or pass fmt= one of {', '.join(QA_FORMATS)}"
        )
    return by_suffix[suffix]


# ----------------------------------------------------------------------------------------------
# Readers
# ----------------------------------------------------------------------------------------------


def _read_jsonl(path: Path, kb_size: int | None) -> Iterator[_Example | _Bad]:
    check_file(path)
    stem = strip_compression(path)[0]
    index = 0
    with open_text(path) as f:
        for line_no, line in enumerate(f, start=1):
            if not line.strip():
                continue
            record_index, index = index, index + 1
            where = f"row {line_no}"
            if has_undecodable(line):
                yield _Bad(path, where, _UNDECODABLE)
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as e:
                yield _Bad(path, where, f"invalid JSON ({e.msg} at column {e.colno})")
                continue
            if not isinstance(obj, dict):
                yield _Bad(path, where, f"expected a JSON object, got {type(obj).__name__}")
                continue
            question = obj.get("question")
            if not isinstance(question, str) or not question.strip():
                yield _Bad(path, where, "empty or missing 'question'")
                continue
            answers = _clean_answers(obj["answers"] if "answers" in obj else obj.get("answer"))
            if not answers:
                yield _Bad(path, where, "no answers ('answers' list or 'answer' string of non-empty text)")
                continue
            article = obj.get("article")
            if article is not None and not isinstance(article, str):
                yield _Bad(path, where, f"'article' must be a string, got {type(article).__name__}")
                continue
            ex = _Example(
                id=str(obj["id"]) if obj.get("id") not in (None, "") else f"{stem}:{record_index}",
                question=question.strip(),
                answers=answers,
                article=article.strip() if article and article.strip() else None,
            )
            gold = obj.get("gold_passage_id")
            if gold is not None:
                if isinstance(gold, bool) or not isinstance(gold, int) or gold < -1:
                    yield _Bad(path, where, f"'gold_passage_id' must be an integer >= -1, got {gold!r}")
                    continue
                if kb_size is not None and gold >= kb_size:
                    yield _Bad(path, where, f"'gold_passage_id' {gold} out of range for a KB of {kb_size} passages")
                    continue
                ex.gold_passage_id = gold
            elif obj.get("gold_doc") not in (None, ""):
                ex.gold_doc = str(obj["gold_doc"])
            yield ex


def _read_squad(path: Path) -> Iterator[_Example | _Bad | Literal["unanswerable"]]:
    for a_i, article in enumerate(load_squad_json(path), start=1):
        if not isinstance(article, dict) or not isinstance(article.get("paragraphs"), list):
            yield _Bad(path, f"article {a_i}", "expected an object with a 'paragraphs' list")
            continue
        title = article.get("title")
        if title is not None and not isinstance(title, str):
            yield _Bad(path, f"article {a_i}", f"'title' must be a string, got {type(title).__name__}")
            continue
        if has_undecodable(title or ""):
            yield _Bad(path, f"article {a_i}", _UNDECODABLE)
            continue
        key = squad_article_key(title or "", a_i)  # the article index stands in for a missing title
        for p_i, para in enumerate(article["paragraphs"]):
            qas = para.get("qas") if isinstance(para, dict) else None
            if not isinstance(qas, list):
                yield _Bad(path, f"article {a_i} paragraph {p_i + 1}", "missing 'qas' list")
                continue
            for q_i, qa in enumerate(qas, start=1):
                where = f"article {a_i} paragraph {p_i + 1} question {q_i}"
                if not isinstance(qa, dict):
                    yield _Bad(path, where, "expected a JSON object")
                    continue
                if qa.get("is_impossible"):
                    yield "unanswerable"
                    continue
                question = qa.get("question")
                if not isinstance(question, str) or not question.strip():
                    yield _Bad(path, where, "empty or missing 'question'")
                    continue
                raw_answers = qa.get("answers")
                if not isinstance(raw_answers, list) or not all(isinstance(a, dict) for a in raw_answers):
                    yield _Bad(path, where, "no answers")
                    continue
                answers = _clean_answers([a.get("text") for a in raw_answers if a.get("text") is not None])
                if not answers:
                    yield _Bad(path, where, "no answers")
                    continue
                if has_undecodable(question, *answers):
                    yield _Bad(path, where, _UNDECODABLE)
                    continue
                start = raw_answers[0].get("answer_start")
                yield _Example(
                    id=str(qa["id"]) if qa.get("id") not in (None, "") else f"{key}:{p_i}:{q_i - 1}",
                    question=question.strip(),
                    answers=answers,
                    article=key,
                    gold_doc=squad_doc_id(key, p_i),
                    gold_char=start if isinstance(start, int) and not isinstance(start, bool) and start >= 0 else None,
                )


def _read_lines_file(path: Path) -> list[str]:
    check_file(path)
    with open_text(path) as f:
        lines = f.read().split("\n")
    if lines and lines[-1] == "":
        lines.pop()
    return [line.rstrip("\r") for line in lines]


def _read_lines(source: Path) -> Iterator[_Example | _Bad]:
    name = source.name
    base = name[: -len(".source.gz")] if name.lower().endswith(".source.gz") else Path(name).stem
    target = source.with_name(name.replace(".source", ".target"))
    if target == source:
        target = source.with_name(base + ".target")
    questions = _read_lines_file(source)
    if not target.exists():
        raise DataError(f"{target}: file not found (answers for {source})")
    answers = _read_lines_file(target)
    if len(questions) != len(answers):
        raise DataError(f"{source} has {len(questions)} lines but {target} has {len(answers)}; they must match")
    for i, (q, a) in enumerate(zip(questions, answers, strict=True)):
        where = f"row {i + 1}"
        if has_undecodable(q):
            yield _Bad(source, where, _UNDECODABLE)
        elif has_undecodable(a):
            yield _Bad(target, where, _UNDECODABLE)
        elif not q.strip():
            yield _Bad(source, where, "empty question")
        elif not a.strip():
            yield _Bad(target, where, "empty answer")
        else:
            yield _Example(id=f"{base}:{i}", question=q.strip(), answers=[a.strip()], article=None)


# ----------------------------------------------------------------------------------------------
# Gold passage resolution against a KB
# ----------------------------------------------------------------------------------------------


def _norm(s: str) -> str:
    return " ".join(s.split()).lower()


def _kb_passages(kb: datasets.Dataset, doc_ids: set[str], with_text: bool) -> dict[str, list[tuple[int, int, str]]]:
    """``doc_id -> [(char_start, id, lowercased text or ""), ...]`` sorted by ``char_start``."""
    cols = ["id", "doc_id", "char_start"] + (["text"] if with_text else [])
    wanted = pa.array(sorted(doc_ids), type=pa.string())
    found: dict[str, list[tuple[int, int, str]]] = {}
    for table in kb.select_columns(cols).with_format("arrow").iter(batch_size=100_000):
        hit = table.filter(pc.is_in(table["doc_id"], value_set=wanted))
        if hit.num_rows == 0:
            continue
        texts = hit["text"].to_pylist() if with_text else [""] * hit.num_rows
        for pid, doc, start, text in zip(
            hit["id"].to_pylist(), hit["doc_id"].to_pylist(), hit["char_start"].to_pylist(), texts, strict=True
        ):
            found.setdefault(doc, []).append((start, pid, _norm(text) if with_text else ""))
    for rows in found.values():
        rows.sort()
    return found


def _resolve_gold(examples: list[_Example], kb: datasets.Dataset) -> int:
    """Fill ``gold_passage_id`` of examples carrying ``gold_doc``; return how many stayed unresolved."""
    pending = [ex for ex in examples if ex.gold_doc is not None]
    if not pending:
        return 0
    need_text = any(ex.gold_char is None for ex in pending)
    passages = _kb_passages(kb, {ex.gold_doc for ex in pending if ex.gold_doc is not None}, need_text)
    unresolved = 0
    for ex in pending:
        rows = passages.get(ex.gold_doc or "")
        if not rows:
            unresolved += 1
            continue
        if ex.gold_char is not None:
            chosen = rows[0][1]
            for start, pid, _ in rows:
                if start <= ex.gold_char:
                    chosen = pid
                else:
                    break
            ex.gold_passage_id = chosen
        else:
            answers = [_norm(a) for a in ex.answers]
            ex.gold_passage_id = next((pid for _, pid, text in rows if any(a in text for a in answers)), rows[0][1])
    return unresolved


# ----------------------------------------------------------------------------------------------
# Public API
# ----------------------------------------------------------------------------------------------


@overload
def load_qa(
    path: str | os.PathLike[str],
    fmt: str | None = ...,
    kb: datasets.Dataset | None = ...,
    passage_words: int = ...,
    skip_bad_rows: bool = ...,
    return_stats: Literal[False] = ...,
    kb_size: int | None = ...,
    max_unknown_gold_fraction: float | None = ...,
) -> list[dict[str, Any]]: ...


@overload
def load_qa(
    path: str | os.PathLike[str],
    fmt: str | None = ...,
    kb: datasets.Dataset | None = ...,
    passage_words: int = ...,
    skip_bad_rows: bool = ...,
    *,
    return_stats: Literal[True],
    kb_size: int | None = ...,
    max_unknown_gold_fraction: float | None = ...,
) -> tuple[list[dict[str, Any]], dict[str, Any]]: ...


def load_qa(
    path: str | os.PathLike[str],
    fmt: str | None = None,
    kb: datasets.Dataset | None = None,
    passage_words: int = 100,
    skip_bad_rows: bool = False,
    return_stats: bool = False,
    kb_size: int | None = None,
    max_unknown_gold_fraction: float | None = None,
) -> list[dict[str, Any]] | tuple[list[dict[str, Any]], dict[str, Any]]:
    """Load question/answer examples (see the module docstring for formats and gold passages).

    Args:
        path: a ``.jsonl``, SQuAD ``.json`` or ``.source`` file (``.target`` beside it); ``.gz`` ok.
        fmt: force the format: ``jsonl``, ``squad`` or ``lines``.
        kb: the knowledge base the gold passage ids refer to (from ``build_kb``/``load_kb``).
        passage_words: only used for SQuAD without ``kb``: gold ids then refer to
            ``build_kb(path, passage_words=passage_words)`` built from this file alone.
        skip_bad_rows: skip and count bad rows instead of raising :class:`DataError`.
        return_stats: also return ``{"examples", "skipped", "skipped_rows", "unanswerable",
            "gold_unresolved", "gold_docs"}``.
        kb_size: the number of passages of the KB ``gold_passage_id`` must fall in (default ``len(kb)``; given
            when ``kb`` holds only some passages of a KB not built yet, see :func:`ragtrain.data.kb.scan_kb`).
        max_unknown_gold_fraction: with ``kb``: a :class:`DataError` when more than this fraction of the
            examples naming a gold document name one the KB does not hold (the wrong KB, or ids that differ).
    """
    p = Path(path)
    kind = detect_qa_format(p, fmt)
    check_file(p)
    stats = _Stats()
    examples: list[_Example] = []
    reader: Iterator[Any]
    size = kb_size if kb_size is not None else len(kb) if kb is not None else None
    for item in _reader(p, kind, size):
        if isinstance(item, _Example):
            examples.append(item)
        elif item == "unanswerable":
            stats.unanswerable += 1
        else:
            assert isinstance(item, _Bad)
            if not skip_bad_rows:
                raise DataError(item.message())
            stats.skipped += 1
            if len(stats.skipped_rows) < 20:
                stats.skipped_rows.append(item.message())

    gold_kb = kb
    if gold_kb is None and kind == "squad" and examples:
        try:
            gold_kb = build_kb(p, fmt="squad", passage_words=passage_words, skip_bad_rows=True, max_passage_chars=0,
                               duplicate_ids="ignore")
        except DataError:
            gold_kb = None  # no usable contexts: every gold stays -1
    stats.gold_docs = sum(ex.gold_doc is not None for ex in examples)
    if gold_kb is not None:
        stats.gold_unresolved = _resolve_gold(examples, gold_kb)
        if kb is not None and max_unknown_gold_fraction is not None and stats.gold_docs \
                and stats.gold_unresolved > max_unknown_gold_fraction * stats.gold_docs:
            first = next(ex for ex in examples if ex.gold_doc is not None and ex.gold_passage_id < 0)
            raise DataError(f"{p}: {stats.gold_unresolved} of {stats.gold_docs} gold documents are not in the "
                            f"knowledge base (first: {first.gold_doc!r}, question {first.id!r}); more than "
                            f"data.max_unknown_gold_fraction={max_unknown_gold_fraction} (the wrong KB, or ids that "
                            "differ from the KB's)")
    else:
        stats.gold_unresolved = sum(ex.gold_doc is not None for ex in examples)

    if stats.skipped:
        logger.warning("%s: skipped %d bad row(s) (first: %s)", p, stats.skipped, stats.skipped_rows[0])
    if stats.unanswerable:
        logger.info("%s: left out %d unanswerable (is_impossible) question(s)", p, stats.unanswerable)
    if stats.gold_unresolved and kb is not None:
        logger.warning("%s: %d gold document(s) not found in the KB (gold_passage_id=-1)", p, stats.gold_unresolved)
    stats.examples = len(examples)
    out = [ex.as_dict() for ex in examples]
    if return_stats:
        return out, {
            "examples": stats.examples,
            "skipped": stats.skipped,
            "skipped_rows": stats.skipped_rows,
            "unanswerable": stats.unanswerable,
            "gold_unresolved": stats.gold_unresolved,
            "gold_docs": stats.gold_docs,
        }
    return out


def _reader(p: Path, kind: str, kb_size: int | None) -> Iterator[Any]:
    if kind == "jsonl":
        return _read_jsonl(p, kb_size)
    if kind == "squad":
        return _read_squad(p)
    return _read_lines(p)


def qa_gold_docs(path: str | os.PathLike[str], fmt: str | None = None, skip_bad_rows: bool = False) -> set[str]:
    """The KB document ids (``gold_doc``) the questions of ``path`` name; bad rows raise as in :func:`load_qa`."""
    p = Path(path)
    kind = detect_qa_format(p, fmt)
    check_file(p)
    out = set()
    for item in _reader(p, kind, None):
        if isinstance(item, _Bad) and not skip_bad_rows:
            raise DataError(item.message())
        if isinstance(item, _Example) and item.gold_doc is not None:
            out.add(item.gold_doc)
    return out


def split_by_article(
    examples: Sequence[dict[str, Any]],
    fractions: Sequence[float] = (0.8, 0.1, 0.1),
    seed: int = 0,
) -> dict[str, list[dict[str, Any]]]:
    """Split examples into ``train``/``validation``/``test`` so that no article and no gold passage is in two
    splits: a test question's gold passage is never the positive of a training question.

    Examples are grouped by the connected components of "same ``article``" and "same gold passage"
    (``gold_passage_id`` >= 0): without articles, questions are grouped by their gold passage; an example with
    neither is its own group. The groups are sorted, shuffled with ``random.Random(seed)`` and dealt out by
    group count in proportion to ``fractions``. With at least 3 groups every split with a positive fraction
    gets one or more. Within a split, examples keep their input order. Deterministic for the same input and seed.
    """
    if len(fractions) != 3 or any(f < 0 for f in fractions) or sum(fractions) <= 0:
        raise ValueError(f"fractions must be 3 non-negative numbers with a positive sum, got {tuple(fractions)}")
    total = float(sum(fractions))
    fr = [f / total for f in fractions]

    parent: dict[str, str] = {}

    def find(x: str) -> str:
        parent.setdefault(x, x)
        while parent[x] != x:
            parent[x] = parent[parent[x]]
            x = parent[x]
        return x

    def union(a: str, b: str) -> None:
        ra, rb = find(a), find(b)
        if ra != rb:  # the smaller name becomes the root: component names do not depend on input order
            parent[max(ra, rb)] = min(ra, rb)

    def nodes(ex: dict[str, Any]) -> list[str]:
        out = [f"a:{ex['article']}"] if ex.get("article") else []
        gold = ex.get("gold_passage_id")
        if gold is not None and int(gold) >= 0:
            out.append(f"g:{int(gold)}")
        return out or [f"i:{ex['id']}"]

    for ex in examples:
        ns = nodes(ex)
        for n_ in ns[1:]:
            union(ns[0], n_)

    def key(ex: dict[str, Any]) -> str:
        return find(nodes(ex)[0])

    groups = sorted({key(ex) for ex in examples})
    random.Random(seed).shuffle(groups)
    n = len(groups)
    # Largest-remainder apportionment of the n groups, then (n >= 3) at least one group for every
    # split whose fraction is positive, taken from the currently largest split.
    counts = [math.floor(f * n) for f in fr]
    by_remainder = sorted(range(3), key=lambda j: (-(fr[j] * n - counts[j]), j))
    for j in by_remainder[: n - sum(counts)]:
        counts[j] += 1
    if n >= 3:
        for j in range(3):
            if fr[j] > 0 and counts[j] == 0:
                donor = max(range(3), key=lambda k: (counts[k], -k))
                counts[donor] -= 1
                counts[j] += 1
    assignment: dict[str, str] = {}
    pos = 0
    for split, c in zip(SPLITS, counts, strict=True):
        for g in groups[pos : pos + c]:
            assignment[g] = split
        pos += c
    out: dict[str, list[dict[str, Any]]] = {s: [] for s in SPLITS}
    for ex in examples:
        out[assignment[key(ex)]].append(ex)
    return out
