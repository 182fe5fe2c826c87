"""Tests for ragtrain.data.kb: passage splitting, KB building from every input format, atomic
saving, memory-mapped reloading and one-line errors for bad input."""

from __future__ import annotations

import csv
import gzip
import json
import logging
from pathlib import Path
from typing import Any

import pytest

from ragtrain.data.errors import DataError
from ragtrain.data.kb import KB_COLUMNS, build_kb, kb_stats, load_kb, split_words

# ----------------------------------------------------------------------------------------------
# helpers
# ----------------------------------------------------------------------------------------------


def words(n: int, prefix: str = "w") -> str:
    return " ".join(f"{prefix}{i}" for i in range(n))


def write_csv(path: Path, rows: list[dict[str, str]], delimiter: str = ",") -> Path:
    with open(path, "w", newline="", encoding="utf-8") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]), delimiter=delimiter)
        writer.writeheader()
        writer.writerows(rows)
    return path


def write_jsonl(path: Path, rows: list[Any]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


def squad(articles: list[tuple[str, list[str]]]) -> dict[str, Any]:
    return {
        "version": "1.1",
        "data": [
            {"title": title, "paragraphs": [{"context": c, "qas": []} for c in contexts]}
            for title, contexts in articles
        ],
    }


def assert_one_line_error(exc: pytest.ExceptionInfo[DataError], *parts: str) -> None:
    msg = str(exc.value)
    assert "\n" not in msg
    for part in parts:
        assert part in msg, f"{part!r} not in {msg!r}"


@pytest.fixture
def docs() -> list[dict[str, str]]:
    return [
        {"id": "a", "title": "Alpha", "text": words(7, "a")},
        {"id": "", "title": "Beta", "text": "  " + words(3, "b") + "\n"},
        {"id": "c", "title": "Gamma", "text": words(6, "c")},
    ]


# ----------------------------------------------------------------------------------------------
# split_words
# ----------------------------------------------------------------------------------------------


def test_split_words_chunks_and_remainder() -> None:
    assert split_words("a b c d e", 2) == ["a b", "c d", "e"]
    assert split_words("a b c d", 2) == ["a b", "c d"]
    assert split_words("  a\tb\n\nc  ", 5) == ["a b c"]
    assert split_words("", 3) == []
    assert split_words(" \n\t ", 3) == []
    assert split_words(words(250), 100) == [
        words(100),
        " ".join(f"w{i}" for i in range(100, 200)),
        " ".join(f"w{i}" for i in range(200, 250)),
    ]


def test_split_words_rejects_non_positive() -> None:
    with pytest.raises(ValueError):
        split_words("a b", 0)


# ----------------------------------------------------------------------------------------------
# build_kb: formats
# ----------------------------------------------------------------------------------------------


def check_kb(ds: Any, source_texts: dict[str, str], n_words: int) -> None:
    assert ds.column_names == list(KB_COLUMNS)
    assert ds["id"] == list(range(len(ds)))
    for row in ds:
        src = source_texts[row["doc_id"]]
        # char_start points at the passage's first word in the source text
        assert src[row["char_start"] :].startswith(row["text"].split()[0])
        assert 1 <= len(row["text"].split()) <= n_words


def test_build_kb_csv(tmp_path: Path, docs: list[dict[str, str]]) -> None:
    path = write_csv(tmp_path / "kb.csv", docs)
    ds = build_kb(path, passage_words=3)
    # 7 words -> 3+3+1, 3 words -> 3, 6 words -> 3+3
    assert ds["title"] == ["Alpha"] * 3 + ["Beta"] + ["Gamma"] * 2
    assert [len(t.split()) for t in ds["text"]] == [3, 3, 1, 3, 3, 3]
    assert ds["doc_id"] == ["a", "a", "a", "kb:1", "c", "c"]
    assert ds["text"][0] == "a0 a1 a2" and ds["text"][2] == "a6"
    assert ds["char_start"][:3] == [0, len("a0 a1 a2 "), len("a0 a1 a2 a3 a4 a5 ")]
    assert ds["char_start"][3] == 2  # leading spaces of the Beta text
    check_kb(ds, {"a": docs[0]["text"], "kb:1": docs[1]["text"], "c": docs[2]["text"]}, 3)


def test_build_kb_tsv_without_id_column(tmp_path: Path, docs: list[dict[str, str]]) -> None:
    rows = [{"text": d["text"], "title": d["title"]} for d in docs]
    path = write_csv(tmp_path / "passages.tsv", rows, delimiter="\t")
    ds = build_kb(path, passage_words=4)
    assert ds["doc_id"] == ["passages:0", "passages:0", "passages:1", "passages:2", "passages:2"]
    assert ds["title"] == ["Alpha", "Alpha", "Beta", "Gamma", "Gamma"]
    assert [len(t.split()) for t in ds["text"]] == [4, 3, 3, 4, 2]
    check_kb(ds, {f"passages:{i}": d["text"] for i, d in enumerate(docs)}, 4)


def test_build_kb_jsonl_and_gzip(tmp_path: Path, docs: list[dict[str, str]]) -> None:
    plain = write_jsonl(tmp_path / "kb.jsonl", docs)
    zipped = tmp_path / "kb.jsonl.gz"
    zipped.write_bytes(gzip.compress(plain.read_bytes()))
    a = build_kb(plain, passage_words=3)
    b = build_kb(zipped, passage_words=3)
    assert a.to_dict() == b.to_dict()
    assert a["doc_id"] == ["a", "a", "a", "kb:1", "c", "c"]  # .gz stripped from the stem
    assert len(a) == 6


def test_build_kb_squad(tmp_path: Path) -> None:
    contexts = [words(5, "x"), "Lead. " + words(4, "y")]
    path = tmp_path / "dev.json"
    path.write_text(json.dumps(squad([("Topic One", contexts), ("Topic Two", [words(2, "z")])])))
    ds = build_kb(path, passage_words=3)
    assert ds["doc_id"] == ["Topic One:0", "Topic One:0", "Topic One:1", "Topic One:1", "Topic Two:0"]
    assert ds["title"] == ["Topic One"] * 4 + ["Topic Two"]
    assert ds["text"][2] == "Lead. y0 y1"
    check_kb(ds, {"Topic One:0": contexts[0], "Topic One:1": contexts[1], "Topic Two:0": words(2, "z")}, 3)
    gz = tmp_path / "dev.json.gz"
    gz.write_bytes(gzip.compress(path.read_bytes()))
    assert build_kb(gz, passage_words=3).to_dict() == ds.to_dict()


def test_fmt_overrides_extension(tmp_path: Path, docs: list[dict[str, str]]) -> None:
    path = write_jsonl(tmp_path / "docs.txt", docs)
    with pytest.raises(DataError, match="docs.txt"):
        build_kb(path)
    assert len(build_kb(path, fmt="jsonl", passage_words=100)) == 3


def test_multiple_sources_ids_continue_and_stable(tmp_path: Path, docs: list[dict[str, str]]) -> None:
    a = write_jsonl(tmp_path / "a.jsonl", docs)
    b = write_csv(tmp_path / "b.csv", docs)
    # the same documents twice: their ids repeat, which is an error unless asked to warn (and count)
    with pytest.raises(DataError, match=r"b.csv row 2: id 'a' is also the id of .*a.jsonl row 1"):
        build_kb([a, b], passage_words=3)
    ds1, stats = build_kb([a, b], passage_words=3, return_stats=True, duplicate_ids="warn")
    ds2 = build_kb([str(a), str(b)], passage_words=3, duplicate_ids="warn")
    assert stats["duplicate_ids"] == 2  # "a" and "c"; the row without an id gets a per-file one
    assert ds1["id"] == list(range(12))
    assert ds1["text"][:6] == ds1["text"][6:]
    assert ds1.to_dict() == ds2.to_dict()
    assert stats["documents"] == 6 and stats["passages"] == 12 and stats["skipped"] == 0
    assert [s["passages"] for s in stats["sources"]] == [6, 6]


def test_crlf_and_quoted_multiline_csv(tmp_path: Path) -> None:
    path = tmp_path / "kb.csv"
    path.write_bytes(b'title,text\r\nA,"one two\r\nthree"\r\nB,four\r\n')
    ds = build_kb(path, passage_words=2)
    assert ds["text"] == ["one two", "three", "four"]
    assert ds["doc_id"] == ["kb:0", "kb:0", "kb:1"]


# ----------------------------------------------------------------------------------------------
# saving / loading
# ----------------------------------------------------------------------------------------------


def test_save_reload_memory_mapped_and_replace(tmp_path: Path, docs: list[dict[str, str]]) -> None:
    src = write_jsonl(tmp_path / "kb.jsonl", docs)
    out = tmp_path / "out" / "kb"
    ds = build_kb(src, out_dir=out, passage_words=3)
    assert ds.cache_files and all(Path(f["filename"]).is_relative_to(out) for f in ds.cache_files)
    loaded = load_kb(out)
    assert loaded.cache_files  # memory-mapped Arrow, not in-memory
    assert loaded.to_dict() == build_kb(src, passage_words=3).to_dict()
    # rebuilding replaces the old KB; no temp dirs are left beside it
    again = build_kb(src, out_dir=out, passage_words=100)
    assert len(again) == 3 and len(load_kb(out)) == 3
    assert sorted(p.name for p in out.parent.iterdir()) == ["kb"]


def test_refuses_to_overwrite_non_kb_dir(tmp_path: Path, docs: list[dict[str, str]]) -> None:
    src = write_jsonl(tmp_path / "kb.jsonl", docs)
    out = tmp_path / "precious"
    out.mkdir()
    (out / "notes.txt").write_text("keep me")
    with pytest.raises(DataError, match="precious"):
        build_kb(src, out_dir=out)
    assert (out / "notes.txt").read_text() == "keep me"


def test_load_kb_errors(tmp_path: Path, docs: list[dict[str, str]]) -> None:
    with pytest.raises(DataError, match="nowhere"):
        load_kb(tmp_path / "nowhere")
    src = write_jsonl(tmp_path / "kb.jsonl", docs)
    with pytest.raises(DataError, match="kb.jsonl"):
        load_kb(src)
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="empty"):
        load_kb(tmp_path / "empty")


