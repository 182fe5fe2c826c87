"""Resumable checkpoints and the final Hugging Face export, written atomically.

A checkpoint is ``OUTPUT_DIR/checkpoints/step_00000N/`` holding Accelerate's state (model, optimizer,
scheduler, RNG, and under DeepSpeed every rank's shards) plus ``trainer_state.json`` (step, data position,
index version).  It is written into ``step_00000N.tmp`` and renamed when complete; ``checkpoints/latest``
(replaced atomically) names the newest complete one, so a crash mid-save never leaves a checkpoint that
resume would pick up.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Callable, Optional


def write_text_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def checkpoint_dir(root: Path, step: int) -> Path:
    return root / f"step_{step:08d}"


def save_checkpoint(root: Path, step: int, state: dict, save_state: Callable[[Path], None], *, is_main: bool,
                    barrier: Callable[[], None], keep: int = 2) -> Path:
    """``save_state(dir)`` is called on every rank (Accelerate/DeepSpeed write their shards); rank 0 then adds
    ``trainer_state.json``, renames the directory into place and updates ``latest``."""
    final = checkpoint_dir(root, step)
    tmp = final.with_name(final.name + ".tmp")
    if is_main:
        root.mkdir(parents=True, exist_ok=True)
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir()
    barrier()
    save_state(tmp)
    barrier()
    if is_main:
        write_text_atomic(tmp / "trainer_state.json", json.dumps(state, indent=2))
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
        write_text_atomic(root / "latest", final.name)
        done = sorted(p for p in root.glob("step_*") if p.is_dir() and not p.name.endswith(".tmp"))
        for old in done[:-keep] if keep > 0 else []:
            shutil.rmtree(old, ignore_errors=True)
    barrier()
    return final


def latest_checkpoint(root: Path) -> Optional[Path]:
    pointer = root / "latest"
    if not pointer.is_file():
        return None
    path = root / pointer.read_text().strip()
    return path if (path / "trainer_state.json").is_file() else None


def read_state(path: Path) -> dict:
    return json.loads((path / "trainer_state.json").read_text())


def referenced_index_versions(root: Path) -> set[int]:
    """Index versions named by the complete checkpoints under ``root`` (kept from pruning while referenced)."""
    out = set()
    for p in root.glob("step_*") if root.is_dir() else []:
        if p.is_dir() and not p.name.endswith(".tmp") and (p / "trainer_state.json").is_file():
            try:
                v = json.loads((p / "trainer_state.json").read_text()).get("index_version")
            except (OSError, ValueError):
                continue
            if isinstance(v, int):
                out.add(v)
    return out


def trim_jsonl(path: Path, max_step: int) -> int:
    """Drop the rows of a JSON-lines log whose ``step`` is beyond ``max_step`` (a resumed run rewrites them);
    atomic. Returns the number of rows dropped."""
    if not path.is_file():
        return 0
    keep, dropped = [], 0
    for line in path.read_text().splitlines():
        if not line.strip():
            continue
        try:
            step = json.loads(line).get("step", 0)
        except ValueError:  # a torn last line from a kill mid-write
            dropped += 1
            continue
        if isinstance(step, (int, float)) and step > max_step:
            dropped += 1
        else:
            keep.append(line)
    if dropped:
        write_text_atomic(path, "".join(x + "\n" for x in keep))
    return dropped
