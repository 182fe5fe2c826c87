"""Tests for ragtrain.data.qa: QA loading (JSONL, SQuAD, RAG line files), gold passage resolution,
bad-row errors, article-disjoint splits, and the shipped sample data."""

from __future__ import annotations

import json
from importlib import resources
from pathlib import Path
from typing import Any

import pytest

from ragtrain.data.errors import DataError
from ragtrain.data.kb import build_kb, split_words
from ragtrain.data.qa import load_qa, split_by_article

SAMPLE = resources.files("ragtrain") / "sample"


def write_jsonl(path: Path, rows: list[Any]) -> Path:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows), encoding="utf-8")
    return path


def filler(n: int, prefix: str) -> str:
    return " ".join(f"{prefix}{i}" for i in range(n))


# ----------------------------------------------------------------------------------------------
# JSONL
# ----------------------------------------------------------------------------------------------


def test_jsonl_basic_fields(tmp_path: Path) -> None:
    path = write_jsonl(
        tmp_path / "qa.jsonl",
        [
            {
                "id": "q1",
                "question": " Who? ",
                "answers": ["Ann", "ann", " Ann ", "A. N."],
                "article": "People",
                "gold_passage_id": 3,
            },
            "",
            {"question": "When?", "answer": "1900"},
            {"question": "How many?", "answers": [7]},
        ],
    )
    qa = load_qa(path)
    assert qa == [
        {"id": "q1", "question": "Who?", "answers": ["Ann", "ann", "A. N."], "article": "People", "gold_passage_id": 3},
        {"id": "qa:1", "question": "When?", "answers": ["1900"], "article": None, "gold_passage_id": -1},
        {"id": "qa:2", "question": "How many?", "answers": ["7"], "article": None, "gold_passage_id": -1},
    ]


@pytest.fixture
def kb_two_docs(tmp_path: Path) -> Any:
    docs = [
        {"id": "d1", "title": "One", "text": filler(10, "a") + " the Blue  Lagoon is here " + filler(5, "b")},
        {"id": "d2", "title": "Two", "text": filler(4, "c")},
    ]
    return build_kb(write_jsonl(tmp_path / "kb.jsonl", docs), passage_words=10)


def test_gold_doc_resolution(tmp_path: Path, kb_two_docs: Any) -> None:
    kb = kb_two_docs
    assert kb["doc_id"] == ["d1", "d1", "d2"]
    path = write_jsonl(
        tmp_path / "qa.jsonl",
        [
            {"question": "Where?", "answers": ["nowhere", "blue lagoon"], "gold_doc": "d1"},  # answer in 2nd passage
            {"question": "What?", "answers": ["absent"], "gold_doc": "d1"},  # not found -> doc's first passage
            {"question": "Which?", "answers": ["c1"], "gold_doc": "d2"},
            {"question": "Lost?", "answers": ["x"], "gold_doc": "d9"},  # unknown doc -> -1
            {"question": "Given?", "answers": ["x"], "gold_passage_id": 2, "gold_doc": "d1"},  # explicit id wins
        ],
    )
    qa, stats = load_qa(path, kb=kb, return_stats=True)
    assert [q["gold_passage_id"] for q in qa] == [1, 0, 2, -1, 2]
    assert "blue lagoon" in kb[1]["text"].lower()
    assert stats["gold_unresolved"] == 1
    # without a KB, gold_doc cannot be resolved
    assert [q["gold_passage_id"] for q in load_qa(path)] == [-1, -1, -1, -1, 2]


def test_gold_passage_id_out_of_range(tmp_path: Path, kb_two_docs: Any) -> None:
    path = write_jsonl(tmp_path / "qa.jsonl", [{"question": "q", "answers": ["a"], "gold_passage_id": 3}])
    with pytest.raises(DataError, match=r"qa\.jsonl row 1: 'gold_passage_id' 3 out of range"):
        load_qa(path, kb=kb_two_docs)
    assert load_qa(path)[0]["gold_passage_id"] == 3


