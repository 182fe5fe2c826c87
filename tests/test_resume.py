"""Exact resume: a run that dies at any moment and is resumed with resume=true continues as if never stopped.

Dropout is on (0.1), so a shifted RNG stream shows up in the losses. Each case crashes the run at one moment
(an exception in-process, or SIGKILL of a subprocess), resumes it, and compares with the uninterrupted run:
per-step losses and index versions (train_log.jsonl), evaluation rows (metrics.jsonl), the index versions on disk
and the exported weights.
"""

import json
import os
import signal
import subprocess
import sys

import numpy as np
import pytest
import torch

from conftest import ROOT, tiny_overrides
from ragtrain.train.trainer import Trainer

COMMON = {"rag.mode": "end2end", "index.refresh_every": 2, "train.max_steps": 6, "train.save_every": 2,
          "train.eval_every": 2, "model.dropout": 0.1, "index.keep_versions": 1}


class Crash(Exception):
    pass


def _rows(out, name):
    return [json.loads(x) for x in (out / name).read_text().splitlines()]


def _weights(out):
    from safetensors.torch import load_file

    return {name: load_file(str(out / "final" / name / "model.safetensors"))
            for name in ("question_encoder", "context_encoder", "generator")}


@pytest.fixture(scope="module")
def straight(tmp_path_factory):
    from ragtrain.config import load_config

    out = tmp_path_factory.mktemp("straight") / "run"
    Trainer(load_config(None, tiny_overrides(out, **COMMON))).train()
    return out


def _assert_same_run(a, b):
    ra, rb = _rows(a, "train_log.jsonl"), _rows(b, "train_log.jsonl")
    assert [r["step"] for r in ra] == [r["step"] for r in rb] == list(range(1, 7))
    assert [r["index_version"] for r in ra] == [r["index_version"] for r in rb]
    np.testing.assert_array_equal([r["loss"] for r in ra], [r["loss"] for r in rb])
    assert _rows(a, "metrics.jsonl") == _rows(b, "metrics.jsonl")
    assert sorted(p.name for p in (a / "index").glob("v*")) == sorted(p.name for p in (b / "index").glob("v*"))
    wa, wb = _weights(a), _weights(b)
    for name in wa:
        for k in wa[name]:
            assert torch.equal(wa[name][k], wb[name][k]), (name, k)


# moment -> (method to break, on which call it raises)
MOMENTS = {
    "right after the step-2 checkpoint": ("save_checkpoint", 1, "after"),
    "mid-step 3 (inside the forward)": ("_passages", 3, "before"),  # called once a step, inside retrieve()
    "mid-refresh at step 4 (after publishing v3)": ("_install", 3, "after"),
    "mid-eval at step 4": ("evaluate", 2, "before"),
    "mid-save at step 4": ("save_checkpoint", 2, "before"),
}


def _crash_and_resume(out, cfg: dict, monkeypatch, name: str, at: int, when: str = "before") -> None:
    """Train with ``cfg`` into ``out`` until the ``at``-th call of ``Trainer.<name>`` raises (before or after the
    real call), then resume the run to its end."""
    from ragtrain.config import load_config

    original = getattr(Trainer, name)
    calls = {"n": 0}

    def breaking(self, *a, **kw):
        calls["n"] += 1
        if calls["n"] == at and when == "before":
            raise Crash(name)
        result = original(self, *a, **kw)
        if calls["n"] == at and when == "after":
            raise Crash(name)
        return result

    monkeypatch.setattr(Trainer, name, breaking)
    with pytest.raises(Crash):
        Trainer(load_config(None, tiny_overrides(out, **cfg))).train()
    monkeypatch.setattr(Trainer, name, original)
    Trainer(load_config(None, tiny_overrides(out, **cfg, resume="true"))).train()


@pytest.mark.parametrize("moment", list(MOMENTS))
def test_crash_and_resume_equals_the_uninterrupted_run(straight, tmp_path, monkeypatch, moment):
    name, at, when = MOMENTS[moment]
    _crash_and_resume(tmp_path / "run", COMMON, monkeypatch, name, at, when)
    _assert_same_run(tmp_path / "run", straight)


KILLER = r'''
import os, signal, sys
sys.path.insert(0, {root!r})
sys.path.insert(0, {tests!r})
from conftest import tiny_overrides
from ragtrain.config import load_config
from ragtrain.train.trainer import Trainer
name, at = {name!r}, {at}
original = getattr(Trainer, name)
calls = [0]
def killing(self, *a, **kw):
    calls[0] += 1
    if calls[0] == at:
        os.kill(os.getpid(), signal.SIGKILL)
    return original(self, *a, **kw)
setattr(Trainer, name, killing)
Trainer(load_config(None, tiny_overrides({out!r}, **{common!r}))).train()
'''


