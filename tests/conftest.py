"""Shared fixtures: the shipped sample data and a fast tiny-model recipe."""

from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SAMPLE = ROOT / "src" / "ragtrain" / "sample"
TINY_RECIPE = ROOT / "launch" / "recipes" / "tiny-cpu.yaml"
SHARED_DATA = ROOT.parent / "shared" / "data"


def tiny_overrides(out: Path, **extra) -> list[str]:
    """A few-second tiny run: 2-layer hidden-32 models on the shipped sample."""
    base = {
        "output_dir": str(out),
        "data.kb": str(SAMPLE / "kb.jsonl"),
        "data.train": str(SAMPLE / "qa.jsonl"),
        "data.passage_words": 60,
        "data.split_by_article": "true",
        "data.max_eval_examples": 8,
        "model.tiny_hidden": 32,
        "model.tiny_layers": 1,
        "model.tiny_vocab": 800,
        "model.dropout": 0.0,  # deterministic: multi-rank and resume comparisons are exact
        "train.mixed_precision": "no",  # fp32 on every host whatever auto picks: exact comparisons
        "model.max_passage_length": 64,
        "model.max_prompt_length": 96,
        "model.max_answer_length": 8,
        "rag.n_docs": 3,
        "index.refresh_every": 0,
        "train.batch_size": 4,
        "train.max_steps": 4,
        "train.eval_every": 0,
        "train.save_every": 0,
        "train.log_every": 1,
        "train.generator_lr": 1e-3,
        "train.question_encoder_lr": 1e-3,
        "train.context_encoder_lr": 1e-3,
        "eval.batch_size": 8,
        "eval.max_new_tokens": 4,
        "eval.recall_ks": "1,5",
    }
    base.update(extra)
    return [f"{k}={v}" for k, v in base.items()]


@pytest.fixture
def tiny_cfg(tmp_path):
    from ragtrain.config import load_config

    def make(sub: str = "run", **extra):
        return load_config(None, tiny_overrides(tmp_path / sub, **extra))

    return make


TRAINED_RUN = {"index.refresh_every": 2, "train.eval_every": 2, "train.max_steps": 5, "train.save_every": 2,
               "train.keep_checkpoints": 3}


@pytest.fixture(scope="session")
def trained_run(tmp_path_factory):
    """One finished tiny run (5 steps; refreshes, evaluations and checkpoints every 2 steps), shared read-only:
    tests that move or change it work on a copy."""
    from ragtrain.config import load_config
    from ragtrain.train.trainer import Trainer

    out = tmp_path_factory.mktemp("trained") / "run"
    Trainer(load_config(None, tiny_overrides(out, **TRAINED_RUN))).train()
    return out
