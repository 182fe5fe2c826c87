"""Tests for ragtrain.index.refresh (schedule + versioned atomic index store)."""

from __future__ import annotations

import json

import numpy as np
import pytest

from ragtrain.index import refresh as refresh_mod
from ragtrain.index.faiss_index import DenseIndex
from ragtrain.index.refresh import IndexStore, RefreshSchedule


def steps_where(schedule: RefreshSchedule, upto: int) -> list[int]:
    return [s for s in range(0, upto + 1) if schedule.should_refresh(s)]


@pytest.mark.parametrize("spec", [100, "100", "every 100", " Every  100 "])
def test_every_n(spec):
    sch = RefreshSchedule.parse(spec)
    assert sch
    assert steps_where(sch, 450) == [100, 200, 300, 400]
    assert not sch.should_refresh(0)


@pytest.mark.parametrize("spec", [0, "0", "every 0", "never", None])
def test_never(spec):
    sch = RefreshSchedule.parse(spec)
    assert not sch
    assert steps_where(sch, 1000) == []


def test_ranges_with_open_end():
    sch = RefreshSchedule.parse("0-1000:100,1000-:500")
    assert sch
    got = steps_where(sch, 3000)
    assert got == [100, 200, 300, 400, 500, 600, 700, 800, 900, 1000, 1500, 2000, 2500, 3000]
    assert sch.should_refresh(10_500) and not sch.should_refresh(10_400)


def test_ranges_closed_with_gap_and_offset_start():
    sch = RefreshSchedule.parse("0-300:100, 500-800:150")
    assert steps_where(sch, 1000) == [100, 200, 500, 650]


def test_parse_is_idempotent_and_str():
    sch = RefreshSchedule.parse("0-1000:100,1000-:500")
    assert RefreshSchedule.parse(sch) is sch
    assert RefreshSchedule.parse(str(sch)) == sch
    assert str(RefreshSchedule.parse(50)) == "every 50"
    assert str(RefreshSchedule.parse(0)) == "never"


@pytest.mark.parametrize(
    "spec",
    [
        "garbage",
        "every -5",
        "-5",
        "10-5:1",              # reversed
        "0-100:10,50-200:10",  # overlapping
        "100-200:10,0-50:10",  # unsorted
        "0-:10,100-200:5",     # open range not last
        "0-100:x",
        "",
    ],
)
def test_garbage_raises_with_spec_text(spec):
    with pytest.raises(ValueError) as exc:
        RefreshSchedule.parse(spec)
    assert repr(spec) in str(exc.value)


def test_negative_int_and_bad_types_raise():
    with pytest.raises(ValueError, match="-3"):
        RefreshSchedule.parse(-3)
    with pytest.raises(ValueError):
        RefreshSchedule.parse(True)  # type: ignore[arg-type]
    with pytest.raises(ValueError):
        RefreshSchedule.parse(1.5)  # type: ignore[arg-type]


# ------------------------------------------------------------------------------------------------ store
def make(n: int = 200, d: int = 16, seed: int = 0):
    rng = np.random.default_rng(seed)
    emb = rng.standard_normal((n, d)).astype(np.float32)
    return DenseIndex.build(emb, kind="flat"), emb


def tmp_entries(root):
    return [p for p in root.iterdir() if p.name.startswith(".tmp")]


def test_publish_versions_current_and_keep(tmp_path):
    store = IndexStore(tmp_path / "store", keep=2)
    assert store.current_version() is None and store.current_dir() is None
    with pytest.raises(FileNotFoundError):
        store.load_current()

    idx1, emb1 = make(seed=1)
    idx2, emb2 = make(seed=2)
    idx3, emb3 = make(seed=3)
    assert store.publish(idx1, emb1, step=100) == 1
    assert store.current_version() == 1
    assert store.publish(idx2, emb2, step=200, extra={"note": "second"}) == 2
    assert store.current_version() == 2
    assert store.current_dir() == tmp_path / "store" / "v000002"
    assert (tmp_path / "store" / "CURRENT").read_text().strip() == "v000002"
    assert store.versions() == [1, 2]
    info = json.loads((store.current_dir() / "version.json").read_text())
    assert info["version"] == 2 and info["step"] == 200 and info["ntotal"] == 200 and info["dim"] == 16
    assert info["note"] == "second" and "created" in info

    assert store.publish(idx3, emb3, step=300) == 3
    assert store.versions() == [2, 3]  # keep=2 -> v1 pruned
    assert not (tmp_path / "store" / "v000001").exists()
    assert tmp_entries(tmp_path / "store") == []