def test_kb_stats(docs: list[dict[str, str]], tmp_path: Path) -> None:
    ds = build_kb(write_jsonl(tmp_path / "kb.jsonl", docs), passage_words=3)
    assert kb_stats(ds) == {"passages": 6, "documents": 3, "words_min": 1, "words_mean": 16 / 6, "words_max": 3}


# ----------------------------------------------------------------------------------------------
# bad input
# ----------------------------------------------------------------------------------------------

GOOD_JSONL = json.dumps({"title": "T", "text": "some words here"}) + "\n"

# name, file name, file bytes, expected message parts (besides the file name)
BAD_INPUTS: list[tuple[str, str, bytes, tuple[str, ...]]] = [
    ("csv empty text", "kb.csv", b"title,text\nA,fine text\nB,more\nC,   \n", ("row 4", "'text' is only whitespace")),
    ("csv short row", "kb.csv", b"id,title,text\n1,A,fine\n2,B\n", ("row 3", "missing 'text'")),
    ("csv bad bytes", "kb.csv", b"title,text\nA,ok\nB,ok\nC,caf\xe9 au lait\n", ("row 4", "undecodable")),
    ("csv multiline then bad", "kb.csv", b'title,text\nA,"two\nlines"\nB,\n', ("row 4", "empty 'text'")),
    ("tsv empty text", "kb.tsv", b"title\ttext\nA\tok\nB\t\n", ("row 3", "empty 'text'")),
    ("jsonl invalid json", "kb.jsonl", (GOOD_JSONL + '{"title": "x", "text": \n').encode(), ("row 2", "invalid JSON")),
    (
        "jsonl bad bytes",
        "kb.jsonl",
        GOOD_JSONL.encode() * 2 + b'{"title": "x", "text": "\xff\xfe"}\n',
        ("row 3", "undecodable"),
    ),
    (
        "jsonl empty text",
        "kb.jsonl",
        (GOOD_JSONL + "\n" + json.dumps({"title": "x", "text": ""}) + "\n").encode(),
        ("row 3", "empty 'text'"),
    ),
    ("jsonl missing text", "kb.jsonl", (json.dumps({"title": "x"}) + "\n").encode(), ("row 1", "missing 'text'")),
    ("jsonl not object", "kb.jsonl", (GOOD_JSONL + "[1, 2]\n").encode(), ("row 2", "JSON object")),
    (
        "squad empty context",
        "train.json",
        json.dumps(squad([("A", ["fine"]), ("B", ["ok", " "])])).encode(),
        ("article 2 paragraph 2", "'context' is only whitespace"),
    ),
    ("squad invalid json", "train.json", b'{"data": [\n{"title": }\n]}', ("line 2", "invalid JSON")),
    (
        "squad bad bytes",
        "train.json",
        b'{"data": [{"title": "A", "paragraphs": [{"context": "\xc3("}]}]}',
        ("article 1 paragraph 1", "undecodable"),
    ),
]


