"""User-facing error type for bad input data.

A :class:`DataError` carries ONE line that names the offending file and, where there is one, the
row (1-based line number for CSV/TSV/JSONL/line files; article/paragraph/question for SQuAD), so a
CLI can print ``str(err)`` without a traceback.
"""

from __future__ import annotations

__all__ = ["DataError"]


class DataError(ValueError):
    """Bad or missing input data (file, column, row); the message is a single human-readable line."""
