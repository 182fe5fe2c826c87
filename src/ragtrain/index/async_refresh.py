"""Asynchronous KB re-encoding (``index.refresh_mode=async``): training continues while separate processes encode
the knowledge base with a snapshot of the context encoder, as EMDR2 does with separate devices.

At a refresh step ``s`` the trainer saves the context encoder (``save_pretrained`` + tokenizer + pooling) to
``OUTPUT_DIR/refresh/step_<s>/`` and starts one ``python -m ragtrain.index.async_refresh`` process per entry of
``index.async_devices`` (``cpu``, or a spare GPU of rank 0's node such as ``cuda:7``), each with its own CPU threads
(``index.async_threads``).  Worker ``i`` encodes the ``i``-th contiguous slice of the KB and writes it, batch by
batch, to the memory-mapped shard ``shard_<i>.npy`` in the snapshot folder (``index.embedding_dtype``; renamed into
place once complete), so no process ever holds the (N, d) matrix; rank 0 builds the index from the shards as a
synchronous sharded refresh does.  A worker tokenizes its slice once, at the first refresh, and keeps the ids
under ``OUTPUT_DIR/refresh/tokens/`` (memory-mapped by the next refreshes).

The new index is swapped in at step ``s + index.async_lag`` exactly -- waiting there if the encode is not done --
so a run is deterministic, and a resumed run (the checkpoint records the pending refresh; the snapshot stays on
disk while a checkpoint names it) starts the workers whose shard is missing again and swaps at the same step.
Every row of ``train_log.jsonl`` records the index version its step used.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path


SNAPSHOT_META = "ragtrain_snapshot.json"
TOKENS_DIR = "tokens"  # OUTPUT_DIR/refresh/tokens/rows_<lo>_<hi>/: each worker's token ids, kept across refreshes
_T_IMPORT = time.time()


def worker_slices(n: int, workers: int) -> list[range]:
    """``range(n)`` in ``workers`` contiguous slices whose sizes differ by at most one."""
    bounds = [n * i // workers for i in range(workers + 1)]
    return [range(bounds[i], bounds[i + 1]) for i in range(workers)]


def shard_file(snapshot: Path, worker: int) -> Path:
    return Path(snapshot) / f"shard_{worker:05d}.npy"


def timing_file(snapshot: Path, worker: int) -> Path:
    return Path(snapshot) / f"encode_timing_{worker:05d}.json"


class EncodeJob:
    """One child process encoding the KB rows ``rows`` from a snapshot folder into the shard ``out``."""

    def __init__(self, snapshot: Path, kb_dir: Path, rows: range, out: Path, *, tokens_dir: Path | None = None,
                 threads: int = 1, device: str = "cpu", batch_size: int = 64, dtype: str = "float32"):
        self.snapshot, self.out = Path(snapshot), Path(out)
        self.log_path = self.out.with_suffix(".log")
        cmd = [sys.executable, "-m", "ragtrain.index.async_refresh", "--snapshot", str(self.snapshot),
               "--kb", str(kb_dir), "--rows", f"{rows.start}:{rows.stop}", "--out", str(self.out),
               "--threads", str(threads), "--device", device, "--batch-size", str(batch_size), "--dtype", dtype]
        if tokens_dir is not None:
            cmd += ["--tokens", str(tokens_dir)]
        env = {**os.environ, "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads),
               "TOKENIZERS_PARALLELISM": "false"}
        for key in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT", "LOCAL_WORLD_SIZE"):
            env.pop(key, None)  # the child is no member of the training job's process group
        self._log = open(self.log_path, "ab")
        self.proc = subprocess.Popen(cmd, stdout=self._log, stderr=subprocess.STDOUT, env=env)

    def done(self) -> bool:
        return self.proc.poll() is not None

    def result(self) -> Path:
        """Wait for the child; the shard it wrote (RuntimeError with the tail of its log when it failed)."""
        rc = self.proc.wait()
        self._log.close()
        if rc != 0 or not self.out.is_file():
            tail = self.log_path.read_text(errors="replace")[-2000:] if self.log_path.is_file() else ""
            raise RuntimeError(f"async KB encode from {self.snapshot} into {self.out.name} failed (exit {rc}); "
                               f"log {self.log_path}, tail:\n{tail}")
        return self.out

    def cancel(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()
        self._log.close()


class AsyncEncode:
    """The KB encode of one async refresh: a worker process per entry of ``devices``, worker ``i`` encoding the
    ``i``-th contiguous slice of the ``n`` passages into ``shard_<i>.npy`` in the snapshot folder.  A shard that
    is already there is complete (a worker renames it into place when done): a resumed refresh starts only the
    workers whose shard is missing."""

    def __init__(self, snapshot: Path, kb_dir: Path, n: int, devices: list[str], *, threads: int = 1,
                 batch_size: int = 64, dtype: str = "float32", tokens_root: Path | None = None):
        self.snapshot = Path(snapshot)
        devices = list(devices)[: max(1, n)]  # never a worker with nothing to encode
        self.shards = [shard_file(self.snapshot, i) for i in range(len(devices))]
        self.jobs: list[EncodeJob | None] = []
        for i, (rows, device) in enumerate(zip(worker_slices(n, len(devices)), devices)):
            if self.shards[i].is_file():
                self.jobs.append(None)
                continue
            tokens = None if tokens_root is None else Path(tokens_root) / f"rows_{rows.start}_{rows.stop}"
            self.jobs.append(EncodeJob(self.snapshot, kb_dir, rows, self.shards[i], tokens_dir=tokens,
                                       threads=threads, device=device, batch_size=batch_size, dtype=dtype))

    def done(self) -> bool:
        return all(j is None or j.done() for j in self.jobs)

    def results(self) -> list[Path]:
        """Wait for every worker; the shards in KB order (a failed worker: RuntimeError, the others cancelled)."""
        try:
            for job in self.jobs:
                if job is not None:
                    job.result()
        except BaseException:
            self.cancel()
            raise
        return self.shards

    def timing(self) -> dict:
        """What the workers spent: start-up (imports, model and KB load) and encode seconds of the slowest, the
        workers' own figures, and how many were (re)started for this refresh."""
        per = [json.loads(p.read_text()) for p in sorted(self.snapshot.glob("encode_timing_*.json"))]
        out: dict = {"workers": len(self.jobs), "started": sum(j is not None for j in self.jobs)}
        if per:
            out.update(startup_s=max(t["startup_s"] for t in per), encode_s=max(t["encode_s"] for t in per),
                       tokenize_s=max(t.get("tokenize_s", 0.0) for t in per), per_worker=per)
        return out

    def cancel(self) -> None:
        for job in self.jobs:
            if job is not None:
                job.cancel()


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


