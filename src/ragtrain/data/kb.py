"""Knowledge-base ingestion: source files -> fixed-length passages -> a memory-mapped Arrow dataset.

Supported inputs (chosen by extension, or forced with ``fmt``; a trailing ``.gz`` means gzip):

* ``.csv`` / ``.tsv`` -- a header row with a ``text`` column (optional ``title`` and ``id``);
* ``.jsonl`` -- one JSON object per line with key ``text`` (optional ``title`` and ``id``);
* ``.json`` -- SQuAD format ``{"data": [{"title"?, "paragraphs": [{"context", "qas"}]}]}``.

Titles are optional everywhere: a document without one gets an empty title (the passage is encoded and shown
to the generator without a title line). A SQuAD article without a title is named ``#<1-based article index>``
wherever an article must be named (``doc_id``, article-level splits).

Every document (row / SQuAD paragraph) is cut into passages of ``passage_words`` whitespace words
(the last one may be shorter); each passage keeps its document's title. With ``passage_stride`` <
``passage_words`` the passages are DPR-style overlapping windows starting every ``passage_stride`` words (the
last window ends at the document's last word), so an answer of up to ``passage_words - passage_stride + 1``
words lies wholly inside some passage. The resulting dataset has the columns of :data:`KB_FEATURES`:

``id``          int64, 0..N-1 in ingestion order (stable across runs for the same inputs)
``title``       the document title
``text``        the passage text (words joined by single spaces)
``doc_id``      the source row's ``id`` if given, else ``"<file stem>:<row index>"`` (0-based index
                of the record in its file); for SQuAD ``"<article title or #index>:<paragraph index>"``
``char_start``  character offset of the passage's first word inside the source document text

Bad input raises :class:`~ragtrain.data.errors.DataError` with one line naming the file and row
(``row N`` is the 1-based line number in the file for CSV/TSV/JSONL). With ``skip_bad_rows=True``
bad rows are skipped and counted instead; a missing file or column is always an error.
"""

from __future__ import annotations

import csv
import gzip
import io
import json
import logging
import os
import re
import shutil
import sys
import tempfile
from array import array
from collections.abc import Generator, Iterable, Iterator
from contextlib import closing
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any, Literal, overload

import datasets
import pyarrow as pa
from tqdm.auto import tqdm

from ragtrain.data.errors import DataError

__all__ = [
    "DUPLICATE_IDS",
    "MAX_PASSAGE_CHARS",
    "scan_kb",
    "source_fingerprint",
    "sweep_stale_builds",
    "KB_COLUMNS",
    "KB_FEATURES",
    "KB_FORMATS",
    "build_kb",
    "detect_format",
    "kb_stats",
    "load_kb",
    "split_words",
    "word_spans",
]

logger = logging.getLogger(__name__)

KB_FORMATS = ("csv", "tsv", "jsonl", "squad")
KB_COLUMNS = ("id", "title", "text", "doc_id", "char_start")
KB_FEATURES = datasets.Features(
    {
        "id": datasets.Value("int64"),
        "title": datasets.Value("string"),
        "text": datasets.Value("string"),
        "doc_id": datasets.Value("string"),
        "char_start": datasets.Value("int64"),
    }
)
_ARROW_SCHEMA = KB_FEATURES.arrow_schema

_WORD_RE = re.compile(r"\S+")
# Bytes that are not valid UTF-8 survive decoding with errors="surrogateescape" as lone
# surrogates U+DC80..U+DCFF, which valid UTF-8 can never produce: that is how a bad row is located.
_UNDECODABLE_RE = re.compile("[\udc80-\udcff]")
_UNDECODABLE = "undecodable bytes (file is not valid UTF-8)"
_BATCH_ROWS = 10_000
_PROGRESS_MIN_BYTES = 8 << 20
_PROGRESS_MIN_ROWS = 100_000


# ----------------------------------------------------------------------------------------------
# Small shared helpers (also used by ragtrain.data.qa)
# ----------------------------------------------------------------------------------------------


def word_spans(text: str) -> list[tuple[int, int]]:
    """``(start, end)`` character spans of the whitespace-separated words of ``text``."""
    return [m.span() for m in _WORD_RE.finditer(text)]


def _window_starts(n: int, n_words: int, stride: int | None) -> list[int]:
    """First-word indices of the windows of ``n_words`` words over ``n`` words, every ``stride`` words
    (``None``/0 = ``n_words``: consecutive chunks); no window starts once one has reached the last word."""
    if n_words < 1:
        raise ValueError(f"n_words must be >= 1, got {n_words}")
    stride = stride or n_words
    if not 1 <= stride <= n_words:
        raise ValueError(f"stride must be between 1 and n_words ({n_words}), got {stride}")
    starts = []
    for i in range(0, n, stride):
        starts.append(i)
        if i + n_words >= n:
            break
    return starts


