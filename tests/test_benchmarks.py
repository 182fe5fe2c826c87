"""The benchmark entry points at toy size (tiny random models, the shipped sample), so the scripts cannot rot.

Checks the files and fields they write, never the figures: nothing here is timed. Needs neither ../shared nor
the PyPI weight packages.
"""

import json
import os
import sys
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

import pytest  # noqa: E402

pytest.importorskip("faiss")
pytest.importorskip("datasets")
pytest.importorskip("matplotlib")

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
SAMPLE = ROOT / "src" / "ragtrain" / "sample"

from benchmarks import quality, speed  # noqa: E402

QUALITY_KEYS = ("em", "f1", "recall@1", "recall@5", "recall@20", "mrr", "train_seconds", "refresh_seconds", "steps")


def _sample_as_squad(path: Path, titles: bool = True) -> Path:
    """The shipped sample rewritten as a SQuAD-format file (one paragraph per document; like COVID-QA without
    article titles when ``titles`` is false)."""
    docs = [json.loads(line) for line in (SAMPLE / "kb.jsonl").read_text().splitlines() if line.strip()]
    qas = [json.loads(line) for line in (SAMPLE / "qa.jsonl").read_text().splitlines() if line.strip()]
    data = []
    for d in docs:
        items = []
        for q in qas:
            if q["gold_doc"] != d["id"]:
                continue
            answers = [{"text": a, "answer_start": d["text"].lower().find(a.lower())} for a in q["answers"]]
            items.append({"id": q["id"], "question": q["question"], "answers": answers})
        data.append({"title": d["title"], "paragraphs": [{"context": d["text"], "qas": items}]} if titles
                    else {"paragraphs": [{"context": d["text"], "qas": items}]})
    path.write_text(json.dumps({"version": "1.1", "data": data}))
    return path


def test_quality_toy_on_a_title_less_squad_file(tmp_path):
    squad = _sample_as_squad(tmp_path / "sample-squad.json", titles=False)
    out = tmp_path / "q"
    res = quality.main(["--scale", "toy", "--dataset", str(squad), "--max-articles", "24", "--out", str(out),
                        "--work-dir", str(tmp_path / "work"), "--arms", ",".join(quality.ARMS),
                        "--set", "eval.max_generate=4"])
    assert set(res["arms"]) == set(quality.ARMS)
    for name in ("results.json", "results.md", "curves.png"):
        assert (out / name).is_file() and (out / name).stat().st_size > 0, name
    saved = json.loads((out / "results.json").read_text())
    assert saved["scale"] == "toy" and saved["dataset"] == "sample-squad"
    assert saved["data_file"].endswith("first24articles.json")
    assert {"cpu_model", "logical_cores", "torch"} <= set(saved["machine"])
    for arm, r in saved["arms"].items():
        assert "error" not in r, (arm, r)
        for key in QUALITY_KEYS:
            assert key in r, (arm, key)
        assert r["split"] == "test" and r["n"] > 0
        rows = [json.loads(x) for x in (out / f"{arm}.metrics.jsonl").read_text().splitlines()]
        assert rows and rows[-1]["split"] == "test" and "step" in rows[-1]
        assert (out / f"{arm}.config.yaml").is_file()
    assert saved["arms"]["zero-shot"]["steps"] == 0 and saved["arms"]["zero-shot"]["train_seconds"] == 0
    assert saved["arms"]["rag-end2end"]["index_version"] >= 2  # refreshed during training
    assert saved["arms"]["rag-original"]["index_version"] == 1
    md = (out / "results.md").read_text()
    assert "| arm | EM | F1 |" in md and "rag-end2end" in md and "Command: `python" in md
    assert not (tmp_path / "work" / "rag-original" / "final").exists()  # exports removed by default
    # the joint arm: end2end + the weighted retrieval loss; EM/F1 on the first 4 questions, recall on all
    assert "retrieval_loss_weight: 1.0" in (out / "rag-end2end-joint.config.yaml").read_text()
    assert all(r["n_generated"] == min(4, r["n"]) for r in saved["arms"].values())
    # paired bootstrap of every comparison, from the per-question scores each arm wrote
    per_q = json.loads((out / "rag-end2end.per_question.json").read_text())
    assert len(per_q["recall@5"]) == saved["arms"]["rag-end2end"]["n"] and len(per_q["em"]) == 4
    comps = {(c["a"], c["b"], c["metric"]): c for c in saved["comparisons"]}
    for a, b in quality.COMPARISONS:
        for metric in ("recall@5", "em", "f1"):
            c = comps[(a, b, metric)]
            assert c["low"] <= c["diff"] <= c["high"] and c["resamples"] >= 1000
            assert c["diff"] == pytest.approx(c["mean_a"] - c["mean_b"])
            assert c["n"] == (4 if metric in ("em", "f1") else saved["arms"][a]["n"])
    assert "## Paired bootstrap" in md and isinstance(saved["goals"], list)