BAD_QA_ROWS = [
    ("empty question", {"question": "  ", "answers": ["a"]}, "question"),
    ("missing question", {"answers": ["a"]}, "question"),
    ("no answers", {"question": "q", "answers": []}, "no answers"),
    ("blank answers", {"question": "q", "answers": ["", "  "]}, "no answers"),
    ("no answer key", {"question": "q"}, "no answers"),
    ("invalid json", '{"question": "q", ', "invalid JSON"),
    ("bad gold id", {"question": "q", "answers": ["a"], "gold_passage_id": "7"}, "gold_passage_id"),
]


@pytest.mark.parametrize(("row", "reason"), [c[1:] for c in BAD_QA_ROWS], ids=[c[0] for c in BAD_QA_ROWS])
def test_jsonl_bad_rows(tmp_path: Path, row: Any, reason: str) -> None:
    good = {"question": "fine?", "answers": ["yes"]}
    path = write_jsonl(tmp_path / "dev.jsonl", [good, "", good, row, good])
    with pytest.raises(DataError) as exc:
        load_qa(path)
    msg = str(exc.value)
    assert "\n" not in msg and "dev.jsonl" in msg and "row 4" in msg and reason in msg
    qa, stats = load_qa(path, skip_bad_rows=True, return_stats=True)
    assert len(qa) == 3 and stats["skipped"] == 1 and "row 4" in stats["skipped_rows"][0]


def test_undecodable_qa_row(tmp_path: Path) -> None:
    path = tmp_path / "qa.jsonl"
    path.write_bytes(b'{"question": "ok", "answers": ["a"]}\n{"question": "caf\xe9", "answers": ["a"]}\n')
    with pytest.raises(DataError, match=r"qa\.jsonl row 2: undecodable"):
        load_qa(path)


def test_missing_file_and_unknown_format(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="nope.jsonl"):
        load_qa(tmp_path / "nope.jsonl")
    (tmp_path / "qa.txt").write_text("x\n")
    with pytest.raises(DataError, match="qa.txt"):
        load_qa(tmp_path / "qa.txt")


# ----------------------------------------------------------------------------------------------
# SQuAD
# ----------------------------------------------------------------------------------------------


@pytest.fixture
def squad_file(tmp_path: Path) -> tuple[Path, str]:
    # paragraph of 25 words with the answer inside the 2nd 10-word chunk (words 10..19)
    context = filler(12, "p") + " Zephyr Hall " + filler(11, "q")
    answer_start = context.index("Zephyr Hall")
    data = {
        "data": [
            {
                "title": "Buildings",
                "paragraphs": [
                    {
                        "context": "Short first paragraph about Orchard Gate.",
                        "qas": [
                            {
                                "id": "s0",
                                "question": "Which gate?",
                                "answers": [{"text": "Orchard Gate", "answer_start": 28}],
                            },
                        ],
                    },
                    {
                        "context": context,
                        "qas": [
                            {
                                "id": "s1",
                                "question": "Which hall?",
                                "answers": [
                                    {"text": "Zephyr Hall", "answer_start": answer_start},
                                    {"text": "Zephyr Hall", "answer_start": answer_start},
                                    {"text": "Zephyr", "answer_start": answer_start},
                                ],
                            },
                            {"id": "s2", "question": "Unanswerable?", "answers": [], "is_impossible": True},
                        ],
                    },
                ],
            }
        ]
    }
    path = tmp_path / "train.json"
    path.write_text(json.dumps(data))
    return path, context


