"""Config validation: every bad value is rejected before anything loads, naming the key."""

from pathlib import Path

import pytest

from conftest import ROOT, tiny_overrides
from ragtrain.config import ConfigError, load_config


@pytest.mark.parametrize("override, key", [
    ("rag.n_docs=0", "rag.n_docs"),
    ("rag.generator_buckets=0", "rag.generator_buckets"),
    ("rag.mode=sideways", "rag.mode"),
    ("rag.loss_type=bag", "rag.loss_type"),
    ("index.refresh_every=-5", "index.refresh_every"),
    ("index.refresh_every=banana", "index.refresh_every"),
    ("train.eval_every=-1", "train.eval_every"),
    ("train.save_every=-2", "train.save_every"),
    ("train.max_steps=0", "train.max_steps"),
    ("train.batch_size=two", "train.batch_size"),
    ("model.pooling=max", "model.pooling"),
    ("index.kind=lsh", "index.kind"),
    ("data.train=/nonexistent/qa.jsonl", "data.train"),
    ("data.kb=/nonexistent/kb.csv", "data.kb"),
    ("model.generator=/nonexistent/model", "model.generator"),
    ("trian.max_steps=3", "trian"),
    ("train.max_stepz=3", "train.max_stepz"),
    ("rag.retrieval_loss_weight=-1", "rag.retrieval_loss_weight"),
])
def test_bad_values_name_the_key(tmp_path, override, key):
    with pytest.raises(ConfigError) as exc:
        load_config(None, tiny_overrides(tmp_path / "o") + [override])
    assert key in str(exc.value)
    assert "\n" not in str(exc.value)


def test_refresh_with_frozen_context_encoder_is_rejected(tmp_path):
    with pytest.raises(ConfigError, match="index.refresh_every"):
        load_config(None, tiny_overrides(tmp_path / "o", **{"rag.mode": "original", "index.refresh_every": 5}))


def test_overrides_are_typed(tmp_path):
    cfg = load_config(None, tiny_overrides(tmp_path / "o") + ["rag.n_docs=2", "train.generator_lr=2e-4",
                                                             "index.refresh_every=0-100:10,100-:50"])
    assert cfg.rag.n_docs == 2 and isinstance(cfg.train.generator_lr, float)
    assert cfg.index.refresh_every == "0-100:10,100-:50"


def test_missing_recipe_file():
    with pytest.raises(ConfigError, match="config file not found"):
        load_config("/nonexistent/recipe.yaml")


@pytest.mark.parametrize("recipe", sorted((ROOT / "launch" / "recipes").glob("*.yaml")), ids=lambda p: p.name)
def test_every_shipped_recipe_parses(recipe):
    import os

    cwd = os.getcwd()
    os.chdir(ROOT)
    try:
        cfg = load_config(recipe, check_files=recipe.name.startswith("tiny"))
    finally:
        os.chdir(cwd)
    assert cfg.rag.n_docs >= 1


def test_yaml_no_is_a_string_for_string_keys(tmp_path):
    cfg = load_config(None, tiny_overrides(tmp_path / "o") + ["train.mixed_precision=no"])
    assert cfg.train.mixed_precision == "no"