@pytest.mark.parametrize(("fname", "content", "parts"), [c[1:] for c in BAD_INPUTS], ids=[c[0] for c in BAD_INPUTS])
def test_bad_row_is_one_line_error_naming_file_and_row(
    tmp_path: Path, fname: str, content: bytes, parts: tuple[str, ...]
) -> None:
    path = tmp_path / fname
    path.write_bytes(content)
    out = tmp_path / "out"
    with pytest.raises(DataError) as exc:
        build_kb(path, out_dir=out, passage_words=2)
    assert_one_line_error(exc, fname, *parts)
    # nothing half-written: no out_dir and no temp dir beside it
    assert sorted(p.name for p in tmp_path.iterdir()) == [fname]


def test_gzip_bad_bytes_row(tmp_path: Path) -> None:
    path = tmp_path / "kb.jsonl.gz"
    path.write_bytes(gzip.compress(GOOD_JSONL.encode() + b'{"title": "x", "text": "\x80"}\n'))
    with pytest.raises(DataError) as exc:
        build_kb(path)
    assert_one_line_error(exc, "kb.jsonl.gz", "row 2", "undecodable")


def test_missing_file(tmp_path: Path) -> None:
    with pytest.raises(DataError) as exc:
        build_kb(tmp_path / "absent.csv", skip_bad_rows=True)
    assert_one_line_error(exc, "absent.csv", "not found")


