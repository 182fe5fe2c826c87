"""`ragtrain plot`: a run's curves as a PNG, index refreshes marked; drawn by the trainer, never failing it."""

import json
import logging

import pytest

from ragtrain.data.errors import DataError
from ragtrain.plot import plot_run, refresh_steps


def _write(run, train_log, metrics):
    run.mkdir(parents=True, exist_ok=True)
    (run / "train_log.jsonl").write_text("".join(json.dumps(r) + "\n" for r in train_log))
    (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in metrics))


LOG = [{"step": s, "loss": 10.0 / s, "index_version": 1 + (s > 2) + (s > 4)} for s in range(1, 7)]
METRICS = [{"step": 2, "split": "validation", "loss": 5, "index_version": 2, "last_refresh_step": 2, "recall@1": 10.0,
            "recall@5": 30.0, "mrr": 15.0},
           {"step": 6, "split": "test", "loss": 2, "index_version": 4, "last_refresh_step": 6, "recall@1": 20.0,
            "recall@5": 40.0, "mrr": 25.0, "em": 5.0, "f1": 9.0}]


def test_refresh_steps_from_the_train_log_and_the_metrics_rows():
    # versions rise after steps 2 and 4 (train_log); the refresh at the last step shows only in metrics rows
    assert refresh_steps(LOG, METRICS) == [2, 4, 6]
    assert refresh_steps(LOG, []) == [2, 4]
    assert refresh_steps([{"step": 1, "index_version": 1}], [{"step": 1, "last_refresh_step": 0}]) == []


def test_plot_run_writes_a_png_and_marks_the_refreshes(tmp_path, monkeypatch):
    import matplotlib.axes

    run = tmp_path / "run"
    _write(run, LOG, METRICS)
    lines = []
    real = matplotlib.axes.Axes.axvline
    monkeypatch.setattr(matplotlib.axes.Axes, "axvline", lambda self, x, *a, **k: lines.append(x) or
                        real(self, x, *a, **k))
    out = plot_run(run)
    assert out == run / "curves.png"
    data = out.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 10_000
    assert sorted(lines) == [2, 2, 2, 4, 4, 4, 6, 6, 6]  # every refresh, in each of the three panels
    assert not list(run.glob(".curves*"))  # written through a temporary name


def test_plot_cli(tmp_path, capsys):
    from ragtrain.cli import main

    run = tmp_path / "run"
    _write(run, LOG, [])
    assert main(["plot", str(run), "--out", str(tmp_path / "c.png")]) == 0
    assert json.loads(capsys.readouterr().out)["out"] == str(tmp_path / "c.png")
    assert (tmp_path / "c.png").is_file()
    (tmp_path / "empty").mkdir()
    assert main(["plot", str(tmp_path / "empty")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "no train_log.jsonl or metrics.jsonl" in err[0]
    with pytest.raises(DataError, match="line 2"):
        (run / "metrics.jsonl").write_text('{"step": 1}\n{torn\n')
        plot_run(run)


def test_a_plot_failure_is_a_warning_not_the_runs(tmp_path, monkeypatch, caplog):
    import ragtrain.plot
    from ragtrain.train.trainer import Trainer

    def broken(run_dir):
        raise RuntimeError("no backend")

    monkeypatch.setattr(ragtrain.plot, "plot_run", broken)
    tr = Trainer.__new__(Trainer)  # the plotting step alone
    tr.out = tmp_path
    caplog.set_level(logging.WARNING)
    assert tr.plot() is None
    assert "could not draw" in caplog.text and "no backend" in caplog.text
