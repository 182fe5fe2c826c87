"""Evaluate or index with an exported run (``OUTPUT_DIR/final``) exactly as the run did in training.

The export's ``ragtrain.json`` records what evaluation needs: the mode and retrieval temperature (p(z|x)), the
retriever (dense / bm25 / hybrid and their settings), the evaluation settings (passages decoded, beams, new tokens,
decoding, batch size, recall depths), the token limits and the passage format.  ``ragtrain eval`` and
``ragtrain index`` (:mod:`ragtrain.cli`) build everything from it; command-line options override.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
from tqdm.auto import tqdm

from ragtrain.data.collate import passage_ids
from ragtrain.retrieval import build_retriever

log = logging.getLogger(__name__)


def resolve_device(device: str = "auto") -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dev = torch.device(device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"--device {device}: no CUDA device is available")
    return dev


@torch.no_grad()
def encode_kb(encoder, tokenizer, kb, max_length: int, batch_size: int = 64, device="cpu") -> np.ndarray:
    """(N, d) float32 vectors of every KB passage, in KB order, batches sorted by length (less padding)."""
    encoder.eval().to(device)
    ids = passage_ids(tokenizer, kb["title"], kb["text"], max_length)
    order = np.argsort([len(r) for r in ids], kind="stable")
    out = np.zeros((len(ids), encoder.dim), dtype=np.float32)
    pad = tokenizer.pad_token_id or 0
    for lo in tqdm(range(0, len(ids), batch_size), desc=f"encode KB ({len(ids)} passages)"):
        rows = order[lo: lo + batch_size]
        width = max(len(ids[i]) for i in rows)
        x = torch.full((len(rows), width), pad, dtype=torch.long)
        m = torch.zeros((len(rows), width), dtype=torch.long)
        for j, i in enumerate(rows):
            x[j, : len(ids[i])] = torch.as_tensor(ids[i])
            m[j, : len(ids[i])] = 1
        out[rows] = encoder(x.to(device), m.to(device)).float().cpu().numpy()
    return out


def load_index(ckpt: Path, index_dir: str | None):
    """``(index, stored vectors or None)``: ``index_dir`` (an IndexStore folder, its current version), else the
    export's own ``final/index``; ``(None, None)`` when the export has none."""
    from ragtrain.index.faiss_index import DenseIndex
    from ragtrain.index.refresh import IndexStore

    if index_dir:
        index, emb, _ = IndexStore(Path(index_dir)).load_current()
        return index, emb
    d = ckpt / "index"
    if (d / "meta.json").is_file():  # index.faiss, or (index.placement=ranks) only the vectors to build it from
        stored = d / "embeddings.npy"
        return DenseIndex.load(d), (np.load(stored, mmap_mode="r") if stored.is_file() else None)
    return None, None


def make_search(kind: str, index, emb, kb):
    """``search(q, questions, k)`` as :func:`ragtrain.eval.evaluate.predict` wants it, with the trained run's
    retriever; the stored vectors of the hits ride along (p(z|x) of modes with a frozen context encoder)."""
    retriever, _ = build_retriever(kind, index, kb)

    def search(q: torch.Tensor, questions: Sequence[str], k: int) -> dict:
        scores, ids = retriever.search(q.detach().float().cpu().numpy(), list(questions), k)
        ids = np.asarray(ids, dtype=np.int64)
        res = {"scores": np.where(ids < 0, -np.inf, scores).astype(np.float32), "ids": ids}
        if emb is not None:
            res["doc_embeddings"] = np.asarray(emb[np.clip(ids, 0, None).reshape(-1)]).reshape(*ids.shape, -1)
        return res

    return search


def kb_dir_of(ckpt: Path, meta: dict, override: str | Path | None = None) -> Path:
    """The KB an export was trained on (``ragtrain.json``'s ``kb_dir``, resolved against the export), or
    ``override``."""
    if override:
        return Path(override)
    if not meta.get("kb_dir"):
        raise FileNotFoundError(f"{ckpt}/ragtrain.json records no kb_dir; pass --kb")
    from ragtrain.model.loading import resolve_kb_dir

    return resolve_kb_dir(ckpt, meta["kb_dir"])


def retriever_kind(meta: dict, override: str | None = None) -> str:
    """The retriever the run trained with (dense for exports that predate the record), or ``override``."""
    return override or meta.get("retriever", {}).get("kind", "dense")


def eval_settings(meta: dict, overrides: dict) -> dict:
    """The run's evaluation settings (``meta["eval"]``; older exports: defaults), then the non-None overrides."""
    settings = {"n_docs": meta.get("n_docs", 5), "num_beams": 1, "max_new_tokens": 24, "decoding": "auto",
                "batch_size": 8, "recall_ks": [1, 5, 20]}
    settings.update(meta.get("eval", {}))
    settings.update({k: v for k, v in overrides.items() if v is not None})
    return settings


def write_jsonl_atomic(path: Path, rows: Sequence[dict]) -> None:
    from ragtrain.train.checkpoint import write_text_atomic

    write_text_atomic(Path(path), "".join(json.dumps(r) + "\n" for r in rows))
