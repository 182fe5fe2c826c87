"""Index refresh schedule and a versioned, atomically swapped on-disk index store.

:class:`RefreshSchedule` decides at which optimizer steps the knowledge base is re-encoded with the
current context encoder and the index rebuilt.  Spec forms (see :meth:`RefreshSchedule.parse`):

* ``500``, ``"500"``, ``"every 500"`` -- every 500 steps (steps 500, 1000, ...); ``0`` = never;
* ``"0-1000:100,1000-:500"`` -- piecewise ranges ``start-end:interval`` (``end`` exclusive, may be
  left open on the last range), as in Atlas's ``IndexRefreshScheduler``: inside a range the index
  is refreshed at steps ``start, start+interval, ...`` (so here at 100, 200, ..., 900, then 1000,
  1500, 2000, ...).  Step 0 never refreshes; steps outside every range never refresh; an interval
  of 0 means "no refresh inside this range".

:class:`IndexStore` keeps versions ``root/v000001/``, ``root/v000002/``, ... and a ``root/CURRENT``
file naming the live one.  A version is written into a temporary directory inside ``root``, every
file and the directory are fsync'ed, the directory is ``os.rename``'d into place, and only then is
``CURRENT`` replaced atomically (temp file + fsync + ``os.replace``), so readers only ever see
complete versions.  After the swap the oldest versions beyond ``keep`` are deleted.

A version's ``embeddings.npy`` is either written from an in-memory array or assembled by streaming ``.npy``
shards (one per rank, rows in id order across them) into it file to file, so that the (N, d) matrix never has
to sit in RAM; either way it is one ordinary ``.npy`` file (``np.load`` reads it; readers memory-map it).
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from ragtrain.index.faiss_index import DenseIndex

logger = logging.getLogger(__name__)

__all__ = ["RefreshSchedule", "IndexStore", "concat_npy"]

_EVERY_RE = re.compile(r"^(?:every\s+)?(\d+)$", re.IGNORECASE)
_RANGE_RE = re.compile(r"^(\d+)\s*-\s*(\d*)\s*:\s*(\d+)$")
_NEVER = {"never", "none", "off"}


@dataclass(frozen=True)
class RefreshSchedule:
    """When to re-encode the KB and rebuild the index.

    ``ranges`` holds ``(start, end, interval)`` triples, sorted and non-overlapping, ``end`` exclusive
    (``None`` = open); an empty tuple never refreshes."""

    ranges: tuple[tuple[int, int | None, int], ...] = ()

    @classmethod
    def parse(cls, spec: int | str | RefreshSchedule | None) -> RefreshSchedule:
        """Parse ``N`` / ``"N"`` / ``"every N"`` / ``"never"`` / ``"a-b:n,b-:m"`` (``None`` = never).

        Raises ``ValueError`` naming the spec for garbage, negative numbers, empty or reversed
        ranges, and unsorted/overlapping ranges."""
        if isinstance(spec, RefreshSchedule):
            return spec
        if spec is None:
            return cls(())
        if isinstance(spec, bool) or not isinstance(spec, (int, str)):
            raise ValueError(f"invalid refresh schedule {spec!r}: expected an int or a string")
        if isinstance(spec, int):
            if spec < 0:
                raise ValueError(f"invalid refresh schedule {spec!r}: interval must be >= 0 (0 = never)")
            return cls(((0, None, spec),) if spec > 0 else ())

        text = spec.strip()
        if text.lower() in _NEVER:
            return cls(())
        m = _EVERY_RE.match(text)
        if m:
            return cls.parse(int(m.group(1)))

        ranges: list[tuple[int, int | None, int]] = []
        for part in text.split(","):
            part = part.strip()
            rm = _RANGE_RE.match(part)
            if not rm:
                raise ValueError(
                    f"invalid refresh schedule {spec!r}: cannot parse {part!r}; expected an interval "
                    "'N' / 'every N' or ranges 'start-end:interval[,start-:interval]' with non-negative integers"
                )
            start = int(rm.group(1))
            end = int(rm.group(2)) if rm.group(2) else None
            interval = int(rm.group(3))
            if end is not None and end <= start:
                raise ValueError(f"invalid refresh schedule {spec!r}: range {part!r} is empty (end must be > start)")
            if ranges:
                prev_end = ranges[-1][1]
                if prev_end is None or start < prev_end:
                    raise ValueError(
                        f"invalid refresh schedule {spec!r}: range {part!r} overlaps or precedes the previous "
                        "range (ranges must be sorted and non-overlapping; only the last may be open-ended)"
                    )
            ranges.append((start, end, interval))
        return cls(tuple(r for r in ranges if r[2] > 0))

    def should_refresh(self, step: int) -> bool:
        """Whether to refresh after ``step`` optimizer steps have completed (never at step <= 0)."""
        if step <= 0:
            return False
        for start, end, interval in self.ranges:
            if start <= step and (end is None or step < end):
                return (step - start) % interval == 0
        return False

    def __bool__(self) -> bool:
        return bool(self.ranges)

    def __str__(self) -> str:
        if not self.ranges:
            return "never"
        if len(self.ranges) == 1 and self.ranges[0][:2] == (0, None):
            return f"every {self.ranges[0][2]}"
        return ",".join(f"{s}-{'' if e is None else e}:{i}" for s, e, i in self.ranges)


# --------------------------------------------------------------------------------------------------
# Versioned index store
# --------------------------------------------------------------------------------------------------
_VERSION_RE = re.compile(r"^v(\d{6,})$")
_TMP_PREFIX = ".tmp-"
CURRENT_FILE = "CURRENT"
EMBEDDINGS_FILE = "embeddings.npy"
VERSION_FILE = "version.json"


def _version_name(version: int) -> str:
    return f"v{version:06d}"


def _fsync_path(path: Path) -> None:
    """fsync a file or directory (directories: best effort; not supported everywhere)."""
    flags = os.O_RDONLY
    if path.is_dir():
        flags |= getattr(os, "O_DIRECTORY", 0)
    try:
        fd = os.open(path, flags)
    except OSError:  # pragma: no cover - platforms without directory fds
        return
    try:
        os.fsync(fd)
    except OSError:  # pragma: no cover - e.g. directories on some filesystems
        pass
    finally:
        os.close(fd)


def _umask() -> int:
    mask = os.umask(0o022)  # reading the umask means setting it: put it straight back
    os.umask(mask)
    return mask


def _fsync_tree(root: Path) -> None:
    for dirpath, _dirnames, filenames in os.walk(root):
        for name in filenames:
            _fsync_path(Path(dirpath) / name)
        _fsync_path(Path(dirpath))


def _npy_header(path: Path) -> tuple[tuple[int, ...], np.dtype, int]:
    """``(shape, dtype, data offset)`` of a C-ordered ``.npy`` file, read from its header only."""
    with open(path, "rb") as f:
        major, minor = np.lib.format.read_magic(f)
        read = np.lib.format.read_array_header_1_0 if major == 1 else np.lib.format.read_array_header_2_0
        shape, fortran, dtype = read(f)
        if fortran and len(shape) > 1:
            raise ValueError(f"{path}: Fortran-ordered arrays are not supported")
        return tuple(int(x) for x in shape), np.dtype(dtype), f.tell()


def concat_npy(sources: list[Path], dest: Path, buffer_bytes: int = 1 << 24) -> tuple[int, ...]:
    """Write the row-wise concatenation of the C-ordered 2-D ``.npy`` files ``sources`` (one dtype) to ``dest``
    as one ``.npy`` file, copying their data bytes in ``buffer_bytes`` pieces (constant memory); returns the
    shape."""
    heads = [_npy_header(Path(p)) for p in sources]
    dtype = heads[0][1]
    shape = (sum(h[0][0] for h in heads), heads[0][0][1])
    with open(dest, "wb") as out:
        np.lib.format.write_array_header_1_0(out, {"descr": np.lib.format.dtype_to_descr(dtype),
                                                    "fortran_order": False, "shape": shape})
        for p, (_shape, _dtype, offset) in zip(sources, heads):
            with open(p, "rb") as f:
                f.seek(offset)
                shutil.copyfileobj(f, out, buffer_bytes)
    return shape


class IndexStore:
    """Versioned index directories under ``root`` (``v000001/``, ``v000002/``, ...) plus ``CURRENT``
    naming the live one.  Each version holds ``index.faiss`` + ``meta.json`` (:meth:`DenseIndex.save`),
    ``embeddings.npy`` (float32 or float16 (N, d), row i = KB id i) and ``version.json``.

    Only one process should publish into a ``root`` at a time (e.g. the main rank); any number may
    read.  Temporary directories left by a crashed publisher are removed by later publishes once they
    are older than ``stale_tmp_s`` seconds."""

    def __init__(self, root: Path | str, keep: int = 2, *, stale_tmp_s: float = 3600.0) -> None:
        if keep < 1:
            raise ValueError(f"IndexStore: keep must be >= 1, got {keep}")
        self.root = Path(root)
        self.keep = int(keep)
        self.stale_tmp_s = float(stale_tmp_s)
        self.pinned: set[int] = set()  # versions never pruned (e.g. those a checkpoint references)
        self.root.mkdir(parents=True, exist_ok=True)

    # ------------------------------------------------------------------ inspection
    def versions(self) -> list[int]:
        """Complete versions present on disk, ascending."""
        out = []
        for p in self.root.iterdir():
            m = _VERSION_RE.match(p.name)
            if m and p.is_dir():
                out.append(int(m.group(1)))
        return sorted(out)

    def version_dir(self, version: int) -> Path:
        return self.root / _version_name(version)

    def current_version(self) -> int | None:
        """The live version named by ``CURRENT``, or ``None`` when nothing was published yet."""
        try:
            text = (self.root / CURRENT_FILE).read_text().strip()
        except FileNotFoundError:
            return None
        m = _VERSION_RE.match(text)
        if m:
            return int(m.group(1))
        if text.isdigit():
            return int(text)
        raise ValueError(f"IndexStore: corrupt {self.root / CURRENT_FILE}: {text!r}")

    def current_dir(self) -> Path | None:
        v = self.current_version()
        return None if v is None else self.version_dir(v)

    # ------------------------------------------------------------------ publishing
    def publish(
        self,
        index: DenseIndex | None,
        embeddings: np.ndarray | None = None,
        *,
        step: int,
        extra: dict[str, Any] | None = None,
        shards: list[Path] | None = None,
        dtype: Any = np.float32,
        index_kind: str = "flat",
        index_params: dict[str, Any] | None = None,
    ) -> int:
        """Write a new complete version, make it current, prune old ones; returns its number.

        The stored vectors come from ``embeddings`` (an array, saved as ``dtype``) or from ``shards`` (``.npy``
        files of one dtype, concatenated in order by streaming their bytes into ``embeddings.npy``).
        ``index=None`` publishes the vectors only, with a ``meta.json`` of kind ``index_kind`` (``index_params``):
        loading the version builds its index from them (``index.placement=ranks``, where no process builds the
        whole index).
        On any error the temporary directory is removed and ``CURRENT`` is left untouched."""
        if (embeddings is None) == (shards is None):
            raise ValueError("IndexStore.publish: pass exactly one of embeddings and shards")
        if shards is not None:
            shards = [Path(p) for p in shards]
            heads = [_npy_header(p) for p in shards]
            shape = (sum(h[0][0] for h in heads), heads[0][0][1] if heads else 0)
            dim = index.dim if index is not None else shape[1]
            if not heads or any(len(h[0]) != 2 or h[0][1] != dim for h in heads):
                raise ValueError(f"IndexStore.publish: shard shapes {[h[0] for h in heads]} do not match index dim "
                                 f"{dim}")
            if len({h[1] for h in heads}) != 1:
                raise ValueError(f"IndexStore.publish: shards of mixed dtypes {sorted({str(h[1]) for h in heads})}")
        else:
            if hasattr(embeddings, "detach"):  # torch.Tensor
                embeddings = embeddings.detach().cpu().float().numpy()  # type: ignore[union-attr]
            emb = np.asarray(embeddings)
            shape = emb.shape
            if emb.ndim != 2 or (index is not None and emb.shape[1] != index.dim):
                raise ValueError(f"IndexStore.publish: embeddings shape {emb.shape} does not match index dim "
                                 f"{None if index is None else index.dim}")
        ntotal, dim = (shape[0], shape[1]) if index is None else (index.ntotal, index.dim)
        if shape[0] != ntotal:
            raise ValueError(
                f"IndexStore.publish: {shape[0]} embedding rows but the index holds {ntotal} vectors"
            )
        reserved = {"version", "step", "ntotal", "dim", "created"}
        if extra and reserved & set(extra):
            raise ValueError(f"IndexStore.publish: extra may not override {sorted(reserved & set(extra))}")

        existing = self.versions()
        cur = self.current_version()
        version = max(existing + ([cur] if cur is not None else []) + [0]) + 1

        tmp = Path(tempfile.mkdtemp(prefix=f"{_TMP_PREFIX}{_version_name(version)}-", dir=self.root))
        try:
            os.chmod(tmp, 0o777 & ~_umask())  # mkdtemp makes it 0700; a published version is readable as mkdir's
            if index is not None:
                index.save(tmp)
            else:
                DenseIndex.save_meta_only(tmp, index_kind, dim, ntotal, EMBEDDINGS_FILE, index_params)
            if shards is not None:
                concat_npy(shards, tmp / EMBEDDINGS_FILE)
            else:
                with open(tmp / EMBEDDINGS_FILE, "wb") as f:
                    np.save(f, np.ascontiguousarray(emb, dtype=dtype))
            info = {
                "version": version,
                "step": int(step),
                "ntotal": int(ntotal),
                "dim": int(dim),
                "created": time.time(),
                **(extra or {}),
            }
            (tmp / VERSION_FILE).write_text(json.dumps(info, indent=2, default=str) + "\n")
            _fsync_tree(tmp)
            while True:  # a concurrent publisher may have taken the number: take the next one
                final = self.version_dir(version)
                try:
                    os.rename(tmp, final)  # fails on an existing non-empty directory
                    break
                except OSError:
                    if not final.exists():
                        raise
                    version += 1
                    info["version"] = version
                    (tmp / VERSION_FILE).write_text(json.dumps(info, indent=2, default=str) + "\n")
                    _fsync_path(tmp / VERSION_FILE)
            _fsync_path(self.root)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise

        self._write_current(version)
        logger.info("IndexStore: published %s (step %d, %d vectors) under %s", _version_name(version), step, ntotal, self.root)
        self._prune(version)
        return version

    def _write_current(self, version: int) -> None:
        fd, tmp_name = tempfile.mkstemp(prefix=f"{_TMP_PREFIX}{CURRENT_FILE}-", dir=self.root)
        try:
            os.chmod(tmp_name, 0o666 & ~_umask())  # mkstemp makes it 0600
            with os.fdopen(fd, "w") as f:
                f.write(_version_name(version) + "\n")
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp_name, self.root / CURRENT_FILE)
        except BaseException:
            try:
                os.unlink(tmp_name)
            except FileNotFoundError:
                pass
            raise
        _fsync_path(self.root)

    def _prune(self, current: int) -> None:
        versions = self.versions()
        keep = set(versions[-self.keep :]) | {current} | self.pinned
        for v in versions:
            if v not in keep:
                shutil.rmtree(self.version_dir(v), ignore_errors=True)
                logger.debug("IndexStore: removed old version %s", _version_name(v))
        now = time.time()
        for p in self.root.iterdir():
            if p.name.startswith(_TMP_PREFIX):
                try:
                    stale = now - p.stat().st_mtime > self.stale_tmp_s
                except FileNotFoundError:
                    continue
                if stale:
                    logger.warning("IndexStore: removing stale temporary %s", p)
                    if p.is_dir():
                        shutil.rmtree(p, ignore_errors=True)
                    else:
                        p.unlink(missing_ok=True)

    def discard_all(self) -> None:
        """Delete every version (a resumed run without a checkpoint starts over from step 0 and rebuilds them,
        with the same numbers)."""
        (self.root / CURRENT_FILE).unlink(missing_ok=True)
        for v in self.versions():
            shutil.rmtree(self.version_dir(v), ignore_errors=True)

    def roll_back(self, version: int) -> None:
        """Make ``version`` current again and delete every later version (resuming from a checkpoint that used
        ``version``: later versions were built after it and are rebuilt, with the same numbers, by the resumed
        run). Raises ``FileNotFoundError`` when ``version`` is not on disk."""
        if not (self.version_dir(version) / VERSION_FILE).is_file():
            raise FileNotFoundError(f"index version {version} ({self.version_dir(version)}) is missing")
        self._write_current(version)
        for v in self.versions():
            if v > version:
                shutil.rmtree(self.version_dir(v), ignore_errors=True)
                logger.info("IndexStore: removed %s (built after the resumed checkpoint)", _version_name(v))

    def load_version(self, version: int, use_gpu: bool = False,
                     mmap_embeddings: bool = True) -> tuple[DenseIndex, np.ndarray, dict[str, Any]]:
        """Load one version: ``(index, embeddings, version_info)``."""
        d = self.version_dir(version)
        info = json.loads((d / VERSION_FILE).read_text())
        embeddings = np.load(d / EMBEDDINGS_FILE, mmap_mode="r" if mmap_embeddings else None)
        return DenseIndex.load(d, use_gpu=use_gpu), embeddings, info

    # ------------------------------------------------------------------ loading
    def load_current(
        self, use_gpu: bool = False, mmap_embeddings: bool = True
    ) -> tuple[DenseIndex, np.ndarray, dict[str, Any]]:
        """Load the live version: ``(index, embeddings, version_info)``.

        Embeddings are memory-mapped read-only (``np.load(mmap_mode="r")``) unless
        ``mmap_embeddings=False``.  If the version is pruned by a concurrent publisher while loading,
        the (new) current version is loaded instead.  Raises ``FileNotFoundError`` when nothing has
        been published."""
        last_err: Exception | None = None
        for _attempt in range(3):
            version = self.current_version()
            if version is None:
                raise FileNotFoundError(f"IndexStore: no published index under {self.root} (no {CURRENT_FILE})")
            d = self.version_dir(version)
            try:
                info = json.loads((d / VERSION_FILE).read_text())
                embeddings = np.load(d / EMBEDDINGS_FILE, mmap_mode="r" if mmap_embeddings else None)
                index = DenseIndex.load(d, use_gpu=use_gpu)
                return index, embeddings, info
            except (FileNotFoundError, RuntimeError) as err:  # faiss raises RuntimeError on a missing file
                last_err = err
                if self.current_version() == version:
                    raise
                logger.info("IndexStore: %s replaced while loading; retrying with the new current version", d)
        assert last_err is not None
        raise last_err
