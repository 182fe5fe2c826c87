"""What a run leaves in (and takes from) its output_dir: re-runs refused or overwritten, a checkpoint at max_steps,
train.keep_checkpoints, train.report_to, too-small QA files, built KBs as data.kb, a movable export."""

import json
import os
import shutil
import subprocess
import sys

import pytest

from conftest import ROOT, SAMPLE, TRAINED_RUN, tiny_overrides
from ragtrain.config import ConfigError, load_config
from ragtrain.train import trainer as T


def _rows(path):
    return [json.loads(x) for x in path.read_text().splitlines() if x.strip()]


def test_checkpoint_at_max_steps_and_keep_checkpoints(trained_run):
    # save_every=2, max_steps=5: steps 2 and 4, and the last step; keep_checkpoints=3 keeps all three
    ck = trained_run / "checkpoints"
    assert sorted(p.name for p in ck.glob("step_*")) == ["step_00000002", "step_00000004", "step_00000005"]
    assert (ck / "latest").read_text().strip() == "step_00000005"
    assert json.loads((ck / "step_00000005" / "trainer_state.json").read_text())["step"] == 5
    assert (trained_run / "curves.png").is_file()  # drawn at the end of training


def test_rerun_into_a_previous_run_is_refused_without_writing(trained_run, capsys):
    from ragtrain.train.run import main

    before = {p: p.stat().st_mtime_ns for p in trained_run.rglob("*") if p.is_file()}
    rc = main(tiny_overrides(trained_run, **TRAINED_RUN))
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1
    assert "output_dir" in err[0] and "resume=true" in err[0] and "overwrite=true" in err[0]
    assert {p: p.stat().st_mtime_ns for p in trained_run.rglob("*") if p.is_file()} == before


def test_overwrite_clears_the_previous_run(trained_run, tmp_path):
    out = tmp_path / "run"
    shutil.copytree(trained_run, out)
    cfg = load_config(None, tiny_overrides(out, overwrite="true", **{"train.max_steps": 2, "train.save_every": 0,
                                                                       "train.report_to": "none"}))
    T.Trainer(cfg).train()
    assert [r["step"] for r in _rows(out / "train_log.jsonl")] == [1, 2]
    assert [r["step"] for r in _rows(out / "metrics.jsonl")] == [2]
    assert not (out / "checkpoints").exists()
    assert json.loads((out / "final" / "ragtrain.json").read_text())["step"] == 2
    # this run's versions only: the initial build and the re-encode after its last step (end2end, no refresh)
    assert sorted(p.name for p in (out / "index").glob("v*")) == ["v000001", "v000002"]
    assert not (out / "tensorboard").exists()  # train.report_to=none
    assert not list(out.glob(".overwritten*"))


def test_report_to_tensorboard_writes_event_files(trained_run):
    assert list((trained_run / "tensorboard").rglob("events.out.tfevents.*"))