def split_words(text: str, n_words: int, stride: int | None = None) -> list[str]:
    """Cut ``text`` into chunks of ``n_words`` whitespace words (joined by one space), one starting every
    ``stride`` words (default ``n_words``: consecutive, no overlap).

    The last chunk may be shorter; empty or all-whitespace text gives ``[]``.
    """
    words = _WORD_RE.findall(text)
    return [" ".join(words[i : i + n_words]) for i in _window_starts(len(words), n_words, stride)]


def _chunk(text: str, n_words: int, stride: int | None = None) -> list[tuple[str, int]]:
    """Like :func:`split_words` but also returns each chunk's first-word character offset."""
    spans = word_spans(text)
    out = []
    for i in _window_starts(len(spans), n_words, stride):
        group = spans[i : i + n_words]
        out.append((" ".join(text[s:e] for s, e in group), group[0][0]))
    return out


def _empty_text(text: str) -> str:
    """Why a document's text is unusable: empty, or whitespace only (said so: the row is not blank to the eye)."""
    return f"'text' is only whitespace ({len(text)} character(s))" if text else "empty 'text'"


def has_undecodable(*values: Any) -> bool:
    """True if any string in ``values`` holds bytes that were not valid UTF-8 (see ``open_text``)."""
    return any(isinstance(v, str) and _UNDECODABLE_RE.search(v) for v in values)


def strip_compression(path: Path) -> tuple[str, str]:
    """``(stem, suffix)`` of ``path`` ignoring a trailing ``.gz``: ``kb.jsonl.gz`` -> ``("kb", ".jsonl")``."""
    name = path.name[:-3] if path.name.lower().endswith(".gz") else path.name
    p = Path(name)
    return p.stem, p.suffix.lower()


def check_file(path: Path) -> None:
    """Raise :class:`DataError` unless ``path`` is an existing regular file."""
    if not path.exists():
        raise DataError(f"{path}: file not found")
    if not path.is_file():
        raise DataError(f"{path}: not a regular file")


def open_text(path: Path, raw: IO[bytes] | None = None) -> io.TextIOWrapper:
    """Open ``path`` (gzip if it ends in ``.gz``) as UTF-8 text without failing on bad bytes.

    Undecodable bytes become lone surrogates (``errors="surrogateescape"``) so the caller can report
    the exact row with :func:`has_undecodable`. A UTF-8 BOM is dropped; newlines are not translated
    (``newline=""``, as the csv module requires).
    """
    binary: IO[bytes] = raw if raw is not None else open(path, "rb")  # noqa: SIM115
    if path.name.lower().endswith(".gz"):
        binary = gzip.GzipFile(fileobj=binary, mode="rb")  # type: ignore[assignment]
    return io.TextIOWrapper(binary, encoding="utf-8-sig", errors="surrogateescape", newline="")


def detect_format(path: str | Path, fmt: str | None = None) -> str:
    """The KB format of ``path``: ``fmt`` if given, else from the extension (``.gz`` ignored)."""
    path = Path(path)
    if fmt is not None:
        if fmt not in KB_FORMATS:
            raise DataError(f"{path}: unknown format {fmt!r} (expected one of {', '.join(KB_FORMATS)})")
        return fmt
    suffix = strip_compression(path)[1]
    by_suffix = {".csv": "csv", ".tsv": "tsv", ".jsonl": "jsonl", ".json": "squad"}
    if suffix not in by_suffix:
        raise DataError(
            f"{path}: cannot tell the format from the extension {suffix or '(none)'!r}; "
            f"use .csv/.tsv/.jsonl/.json[.gz] or pass fmt= one of {', '.join(KB_FORMATS)}"
        )
    return by_suffix[suffix]


class _Progress:
    """Byte-based progress over the raw (possibly compressed) file; silent for small files."""

    def __init__(self, path: Path, raw: IO[bytes]) -> None:
        size = path.stat().st_size
        self._raw = raw
        self._done = 0
        self._bar = tqdm(
            total=size,
            unit="B",
            unit_scale=True,
            desc=f"reading {path.name}",
            disable=size < _PROGRESS_MIN_BYTES,
            leave=False,
        )

    def tick(self) -> None:
        if self._bar.disable:
            return
        pos = self._raw.tell()
        if pos > self._done:
            self._bar.update(pos - self._done)
            self._done = pos

    def close(self) -> None:
        self._bar.close()