@pytest.mark.parametrize("name,at", [("refresh_index", 3), ("_after_step", 5)])
def test_sigkill_and_resume_equals_the_uninterrupted_run(straight, tmp_path, name, at):
    """A real kill -9 (no cleanup, no exception handlers): mid-refresh at step 4, and between step 5's update
    and its logging."""
    out = tmp_path / "run"
    kill_and_resume(out, COMMON, name, at)
    _assert_same_run(out, straight)


def kill_and_resume(out, common: dict, name: str, at: int) -> None:
    """Run ``common`` in a subprocess that kill -9s itself on the ``at``-th call of ``Trainer.<name>``, then resume
    it with ``train.py``."""
    script = KILLER.format(root=str(ROOT / "src"), tests=str(ROOT / "tests"), name=name, at=at, out=str(out),
                           common=common)
    # the same thread count as the in-process uninterrupted run: another one changes reduction order (1e-7 apart)
    env = {**os.environ, "OMP_NUM_THREADS": str(torch.get_num_threads())}
    proc = subprocess.run([sys.executable, "-c", script], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-3000:]
    proc = subprocess.run([sys.executable, str(ROOT / "train.py"), *tiny_overrides(out, **common, resume="true")],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]


def test_nan_stops_the_run_before_anything_nan_is_written(tmp_path):
    """Learning rates of 1e9: the loss or gradient norm goes non-finite within a few steps. The run stops with
    one line naming the step (exit 3); no checkpoint, index version or export is written after it, and every log
    row is valid JSON with finite numbers."""
    out = tmp_path / "run"
    lrs = {f"train.{m}_lr": 1e9 for m in ("generator", "question_encoder", "context_encoder")}
    args = tiny_overrides(out, **{**COMMON, **lrs, "train.max_grad_norm": 0.0, "train.max_steps": 12})
    proc = subprocess.run([sys.executable, str(ROOT / "train.py"), *args], cwd=ROOT, capture_output=True, text=True,
                          timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 3, proc.stderr[-2000:]
    err = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert len(err) == 1 and "non-finite" in err[0] and "step " in err[0], proc.stderr[-2000:]
    bad_step = int(err[0].split("step ")[1].split(":")[0])
    assert not (out / "final").exists()
    rows = _rows(out, "train_log.jsonl")  # json.loads rejects nothing here: check the numbers too
    assert [r["step"] for r in rows] == list(range(1, bad_step)) and all(np.isfinite(r["loss"]) for r in rows)
    for r in _rows(out, "metrics.jsonl") if (out / "metrics.jsonl").exists() else []:
        assert all(np.isfinite(v) for v in r.values() if isinstance(v, float))
    for v in (out / "index").glob("v*"):
        assert np.isfinite(np.load(v / "embeddings.npy")).all()
    ckpts = sorted((out / "checkpoints").glob("step_*")) if (out / "checkpoints").exists() else []
    assert all(int(p.name.split("_")[1]) < bad_step for p in ckpts)


def test_skip_nonfinite_skips_the_step_and_continues(tmp_path, monkeypatch):
    from ragtrain.config import load_config
    from ragtrain.model.rag import RagModel
    from ragtrain.train.trainer import NonFiniteError

    original = RagModel.forward
    calls = {"n": 0}

    def nan_on_second_call(self, *a, **kw):
        out = original(self, *a, **kw)
        if not self.training:  # the evaluation loss's forward passes
            return out
        calls["n"] += 1
        if calls["n"] == 2:
            out.loss = out.loss * float("nan")
        return out

    monkeypatch.setattr(RagModel, "forward", nan_on_second_call)
    cfg = {**COMMON, "train.max_steps": 4, "train.save_every": 0, "train.eval_every": 0, "index.refresh_every": 0}
    with pytest.raises(NonFiniteError, match="step 2: non-finite loss"):
        Trainer(load_config(None, tiny_overrides(tmp_path / "a", **cfg))).train()
    calls["n"] = 0
    Trainer(load_config(None, tiny_overrides(tmp_path / "b", **cfg, **{"train.skip_nonfinite": 1}))).train()
    rows = _rows(tmp_path / "b", "train_log.jsonl")
    assert [r["step"] for r in rows] == [1, 2, 3, 4] and calls["n"] == 5  # 5 batches for 4 updates
    assert all(np.isfinite(r["loss"]) for r in rows)


def test_dangling_latest_falls_back_to_the_newest_complete_checkpoint(straight, tmp_path, caplog):
    """`latest` naming a checkpoint that never completed (kill mid-save) must not restart from step 0."""
    import shutil

    from ragtrain.config import load_config

    out = tmp_path / "run"
    shutil.copytree(straight, out)
    ck = out / "checkpoints"
    assert (ck / "step_00000006").is_dir()
    shutil.rmtree(ck / "step_00000006")
    (ck / "step_00000006.tmp").mkdir()  # what a kill mid-save leaves
    (ck / "latest").write_text("step_00000006\n")
    caplog.set_level("WARNING")
    tr = Trainer(load_config(None, tiny_overrides(out, **COMMON, resume="true")))
    assert tr.step == 4 and "not a complete checkpoint" in caplog.text
    assert not (ck / "step_00000006.tmp").exists()  # swept at start-up


def test_replace_dir_and_sweep_never_lose_the_previous_copy(tmp_path):
    from ragtrain.train.checkpoint import replace_dir, sweep_stale

    out = tmp_path / "run"
    (out / "final").mkdir(parents=True)
    (out / "final" / "a").write_text("old")
    tmp = out / "final.tmp"
    tmp.mkdir()
    (tmp / "a").write_text("new")
    replace_dir(tmp, out / "final")
    assert (out / "final" / "a").read_text() == "new" and not tmp.exists() and not (out / "final.old").exists()
    # a kill between the two renames: only final.old (complete) and final.tmp exist -> sweep restores the old one
    (out / "final").rename(out / "final.old")
    (out / "final.tmp").mkdir()
    (out / "index").mkdir()
    (out / "index" / ".tmp-v000002-x").mkdir()
    (out / ".config.yaml.tmp123").write_text("half")
    removed = sweep_stale(out)
    assert (out / "final" / "a").read_text() == "new" and not (out / "final.old").exists()
    assert {p.name for p in removed} == {"final.tmp", ".tmp-v000002-x", ".config.yaml.tmp123"}


def test_resume_refuses_another_mode_before_loading_anything(straight, tmp_path):
    import shutil

    from ragtrain.config import ConfigError, load_config

    out = tmp_path / "run"
    shutil.copytree(straight, out)
    with pytest.raises(ConfigError, match="mode: checkpoint 'end2end', this run 'original'"):
        Trainer(load_config(None, tiny_overrides(out, **{**COMMON, "rag.mode": "original", "index.refresh_every": 0},
                                                  resume="true")))


@pytest.mark.parametrize("name,at", [("_install_slice", 3), ("_passages", 3)])
def test_index_on_the_ranks_crash_and_resume_equals_the_uninterrupted_run(straight, tmp_path, monkeypatch, name, at):
    """index.placement=ranks keeps no index file: a resumed run re-indexes its slice of the checkpoint's version
    (crash right after publishing v3 at step 4, before the slice is installed; and mid-step 3) and continues
    exactly as the uninterrupted run with the rank-0 index."""
    _crash_and_resume(tmp_path / "run", {**COMMON, "index.placement": "ranks"}, monkeypatch, name, at)
    _assert_same_run(tmp_path / "run", straight)


@pytest.mark.parametrize("name,at", [("_install", 3), ("_passages", 3)])
def test_ivf_with_a_tuned_nprobe_crash_and_resume_equals_the_uninterrupted_run(tmp_path, monkeypatch, name, at):
    """index.kind=ivf with nlist/nprobe=auto: every refresh tunes nprobe; a run that crashes right after publishing
    v3 (step 4) or mid-step 3 and resumes searches with the versions' tuned values and equals the uninterrupted
    run."""
    from ragtrain.config import load_config

    cfg = {**COMMON, "index.kind": "ivf", "index.target_recall": 0.5}
    straight_out = tmp_path / "straight"
    Trainer(load_config(None, tiny_overrides(straight_out, **cfg))).train()
    meta = json.loads(next((straight_out / "index").glob("v*/meta.json")).read_text())
    assert meta["params"]["tuned_nprobe"]["nprobe"] < meta["params"]["effective_nlist"]  # a real approximation
    _crash_and_resume(tmp_path / "run", cfg, monkeypatch, name, at)
    _assert_same_run(tmp_path / "run", straight_out)