def encode_slice(snapshot: Path, kb_dir: Path, rows: range, out: Path, *, tokens_dir: Path | None = None,
                 device: str = "cpu", batch_size: int = 64, dtype: str = "float32") -> dict:
    """Encode the KB rows ``rows`` with the snapshot's context encoder into the shard ``out`` (memory-mapped,
    written batch by batch, renamed into place when complete); the token ids come from ``tokens_dir`` when it
    holds this slice's (written there on the first call).  Returns the seconds spent loading (model, tokenizer,
    KB), tokenizing (0 when the ids came from ``tokens_dir``) and encoding."""
    import torch
    from transformers import AutoTokenizer

    from ragtrain.data.collate import pad_passage_ids, passage_ids
    from ragtrain.data.kb import load_kb
    from ragtrain.data.kb_tokens import PassageTokens
    from ragtrain.index.shards import ShardWriter
    from ragtrain.model.encoders import Encoder
    from ragtrain.model.loading import _auto_encoder

    t_load = time.time()
    meta = json.loads((snapshot / SNAPSHOT_META).read_text())
    encoder = Encoder(_auto_encoder(snapshot), meta["pooling"], meta["normalize"])
    tokenizer = AutoTokenizer.from_pretrained(snapshot)
    kb = load_kb(kb_dir)
    t0 = time.time()

    def pad(r):
        return pad_passage_ids(tokenizer, r)

    tok_meta = {"kb_rows": len(kb), "max_length": meta["max_length"], "tokenizer": type(tokenizer).__name__,
                "vocab": len(tokenizer)}
    tokens = PassageTokens.load(tokens_dir, rows, pad, tok_meta) if tokens_dir is not None else None
    cached = tokens is not None
    if tokens is None:  # first refresh (or ids made from anything else): tokenize the slice, keep its ids
        tokens = PassageTokens(kb, rows, lambda t, x: passage_ids(tokenizer, t, x, meta["max_length"]), pad)
        if tokens_dir is not None:
            tokens.save(tokens_dir, tok_meta)
    t1 = time.time()
    dev = torch.device(device)
    encoder.eval().to(dev)
    tmp = out.with_name(f".{out.name}.tmp{os.getpid()}.npy")
    writer = ShardWriter(tmp, len(rows), encoder.dim, dtype)
    with torch.no_grad(), torch.autocast(dev.type, dtype=torch.bfloat16, enabled=meta["mixed_precision"] == "bf16"):
        for pos, ids, mask in tokens.batches(batch_size):
            writer.write(pos, encoder(ids.to(dev), mask.to(dev)).float().cpu().numpy())
    writer.close()
    os.replace(tmp, out)
    return {"load_s": round(t0 - t_load, 3), "tokenize_s": round(t1 - t0, 3), "encode_s": round(time.time() - t1, 3),
            "tokens": "cached" if cached else "tokenized"}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description="encode a slice of a KB with a context-encoder snapshot into a "
                                            "memory-mapped shard (ragtrain async refresh)")
    p.add_argument("--snapshot", required=True)
    p.add_argument("--kb", required=True)
    p.add_argument("--rows", required=True, help="LO:HI, the KB rows to encode")
    p.add_argument("--out", required=True, help="the shard (.npy) to write")
    p.add_argument("--tokens", default=None, help="folder caching this slice's token ids across refreshes")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--device", default="cpu")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--dtype", default="float32")
    args = p.parse_args(argv)
    import torch

    torch.set_num_threads(max(args.threads, 1))
    lo, hi = (int(x) for x in args.rows.split(":"))
    out = Path(args.out)
    t_imported = time.time()
    times = encode_slice(Path(args.snapshot), Path(args.kb), range(lo, hi), out,
                         tokens_dir=Path(args.tokens) if args.tokens else None, device=args.device,
                         batch_size=args.batch_size, dtype=args.dtype)
    worker = int(out.stem.rsplit("_", 1)[1])
    timing_file(out.parent, worker).write_text(json.dumps(
        {"worker": worker, "rows": [lo, hi], "device": args.device, "startup_s": round(t_imported - _T_IMPORT + times["load_s"], 3), **times}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