# ----------------------------------------------------------------------------------------------
# Readers: each yields _Doc (a good document) or _Bad (a skippable bad row)
# ----------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Doc:
    title: str
    text: str
    doc_id: str
    where: str = ""  # e.g. "row 7" or "article 2 paragraph 3" (error messages)


@dataclass(frozen=True)
class _Bad:
    where: str  # e.g. "row 7" or "article 2 paragraph 3"
    reason: str


def _read_delimited(path: Path, delimiter: str, progress: _Progress, f: io.TextIOWrapper) -> Iterator[_Doc | _Bad]:
    stem = strip_compression(path)[0]
    csv.field_size_limit(min(sys.maxsize, 2**31 - 1))
    reader = csv.reader(f, delimiter=delimiter)
    try:
        header = next(reader)
    except StopIteration:
        raise DataError(f"{path}: empty file (expected a header row with 'title' and 'text')") from None
    except csv.Error as e:
        raise DataError(f"{path} row 1: malformed header ({e})") from None
    if has_undecodable(*header):
        raise DataError(f"{path} row 1: {_UNDECODABLE}")
    cols = {name.strip().lower(): i for i, name in enumerate(header)}
    if "text" not in cols:  # a title column is optional: passages then get an empty title
        found = ", ".join(repr(h) for h in header)
        raise DataError(f"{path}: missing required column 'text' (header: {found})")
    i_title, i_text, i_id = cols.get("title"), cols["text"], cols.get("id")

    index = 0  # 0-based index of the data record (for default doc ids)
    while True:
        line = reader.line_num + 1  # 1-based line where the next record starts
        try:
            row = next(reader)
        except StopIteration:
            return
        except csv.Error as e:
            index += 1
            yield _Bad(f"row {line}", f"malformed CSV ({e})")
            continue
        progress.tick()
        if not row:  # blank line
            continue
        record_index, index = index, index + 1
        if has_undecodable(*row):
            yield _Bad(f"row {line}", _UNDECODABLE)
            continue
        text = row[i_text] if i_text < len(row) else None
        if text is None:
            yield _Bad(f"row {line}", f"missing 'text' (row has {len(row)} fields, header has {len(header)})")
            continue
        if not text.strip():
            yield _Bad(f"row {line}", _empty_text(text))
            continue
        title = row[i_title].strip() if i_title is not None and i_title < len(row) else ""
        given_id = row[i_id].strip() if i_id is not None and i_id < len(row) else ""
        yield _Doc(title, text, given_id or f"{stem}:{record_index}", f"row {line}")


def _read_jsonl(path: Path, progress: _Progress, f: io.TextIOWrapper) -> Iterator[_Doc | _Bad]:
    stem = strip_compression(path)[0]
    index = 0
    for line_no, line in enumerate(f, start=1):
        progress.tick()
        if not line.strip():
            continue
        record_index, index = index, index + 1
        where = f"row {line_no}"
        if has_undecodable(line):
            yield _Bad(where, _UNDECODABLE)
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as e:
            yield _Bad(where, f"invalid JSON ({e.msg} at column {e.colno})")
            continue
        if not isinstance(obj, dict):
            yield _Bad(where, f"expected a JSON object, got {type(obj).__name__}")
            continue
        if "text" not in obj:
            yield _Bad(where, "missing 'text'")
            continue
        text, title = obj["text"], obj.get("title")  # no title -> empty title
        if not isinstance(text, str):
            yield _Bad(where, "empty 'text'" if text is None else f"'text' must be a string, got {type(text).__name__}")
            continue
        if not text.strip():
            yield _Bad(where, _empty_text(text))
            continue
        if title is None:
            title = ""
        if not isinstance(title, str):
            yield _Bad(where, f"'title' must be a string, got {type(title).__name__}")
            continue
        given_id = obj.get("id")
        doc_id = str(given_id).strip() if given_id is not None and str(given_id).strip() else f"{stem}:{record_index}"
        yield _Doc(title.strip(), text, doc_id, where)


def load_squad_json(path: Path) -> list[Any]:
    """Parse a SQuAD-format file and return its ``data`` list (one entry per article)."""
    check_file(path)
    with open_text(path) as f:
        raw = f.read()
    try:
        obj = json.loads(raw)
    except json.JSONDecodeError as e:
        raise DataError(f"{path} line {e.lineno}: invalid JSON ({e.msg})") from None
    if not isinstance(obj, dict) or not isinstance(obj.get("data"), list):
        raise DataError(f"{path}: not SQuAD format (missing required top-level list 'data')")
    return obj["data"]