def test_squad_gold_passage_contains_answer(tmp_path: Path, squad_file: tuple[Path, str]) -> None:
    path, context = squad_file
    kb = build_kb(path, passage_words=10)
    assert len(split_words(context, 10)) == 3
    qa, stats = load_qa(path, kb=kb, passage_words=10, return_stats=True)
    assert [q["id"] for q in qa] == ["s0", "s1"] and stats["unanswerable"] == 1
    assert qa[1]["answers"] == ["Zephyr Hall", "Zephyr"] and qa[1]["article"] == "Buildings"
    gold = kb[qa[1]["gold_passage_id"]]
    assert gold["doc_id"] == "Buildings:1" and gold["char_start"] > 0  # not the paragraph's first chunk
    assert "Zephyr Hall" in gold["text"]
    assert "Orchard Gate" in kb[qa[0]["gold_passage_id"]]["text"]
    # without a KB the ids refer to build_kb(path, passage_words) of this file alone
    assert [q["gold_passage_id"] for q in load_qa(path, passage_words=10)] == [q["gold_passage_id"] for q in qa]


def test_squad_gold_ids_follow_kb_order(tmp_path: Path, squad_file: tuple[Path, str]) -> None:
    path, _ = squad_file
    other = write_jsonl(tmp_path / "other.jsonl", [{"title": "X", "text": filler(25, "o")}])
    kb = build_kb([other, path], passage_words=10)  # 3 passages come first
    qa = load_qa(path, kb=kb, passage_words=10)
    assert qa[1]["gold_passage_id"] == load_qa(path, passage_words=10)[1]["gold_passage_id"] + 3
    assert "Zephyr Hall" in kb[qa[1]["gold_passage_id"]]["text"]


def test_squad_bad_question(tmp_path: Path) -> None:
    data = {
        "data": [
            {
                "title": "T",
                "paragraphs": [
                    {
                        "context": "c",
                        "qas": [
                            {"id": "a", "question": "ok", "answers": [{"text": "c", "answer_start": 0}]},
                            {"id": "b", "question": "no answers", "answers": []},
                        ],
                    }
                ],
            }
        ]
    }
    path = tmp_path / "dev.json"
    path.write_text(json.dumps(data))
    with pytest.raises(DataError, match=r"dev\.json article 1 paragraph 1 question 2: no answers"):
        load_qa(path)
    qa, stats = load_qa(path, skip_bad_rows=True, return_stats=True)
    assert [q["id"] for q in qa] == ["a"] and stats["skipped"] == 1


# ----------------------------------------------------------------------------------------------
# RAG .source / .target line files
# ----------------------------------------------------------------------------------------------


def test_line_files(tmp_path: Path) -> None:
    (tmp_path / "train.source").write_text("who wrote it\r\nwhere is it\n")
    (tmp_path / "train.target").write_text("Ann Lee\nthe north\tside\n")
    qa = load_qa(tmp_path / "train.source")
    assert qa == [
        {"id": "train:0", "question": "who wrote it", "answers": ["Ann Lee"], "article": None, "gold_passage_id": -1},
        {
            "id": "train:1",
            "question": "where is it",
            "answers": ["the north\tside"],
            "article": None,
            "gold_passage_id": -1,
        },
    ]


def test_line_files_mismatch_and_bad_rows(tmp_path: Path) -> None:
    src, tgt = tmp_path / "val.source", tmp_path / "val.target"
    src.write_text("q1\nq2\nq3\n")
    tgt.write_text("a1\na2\n")
    with pytest.raises(DataError) as exc:
        load_qa(src)
    assert "val.source" in str(exc.value) and "val.target" in str(exc.value)
    tgt.write_text("a1\n\na3\n")
    with pytest.raises(DataError, match=r"val\.target row 2: empty answer"):
        load_qa(src)
    src.write_text("q1\n  \nq3\n")
    tgt.write_text("a1\na2\na3\n")
    with pytest.raises(DataError, match=r"val\.source row 2: empty question"):
        load_qa(src)
    qa, stats = load_qa(src, skip_bad_rows=True, return_stats=True)
    assert [q["id"] for q in qa] == ["val:0", "val:2"] and stats["skipped"] == 1
    tgt.unlink()
    with pytest.raises(DataError, match="val.target"):
        load_qa(src)


