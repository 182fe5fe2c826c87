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


@pytest.mark.parametrize("override, key", [
    ("data.passage_stride=61", "data.passage_stride"),  # tiny_overrides: passage_words 60
    ("data.passage_stride=-1", "data.passage_stride"),
    ("train.keep_checkpoints=-1", "train.keep_checkpoints"),
    ("train.report_to=tensorbored", "train.report_to"),
    ("train.report_to=", "train.report_to"),
    ("overwrite=maybe", "overwrite"),
    ("index.nlist=0", "index.nlist"),
    ("index.nprobe=some", "index.nprobe"),
    ("index.target_recall=0", "index.target_recall"),
    ("index.target_recall=1.2", "index.target_recall"),
])
def test_new_keys_are_validated(tmp_path, override, key):
    with pytest.raises(ConfigError) as exc:
        load_config(None, tiny_overrides(tmp_path / "o") + [override])
    assert key in str(exc.value) and "\n" not in str(exc.value)


def test_resume_and_overwrite_together_are_rejected(tmp_path):
    with pytest.raises(ConfigError, match="overwrite"):
        load_config(None, tiny_overrides(tmp_path / "o", resume="true", overwrite="true"))


def test_report_to_accepts_none_all_and_lists(tmp_path):
    from ragtrain.config import report_to_trackers

    for value, want in (("none", []), ("tensorboard", ["tensorboard"]), ("all", ["all"])):
        cfg = load_config(None, tiny_overrides(tmp_path / "o", **{"train.report_to": value}))
        assert report_to_trackers(cfg.train.report_to) == want
    assert report_to_trackers("tensorboard, wandb") == ["tensorboard", "wandb"]


def test_every_config_key_has_a_help_line():
    """The help is generated from the dataclasses: a key added without a help line (or a stale line) fails here."""
    from ragtrain.config import HELP, config_keys

    keys = [k for k, _, _ in config_keys()]
    assert len(keys) == len(set(keys)) > 70
    assert set(keys) == set(HELP), set(keys) ^ set(HELP)
    assert all(HELP[k].strip() and "\n" not in HELP[k] for k in keys)


@pytest.mark.parametrize("argv", [[str(ROOT / "train.py"), "--help"], ["-m", "ragtrain.cli", "train", "--help"]],
                         ids=["train.py", "ragtrain train"])
def test_train_help_lists_every_key_with_type_default_and_meaning(argv):
    import subprocess
    import sys

    from ragtrain.config import HELP, config_keys

    proc = subprocess.run([sys.executable, *argv], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    lines = {line.split()[0]: line for line in proc.stdout.splitlines() if line.startswith("    ") and line.split()}
    for key, tp, default in config_keys():
        assert key in lines, key
        assert f" {tp} (default " in lines[key] and HELP[key] in lines[key], lines[key]
    assert "train.max_steps  " in lines["train.max_steps"] and "(default 100)" in lines["train.max_steps"]
    assert "(default tensorboard)" in lines["train.report_to"] and "(default [1,5,20])" in lines["eval.recall_ks"]


def test_config_command_prints_the_resolved_config(tmp_path):
    import subprocess
    import sys

    import yaml

    recipe = ROOT / "launch" / "recipes" / "tiny-cpu.yaml"
    proc = subprocess.run([sys.executable, "-m", "ragtrain.cli", "config", "--recipe", str(recipe), "rag.n_docs=2",
                           "train.keep_checkpoints=5"], capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr
    printed = yaml.safe_load(proc.stdout)
    want = load_config(recipe, ["rag.n_docs=2", "train.keep_checkpoints=5"], check_files=False).to_dict()
    assert printed == want and printed["rag"]["n_docs"] == 2 and printed["model"]["tiny_hidden"] == 64
    assert printed["data"]["passage_stride"] == 0  # defaults the recipe leaves out are printed too
    bad = subprocess.run([sys.executable, "-m", "ragtrain.cli", "config", "--recipe", str(recipe), "rag.n_docz=2"],
                         capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert bad.returncode == 2 and bad.stdout == ""
    err = bad.stderr.strip().splitlines()
    assert len(err) == 1 and "rag.n_docz" in err[0]