def _read_squad(path: Path) -> Iterator[_Doc | _Bad]:
    for a_i, article in enumerate(load_squad_json(path), start=1):
        if not isinstance(article, dict):
            yield _Bad(f"article {a_i}", "expected a JSON object")
            continue
        title = article.get("title")
        if title is not None and not isinstance(title, str):
            yield _Bad(f"article {a_i}", f"'title' must be a string, got {type(title).__name__}")
            continue
        title = (title or "").strip()
        if has_undecodable(title):
            yield _Bad(f"article {a_i}", _UNDECODABLE)
            continue
        key = squad_article_key(title, a_i)
        paragraphs = article.get("paragraphs")
        if not isinstance(paragraphs, list):
            yield _Bad(f"article {a_i}", "missing 'paragraphs' list")
            continue
        for p_i, para in enumerate(paragraphs):
            where = f"article {a_i} paragraph {p_i + 1}"
            context = para.get("context") if isinstance(para, dict) else None
            if not isinstance(context, str) or not context.strip():
                yield _Bad(where, ("'context' is only whitespace" if isinstance(context, str) and context else
                                   "empty 'context'") if isinstance(para, dict) else "expected a JSON object")
                continue
            if has_undecodable(context):
                yield _Bad(where, _UNDECODABLE)
                continue
            yield _Doc(title, context, squad_doc_id(key, p_i), where)


def squad_article_key(title: str, article_index: int) -> str:
    """Stable key of a SQuAD article: its title, or ``#<1-based article index>`` when it has none.

    Many SQuAD-format files in the wild (COVID-QA among them) have no article titles; their passages get an empty
    title, and the article index stands in wherever an article must be named (KB ``doc_id``, article splits).
    """
    return title.strip() or f"#{article_index}"


def squad_doc_id(article_key: str, paragraph_index: int) -> str:
    """KB ``doc_id`` of SQuAD paragraph ``paragraph_index`` (0-based) of the article ``article_key``."""
    return f"{article_key.strip()}:{paragraph_index}"


def _iter_source(path: Path, fmt: str) -> Generator[_Doc | _Bad, None, None]:
    check_file(path)
    try:
        if fmt == "squad":  # one JSON document, parsed as a whole (no progress bar)
            yield from _read_squad(path)
            return
        with open(path, "rb") as raw:
            progress = _Progress(path, raw)
            try:
                with open_text(path, raw) as f:
                    if fmt == "jsonl":
                        yield from _read_jsonl(path, progress, f)
                    else:
                        yield from _read_delimited(path, "," if fmt == "csv" else "\t", progress, f)
            finally:
                progress.close()
    except (OSError, EOFError) as e:  # e.g. a truncated or non-gzip .gz file
        raise DataError(f"{path}: cannot read file ({e})") from None


# ----------------------------------------------------------------------------------------------
# Building and saving
# ----------------------------------------------------------------------------------------------


class _Sink:
    """Collects passage rows in column batches; spills to an Arrow stream file if given a path."""

    def __init__(self, arrow_path: Path | None) -> None:
        self.n = 0
        self._cols: dict[str, list[Any]] = {c: [] for c in KB_COLUMNS}
        self._batches: list[pa.RecordBatch] = []
        self._file: pa.NativeFile | None = None
        self._writer: pa.ipc.RecordBatchStreamWriter | None = None
        if arrow_path is not None:
            self._file = pa.OSFile(str(arrow_path), "wb")
            self._writer = pa.ipc.new_stream(self._file, _ARROW_SCHEMA)

    def add(self, title: str, text: str, doc_id: str, char_start: int) -> None:
        c = self._cols
        c["id"].append(self.n)
        c["title"].append(title)
        c["text"].append(text)
        c["doc_id"].append(doc_id)
        c["char_start"].append(char_start)
        self.n += 1
        if len(c["id"]) >= _BATCH_ROWS:
            self._flush()

    def _flush(self) -> None:
        if not self._cols["id"]:
            return
        batch = pa.RecordBatch.from_pydict(self._cols, schema=_ARROW_SCHEMA)
        if self._writer is not None:
            self._writer.write_batch(batch)
        else:
            self._batches.append(batch)
        self._cols = {c: [] for c in KB_COLUMNS}

    def finish(self) -> pa.Table | None:
        """Flush; return the in-memory table (no spill file) or None (stream file closed)."""
        self._flush()
        self.close()
        if self._file is None:
            return pa.Table.from_batches(self._batches, schema=_ARROW_SCHEMA)
        return None

    def close(self) -> None:
        if self._writer is not None:
            self._writer.close()
            self._writer = None
        if self._file is not None and not self._file.closed:
            self._file.close()


