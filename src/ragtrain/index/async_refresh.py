"""Asynchronous KB re-encoding (``index.refresh_mode=async``): training continues while a separate process encodes
the knowledge base with a snapshot of the context encoder, as EMDR2 does with separate devices.

At a refresh step ``s`` the trainer saves the context encoder (``save_pretrained`` + tokenizer + pooling) to
``OUTPUT_DIR/refresh/step_<s>/`` and starts ``python -m ragtrain.index.async_refresh`` on it with its own CPU
threads (``index.async_threads``) or device; the child writes ``embeddings.npy`` there (atomically) and exits.
The new index is swapped in at step ``s + index.async_lag`` exactly -- waiting there if the encode is not done --
so a run is deterministic, and a resumed run (the checkpoint records the pending refresh; the snapshot stays on
disk while a checkpoint names it) relaunches the encode and swaps at the same step.  Every row of
``train_log.jsonl`` records the index version its step used.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

SNAPSHOT_META = "ragtrain_snapshot.json"
RESULT = "embeddings.npy"
TIMING = "encode_timing.json"  # the child's start-up (imports, model and KB load) and encode seconds
_T_IMPORT = time.time()


class EncodeJob:
    """One child process encoding the KB from a snapshot folder."""

    def __init__(self, snapshot: Path, kb_dir: Path, *, threads: int = 1, device: str = "cpu",
                 batch_size: int = 64, log_path: Path | None = None):
        self.snapshot = Path(snapshot)
        self.t0 = time.time()
        cmd = [sys.executable, "-m", "ragtrain.index.async_refresh", "--snapshot", str(self.snapshot),
               "--kb", str(kb_dir), "--threads", str(threads), "--device", device, "--batch-size", str(batch_size)]
        env = {**os.environ, "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads),
               "TOKENIZERS_PARALLELISM": "false"}
        for key in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT", "LOCAL_WORLD_SIZE"):
            env.pop(key, None)  # the child is no member of the training job's process group
        self._log = open(log_path or self.snapshot / "encode.log", "ab")
        self.proc = subprocess.Popen(cmd, stdout=self._log, stderr=subprocess.STDOUT, env=env)

    def done(self) -> bool:
        return self.proc.poll() is not None

    def result(self) -> Path:
        """Wait for the child; the ``.npy`` file of its (N, d) vectors (RuntimeError naming the log when it
        failed)."""
        rc = self.proc.wait()
        self._log.close()
        path = self.snapshot / RESULT
        if rc != 0 or not path.is_file():
            tail = (self.snapshot / "encode.log").read_text(errors="replace")[-2000:] \
                if (self.snapshot / "encode.log").is_file() else ""
            raise RuntimeError(f"async KB encode from {self.snapshot} failed (exit {rc}); log tail:\n{tail}")
        return path

    def cancel(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()
        self._log.close()


def write_snapshot(path: Path, hf_model, tokenizer, *, pooling: str, normalize: bool, max_length: int,
                   mixed_precision: str, step: int) -> None:
    """The context encoder as it is now, loadable by the child (plain ``save_pretrained`` folder)."""
    tmp = path.with_name(path.name + ".tmp")
    if tmp.exists():
        import shutil

        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    hf_model.save_pretrained(tmp, safe_serialization=True)
    tokenizer.save_pretrained(tmp)
    (tmp / SNAPSHOT_META).write_text(json.dumps({"pooling": pooling, "normalize": normalize,
                                                 "max_length": max_length, "mixed_precision": mixed_precision,
                                                 "step": step}))
    os.replace(tmp, path)


def encode_snapshot(snapshot: Path, kb_dir: Path, *, device: str = "cpu", batch_size: int = 64) -> np.ndarray:
    import torch
    from transformers import AutoTokenizer

    from ragtrain.data.kb import load_kb
    from ragtrain.eval.exported import encode_kb
    from ragtrain.model.encoders import Encoder
    from ragtrain.model.loading import _auto_encoder

    meta = json.loads((snapshot / SNAPSHOT_META).read_text())
    encoder = Encoder(_auto_encoder(snapshot), meta["pooling"], meta["normalize"])
    tokenizer = AutoTokenizer.from_pretrained(snapshot)
    kb = load_kb(kb_dir)
    dev = torch.device(device)
    bf16 = meta["mixed_precision"] == "bf16"
    with torch.autocast(dev.type, dtype=torch.bfloat16, enabled=bf16):
        return encode_kb(encoder, tokenizer, kb, meta["max_length"], batch_size, dev)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description="encode a KB with a context-encoder snapshot (ragtrain async refresh)")
    p.add_argument("--snapshot", required=True)
    p.add_argument("--kb", required=True)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--device", default="cpu")
    p.add_argument("--batch-size", type=int, default=64)
    args = p.parse_args(argv)
    import torch

    torch.set_num_threads(max(args.threads, 1))
    snap = Path(args.snapshot)
    t_ready = time.time()
    emb = encode_snapshot(snap, Path(args.kb), device=args.device, batch_size=args.batch_size)
    tmp = snap / f".{RESULT}.tmp{os.getpid()}.npy"
    np.save(tmp, emb.astype(np.float32))
    (snap / TIMING).write_text(json.dumps({"startup_s": round(t_ready - _T_IMPORT, 3),
                                           "encode_s": round(time.time() - t_ready, 3)}))
    os.replace(tmp, snap / RESULT)
    return 0


if __name__ == "__main__":
    sys.exit(main())
