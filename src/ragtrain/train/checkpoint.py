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
        replace_dir(tmp, final)
        write_text_atomic(root / "latest", final.name)
        done = sorted(p for p in root.glob("step_*") if _complete(p))
        for old in done[:-keep] if keep > 0 else []:
            shutil.rmtree(old, ignore_errors=True)
    barrier()
    return final


def replace_dir(tmp: Path, final: Path) -> None:
    """Move the complete directory ``tmp`` to ``final``. An existing ``final`` is first renamed to ``final.old``
    and deleted only once the new one is in place, so a kill at any moment leaves a complete copy under one of
    the two names (:func:`sweep_stale` puts ``.old`` back when the new one never arrived)."""
    old = final.with_name(final.name + ".old")
    if final.exists():
        shutil.rmtree(old, ignore_errors=True)
        os.replace(final, old)
    os.replace(tmp, final)
    shutil.rmtree(old, ignore_errors=True)


def _complete(path: Path) -> bool:
    return path.is_dir() and not path.name.endswith((".tmp", ".old")) and (path / "trainer_state.json").is_file()


def latest_checkpoint(root: Path, warn=None) -> Optional[Path]:
    """The checkpoint named by ``root/latest``; when that is missing or incomplete (a kill mid-save), the newest
    complete ``step_*`` instead (reported through ``warn``); ``None`` when there is none."""
    pointer = root / "latest"
    named = root / pointer.read_text().strip() if pointer.is_file() else None
    if named is not None and _complete(named):
        return named
    done = sorted(p for p in root.glob("step_*") if _complete(p)) if root.is_dir() else []
    if done and warn is not None:
        warn(f"{pointer} names {named.name if named else 'nothing'}, which is not a complete checkpoint; "
             f"resuming from the newest complete one, {done[-1].name}")
    return done[-1] if done else None


def sweep_stale(out: Path) -> list[Path]:
    """Remove what a killed run left half written under its output folder (checkpoint, export and index
    temporaries) and put back a ``.old`` directory whose replacement never arrived. Returns what was removed."""
    removed = []
    for old in list(out.glob("final.old")) + list((out / "checkpoints").glob("step_*.old")):
        final = old.with_name(old.name[: -len(".old")])
        if final.exists():
            shutil.rmtree(old, ignore_errors=True)
            removed.append(old)
        else:
            os.replace(old, final)
    stale = [out / "final.tmp", *(out / "checkpoints").glob("step_*.tmp"), *(out / "index").glob(".tmp-*"),
             *out.glob(".*.tmp*"), *(out / "checkpoints").glob(".*.tmp*")]
    for p in stale:
        if p.is_dir():
            shutil.rmtree(p, ignore_errors=True)
        elif p.exists():
            p.unlink(missing_ok=True)
        else:
            continue
        removed.append(p)
    return removed


def read_state(path: Path) -> dict:
    return json.loads((path / "trainer_state.json").read_text())


def _checkpoint_states(root: Path):
    """The ``trainer_state.json`` of every complete checkpoint under ``root`` (unreadable ones skipped)."""
    for p in root.glob("step_*") if root.is_dir() else []:
        if p.is_dir() and not p.name.endswith(".tmp") and (p / "trainer_state.json").is_file():
            try:
                yield json.loads((p / "trainer_state.json").read_text())
            except (OSError, ValueError):
                continue


def referenced_index_versions(root: Path) -> set[int]:
    """Index versions named by the complete checkpoints under ``root`` (kept from pruning while referenced)."""
    return {st["index_version"] for st in _checkpoint_states(root) if isinstance(st.get("index_version"), int)}


def referenced_snapshots(root: Path) -> set[str]:
    """Names of the async-refresh snapshot folders (``OUTPUT_DIR/refresh/step_*``) that complete checkpoints under
    ``root`` still need (their refresh was in flight when they were saved)."""
    out = set()
    for st in _checkpoint_states(root):
        pending = st.get("pending_refresh")
        if isinstance(pending, dict) and pending.get("snapshot"):
            out.add(Path(pending["snapshot"]).name)
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