def _as_paths(sources: str | os.PathLike[str] | Iterable[str | os.PathLike[str]]) -> list[Path]:
    if isinstance(sources, (str, os.PathLike)):
        return [Path(sources)]
    paths = [Path(s) for s in sources]
    if not paths:
        raise DataError("build_kb: no source files given")
    return paths


DUPLICATE_IDS = ("error", "warn", "ignore")
MAX_PASSAGE_CHARS = 100_000


def _fill(sink: _Sink, paths: list[Path], fmt: str | None, passage_words: int, skip_bad_rows: bool,
          passage_stride: int | None = None, max_passage_chars: int = MAX_PASSAGE_CHARS,
          duplicate_ids: str = "error") -> dict[str, Any]:
    """Read ``paths`` into ``sink``. Besides the readers' bad rows: a passage longer than ``max_passage_chars``
    characters (0 = no limit; a bad row, named) and a ``doc_id`` given to two documents (``duplicate_ids``:
    ``error`` names both rows, ``warn`` counts them in ``stats["duplicate_ids"]``, ``ignore``)."""
    if duplicate_ids not in DUPLICATE_IDS:
        raise DataError(f"duplicate_ids must be one of {', '.join(DUPLICATE_IDS)}, got {duplicate_ids!r}")
    stats: dict[str, Any] = {"documents": 0, "passages": 0, "skipped": 0, "skipped_rows": [], "sources": [],
                             "duplicate_ids": 0}
    hashes = array("q")  # hash of every document's doc_id: 8 bytes a document, whatever the KB's size
    for path in paths:
        source_fmt = detect_format(path, fmt)
        n_docs = n_skipped = 0
        start = sink.n
        with closing(_iter_source(path, source_fmt)) as items:
            for item in items:
                if isinstance(item, _Doc) and max_passage_chars and len(item.text) > max_passage_chars:
                    chunks = _chunk(item.text, passage_words, passage_stride)
                    longest = max(len(c) for c, _ in chunks)
                    if longest > max_passage_chars:
                        item = _Bad(item.where, f"a passage of {longest} characters (data.max_passage_chars="
                                                f"{max_passage_chars}: text without spaces, or not text at all?)")
                if isinstance(item, _Bad):
                    if not skip_bad_rows:
                        raise DataError(f"{path} {item.where}: {item.reason}")
                    n_skipped += 1
                    if len(stats["skipped_rows"]) < 20:
                        stats["skipped_rows"].append(f"{path} {item.where}: {item.reason}")
                    continue
                n_docs += 1
                if duplicate_ids != "ignore":
                    hashes.append(hash(item.doc_id))
                for passage, char_start in _chunk(item.text, passage_words, passage_stride):
                    sink.add(item.title, passage, item.doc_id, char_start)
        if n_skipped:
            logger.warning("%s: skipped %d bad row(s) (first: %s)", path, n_skipped, stats["skipped_rows"][0])
        stats["documents"] += n_docs
        stats["skipped"] += n_skipped
        stats["sources"].append(
            {
                "path": str(path),
                "format": source_fmt,
                "documents": n_docs,
                "passages": sink.n - start,
                "skipped": n_skipped,
            }
        )
    stats["passages"] = sink.n
    if sink.n == 0:
        skipped = f" ({stats['skipped']} bad row(s) skipped)" if stats["skipped"] else ""
        raise DataError(f"{', '.join(map(str, paths))}: no passages produced{skipped}")
    if duplicate_ids != "ignore" and len(hashes) > 1:
        import numpy as np

        h = np.sort(np.frombuffer(hashes, dtype=np.int64))
        dup_hashes = np.unique(h[1:][h[1:] == h[:-1]])
        if len(dup_hashes):
            first, n_dup = _duplicates(paths, fmt, set(dup_hashes.tolist()), skip_bad_rows)
            stats["duplicate_ids"] = n_dup
            if first is not None:  # None: a hash collision of distinct ids, not a duplicate
                if duplicate_ids == "error":
                    raise DataError(f"{first}; document ids must be unique (gold_doc names a document by its id; "
                                    "data.duplicate_ids=warn keeps both rows)")
                logger.warning("%d document id(s) given to more than one document (first: %s); kept all",
                               n_dup, first)
    return stats


