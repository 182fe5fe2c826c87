"""Context-encoder token ids of a slice of the knowledge base, tokenized once and reused by every refresh.

Re-encoding the KB is the recurring cost of end2end training; tokenizing the passages again at every refresh
doubled it for small encoders.  A rank tokenizes its slice once (batched calls of the fast tokenizer), keeps
the ids as one flat int32 array plus offsets (4 bytes per token: about 0.6 GB per million 150-token passages),
and serves length-sorted padded batches, so batches of short passages are not padded to the longest passage of
the KB slice.  Positions come back with each batch, so callers write embeddings back in KB order.  The training
step's live re-encoding of retrieved passages reads its ids from here too (:meth:`get`) instead of tokenizing.
"""

from __future__ import annotations

from typing import Callable, Iterator

import numpy as np
import torch
from tqdm.auto import tqdm

# (titles, texts) -> token id lists, unpadded (RagCollator.passage_ids)
TokenizeFn = Callable[[list[str], list[str]], list[list[int]]]


class PassageTokens:
    def __init__(self, kb, rows: range, tokenize: TokenizeFn, pad_id: int, chunk: int = 4096,
                 progress: bool = False):
        self.rows = rows
        self.pad_id = int(pad_id)
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

    def __len__(self) -> int:
        return len(self.lengths)

    def n_batches(self, batch_size: int) -> int:
        return -(-len(self) // batch_size)

    def get(self, kb_id: int) -> np.ndarray | None:
        """Unpadded ids of KB row ``kb_id``, or None when that row is outside this slice."""
        if kb_id not in self.rows:
            return None
        p = kb_id - self.rows.start
        return self.flat[self.offsets[p]: self.offsets[p + 1]]

    def padded(self, positions: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
        """Right-padded ``(input_ids, attention_mask)`` of the rows at ``positions`` (0-based in the slice)."""
        width = max(int(self.lengths[positions].max()), 1) if len(positions) else 1
        ids = np.full((len(positions), width), self.pad_id, dtype=np.int64)
        mask = np.zeros((len(positions), width), dtype=np.int64)
        for r, p in enumerate(positions):
            a, b = self.offsets[p], self.offsets[p + 1]
            ids[r, : b - a] = self.flat[a:b]
            mask[r, : b - a] = 1
        return torch.from_numpy(ids), torch.from_numpy(mask)

    def batches(self, batch_size: int) -> Iterator[tuple[np.ndarray, torch.Tensor, torch.Tensor]]:
        """``(positions, input_ids, attention_mask)``, longest passages first (an out-of-memory shows at once)."""
        order = np.argsort(-self.lengths, kind="stable")
        for i in range(0, len(order), batch_size):
            pos = order[i: i + batch_size]
            yield (pos, *self.padded(pos))