@pytest.mark.parametrize("skip", [False, True])
def test_missing_column_always_errors(tmp_path: Path, skip: bool) -> None:
    path = tmp_path / "kb.csv"
    path.write_text("title,body\nA,words\n")
    with pytest.raises(DataError) as exc:
        build_kb(path, skip_bad_rows=skip, out_dir=tmp_path / "out")
    assert_one_line_error(exc, "kb.csv", "'text'", "column")
    assert not (tmp_path / "out").exists()


def test_failed_rebuild_keeps_old_kb(tmp_path: Path, docs: list[dict[str, str]]) -> None:
    good = write_jsonl(tmp_path / "good.jsonl", docs)
    bad = tmp_path / "bad.jsonl"
    bad.write_text(GOOD_JSONL + "{oops\n")
    out = tmp_path / "kb"
    build_kb(good, out_dir=out, passage_words=3)
    with pytest.raises(DataError, match="bad.jsonl row 2"):
        build_kb([good, bad], out_dir=out, passage_words=3)
    assert len(load_kb(out)) == 6
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bad.jsonl", "good.jsonl", "kb"]


def test_failed_build_removes_created_parents(tmp_path: Path) -> None:
    bad = tmp_path / "bad.jsonl"
    bad.write_text("{oops\n")
    with pytest.raises(DataError):
        build_kb(bad, out_dir=tmp_path / "new" / "deeper" / "kb")
    assert not (tmp_path / "new").exists()


