"""index.refresh_mode=async: the KB is encoded by a child process from a snapshot of the context encoder while
training continues; the index is swapped in exactly index.async_lag steps later, holds the snapshot's vectors,
and a run killed while a refresh is in flight resumes exactly."""

import json

import numpy as np
import pytest
import torch

from conftest import tiny_overrides
from ragtrain.train.trainer import Trainer

# two encoding processes: each encodes half of the KB into its own memory-mapped shard
ASYNC = {"rag.mode": "end2end", "index.refresh_every": 3, "index.refresh_mode": "async", "index.async_lag": 2,
         "index.async_devices": "[cpu, cpu]", "train.max_steps": 6, "train.context_encoder_lr": 5e-2,
         "model.dropout": 0.1, "train.save_every": 4}


def _rows(out, name):
    return [json.loads(x) for x in (out / name).read_text().splitlines()]


class Crash(Exception):
    pass


@pytest.fixture(scope="module")
def async_run(tmp_path_factory):
    from ragtrain.config import load_config

    out = tmp_path_factory.mktemp("async") / "run"
    snapshots = {}
    original = Trainer._start_async_refresh

    def spy(self):
        snapshots[self.step] = {k: v.clone() for k, v in self.unwrapped.context_encoder.state_dict().items()}
        return original(self)

    Trainer._start_async_refresh = spy
    try:
        tr = Trainer(load_config(None, tiny_overrides(out, **ASYNC)))
        tr.train()
    finally:
        Trainer._start_async_refresh = original
    return tr, snapshots


def test_the_index_is_swapped_in_after_the_lag_with_the_snapshots_vectors(async_run):
    tr, snapshots = async_run
    rows = _rows(tr.out, "train_log.jsonl")
    # step 3 starts a refresh, swapped in at the end of step 5: step 6 uses v2; step 6 starts another, finished
    # before the final evaluation (v3)
    assert [(r["step"], r["index_version"]) for r in rows] == [(1, 1), (2, 1), (3, 1), (4, 1), (5, 1), (6, 2)]
    assert sorted(snapshots) == [3, 6] and tr.index_version == 3 and tr.last_refresh_step == 6
    _, v2, info = tr.store.load_version(2)
    assert info["step"] == 3
    # v2 = the KB encoded (in this process, the ordinary way) by the context encoder as it was at step 3
    enc = tr.unwrapped.context_encoder
    live = {k: v.clone() for k, v in enc.state_dict().items()}
    enc.load_state_dict(snapshots[3])
    np.testing.assert_allclose(np.asarray(v2), tr.encode_kb(), atol=1e-5)
    enc.load_state_dict(live)
    assert not np.allclose(np.asarray(v2), np.asarray(tr.store.load_version(3)[1]), atol=1e-4)  # it did move
    # snapshots are kept only while a checkpoint needs them (the step-4 one was saved while step 3's was in flight);
    # the workers' token ids are kept for every refresh
    assert sorted(p.name for p in (tr.out / "refresh").iterdir()) == ["step_00000003", "step_00000006", "tokens"]
    n = len(tr.kb)
    assert sorted(p.name for p in (tr.out / "refresh" / "tokens").iterdir()) == sorted(
        [f"rows_0_{n // 2}", f"rows_{n // 2}_{n}"])


