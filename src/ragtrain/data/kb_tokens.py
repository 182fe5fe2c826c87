"""Context-encoder token ids of a slice of the knowledge base, tokenized once and reused by every refresh.

Re-encoding the KB is the recurring cost of end2end training; tokenizing the passages again at every refresh
doubled it for small encoders.  A rank tokenizes its slice once (batched calls of the fast tokenizer), keeps
the ids as one flat int32 array plus offsets (4 bytes per token: about 0.6 GB per million 150-token passages),
and serves length-sorted padded batches, so batches of short passages are not padded to the longest passage of
the KB slice.  Positions come back with each batch, so callers write embeddings back in KB order.  The training
step's live re-encoding of retrieved passages reads its ids from here too (:meth:`get`) instead of tokenizing.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Callable, Iterator

import numpy as np
import torch
from tqdm.auto import tqdm

# (titles, texts) -> token id lists, unpadded (RagCollator.passage_ids)
TokenizeFn = Callable[[list[str], list[str]], list[list[int]]]
# unpadded id rows -> {"input_ids", "attention_mask"} (RagCollator.pad_passage_ids: the live re-encoding pads alike)
PadFn = Callable[[list[np.ndarray]], dict]
DROP_BYTES = 64 << 20  # memory-mapped ids: resident pages released every this many bytes of pages touched


class PassageTokens:
    def __init__(self, kb, rows: range, tokenize: TokenizeFn, pad: PadFn, chunk: int = 4096,
                 progress: bool = False):
        self.rows = rows
        self.pad = pad
        parts: list[np.ndarray] = []
        lengths: list[int] = []
        starts = range(rows.start, rows.stop, chunk)
        for lo in tqdm(starts, desc=f"tokenize KB slice ({len(rows)} passages)", disable=not progress):
            sel = kb.select(range(lo, min(lo + chunk, rows.stop)))
            for ids in tokenize(list(sel["title"]), list(sel["text"])):
                parts.append(np.asarray(ids, dtype=np.int32))
                lengths.append(len(ids))
        self.lengths = np.asarray(lengths, dtype=np.int64)
        self.offsets = np.zeros(len(lengths) + 1, dtype=np.int64)
        np.cumsum(self.lengths, out=self.offsets[1:])
        self.flat = np.concatenate(parts) if parts else np.zeros(0, dtype=np.int32)

    def save(self, directory: Path, meta: dict) -> None:
        """Write the ids (``flat.npy``, ``offsets.npy``) and ``meta`` (what they were made from: compared by
        :meth:`load`) to ``directory``, atomically (a temporary folder renamed into place)."""
        directory = Path(directory)
        tmp = directory.with_name(f".{directory.name}.tmp{os.getpid()}")
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        np.save(tmp / "flat.npy", self.flat)
        np.save(tmp / "offsets.npy", self.offsets)
        (tmp / "meta.json").write_text(json.dumps({**meta, "rows": [self.rows.start, self.rows.stop]}))
        shutil.rmtree(directory, ignore_errors=True)
        os.replace(tmp, directory)

    @classmethod
    def load(cls, directory: Path, rows: range, pad: PadFn, meta: dict) -> PassageTokens | None:
        """The ids :meth:`save` wrote for ``rows`` (memory-mapped: only the pages a batch reads come into RAM),
        or None when ``directory`` holds none or holds ids made from anything else than ``meta``."""
        directory = Path(directory)
        try:
            saved = json.loads((directory / "meta.json").read_text())
        except (OSError, ValueError):
            return None
        if saved != {**meta, "rows": [rows.start, rows.stop]}:
            return None
        obj = cls.__new__(cls)
        obj.rows, obj.pad = rows, pad
        obj.flat = np.load(directory / "flat.npy", mmap_mode="r")
        obj.offsets = np.load(directory / "offsets.npy")
        obj.lengths = np.diff(obj.offsets)
        return obj

    def __len__(self) -> int:
        return len(self.lengths)

    def n_batches(self, batch_size: int) -> int:
        return -(-len(self) // batch_size)

    def get(self, kb_id: int) -> np.ndarray | None:
        """Unpadded ids of KB row ``kb_id``, or None when that row is outside this slice."""
        return self._row(kb_id - self.rows.start) if kb_id in self.rows else None

    def _row(self, p: int) -> np.ndarray:
        return self.flat[self.offsets[p]: self.offsets[p + 1]]

    def padded(self, positions: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
        """Padded ``(input_ids, attention_mask)`` of the rows at ``positions`` (0-based in the slice)."""
        enc = self.pad([self._row(p) for p in positions])
        return enc["input_ids"], enc["attention_mask"]

    def batches(self, batch_size: int) -> Iterator[tuple[np.ndarray, torch.Tensor, torch.Tensor]]:
        """``(positions, input_ids, attention_mask)``, longest passages first (an out-of-memory shows at once)."""
        order = np.argsort(-self.lengths, kind="stable")
        mapped = isinstance(self.flat, np.memmap)  # ids loaded from a cache: keep its pages from piling up in RSS
        if mapped:
            from ragtrain.index.faiss_index import drop_pages
        read = 0
        for i in range(0, len(order), batch_size):
            pos = order[i: i + batch_size]
            yield (pos, *self.padded(pos))
            if mapped:  # pages touched, not bytes: the rows are scattered over the file, each at least a page
                read += int(np.maximum(4 * self.lengths[pos], 4096).sum())
                if read >= DROP_BYTES:
                    drop_pages(self.flat)
                    read = 0