def _duplicates(paths: list[Path], fmt: str | None, hashes: set[int], skip_bad_rows: bool) -> tuple[str | None, int]:
    """Second reading, only when two doc_ids hashed alike: the first real duplicate as ``"<file> <row>: id
    '<id>' is also the id of <file> <row>"`` (or None) and the number of documents that repeat an earlier id."""
    seen: dict[str, str] = {}
    first, n = None, 0
    for path in paths:
        with closing(_iter_source(path, detect_format(path, fmt))) as items:
            for item in items:
                if not isinstance(item, _Doc) or hash(item.doc_id) not in hashes:
                    continue
                where = f"{path} {item.where}"
                if item.doc_id in seen:
                    n += 1
                    if first is None:
                        first = f"{where}: id {item.doc_id!r} is also the id of {seen[item.doc_id]}"
                else:
                    seen[item.doc_id] = where
    return first, n


class _ScanSink:
    """Counts passages and keeps only those of the documents in ``wanted`` (see :func:`scan_kb`)."""

    def __init__(self, wanted: set[str]) -> None:
        self.n = 0
        self.wanted = wanted
        self.rows: dict[str, list[Any]] = {c: [] for c in KB_COLUMNS}

    def add(self, title: str, text: str, doc_id: str, char_start: int) -> None:
        if doc_id in self.wanted:
            for c, v in zip(KB_COLUMNS, (self.n, title, text, doc_id, char_start)):
                self.rows[c].append(v)
        self.n += 1


def scan_kb(
    sources: str | os.PathLike[str] | Iterable[str | os.PathLike[str]],
    passage_words: int = 100,
    skip_bad_rows: bool = False,
    passage_stride: int | None = None,
    max_passage_chars: int = MAX_PASSAGE_CHARS,
    duplicate_ids: str = "error",
    wanted_docs: Iterable[str] = (),
) -> tuple[int, datasets.Dataset, dict[str, Any]]:
    """Every check :func:`build_kb` makes on ``sources``, writing nothing: ``(passages, subset, stats)`` where
    ``subset`` holds the passages (with the ids the built KB will give them) of the documents in ``wanted_docs``,
    enough to check and resolve gold documents before the KB is built."""
    sink = _ScanSink(set(wanted_docs))
    stats = _fill(sink, _as_paths(sources), None, passage_words, skip_bad_rows, passage_stride,  # type: ignore[arg-type]
                  max_passage_chars, duplicate_ids)
    subset = datasets.Dataset(pa.Table.from_pydict(sink.rows, schema=_ARROW_SCHEMA),
                              info=datasets.DatasetInfo(features=KB_FEATURES))
    return sink.n, subset, stats


def source_fingerprint(sources: list[str], passage_words: int, passage_stride: int = 0) -> str:
    """What a KB built from ``sources`` depends on (paths, sizes, modification times, passage settings): the
    trainer rebuilds its KB only when this changes."""
    import hashlib

    h = hashlib.sha256(str(passage_words).encode())
    if passage_stride and passage_stride != passage_words:  # no overlap keeps the fingerprint it always had
        h.update(f"stride={passage_stride}".encode())
    for s in sources:
        st = os.stat(s)
        h.update(f"{os.path.abspath(s)}|{st.st_size}|{st.st_mtime_ns}".encode())
    return h.hexdigest()


def _save_quietly(ds: datasets.Dataset, path: Path, quiet: bool) -> None:
    """``save_to_disk``, without the datasets progress bar for small KBs."""
    silence = quiet and datasets.is_progress_bar_enabled()
    if silence:
        datasets.disable_progress_bars()
    try:
        ds.save_to_disk(str(path))
    finally:
        if silence:
            datasets.enable_progress_bars()


def _is_replaceable_kb_dir(path: Path) -> bool:
    """An existing ``out_dir`` is only removed if it is empty or holds a saved dataset."""
    if not path.is_dir() or path.is_symlink():
        return False
    names = {p.name for p in path.iterdir()}
    return not names or "state.json" in names or "dataset_dict.json" in names


def _missing_ancestors(path: Path) -> list[Path]:
    missing = []
    for parent in path.parents:
        if parent.exists():
            break
        missing.append(parent)
    return missing


@overload
def build_kb(
    sources: str | os.PathLike[str] | Iterable[str | os.PathLike[str]],
    out_dir: str | os.PathLike[str] | None = ...,
    passage_words: int = ...,
    skip_bad_rows: bool = ...,
    fmt: str | None = ...,
    return_stats: Literal[False] = ...,
    passage_stride: int | None = ...,
    max_passage_chars: int = ...,
    duplicate_ids: str = ...,
) -> datasets.Dataset: ...