def test_two_workers_encode_a_slice_each_and_tokenize_only_once(async_run):
    tr, _ = async_run
    first, second = tr.async_timings
    n = len(tr.kb)
    for t in (first, second):
        assert t["workers"] == 2 and t["started"] == 2
        assert [w["rows"] for w in t["per_worker"]] == [[0, n // 2], [n // 2, n]]
    assert [w["tokens"] for w in first["per_worker"]] == ["tokenized", "tokenized"]
    assert [w["tokens"] for w in second["per_worker"]] == ["cached", "cached"]


def test_cached_token_ids_equal_the_tokenizers_and_are_refused_when_made_otherwise(async_run, tmp_path,
                                                                                     monkeypatch):
    import ragtrain.data.kb_tokens as kb_tokens
    import ragtrain.index.faiss_index as faiss_index
    from ragtrain.data.kb_tokens import PassageTokens

    tr, _ = async_run
    rows = range(3, 11)
    made = PassageTokens(tr.kb, rows, tr.collator.passage_ids, tr.collator.pad_passage_ids)
    made.save(tmp_path / "t", {"max_length": 64})
    back = PassageTokens.load(tmp_path / "t", rows, tr.collator.pad_passage_ids, {"max_length": 64})
    assert [list(back.get(i)) for i in rows] == [list(made.get(i)) for i in rows]
    assert [list(back.get(i)) for i in rows] == tr.collator.passage_ids(tr.kb[3:11]["title"], tr.kb[3:11]["text"])
    # batches from the memory-mapped ids equal the in-RAM ones; the map's pages are released as they are read
    dropped = []
    monkeypatch.setattr(kb_tokens, "DROP_BYTES", 1)
    monkeypatch.setattr(faiss_index, "drop_pages", lambda a: dropped.append(a))
    for (p1, i1, m1), (p2, i2, m2) in zip(back.batches(3), made.batches(3), strict=True):
        np.testing.assert_array_equal(p1, p2)
        assert torch.equal(i1, i2) and torch.equal(m1, m2)
    assert len(dropped) == 3 and all(a is back.flat for a in dropped)  # 8 rows in batches of 3
    assert PassageTokens.load(tmp_path / "t", rows, None, {"max_length": 32}) is None  # other settings
    assert PassageTokens.load(tmp_path / "t", range(3, 12), None, {"max_length": 64}) is None  # other rows
    assert PassageTokens.load(tmp_path / "none", rows, None, {"max_length": 64}) is None


def test_worker_slices_are_contiguous_and_even():
    from ragtrain.index.async_refresh import worker_slices

    assert worker_slices(10, 3) == [range(0, 3), range(3, 6), range(6, 10)]
    assert worker_slices(7, 1) == [range(0, 7)]


def test_a_run_killed_while_a_refresh_is_in_flight_resumes_exactly(async_run, tmp_path, monkeypatch):
    from ragtrain.config import load_config

    straight = async_run[0].out
    out = tmp_path / "run"
    original = Trainer.save_checkpoint

    def crash_after_first_checkpoint(self, *a, **kw):
        original(self, *a, **kw)
        raise Crash("killed right after the step-4 checkpoint, step 3's refresh in flight")

    monkeypatch.setattr(Trainer, "save_checkpoint", crash_after_first_checkpoint)
    crashed = Trainer(load_config(None, tiny_overrides(out, **ASYNC)))
    with pytest.raises(Crash):
        crashed.train()
    monkeypatch.setattr(Trainer, "save_checkpoint", original)
    state = json.loads((out / "checkpoints" / "step_00000004" / "trainer_state.json").read_text())
    assert state["pending_refresh"]["swap_step"] == 5
    # one worker finished its shard, the other was killed before renaming its shard into place
    shards = crashed._job.results()
    shards[1].unlink()
    resumed = Trainer(load_config(None, tiny_overrides(out, **ASYNC, resume="true")))
    resumed.train()
    assert [(t["workers"], t["started"]) for t in resumed.async_timings] == [(2, 1), (2, 2)]  # only the missing one
    _assert_same_run(out, straight)


def _assert_same_run(out, straight):
    a, b = _rows(out, "train_log.jsonl"), _rows(straight, "train_log.jsonl")
    assert [(r["step"], r["index_version"]) for r in a] == [(r["step"], r["index_version"]) for r in b]
    np.testing.assert_array_equal([r["loss"] for r in a], [r["loss"] for r in b])
    assert _rows(out, "metrics.jsonl") == _rows(straight, "metrics.jsonl")
    for v in (2, 3):
        np.testing.assert_array_equal(np.load(out / "index" / f"v{v:06d}" / "embeddings.npy"),
                                      np.load(straight / "index" / f"v{v:06d}" / "embeddings.npy"))


@pytest.mark.parametrize("name,at", [("_finish_async_refresh", 1), ("_start_async_refresh", 2)])
def test_sigkill_and_resume_equals_the_uninterrupted_run(async_run, tmp_path, name, at):
    """A real kill -9 of the training process (its encoding workers live on, orphaned): at step 5's swap, step
    3's refresh in flight, and as step 6 starts the next refresh; resumed from the step-4 checkpoint with train.py."""
    from test_resume import kill_and_resume

    out = tmp_path / "run"
    kill_and_resume(out, ASYNC, name, at)
    _assert_same_run(out, async_run[0].out)


def test_async_keys_are_validated(tiny_cfg):
    from ragtrain.config import ConfigError

    with pytest.raises(ConfigError, match="index.refresh_mode"):
        tiny_cfg(**{"index.refresh_mode": "later"})
    with pytest.raises(ConfigError, match="index.async_lag"):
        tiny_cfg(**{"index.async_lag": 0})
    with pytest.raises(ConfigError, match=r"index.async_devices\[1\]: 'gpu1' is not cpu, cuda or cuda:N"):
        tiny_cfg(**{"index.async_devices": "[cpu, gpu1]"})
    with pytest.raises(ConfigError, match="index.async_devices: must be a non-empty list"):
        tiny_cfg(**{"index.async_devices": "[]"})


def test_an_async_device_the_node_lacks_is_refused_before_anything_is_written(tiny_cfg, tmp_path):
    from ragtrain.config import ConfigError

    n = torch.cuda.device_count() if torch.cuda.is_available() else 0
    cfg = tiny_cfg(**{"index.refresh_mode": "async", "index.refresh_every": 2, "index.async_devices": f"[cpu, cuda:{n}]"})
    with pytest.raises(ConfigError, match=rf"index.async_devices\[1\]: cuda:{n}, but this node has {n} CUDA"):
        Trainer(cfg)
    assert not (tmp_path / "run").exists()


def test_a_failing_worker_raises_naming_its_log_and_the_other_is_stopped(tmp_path):
    from ragtrain.index.async_refresh import AsyncEncode

    snap = tmp_path / "refresh" / "step_00000003"
    snap.mkdir(parents=True)  # no snapshot in it: both workers fail at start-up
    job = AsyncEncode(snap, tmp_path / "kb", 10, ["cpu", "cpu"])
    with pytest.raises(RuntimeError, match=r"async KB encode from .*step_00000003 into shard_00000.npy failed "
                                           r"\(exit 1\); log .*shard_00000.log"):
        job.results()
    assert all(j.done() for j in job.jobs) and not any(p.exists() for p in job.shards)
    assert "ragtrain_snapshot.json" in (snap / "shard_00000.log").read_text()  # the child's own error is kept
