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


@pytest.mark.parametrize("moment", list(MOMENTS))
def test_crash_and_resume_equals_the_uninterrupted_run(straight, tmp_path, monkeypatch, moment):
    from ragtrain.config import load_config

    name, at, when = MOMENTS[moment]
    original = getattr(Trainer, name)
    calls = {"n": 0}

    def breaking(self, *a, **kw):
        calls["n"] += 1
        if calls["n"] == at and when == "before":
            raise Crash(moment)
        out = original(self, *a, **kw)
        if calls["n"] == at and when == "after":
            raise Crash(moment)
        return out

    out = tmp_path / "run"
    monkeypatch.setattr(Trainer, name, breaking)
    with pytest.raises(Crash):
        Trainer(load_config(None, tiny_overrides(out, **COMMON))).train()
    monkeypatch.setattr(Trainer, name, original)
    Trainer(load_config(None, tiny_overrides(out, **COMMON, resume="true"))).train()
    _assert_same_run(out, straight)


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
    script = KILLER.format(root=str(ROOT / "src"), tests=str(ROOT / "tests"), name=name, at=at, out=str(out),
                           common=COMMON)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, "-c", script], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-3000:]
    proc = subprocess.run([sys.executable, str(ROOT / "train.py"), *tiny_overrides(out, **COMMON, resume="true")],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    _assert_same_run(out, straight)