# ----------------------------------------------------------------------------------------------
# split_by_article
# ----------------------------------------------------------------------------------------------


def make_examples(n_articles: int, per_article: int = 3, loose: int = 4) -> list[dict[str, Any]]:
    out = [
        {"id": f"{a}-{k}", "question": "q", "answers": ["a"], "article": f"art{a}", "gold_passage_id": -1}
        for a in range(n_articles)
        for k in range(per_article)
    ]
    out += [
        {"id": f"loose{k}", "question": "q", "answers": ["a"], "article": None, "gold_passage_id": -1}
        for k in range(loose)
    ]
    return out


def test_split_by_article_disjoint_complete_deterministic() -> None:
    examples = make_examples(20)
    splits = split_by_article(examples, seed=3)
    assert set(splits) == {"train", "validation", "test"}
    owners: dict[str, str] = {}
    for name, part in splits.items():
        assert part
        for ex in part:
            key = ex["article"] or ex["id"]
            assert owners.setdefault(key, name) == name, f"{key} in two splits"
    assert sorted(ex["id"] for part in splits.values() for ex in part) == sorted(ex["id"] for ex in examples)
    assert split_by_article(examples, seed=3) == splits
    assert split_by_article(list(reversed(examples)), seed=3)["test"] == list(reversed(splits["test"]))
    assert any(split_by_article(examples, seed=s) != splits for s in range(4, 10))
    # 24 groups at 0.8/0.1/0.1 -> 19/2/3 or 20/2/2 groups; train gets most
    assert len(splits["train"]) > len(splits["validation"]) + len(splits["test"])


@pytest.mark.parametrize("n", [3, 4, 5])
def test_split_every_split_non_empty_with_three_articles(n: int) -> None:
    for seed in range(5):
        splits = split_by_article(make_examples(n, loose=0), seed=seed)
        assert all(splits[s] for s in ("train", "validation", "test"))


def test_split_edge_cases() -> None:
    assert split_by_article([]) == {"train": [], "validation": [], "test": []}
    one = make_examples(1, loose=0)
    assert split_by_article(one)["train"] == one
    only_train = split_by_article(make_examples(5, loose=0), fractions=(1, 0, 0))
    assert len(only_train["train"]) == 15 and not only_train["validation"] and not only_train["test"]
    with pytest.raises(ValueError):
        split_by_article(one, fractions=(0.5, 0.5))


# ----------------------------------------------------------------------------------------------
# shipped sample data
# ----------------------------------------------------------------------------------------------


def test_sample_answers_occur_in_gold_doc_text() -> None:
    docs = {d["id"]: d for d in map(json.loads, (SAMPLE / "kb.jsonl").read_text(encoding="utf-8").splitlines())}
    rows = [json.loads(line) for line in (SAMPLE / "qa.jsonl").read_text(encoding="utf-8").splitlines()]
    assert 35 <= len(docs) <= 50 and len(rows) >= 100
    assert len({r["id"] for r in rows}) == len(rows)
    assert sum(len(d["text"].split()) > 100 for d in docs.values()) >= 3
    assert all(40 <= len(d["text"].split()) <= 120 for d in docs.values())
    for r in rows:
        doc = docs[r["gold_doc"]]
        assert r["article"] == doc["title"]
        assert len(r["answers"]) >= 1
        for answer in r["answers"]:
            assert answer.lower() in doc["text"].lower(), (r["id"], answer)
            assert len(answer.split()) <= 3, (r["id"], answer)