def test_failed_publish_leaves_previous_intact(tmp_path, monkeypatch):
    store = IndexStore(tmp_path / "store", keep=2)
    idx1, emb1 = make(seed=1)
    store.publish(idx1, emb1, step=10)
    before = sorted(p.name for p in (tmp_path / "store" / "v000001").iterdir())

    def boom(self, directory):
        (directory / "index.faiss").write_bytes(b"partial")
        raise OSError("disk full (simulated)")

    monkeypatch.setattr(DenseIndex, "save", boom)
    idx2, emb2 = make(seed=2)
    with pytest.raises(OSError, match="simulated"):
        store.publish(idx2, emb2, step=20)
    monkeypatch.undo()

    assert store.current_version() == 1
    assert store.versions() == [1]
    assert sorted(p.name for p in (tmp_path / "store" / "v000001").iterdir()) == before
    assert tmp_entries(tmp_path / "store") == []
    index, emb, info = store.load_current()
    np.testing.assert_array_equal(emb, emb1)
    assert info["step"] == 10
    # the next successful publish gets the next number
    assert store.publish(idx2, emb2, step=30) == 2


def test_failed_embedding_write_leaves_no_temp(tmp_path, monkeypatch):
    store = IndexStore(tmp_path / "store")
    idx, emb = make()

    def boom(*a, **k):
        raise RuntimeError("np.save failed")

    monkeypatch.setattr(refresh_mod.np, "save", boom)
    with pytest.raises(RuntimeError):
        store.publish(idx, emb, step=1)
    assert store.current_version() is None
    assert list((tmp_path / "store").iterdir()) == []


def test_load_current_matches_published(tmp_path):
    store = IndexStore(tmp_path / "store")
    idx, emb = make(n=300, d=24, seed=5)
    store.publish(idx, emb, step=42)
    q = np.random.default_rng(9).standard_normal((7, 24)).astype(np.float32)

    loaded, emb_loaded, info = store.load_current()
    assert isinstance(emb_loaded, np.memmap)
    assert emb_loaded.dtype == np.float32 and emb_loaded.shape == (300, 24)
    np.testing.assert_array_equal(np.asarray(emb_loaded), emb)
    assert info["step"] == 42 and info["version"] == 1
    s1, i1 = idx.search(q, 10)
    s2, i2 = loaded.search(q, 10)
    np.testing.assert_array_equal(i1, i2)
    np.testing.assert_array_equal(s1, s2)

    _, emb_mem, _ = store.load_current(mmap_embeddings=False)
    assert not isinstance(emb_mem, np.memmap)


def test_publish_validates_shapes(tmp_path):
    store = IndexStore(tmp_path / "store")
    idx, emb = make()
    with pytest.raises(ValueError):
        store.publish(idx, emb[:10], step=1)
    with pytest.raises(ValueError):
        store.publish(idx, emb[:, :4], step=1)
    with pytest.raises(ValueError):
        store.publish(idx, emb, step=1, extra={"version": 9})
    assert list((tmp_path / "store").iterdir()) == []


def test_stale_temp_dirs_are_cleaned(tmp_path):
    import os

    root = tmp_path / "store"
    store = IndexStore(root, stale_tmp_s=60)
    stale = root / ".tmp-v000001-crashed"
    stale.mkdir()
    (stale / "junk").write_text("x")
    os.utime(stale, (0, 0))
    idx, emb = make()
    store.publish(idx, emb, step=1)
    assert not stale.exists()
    assert store.current_version() == 1


@pytest.mark.parametrize("umask, dir_mode, file_mode", [(0o022, 0o755, 0o644), (0o077, 0o700, 0o600)])
def test_published_versions_follow_the_umask(tmp_path, umask, dir_mode, file_mode):
    """A version folder is made by mkdtemp (always 0700) and CURRENT by mkstemp (0600): both get the modes that
    mkdir / open would give under the umask, so another user of the group can read a shared run's index."""
    import os
    import stat

    old = os.umask(umask)
    try:
        store = IndexStore(tmp_path / "store")
        emb = np.random.default_rng(0).standard_normal((5, 4)).astype("float32")
        v = store.publish(DenseIndex.build(emb), emb, step=0)
    finally:
        os.umask(old)
    assert stat.S_IMODE(store.version_dir(v).stat().st_mode) == dir_mode
    assert stat.S_IMODE((tmp_path / "store" / "CURRENT").stat().st_mode) == file_mode