def test_quality_goal_verdicts():
    def comp(a, b, metric, diff, low):
        return {"a": a, "b": b, "metric": metric, "mean_a": 50 + diff, "mean_b": 50.0, "diff": diff, "low": low,
                "high": diff + 3, "n": 177}

    res = {"dataset": "covid", "comparisons": [
        comp("rag-end2end", "rag-original", "recall@5", 6.0, 1.0),      # +6, CI above 0: met
        comp("rag-end2end-joint", "rag-original", "recall@5", 6.0, -0.5),  # CI reaches 0: not met
        comp("rag-end2end", "rag-original", "f1", -1.0, -4.0),
        comp("rag-end2end", "bm25", "recall@5", 0.0, -3.0)]}
    status = {g["goal"]: g["status"] for g in quality.goals(res)}
    assert status["COVID-QA: rag-end2end recall@5 >= rag-original + 5 with the CI above 0"] == "met"
    assert status["COVID-QA: rag-end2end-joint recall@5 >= rag-original + 5 with the CI above 0"] == "not met"
    assert status["COVID-QA: rag-end2end F1 >= rag-original F1"] == "not met"
    assert status["stretch, COVID-QA: trained rag-end2end recall@5 >= BM25 recall@5"] == "met"
    assert status["stretch, COVID-QA: trained rag-end2end-joint recall@5 >= BM25 recall@5"] == "not measured"
    squad = quality.goals({"dataset": "squad", "comparisons": [comp("rag-end2end", "rag-original", "em", 0.5, -2)]})
    assert [g["status"] for g in squad] == ["not measured", "met"]


def test_quality_rerank_cost_goal_is_judged_without_the_end_of_run_encode():
    """KB of 1,000: the full-refresh arm refreshed 6 times (5 in the loop + the end-of-run one, 100 s each), the
    re-rank arm re-encoded 1,000 passages a-piece in the loop and once at the end."""
    def res(rerank_passages, rerank_seconds, refreshes=6):
        return {"dataset": "covid", "comparisons": [], "arms": {
            "rag-end2end": {"kb_passages": 1000, "refresh_passages": refreshes * 1000,
                            "refresh_seconds": refreshes * 100.0, "rerank_passages": 0, "rerank_seconds": 0.0},
            "rag-end2end-rerank": {"kb_passages": 1000, "refresh_passages": 1000, "refresh_seconds": 100.0,
                                   "rerank_passages": rerank_passages, "rerank_seconds": rerank_seconds}}}

    def verdict(r):
        return next(g for g in quality.goals(r) if "encoding cost" in g["goal"])

    cost = quality.rerank_cost(res(1250, 125.0))
    assert cost["ratio_passages_in_loop"] == pytest.approx(1250 / 5000)
    assert cost["ratio_seconds_in_loop"] == pytest.approx(125 / 500)
    assert cost["ratio_passages"] == pytest.approx(2250 / 6000)  # whole run: above 0.25, not the verdict
    g = verdict(res(1250, 125.0))
    assert g["status"] == "met" and "0.25x in passages" in g["figures"] and "0.38x" in g["figures"]
    assert verdict(res(1251, 125.0))["status"] == "not met"
    assert verdict(res(1250, 126.0))["status"] == "not met"  # seconds count too
    # the full-refresh arm refreshed only at the end: nothing in the loop to compare
    assert verdict(res(0, 0.0, refreshes=1))["status"] == "not measured"


def test_quality_arm_selection_and_bad_arm():
    with pytest.raises(ValueError, match="unknown arm"):
        quality.arm_keys("rag-magic", 0)
    keys, trains = quality.arm_keys("bm25", 5)
    assert keys["index.retriever"] == "bm25" and keys["rag.mode"] == "original" and trains
    keys, trains = quality.arm_keys("rag-end2end", "0-10:2")
    assert keys["index.refresh_every"] == "0-10:2" and keys["rag.mode"] == "end2end"
    assert quality.arm_keys("zero-shot", 5)[1] is False