def test_skip_bad_rows_counts_and_warns(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    path = tmp_path / "kb.jsonl"
    lines = [
        GOOD_JSONL.strip(),
        "{not json",
        json.dumps({"title": "E", "text": "   "}),
        json.dumps({"title": "Z", "text": "last doc"}),
    ]
    path.write_bytes(("\n".join(lines) + "\n").encode() + b'{"title": "b", "text": "\xff"}\n')
    with caplog.at_level(logging.WARNING, logger="ragtrain.data.kb"):
        ds, stats = build_kb(path, skip_bad_rows=True, out_dir=tmp_path / "out", return_stats=True)
    assert stats["skipped"] == 3 and stats["documents"] == 2
    assert ds["id"] == [0, 1] and ds["text"] == ["some words here", "last doc"]
    assert ds["doc_id"] == ["kb:0", "kb:3"]  # default ids count every record, so they are stable
    assert any("row 2" in r for r in stats["skipped_rows"])
    assert any("skipped 3 bad row" in r.getMessage() for r in caplog.records)


def test_only_bad_rows_is_an_error_even_when_skipping(tmp_path: Path) -> None:
    path = tmp_path / "kb.csv"
    path.write_text("title,text\nA,\nB, \n")
    with pytest.raises(DataError, match="no passages"):
        build_kb(path, skip_bad_rows=True)


def test_invalid_passage_words(tmp_path: Path, docs: list[dict[str, str]]) -> None:
    with pytest.raises(DataError, match="passage_words"):
        build_kb(write_jsonl(tmp_path / "kb.jsonl", docs), passage_words=0)


# ----------------------------------------------------------------------------------------------
# titles are optional (COVID-QA and many SQuAD-format files have none)
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("fmt", ["csv", "tsv", "jsonl", "jsonl-null"])
def test_title_less_rows_get_an_empty_title(tmp_path: Path, fmt: str) -> None:
    texts = [words(7, "a"), words(3, "b")]
    if fmt in ("csv", "tsv"):
        path = write_csv(tmp_path / f"kb.{fmt}", [{"text": t} for t in texts], "," if fmt == "csv" else "\t")
    else:
        rows = [{"text": t} if fmt == "jsonl" else {"title": None, "text": t} for t in texts]
        path = write_jsonl(tmp_path / "kb.jsonl", rows)
    ds = build_kb(path, passage_words=5)
    assert ds["title"] == ["", "", ""]
    first = texts[0].split()
    assert ds["text"] == [" ".join(first[:5]), " ".join(first[5:]), texts[1]]
    assert ds["doc_id"] == ["kb:0", "kb:0", "kb:1"]


def test_title_less_squad_articles_are_named_by_index(tmp_path: Path) -> None:
    data = squad([("", [words(4, "a")]), ("Named", [words(3, "b")]), ("", [words(6, "c"), words(2, "d")])])
    del data["data"][0]["title"]  # absent, and empty: both are "no title"
    path = tmp_path / "covid.json.gz"
    path.write_bytes(gzip.compress(json.dumps(data).encode()))
    ds = build_kb(path, passage_words=5)
    assert ds["title"] == ["", "Named", "", "", ""]
    assert ds["doc_id"] == ["#1:0", "Named:0", "#3:0", "#3:0", "#3:1"]


def test_non_string_title_is_still_a_bad_row(tmp_path: Path) -> None:
    path = write_jsonl(tmp_path / "kb.jsonl", [{"title": 7, "text": "words here"}])
    with pytest.raises(DataError) as exc:
        build_kb(path)
    assert_one_line_error(exc, "kb.jsonl", "row 1", "'title' must be a string")


# ----------------------------------------------------------------------------------------------
# overlapping passages (data.passage_stride) and plain datasets folders
# ----------------------------------------------------------------------------------------------


def test_split_words_with_stride_gives_overlapping_windows() -> None:
    assert split_words(words(7), 4, 2) == ["w0 w1 w2 w3", "w2 w3 w4 w5", "w4 w5 w6"]
    assert split_words(words(6), 4, 2) == ["w0 w1 w2 w3", "w2 w3 w4 w5"]  # no window past the last word
    assert split_words(words(7), 4, 4) == split_words(words(7), 4) == split_words(words(7), 4, 0)
    assert split_words(words(250), 100, 50)[-1] == " ".join(f"w{i}" for i in range(150, 250))
    with pytest.raises(ValueError, match="stride"):
        split_words(words(7), 4, 5)


def test_answer_straddling_a_boundary_is_whole_in_an_overlapping_passage(tmp_path: Path) -> None:
    """DPR-style 100-word windows every 50 words: an answer cut by the 100-word boundary (words 98-102) is
    wholly inside a passage; without overlap it is in none, and the SQuAD gold passage (by answer_start) is the
    one that holds it."""
    from ragtrain.data.qa import load_qa

    text = words(98) + " the grand old river bank " + words(100, "z")
    answer = "the grand old river bank"
    path = tmp_path / "kb.json"
    path.write_text(json.dumps({"data": [{"title": "T", "paragraphs": [{"context": text, "qas": [
        {"id": "q1", "question": "where?", "answers": [{"text": answer, "answer_start": text.index(answer)}]}]}]}]}))
    plain = build_kb(path, passage_words=100)
    assert not any(answer in t for t in plain["text"])
    kb = build_kb(tmp_path / "kb.json", tmp_path / "kb_dir", passage_words=100, passage_stride=50)
    holding = [i for i, t in enumerate(kb["text"]) if answer in t]
    assert holding and all(len(t.split()) <= 100 for t in kb["text"])
    assert [len(t.split()) for t in kb["text"]] == [100, 100, 100, 53]  # starts 0, 50, 100, 150 of 203 words
    for row in kb:  # char_start still points at each window's first word
        assert text[row["char_start"]:].startswith(row["text"].split()[0])
    (ex,) = load_qa(path, kb=kb)
    assert ex["gold_passage_id"] in holding


def test_passage_stride_is_validated(tmp_path: Path, docs: list[dict[str, str]]) -> None:
    with pytest.raises(DataError, match="passage_stride"):
        build_kb(write_jsonl(tmp_path / "kb.jsonl", docs), passage_words=3, passage_stride=4)


def test_kb_cli_passage_stride(tmp_path: Path) -> None:
    from ragtrain.cli import main

    src = write_jsonl(tmp_path / "kb.jsonl", [{"title": "A", "text": words(10)}])
    assert main(["kb", str(src), "--out", str(tmp_path / "kb"), "--passage-words", "4", "--passage-stride", "3"]) == 0
    assert load_kb(tmp_path / "kb")["text"] == ["w0 w1 w2 w3", "w3 w4 w5 w6", "w6 w7 w8 w9"]


def test_plain_datasets_folder_is_a_kb(tmp_path: Path) -> None:
    import datasets

    datasets.Dataset.from_dict({"title": ["A", "B"], "text": ["x y", "u v w"]}).save_to_disk(str(tmp_path / "plain"))
    kb = load_kb(tmp_path / "plain")
    assert kb.column_names == list(KB_COLUMNS)
    assert kb["id"] == [0, 1] and kb["text"] == ["x y", "u v w"] and kb["title"] == ["A", "B"]
    assert kb["doc_id"] == ["plain:0", "plain:1"] and kb["char_start"] == [0, 0]
    # DPR's psgs_w100 layout: string ids (kept as doc_id), no title needed; a one-split DatasetDict
    dd = datasets.DatasetDict({"train": datasets.Dataset.from_dict({"id": ["17", "4"], "text": ["a", "b"]})})
    dd.save_to_disk(str(tmp_path / "dpr"))
    kb = load_kb(tmp_path / "dpr")
    assert kb["doc_id"] == ["17", "4"] and kb["id"] == [0, 1] and kb["title"] == ["", ""]
    datasets.Dataset.from_dict({"body": ["x"]}).save_to_disk(str(tmp_path / "notext"))
    with pytest.raises(DataError, match="no 'text' column") as exc:
        load_kb(tmp_path / "notext")
    assert_one_line_error(exc, str(tmp_path / "notext"))


KILLED_BUILD = r"""
import os, signal, sys
sys.path.insert(0, {src!r})
from ragtrain.data import kb
def die(*a, **k):
    os.kill(os.getpid(), signal.SIGKILL)  # mid-build: passages written to the temporary, nothing renamed yet
kb._save_quietly = die
from ragtrain.cli import main
main(["kb", {source!r}, "--out", {out!r}])
"""


def test_a_killed_kb_build_leaves_no_temporary_after_the_next_run(tmp_path: Path, docs: list[dict[str, str]]) -> None:
    """kill -9 during `ragtrain kb` leaves `.kb.tmp-<pid>-*` beside --out; the next `ragtrain kb` (or training run)
    removes it. A temporary of a build that is still running (its pid alive) is left alone."""
    import os
    import signal
    import subprocess
    import sys

    from ragtrain.cli import main

    src = write_jsonl(tmp_path / "src.jsonl", docs)
    out = tmp_path / "kb"
    script = KILLED_BUILD.format(src=str(Path(__file__).resolve().parents[1] / "src"), source=str(src), out=str(out))
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-2000:]
    left = list(tmp_path.glob(".kb.tmp-*"))
    assert len(left) == 1 and (left[0] / "passages.arrow").is_file() and not out.exists()
    running = tmp_path / ".kb.tmp-1-busy"  # pid 1 is alive: a build in progress elsewhere
    running.mkdir()
    assert main(["kb", str(src), "--out", str(out), "--passage-words", "3"]) == 0
    assert sorted(p.name for p in tmp_path.glob(".kb.tmp-*")) == [running.name]
    assert len(load_kb(out)) == 6
    os.rmdir(running)