def test_export_records_the_kb_relative_to_itself_so_a_moved_run_evaluates(trained_run, tmp_path):
    meta = json.loads((trained_run / "final" / "ragtrain.json").read_text())
    assert meta["kb_dir"] == os.path.join("..", "kb")
    moved = tmp_path / "elsewhere" / "moved"
    shutil.copytree(trained_run, moved)
    proc = subprocess.run([sys.executable, "-m", "ragtrain.cli", "eval", "--checkpoint", str(moved / "final"),
                           "--data", str(SAMPLE / "qa.jsonl"), "--max-examples", "4", "--max-new-tokens", "2"],
                          capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert json.loads(proc.stdout.strip().splitlines()[-1])["n"] == 4


def test_resolve_kb_dir(tmp_path):
    from ragtrain.model.loading import resolve_kb_dir

    export = tmp_path / "run" / "final"
    (tmp_path / "run" / "kb").mkdir(parents=True)
    assert resolve_kb_dir(export, "../kb") == tmp_path / "run" / "kb"
    # an older export: an absolute path that is gone -> the same-named folder beside the export
    assert resolve_kb_dir(export, "/gone/somewhere/kb") == tmp_path / "run" / "kb"
    assert resolve_kb_dir(export, str(tmp_path / "run" / "kb")) == tmp_path / "run" / "kb"
    assert T.kb_dir_for_export(tmp_path / "run" / "kb", tmp_path / "run", export) == os.path.join("..", "kb")
    assert T.kb_dir_for_export(tmp_path / "shared_kb", tmp_path / "run", export) == str(tmp_path / "shared_kb")


def _boom(*a, **k):
    raise AssertionError("models must not load")


def test_qa_without_evaluation_examples_is_an_error_naming_the_file(tmp_path, monkeypatch):
    monkeypatch.setattr(T, "build_rag_model", _boom)
    qa = tmp_path / "one.jsonl"
    qa.write_text(json.dumps({"question": "Which river?", "answers": ["Wend"]}) + "\n")
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    for extra, named in (({}, qa), ({"data.split_by_article": "false", "data.validation": str(empty)}, empty)):
        cfg = load_config(None, tiny_overrides(tmp_path / "o", **{"data.train": str(qa), **extra}))
        with pytest.raises(ConfigError) as exc:
            T.Trainer(cfg)
        msg = str(exc.value)
        assert "data.validation" in msg and str(named) in msg and "\n" not in msg


def test_empty_train_split_names_the_file(tmp_path, monkeypatch):
    monkeypatch.setattr(T, "build_rag_model", _boom)
    qa = tmp_path / "two.jsonl"
    qa.write_text("".join(json.dumps({"question": f"q{i}", "answers": ["a"], "article": f"A{i}"}) + "\n"
                          for i in range(2)))
    cfg = load_config(None, tiny_overrides(tmp_path / "o", **{"data.train": str(qa),
                                                               "data.split_fractions": "0,0.5,0.5"}))
    with pytest.raises(ConfigError, match=f"data.train: no training examples in {qa}"):
        T.Trainer(cfg)


def test_a_built_kb_dir_and_a_plain_datasets_folder_are_accepted_as_data_kb(tmp_path):
    import datasets

    from ragtrain.data.kb import build_kb

    built = build_kb(SAMPLE / "kb.jsonl", tmp_path / "built", passage_words=60)
    tr = T.Trainer(load_config(None, tiny_overrides(tmp_path / "a", **{"data.kb": str(tmp_path / "built"),
                                                                        "train.max_steps": 1})))
    assert len(tr.kb) == len(built) and not (tmp_path / "a" / "kb").exists()
    tr.train()
    assert json.loads((tmp_path / "a" / "final" / "ragtrain.json").read_text())["kb_dir"] == str(tmp_path / "built")
    plain = datasets.Dataset.from_dict({"title": built["title"], "text": built["text"]})
    plain.save_to_disk(str(tmp_path / "plain"))
    # its rows have no ids, so the sample's gold_doc names resolve to nothing: allowed explicitly
    tr = T.Trainer(load_config(None, tiny_overrides(tmp_path / "b", **{"data.kb": str(tmp_path / "plain"),
                                                                        "data.max_unknown_gold_fraction": 1})))
    assert tr.kb["text"] == built["text"]
    with pytest.raises(ConfigError, match=r"data.kb\[0\]"):
        load_config(None, tiny_overrides(tmp_path / "c", **{"data.kb": f"{tmp_path / 'built'},{SAMPLE / 'kb.jsonl'}"}))


def test_passage_stride_is_part_of_the_kb_cache_key(tmp_path):
    kb = [str(SAMPLE / "kb.jsonl")]
    assert T._fingerprint(kb, 60) == T._fingerprint(kb, 60, 0) == T._fingerprint(kb, 60, 60)
    assert T._fingerprint(kb, 60, 30) != T._fingerprint(kb, 60)

    def prepare(stride):  # the trainer's KB step alone
        tr = T.Trainer.__new__(T.Trainer)
        tr.cfg = load_config(None, tiny_overrides(tmp_path / "run", **{"data.passage_stride": stride}))
        tr.out, tr.is_main = tmp_path / "run", True
        return tr._prepare_kb()

    plain, overlapping = len(prepare(0)), len(prepare(30))
    assert overlapping > plain and len(prepare(0)) == plain  # rebuilt each time the stride changes