def test_generator_lora_flag(monkeypatch):
    import dataclasses

    from ragtrain import config

    names = {f.name for f in dataclasses.fields(config.ModelConfig)}
    if "lora" in names or "generator_lora" in names:
        keys = quality.generator_lora_keys()
        assert keys in ({"model.lora": "[generator]"}, {"model.generator_lora": "true"})

    @dataclasses.dataclass
    class NoLora:
        generator: str = "tiny:llama"

    monkeypatch.setattr(config, "ModelConfig", NoLora)
    with pytest.raises(SystemExit, match="not available yet"):
        quality.generator_lora_keys()


def test_speed_toy(tmp_path):
    res = speed.main(["--scale", "toy", "--out", str(tmp_path), "--quality-results", str(tmp_path / "none.json")])
    js, md = tmp_path / "speed-toy.json", tmp_path / "speed-toy.md"
    assert js.is_file() and md.is_file()
    saved = json.loads(js.read_text())
    assert saved["kb"]["passages"] > 0 and {"cpu_model", "torch"} <= set(saved["machine"])
    step, step_no_dropout = saved["train_step"]  # the toy scale times (a) at dropout 0.1 and 0
    assert (step["size"], step["dropout"], step_no_dropout["dropout"]) == ("toy", 0.1, 0.0)
    assert "generator_buckets" not in step_no_dropout  # timed for the headline dropout rate only
    assert step_no_dropout["median_ratio_hf_over_ragtrain"] > 0
    for key in ("hf_median_step_s", "ragtrain_median_step_s", "median_ratio_hf_over_ragtrain", "hf_padding_share",
                "ragtrain_padding_share", "hf_optimizer_step_s", "ragtrain_optimizer_step_s"):
        assert isinstance(step[key], float), key
    assert 0 < step["ragtrain_live_encoded_share_of_retrieved"] <= 1
    assert step["flop_batches"] == 2 and step["hf_gflops_per_step"] > 0 and step["ragtrain_gflops_per_step"] > 0
    assert step["flop_ratio_hf_over_ragtrain"] > 0
    assert step["ragtrain_optimizer"] == "AdamW (fused)"
    buckets = step["generator_buckets"]
    assert set(buckets["median_s"]) == set(buckets["time_ratio_vs_1"]) == {"1", "2", "3"}
    assert buckets["time_ratio_vs_1"]["1"] == 1.0 and "rag.generator_buckets" in md.read_text()
    assert len(step["hf_step_s"]) == len(step["ragtrain_step_s"]) == step["timed_steps"]
    (enc,) = saved["encode_kb"]
    assert enc["passages"] == saved["kb"]["passages"] and "overhead" in enc
    assert set(saved["index"]["kinds"]) == {"flat", "ivf", "hnsw"}
    assert saved["index"]["kinds"]["flat"]["same_top1"] == 1.0
    for r in saved["index"]["kinds"].values():
        assert "search_ratio_ragtrain_over_faiss" in r and "build_ratio_ragtrain_over_faiss" in r
    assert "ratio_ragtrain_over_bare" in saved["index"]["torch"]
    assert "missing" in saved["refresh_share"]["quality_run"]
    assert "toy" in saved["refresh_share"]["estimate_from_this_run"]
    text = md.read_text()
    for heading in ("## (a)", "## (b)", "## (c)", "## (d)"):
        assert heading in text
    assert "Goal (>= 2×) with dropout 0.1" in text and "With dropout 0:" in text
    assert saved["dropout_cost"]["dropout_ns_per_element"] > 0 and "Why a dropout-0 row" in text
    assert res["wall_seconds"] >= 0


def test_count_flops_matches_the_matmul_and_attention_formulas():
    torch = pytest.importorskip("torch")
    lin = torch.nn.Linear(16, 32, bias=False)
    x = torch.randn(8, 16, requires_grad=True)
    # forward x @ W.T, backward grad_x and grad_W: three (8 x 16 x 32) products of 2 FLOPs per multiply-add
    assert speed.count_flops(lambda: lin(x).sum().backward()) == 3 * 2 * 8 * 16 * 32
    b, h, s, d = 2, 3, 10, 8
    q, k, v = (torch.randn(b, h, s, d, requires_grad=True) for _ in range(3))
    product = 2 * b * h * s * s * d
    attn = torch.nn.functional.scaled_dot_product_attention
    # CPU flash kernels, counted through the mapping speed.py adds: forward q @ k.T and p @ v; backward recomputes
    # the scores and forms grad_v, grad_p, grad_q and grad_k
    assert speed.count_flops(lambda: attn(q, k, v)) == 2 * product
    assert speed.count_flops(lambda: attn(q, k, v).sum().backward()) == (2 + 5) * product