@pytest.mark.parametrize("passage_words", [60, 100])
def test_sample_gold_passages_contain_an_answer(passage_words: int) -> None:
    kb = build_kb(SAMPLE / "kb.jsonl", passage_words=passage_words)
    qa, stats = load_qa(SAMPLE / "qa.jsonl", kb=kb, return_stats=True)
    assert stats["skipped"] == 0 and stats["gold_unresolved"] == 0
    texts = kb["text"]
    for q in qa:
        assert q["gold_passage_id"] != -1, q["id"]
        passage = texts[q["gold_passage_id"]].lower()
        assert any(a.lower() in passage for a in q["answers"]), (q["id"], q["answers"])
    assert len(kb) > len({d for d in kb["doc_id"]})  # some documents really were split
    splits = split_by_article(qa)
    assert all(splits.values())


def test_title_less_squad_questions_split_by_article_index(tmp_path: Path) -> None:
    """COVID-QA has no article titles: the article index names the article (KB doc ids, gold passages, splits)."""
    articles = []
    for a in range(6):
        context = filler(8, f"x{a}") + f" Answer{a} is here " + filler(8, f"y{a}")
        qas = [{"id": f"q{a}-{j}", "question": f"Where is answer {a}?",
                "answers": [{"text": f"Answer{a}", "answer_start": context.index(f"Answer{a}")}]} for j in range(3)]
        articles.append({"paragraphs": [{"context": context, "qas": qas}]})  # no "title" at all
    path = tmp_path / "covid.json"
    path.write_text(json.dumps({"data": articles}))
    kb = build_kb(path, passage_words=10)
    qa = load_qa(path, kb=kb, passage_words=10)
    assert len(qa) == 18 and {q["article"] for q in qa} == {f"#{a}" for a in range(1, 7)}
    for q in qa:
        gold = kb[q["gold_passage_id"]]
        assert gold["title"] == "" and gold["doc_id"] == f"{q['article']}:0" and q["answers"][0] in gold["text"]
    splits = split_by_article(qa, fractions=(0.5, 0.25, 0.25), seed=0)
    arts = {s: {q["article"] for q in rows} for s, rows in splits.items()}
    assert all(arts[s] for s in arts)
    assert not (arts["train"] & arts["test"]) and not (arts["train"] & arts["validation"])
    train_gold = {q["gold_passage_id"] for q in splits["train"]}
    assert not train_gold & {q["gold_passage_id"] for q in splits["test"]}


def test_split_without_articles_groups_by_gold_passage() -> None:
    """40 questions without articles whose gold passages are i % 5: each passage's questions stay together."""
    examples = [{"id": f"q{i}", "question": "q", "answers": ["a"], "article": None, "gold_passage_id": i % 5}
                for i in range(40)]
    for seed in range(5):
        splits = split_by_article(examples, seed=seed)
        golds = {s: {ex["gold_passage_id"] for ex in part} for s, part in splits.items()}
        assert not golds["train"] & golds["test"] and not golds["train"] & golds["validation"]
        assert not golds["validation"] & golds["test"]
        assert all(splits.values()) and sum(map(len, splits.values())) == 40


def test_split_joins_articles_that_share_a_gold_passage() -> None:
    """A question naming another article's gold passage (or none) ties the two groups together."""
    examples = make_examples(12, loose=0)
    for i, ex in enumerate(examples):
        ex["gold_passage_id"] = 100 + i // 3  # one passage per article
    examples.append({"id": "bridge", "question": "q", "answers": ["a"], "article": "art0", "gold_passage_id": 105})
    examples.append({"id": "orphan", "question": "q", "answers": ["a"], "article": None, "gold_passage_id": 107})
    for seed in range(6):
        splits = split_by_article(examples, seed=seed)
        owner = {ex["id"]: s for s, part in splits.items() for ex in part}
        assert owner["bridge"] == owner["0-0"] == owner["5-0"]  # art0 and art5 are one group
        assert owner["orphan"] == owner["7-0"]
        golds = {s: {ex["gold_passage_id"] for ex in part} for s, part in splits.items()}
        assert not golds["train"] & golds["test"]