@overload
def build_kb(
    sources: str | os.PathLike[str] | Iterable[str | os.PathLike[str]],
    out_dir: str | os.PathLike[str] | None = ...,
    passage_words: int = ...,
    skip_bad_rows: bool = ...,
    fmt: str | None = ...,
    *,
    return_stats: Literal[True],
    passage_stride: int | None = ...,
    max_passage_chars: int = ...,
    duplicate_ids: str = ...,
) -> tuple[datasets.Dataset, dict[str, Any]]: ...


def build_kb(
    sources: str | os.PathLike[str] | Iterable[str | os.PathLike[str]],
    out_dir: str | os.PathLike[str] | None = None,
    passage_words: int = 100,
    skip_bad_rows: bool = False,
    fmt: str | None = None,
    return_stats: bool = False,
    passage_stride: int | None = None,
    max_passage_chars: int = MAX_PASSAGE_CHARS,
    duplicate_ids: str = "error",
) -> datasets.Dataset | tuple[datasets.Dataset, dict[str, Any]]:
    """Ingest one or more source files into a passage dataset (see the module docstring).

    Args:
        sources: a path or a list of paths; their passages are concatenated with ids continuing.
        out_dir: if given, the dataset is saved there atomically (built in a temporary directory
            next to it, then renamed into place; an existing KB at ``out_dir`` is replaced only
            once the new one is complete) and the returned dataset is memory-mapped from it.
            Without ``out_dir`` the dataset is returned in memory.
        passage_words: words per passage.
        skip_bad_rows: skip (and count) bad rows instead of raising :class:`DataError`.
        fmt: force the format of every source (``csv``, ``tsv``, ``jsonl`` or ``squad``).
        passage_stride: words between passage starts (``None``/0 = ``passage_words``, no overlap).
        max_passage_chars: a passage longer than this (characters; 0 = no limit) is a bad row: a document
            without whitespace would otherwise become one huge passage that tokenization chokes on.
        duplicate_ids: a ``doc_id`` given to two documents: ``error`` (naming both rows), ``warn`` (counted in
            the stats' ``duplicate_ids``) or ``ignore``.
        return_stats: also return a stats dict with ``documents``, ``passages``, ``skipped``,
            ``skipped_rows`` (first 20 messages), ``duplicate_ids`` and per-source ``sources``.

    Raises:
        DataError: missing file / column, a bad row (unless skipped), or no passages at all.
    """
    if isinstance(passage_words, bool) or not isinstance(passage_words, int) or passage_words < 1:
        raise DataError(f"passage_words must be a positive integer, got {passage_words!r}")
    if passage_stride is not None and not 0 <= passage_stride <= passage_words:
        raise DataError(f"passage_stride must be between 0 (= passage_words) and passage_words ({passage_words}), "
                        f"got {passage_stride!r}")
    paths = _as_paths(sources)

    if out_dir is None:
        sink = _Sink(None)
        try:
            stats = _fill(sink, paths, fmt, passage_words, skip_bad_rows, passage_stride, max_passage_chars,
                          duplicate_ids)
            table = sink.finish()
        finally:
            sink.close()
        assert table is not None
        ds = datasets.Dataset(table, info=datasets.DatasetInfo(features=KB_FEATURES))
        return (ds, stats) if return_stats else ds

    out = Path(out_dir)
    if out.exists() and not _is_replaceable_kb_dir(out):
        raise DataError(f"{out}: exists and is not a saved knowledge base; refusing to overwrite it")
    if out.parent.exists() and not out.parent.is_dir():
        raise DataError(f"{out}: {out.parent} is a file, not a folder")
    created = _missing_ancestors(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    for stale in sweep_stale_builds(out):
        logger.info("removed %s left by an interrupted KB build", stale)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-{os.getpid()}-", dir=out.parent))
    try:
        sink = _Sink(tmp / "passages.arrow")
        try:
            stats = _fill(sink, paths, fmt, passage_words, skip_bad_rows, passage_stride, max_passage_chars,
                          duplicate_ids)
            sink.finish()
        finally:
            sink.close()
        staged = datasets.Dataset.from_file(str(tmp / "passages.arrow"))
        _save_quietly(staged, tmp / "kb", quiet=sink.n < _PROGRESS_MIN_ROWS)
        del staged
        old = tmp / "old"
        if out.exists():
            os.replace(out, old)
        try:
            os.replace(tmp / "kb", out)
        except BaseException:
            if old.exists():
                os.replace(old, out)
            raise
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        for d in created:  # innermost first; only directories this call created and left empty
            try:
                d.rmdir()
            except OSError:
                break
        raise
    shutil.rmtree(tmp, ignore_errors=True)
    ds = load_kb(out)
    return (ds, stats) if return_stats else ds


def sweep_stale_builds(out: str | os.PathLike[str]) -> list[Path]:
    """Remove the temporaries ``.<name>.tmp-<pid>-*`` that a killed build of ``out`` left beside it (their
    process is gone; a build still running elsewhere keeps its own). Returns what was removed."""
    out = Path(out)
    removed = []
    for p in out.parent.glob(f".{out.name}.tmp-*") if out.parent.is_dir() else []:
        pid = p.name[len(f".{out.name}.tmp-"):].split("-")[0]
        if pid.isdigit() and int(pid) != os.getpid() and _alive(int(pid)):
            continue
        shutil.rmtree(p, ignore_errors=True) if p.is_dir() else p.unlink(missing_ok=True)
        removed.append(p)
    return removed


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process
        return True
    return True


def load_kb(path: str | os.PathLike[str]) -> datasets.Dataset:
    """Load a KB saved by :func:`build_kb` (memory-mapped Arrow via ``datasets.load_from_disk``).

    A plain ``datasets`` folder (``save_to_disk``, a Dataset or a one-split DatasetDict) with a string ``text``
    column is accepted too, one passage a row, as is (not re-cut): a missing ``title`` is empty, ``doc_id`` is the
    row's own ``id`` when that is not already the row number (DPR's ``psgs_w100``), else ``<folder>:<row>``;
    ``id`` becomes the row number and ``char_start`` 0. The added columns live in memory; the folder is never
    written to."""
    p = Path(path)
    if not p.exists():
        raise DataError(f"{p}: knowledge base directory not found")
    if not p.is_dir():
        raise DataError(f"{p}: not a knowledge base directory (build one from this file with build_kb)")
    try:
        ds = datasets.load_from_disk(str(p))
    except (FileNotFoundError, ValueError, OSError) as e:
        first = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise DataError(f"{p}: not a saved knowledge base ({first})") from None
    if isinstance(ds, datasets.DatasetDict):
        if len(ds) != 1:
            raise DataError(f"{p}: holds a DatasetDict with splits {', '.join(ds)}; save the one split that is "
                            "the knowledge base")
        ds = next(iter(ds.values()))
    if all(c in ds.column_names for c in KB_COLUMNS):
        return ds
    return _adopt_plain(ds, p)


def _adopt_plain(ds: datasets.Dataset, p: Path) -> datasets.Dataset:
    """A plain dataset with ``text`` (optional ``title``, ``id``) -> the :data:`KB_COLUMNS` layout (see load_kb)."""
    import numpy as np

    feats = ds.features
    for col in ("text", "title"):
        if col not in feats:
            if col == "text":
                raise DataError(f"{p}: not a knowledge base (no 'text' column; columns: {', '.join(ds.column_names)})")
            continue
        if feats[col] != datasets.Value("string") and feats[col] != datasets.Value("large_string"):
            raise DataError(f"{p}: column {col!r} must hold strings, holds {feats[col]}")
    n = len(ds)
    row_ids = np.arange(n, dtype=np.int64)
    keep = [c for c in ("title", "text") if c in feats]
    out = ds.select_columns(keep)
    if "title" not in feats:
        out = out.add_column("title", [""] * n)
    if "doc_id" in feats:
        doc_ids = [str(x) for x in ds["doc_id"]]
    elif "id" in feats and ds["id"] != row_ids.tolist():
        doc_ids = [str(x) for x in ds["id"]]
    else:
        doc_ids = [f"{p.name}:{i}" for i in range(n)]
    out = out.add_column("doc_id", doc_ids)
    out = out.add_column("id", row_ids)
    out = out.add_column("char_start", np.zeros(n, dtype=np.int64))
    return out.select_columns(list(KB_COLUMNS))


def kb_stats(kb: datasets.Dataset, batch_size: int = 50_000) -> dict[str, Any]:
    """Summary of a KB: passage and document counts and words per passage (min / mean / max)."""
    n = len(kb)
    docs: set[str] = set()
    total = 0
    lo, hi = sys.maxsize, 0
    for batch in kb.select_columns(["doc_id", "text"]).iter(batch_size=batch_size):
        docs.update(batch["doc_id"])
        for text in batch["text"]:
            w = len(_WORD_RE.findall(text))
            total += w
            lo, hi = min(lo, w), max(hi, w)
    return {
        "passages": n,
        "documents": len(docs),
        "words_min": lo if n else 0,
        "words_mean": total / n if n else 0.0,
        "words_max": hi,
    }