@pytest.mark.slow
def test_zero_memory_toy(tmp_path):
    """Three 2-rank bf16 runs at toy size: the report names each arm and its byte counts (not the figures)."""
    pytest.importorskip("deepspeed")
    from benchmarks import zero_memory

    rep = zero_memory.main(["--hidden", "32", "--layers", "1", "--steps", "1", "--precisions", "bf16",
                            "--out", str(tmp_path)])
    assert [(a["precision"], a["stage"]) for a in rep["arms"]] == [("bf16", 0), ("bf16", 2), ("bf16", 3)]
    for a in rep["arms"]:
        assert a["max_per_rank_bytes"] > 0 and a["ranks"][0]["zero_stage"] == a["stage"]
    assert rep["arms"][0]["memory_ratio_vs_zero0"] == 1.0
    assert set(rep["goal_zero3_ratio_le_0.55"]) == {"bf16"}
    assert (tmp_path / "zero_memory.md").read_text().count("| bf16 |") == 3


def test_precision_toy(tmp_path):
    from benchmarks import precision

    res = precision.main(["--scale", "toy", "--steps", "3", "--out", str(tmp_path / "p"),
                          "--work-dir", str(tmp_path / "w")])
    assert set(res["arms"]) == {"fp32", "bf16"}
    for arm in res["arms"].values():
        assert len(arm["losses"]) == 3 and len(arm["step_seconds"]) == 3 and arm["median_step_seconds"] > 0
    assert res["arms"]["fp32"]["mixed_precision_applied"] == "no"
    assert res["arms"]["bf16"]["mixed_precision_applied"] == "bf16"
    c = res["comparison"]
    assert c["fp32_over_bf16_step_time"] > 0 and c["loss_diff_bf16_minus_fp32"]["n"] == 3
    assert (tmp_path / "p" / "results.md").read_text().count("within noise") == 1
    assert (tmp_path / "p" / "loss.png").stat().st_size > 0
    cfgs = {a: (tmp_path / "w" / p / "config.yaml").read_text() for a, p in (("fp32", "no"), ("bf16", "bf16"))}
    assert "mixed_precision: bf16" in cfgs["bf16"] and "mixed_precision: 'no'" in cfgs["fp32"].replace('"', "'")


def test_ivf_nlist_toy(tmp_path):
    """Two sizes, two policies over random vectors: every row reaches the recall target it tuned nprobe for, the
    work counted is the lists scanned + the flat quantizer, and the report has the ratio table."""
    import numpy as np

    from benchmarks import ivf_nlist

    raw = np.random.default_rng(0).standard_normal((6_000, 16)).astype(np.float32)
    np.save(tmp_path / "emb.npy", raw)
    assert ivf_nlist.main(["--vectors", str(tmp_path / "emb.npy"), "--sizes", "3000,6000", "--policies", "auto,n64",
                           "--queries", "64", "--reps", "2", "--out", str(tmp_path / "out")]) == 0
    res = json.loads((tmp_path / "out" / "results.json").read_text())
    assert [(r["n"], r["policy"]) for r in res["rows"]] == [(3000, "auto"), (3000, "n64"), (6000, "auto"),
                                                           (6000, "n64")]
    for r in res["rows"]:
        assert r["nlist"] == ({"n64": r["n"] // 64}.get(r["policy"]) or r["nlist"])
        assert r["work_per_query"] == pytest.approx(r["scanned_per_query"] + r["nlist"], abs=0.11)
        # nprobe lists of ~n / nlist vectors each were scanned
        assert 0.5 < r["scanned_per_query"] / (r["nprobe"] * r["n"] / r["nlist"]) < 1.5
        assert r["recall_at_10"] >= 0.9 and r["nprobe"] <= r["nlist"]  # the fewest lists reaching the target
        assert r["nprobe"] == 1 or r["recall_at_10_one_list_fewer"] < 0.9
        assert r["recall_at_10_auto"] >= 0.8  # nprobe=auto: tuned to 0.9 on KB vectors, measured on noisy queries
    md = (tmp_path / "out" / "results.md").read_text()
    assert "## 6,000 / 3,000" in md and md.count("| n64 |") == 3
    assert ivf_nlist.main(["--vectors", str(tmp_path / "emb.npy"), "--sizes", "9000"]) == 2  # more than stored
