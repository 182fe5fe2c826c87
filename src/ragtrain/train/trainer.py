"""The training loop -- the only place in ragtrain that knows about Accelerate and DeepSpeed.

One step::

    questions -> question encoder (all ranks) -> vectors gathered to rank 0 -> one FAISS search
      -> ids (+ stored vectors) broadcast back -> each rank reads its passages from the memory-mapped KB
      -> RagModel.forward (live re-encoding in end2end mode) -> loss -> backward -> optimizer step
    every refresh step: every rank encodes an equal-batch slice of the KB -> rank 0 builds + publishes the index

Run it with ``python train.py --config launch/recipes/tiny-cpu.yaml`` or any Accelerate/DeepSpeed launcher.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import shutil
import time
from datetime import timedelta
from pathlib import Path

import numpy as np
import torch
from accelerate import Accelerator
from accelerate.utils import (DataLoaderConfiguration, DeepSpeedPlugin, DistributedDataParallelKwargs,
                              InitProcessGroupKwargs, set_seed)
from torch.utils.data import DataLoader
from tqdm.auto import tqdm
from transformers import get_linear_schedule_with_warmup

from ragtrain.config import Config, ConfigError, dump_config, report_to_trackers
from ragtrain.data.collate import RagCollator
from ragtrain.data.kb import build_kb, load_kb, source_fingerprint, sweep_stale_builds
from ragtrain.data.kb_tokens import PassageTokens
from ragtrain.data.qa import load_qa
from ragtrain.eval.evaluate import predict, summarize
from ragtrain.index.async_refresh import TOKENS_DIR, AsyncEncode, write_snapshot
from ragtrain.index.faiss_index import DenseIndex, drop_pages
from ragtrain.index.refresh import EMBEDDINGS_FILE, IndexStore, RefreshSchedule
from ragtrain.index.sharded import SliceIndex, merge_topk
from ragtrain.index.shards import ShardWriter, index_and_publish, shard_path, shard_paths
from ragtrain.model.lora import is_lora, merged_copy
from ragtrain.model.loading import build_rag_model, export_models
from ragtrain.preflight import check_run, make_splits
from ragtrain.retrieval import build_retriever, retriever_settings
from ragtrain.train import checkpoint as ckpt
from ragtrain.train import distributed as D

log = logging.getLogger("ragtrain")
SHARDS_DIR = ".shards"  # under the index store: the ranks' KB-vector shards of the refresh under way


class NonFiniteError(RuntimeError):
    """Training produced a NaN/inf loss or gradient norm; raised before anything non-finite is saved, indexed or
    exported."""


def resolve_mixed_precision(mp: str) -> str:
    """``train.mixed_precision`` -> accelerate's value: ``auto`` = bf16 on GPUs that support it and on CPUs with
    AMX tiles (bf16 matrix units), else ``no`` (fp32).

    On a 2-core AMX Xeon, ``benchmarks/precision.py`` (the same RAG-end2end run with real weights in fp32 and in
    bf16, results in benchmarks/results/precision-cpu) measured 1.39x faster training steps and a 3.45x faster KB
    encode under bf16 autocast, with a per-step loss 0.4% above fp32's (within the 2% tolerance).  CPUs without
    AMX emulate bf16 and stay fp32."""
    if mp != "auto":
        return mp
    if torch.cuda.is_available():
        return "bf16" if torch.cuda.is_bf16_supported() else "no"
    try:
        amx = bool(torch.cpu._is_amx_tile_supported())
    except Exception:  # noqa: BLE001 - a private torch probe, absent on some builds: assume no AMX
        amx = False
    return "bf16" if amx else "no"


def deepspeed_config_from_launcher(cfg: Config) -> dict:
    """The DeepSpeed config that ``accelerate launch --use_deepspeed`` flags ask for when no JSON file is given.

    accelerate passes ``--zero_stage``, ``--offload_optimizer_device``, ``--offload_param_device``,
    ``--zero3_save_16bit_model``, ``--gradient_accumulation_steps`` and ``--gradient_clipping`` as
    ``ACCELERATE_*`` environment variables. The stage and offload choices are honoured (with the same explicit
    bucket sizes as ``ds_configs/zero*.json``: the three-model wrapper has no ``hidden_size`` for "auto"); the
    recipe stays the single source of accumulation and clipping, so a launcher value that contradicts it stops
    the run with a message naming both, instead of one silently winning."""
    env = os.environ
    tc = cfg.train
    for var, key, ours in (("ACCELERATE_GRADIENT_ACCUMULATION_STEPS", "train.gradient_accumulation_steps",
                            tc.gradient_accumulation_steps),
                           ("ACCELERATE_GRADIENT_CLIPPING", "train.max_grad_norm", tc.max_grad_norm)):
        raw = env.get(var, "").strip()
        if raw and raw.lower() not in ("auto", "none"):
            try:
                value = float(raw)
            except ValueError:
                raise ConfigError(f"{var}={raw!r} (from accelerate launch): not a number") from None
            if value != float(ours):
                raise ConfigError(f"{key}: the recipe says {ours} but accelerate launch passed {raw} ({var}); "
                                  f"set {key}={raw} in the recipe or drop the launcher flag")
    raw_stage = env.get("ACCELERATE_DEEPSPEED_ZERO_STAGE", "2").strip() or "2"
    if raw_stage not in ("0", "1", "2", "3"):
        raise ConfigError(f"ACCELERATE_DEEPSPEED_ZERO_STAGE={raw_stage!r} (accelerate launch --zero_stage): "
                          "expected 0, 1, 2 or 3")
    stage = int(raw_stage)
    zero: dict = {"stage": stage, "overlap_comm": True, "contiguous_gradients": True,
                  "reduce_bucket_size": 50_000_000}
    if stage in (1, 2):
        zero.update({"allgather_partitions": True, "allgather_bucket_size": 50_000_000, "reduce_scatter": True})
    if stage == 3:
        zero.update({"stage3_prefetch_bucket_size": 45_000_000, "stage3_param_persistence_threshold": 100_000,
                     "stage3_max_live_parameters": 1_000_000_000, "stage3_max_reuse_distance": 1_000_000_000,
                     "sub_group_size": 1_000_000_000,
                     "stage3_gather_16bit_weights_on_model_save":
                         env.get("ACCELERATE_DEEPSPEED_ZERO3_SAVE_16BIT_MODEL", "true").lower() == "true"})
    for what, var in (("optimizer", "ACCELERATE_DEEPSPEED_OFFLOAD_OPTIMIZER_DEVICE"),
                      ("param", "ACCELERATE_DEEPSPEED_OFFLOAD_PARAM_DEVICE")):
        device = env.get(var, "none").strip().lower() or "none"
        if device not in ("none", "cpu", "nvme"):
            raise ConfigError(f"{var}={device!r} (accelerate launch --offload_{what}_device): expected none, cpu or nvme")
        if device != "none":
            if what == "param" and stage != 3:
                raise ConfigError(f"accelerate launch --offload_param_device {device} needs --zero_stage 3 "
                                  f"(got {stage})")
            entry = {"device": device, "pin_memory": True}
            nvme = env.get(f"ACCELERATE_DEEPSPEED_OFFLOAD_{what.upper()}_NVME_PATH", "none")
            if device == "nvme":
                entry["nvme_path"] = nvme
            zero[f"offload_{what}"] = entry
    return {"train_batch_size": "auto", "train_micro_batch_size_per_gpu": "auto",
            "gradient_accumulation_steps": "auto", "gradient_clipping": "auto",
            "bf16": {"enabled": "auto"}, "fp16": {"enabled": "auto"},
            "zero_optimization": zero, "steps_per_print": 100, "wall_clock_breakdown": False}


def make_accelerator(cfg: Config) -> Accelerator:
    """Accelerator for this host: bf16 where supported, gloo process groups on hosts without CUDA (the only
    way DeepSpeed runs on CPU ranks), DeepSpeed when a ds config is given or the launcher asks for it."""
    tc = cfg.train
    mp = resolve_mixed_precision(tc.mixed_precision)
    timeout = timedelta(seconds=tc.process_group_timeout_s)
    handlers = [DistributedDataParallelKwargs(find_unused_parameters=True)]
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:  # launched with several processes
        handlers.append(InitProcessGroupKwargs(backend="nccl" if torch.cuda.is_available() else "gloo",
                                               timeout=timeout))
    kwargs = {}
    ds_config = tc.deepspeed_config
    if not ds_config and os.environ.get("ACCELERATE_USE_DEEPSPEED", "").lower() == "true":
        # `accelerate launch --config_file launch/accelerate/zero*.yaml`: build the plugin ourselves so the
        # recipe's accumulation and clipping fill the JSON's "auto" values (accelerate would use 1.0);
        # `accelerate launch --use_deepspeed --zero_stage N ...` (no JSON): a config from its flags
        ds_file = os.environ.get("ACCELERATE_DEEPSPEED_CONFIG_FILE", "").strip()
        ds_config = ds_file if ds_file.lower() not in ("", "none") else deepspeed_config_from_launcher(cfg)
    if ds_config:
        kwargs["deepspeed_plugin"] = DeepSpeedPlugin(hf_ds_config=ds_config,
                                                     gradient_accumulation_steps=tc.gradient_accumulation_steps,
                                                     gradient_clipping=tc.max_grad_norm)
    if not ds_config and not torch.cuda.is_available():
        # without cpu=True, accelerate calls torchrun's CPU ranks DistributedType.NO: each rank would train its
        # own replica with no gradient all-reduce
        kwargs["cpu"] = True
    return Accelerator(gradient_accumulation_steps=tc.gradient_accumulation_steps, mixed_precision=mp,
                       log_with=report_to_trackers(tc.report_to) or None, project_dir=cfg.output_dir,
                       kwargs_handlers=handlers,
                       # the LR schedule counts optimizer steps, whatever the number of processes (accelerate
                       # would otherwise advance it num_processes times per step)
                       step_scheduler_with_optimizer=False,
                       dataloader_config=DataLoaderConfiguration(use_seedable_sampler=True, data_seed=cfg.seed),
                       **kwargs)


_fingerprint = source_fingerprint


class _Examples(torch.utils.data.Dataset):
    def __init__(self, examples: list[dict]):
        self.examples = examples

    def __len__(self):
        return len(self.examples)

    def __getitem__(self, i):
        return self.examples[i]


class Trainer:
    def __init__(self, cfg: Config):
        self.cfg = cfg
        self.out = Path(cfg.output_dir)
        # every config, data, model-folder, DeepSpeed-JSON and output_dir problem, before anything is written
        check_run(cfg)
        previous = previous_run(self.out) if not cfg.resume else []  # overwrite=true (else check_run refused)
        self.accelerator = make_accelerator(cfg)
        acc = self.accelerator
        self.is_main = acc.is_main_process
        logging.basicConfig(level=logging.INFO if self.is_main else logging.WARNING,
                            format="%(asctime)s %(levelname)s %(name)s: %(message)s")
        if self.is_main:
            self.out.mkdir(parents=True, exist_ok=True)
            if previous:
                clear_previous_run(self.out)
                log.info("overwrite=true: removed the previous run's %s from %s", ", ".join(previous), self.out)
            for p in ckpt.sweep_stale(self.out):
                log.info("removed %s left by an interrupted run", p)
            dump_config(cfg, self.out / "config.yaml")
        set_seed(cfg.seed)
        self.kb = self._prepare_kb()
        if cfg.rag.n_docs > len(self.kb):
            raise ConfigError(f"rag.n_docs: {cfg.rag.n_docs} is larger than the knowledge base "
                              f"({len(self.kb)} passages)")
        self.splits = self._load_qa()
        corpus = self._tokenizer_corpus()
        self.rag, self.tokenizers = build_rag_model(cfg.model, cfg.rag, corpus, seed=cfg.seed)
        m = cfg.model
        self.collator = RagCollator(self.tokenizers.question, self.tokenizers.context, self.tokenizers.generator,
                                    is_seq2seq=self.rag.generator.is_seq2seq, max_query_length=m.max_query_length,
                                    max_passage_length=m.max_passage_length, max_prompt_length=m.max_prompt_length,
                                    max_answer_length=m.max_answer_length,
                                    chat_template=self._use_chat_template(), stop_strings=cfg.eval.stop_strings)
        dim = self.rag.context_encoder.dim
        if cfg.index.kind == "ivfpq" and dim % cfg.index.pq_m:
            raise ConfigError(f"index.pq_m: the context encoder's dim ({dim}) is not divisible by {cfg.index.pq_m}")
        self.optimizer = self._optimizer()
        self.scheduler = get_linear_schedule_with_warmup(self.optimizer, cfg.train.warmup_steps, cfg.train.max_steps)
        loader = DataLoader(_Examples(self.splits["train"]), batch_size=cfg.train.batch_size, shuffle=True,
                            collate_fn=self._collate, num_workers=cfg.train.num_workers, drop_last=False)
        self.model, self.optimizer, self.train_loader, self.scheduler = acc.prepare(
            self.rag, self.optimizer, loader, self.scheduler)
        self.is_zero3 = bool(acc.state.deepspeed_plugin and acc.state.deepspeed_plugin.zero_stage == 3)
        self._encode_calls = {"real": 0, "dummy": 0}
        self._window = {"loss": 0.0, "n": 0, "nll": 0.0, "tokens": 0.0}  # training loss since the last log row
        self._window_t0 = 0.0
        self._write_rank_info()
        self.store = IndexStore(self.out / "index", keep=cfg.index.keep_versions)
        self.store.pinned = ckpt.referenced_index_versions(self.out / "checkpoints")  # resumable versions stay
        self.schedule = RefreshSchedule.parse(cfg.index.refresh_every)
        self.retriever = None  # rank 0 only
        self.embeddings = None  # rank 0 only, (N, d) stored passage vectors (a memory map of the live version's)
        self.index_version = 0
        self.last_refresh_step = 0
        self.refresh_seconds = 0.0
        self.refresh_passages = 0  # passages encoded by refreshes (the initial build included)
        self.rerank_seconds = 0.0  # rag.rerank_top: this rank's live re-encoding of the top-L in training steps
        self.rerank_passages = 0
        self.rerank_eval_passages = 0  # ... and in evaluations (the evaluation loss retrieves like a step)
        self.async_wait_seconds = 0.0  # async refresh: time training waited for the encode at swap steps
        self.async_timings: list[dict] = []  # rank 0: per async refresh, the child's start-up/encode and the wait
        self._pending = None  # async refresh in flight: {"start_step", "swap_step", "snapshot"}
        self._job = None  # rank 0: its AsyncEncode (the worker processes)
        self.step = 0
        self.epoch = 0
        self.batch_in_epoch = 0
        self._loss_sum = 0.0
        self._loss_n = 0
        self._step_losses: list[float] = []
        self._metrics_path = self.out / "metrics.jsonl"
        if self.is_main and acc.log_with:
            acc.init_trackers("tensorboard", config=_flat_hparams(cfg))
        resumed = cfg.resume and self._resume()
        if not resumed:
            self.refresh_index()

    # ------------------------------------------------------------------------------------ set-up
    def _prepare_kb(self):
        cfg = self.cfg.data
        kb_dir = Path(cfg.kb_dir) if cfg.kb_dir else self.out / "kb"
        if len(cfg.kb) == 1 and Path(cfg.kb[0]).is_dir():  # a built KB (ragtrain kb / save_to_disk): used as is
            self.kb_dir = Path(cfg.kb[0])
            return load_kb(self.kb_dir)
        self.kb_dir = kb_dir
        if self.is_main:  # what a killed build of this KB (ragtrain kb, or a run) left beside it
            for p in sweep_stale_builds(kb_dir):
                log.info("removed %s left by an interrupted KB build", p)
        if cfg.kb:
            fp = _fingerprint(cfg.kb, cfg.passage_words, cfg.passage_stride)
            stamp = kb_dir / "ragtrain_sources.json"
            if self.is_main:
                current = json.loads(stamp.read_text()).get("fingerprint") if stamp.is_file() else None
                if current != fp:
                    log.info("building knowledge base from %s into %s", ", ".join(cfg.kb), kb_dir)
                    build_kb(cfg.kb, kb_dir, passage_words=cfg.passage_words, skip_bad_rows=cfg.skip_bad_rows,
                             passage_stride=cfg.passage_stride, max_passage_chars=cfg.max_passage_chars,
                             duplicate_ids=cfg.duplicate_ids)
                    ckpt.write_text_atomic(stamp, json.dumps({"fingerprint": fp, "sources": cfg.kb}))
            D.barrier()
        return load_kb(kb_dir)

    def _load_qa(self) -> dict[str, list[dict]]:
        d = self.cfg.data
        splits = make_splits(self.cfg, lambda path: load_qa(
            path, kb=self.kb, passage_words=d.passage_words, skip_bad_rows=d.skip_bad_rows,
            max_unknown_gold_fraction=d.max_unknown_gold_fraction))
        if not splits["validation"] and not splits["test"]:
            # no split configured at all (e.g. a speed run): train without evaluation, and say so
            log.warning("no data.validation, data.test or data.split_by_article: the run is not evaluated")
        if d.max_eval_examples:
            for key in ("validation", "test"):
                splits[key] = splits[key][: d.max_eval_examples]
        log.info("QA examples: %s", {k: len(v) for k, v in splits.items()})
        if D.rank() == 0:  # the evaluated questions, as JSONL that `ragtrain eval --data` reads back
            for key in ("validation", "test"):
                if splits[key]:
                    (self.out / "splits").mkdir(parents=True, exist_ok=True)
                    ckpt.write_text_atomic(self.out / "splits" / f"{key}.jsonl", "".join(
                        json.dumps({k: ex.get(k) for k in ("id", "question", "answers", "article",
                                                           "gold_passage_id")}) + "\n" for ex in splits[key]))
        return splits

    def _tokenizer_corpus(self) -> list[str]:
        n = min(len(self.kb), 50_000)
        rows = self.kb.select(range(n))
        texts = [f"{t} {x}" for t, x in zip(rows["title"], rows["text"])]
        for ex in self.splits["train"]:
            texts.append(ex["question"] + " " + " ".join(ex["answers"]))
        return texts

    def _optimizer(self) -> torch.optim.Optimizer:
        tc = self.cfg.train
        groups = []
        for name, lr in (("generator", tc.generator_lr), ("question_encoder", tc.question_encoder_lr),
                         ("context_encoder", tc.context_encoder_lr)):
            params = [p for p in getattr(self.rag, name).parameters() if p.requires_grad]
            if params and self.rag.is_trained(name):
                groups.append({"params": params, "lr": lr, "weight_decay": tc.weight_decay, "name": name})
        try:  # the fused kernel (CPU and GPU): one pass over each tensor, ~4x faster than the per-tensor loop
            return torch.optim.AdamW(groups, fused=True)
        except (RuntimeError, ValueError, TypeError) as e:  # a device or dtype the fused kernel lacks
            log.info("fused AdamW unavailable (%s); using the default implementation", e)
            return torch.optim.AdamW(groups)

    def _use_chat_template(self) -> bool:
        setting = self.cfg.model.chat_template
        has = bool(getattr(self.tokenizers.generator, "chat_template", None)) and not self.rag.generator.is_seq2seq
        if setting == "yes" and not has:
            raise ConfigError("model.chat_template=yes: the generator's tokenizer has no chat template (or the "
                              "generator is seq2seq); use auto or no")
        return has if setting == "auto" else setting == "yes"

    def _collate(self, examples: list[dict]) -> dict:
        batch = self.collator.questions([e["question"] for e in examples])
        batch["questions"] = [e["question"] for e in examples]
        batch["answers"] = [e["answers"][0] for e in examples]
        batch["gold_ids"] = torch.tensor([int(e.get("gold_passage_id", -1)) for e in examples], dtype=torch.long)
        return batch

    @property
    def unwrapped(self):
        return self.accelerator.unwrap_model(self.model)

    def _optimizer_state_tensors(self) -> list[torch.Tensor]:
        """Optimizer state this rank holds: Adam moments plus ZeRO's / bf16's fp32 master partitions."""
        opt = getattr(self.optimizer, "optimizer", self.optimizer)  # AcceleratedOptimizer -> engine optimizer
        inner = getattr(opt, "optimizer", opt)  # DeepSpeed ZeRO optimizer -> torch AdamW
        out = [t for st in inner.state.values() for t in st.values() if torch.is_tensor(t) and t.dim() > 0]
        for attr in ("single_partition_of_fp32_groups", "fp32_partitioned_groups_flat", "fp32_groups_flat_partition",
                     "fp32_groups_flat", "fp32_groups"):
            for item in getattr(opt, attr, []) or []:  # flat tensors, or per-group lists (FP16_UnfusedOptimizer)
                out += [t for t in (item if isinstance(item, (list, tuple)) else [item]) if torch.is_tensor(t)]
        return list({(t.data_ptr(), t.numel()): t for t in out}.values())  # a tensor listed twice counts once

    def _write_rank_info(self) -> None:
        """``OUTPUT_DIR/ranks/rank_N.json``: what this rank holds (ZeRO-3 partitions: ``ds_tensor``)."""
        local = total = local_bytes = 0
        for p in self.model.parameters():
            total += int(getattr(p, "ds_numel", p.numel()))
            held = p.ds_tensor if hasattr(p, "ds_tensor") else p
            local += int(held.numel())
            local_bytes += int(held.numel()) * held.element_size()
        opt_state = self._optimizer_state_tensors()
        plugin = self.accelerator.state.deepspeed_plugin
        info = {"rank": D.rank(), "world_size": D.world(), "distributed_type": str(self.accelerator.distributed_type),
                "zero_stage": plugin.zero_stage if plugin else 0, "local_param_numel": local,
                "total_param_numel": total, "step": self.step if hasattr(self, "step") else 0,
                "optimizer_state_numel": sum(int(t.numel()) for t in opt_state),
                "local_param_bytes": local_bytes,
                "optimizer_class": type(getattr(self.optimizer, "optimizer", self.optimizer)).__name__,
                "optimizer_state_bytes": sum(int(t.numel()) * t.element_size() for t in opt_state),
                # KB-encode calls so far (every refresh); "dummy": ZeRO-3 lock-step calls of a rank whose slice ran out
                "encode_batches": dict(self._encode_calls)}
        sl = getattr(self, "_slice_index", None)
        if sl is not None:  # index.placement=ranks: the KB rows this rank's index holds
            info["index_slice"] = [sl.start, sl.stop]
        d = self.out / "ranks"
        d.mkdir(parents=True, exist_ok=True)
        ckpt.write_text_atomic(d / f"rank_{D.rank()}.json", json.dumps(info))

    # ------------------------------------------------------------------------------- retrieval
    def search(self, q: torch.Tensor, questions: list[str], k: int, gold_ids: torch.Tensor | None = None,
               with_embeddings: bool = False) -> dict:
        """Route this rank's queries to rank 0's retriever; returns ``scores``/``ids`` (and stored
        ``doc_embeddings``/``gold_embeddings``) for this rank's rows."""
        if self.cfg.index.placement == "ranks":
            return self._search_slices(q, k, gold_ids, with_embeddings)
        needs_text = self.cfg.index.retriever != "dense"
        all_questions = [x for part in D.gather_objects(list(questions)) for x in part] if needs_text else []
        inputs = {"q": q.detach().float()}
        if gold_ids is not None:
            inputs["gold"] = gold_ids.to(q.device)

        def on_rank0(g: dict) -> dict:
            scores, ids = self.retriever.search(g["q"].numpy(), all_questions, k)
            # FAISS pads with id -1 when fewer than k vectors are probed (IVF/HNSW): kept as -1, so callers mask
            # those slots (p(z|x) = 0, never a hit, never a negative) instead of reading them as passage 0
            ids = np.asarray(ids, dtype=np.int64)
            scores = np.where(ids < 0, -np.inf, scores)
            out = {"scores": torch.from_numpy(np.ascontiguousarray(scores, dtype=np.float32)),
                   "ids": torch.from_numpy(np.ascontiguousarray(ids, dtype=np.int64))}
            if with_embeddings:
                out["doc_embeddings"] = torch.from_numpy(self._rows(ids))
                if "gold" in g:
                    out["gold_embeddings"] = torch.from_numpy(self._rows(g["gold"].clamp(min=0).numpy()))
            return out

        return D.rank0_compute(on_rank0, inputs)

    def _search_slices(self, q: torch.Tensor, k: int, gold_ids: torch.Tensor | None, with_embeddings: bool) -> dict:
        """``index.placement=ranks``: every rank searches its slice for the whole global batch, the per-slice
        top-k lists are exchanged and each rank merges those of its own rows (exact with kind=flat)."""
        all_q, sizes = D.gather_rows(q.detach().float())
        scores, ids = self._slice_index.search(all_q.cpu().numpy(), k)
        parts_s, _ = D.gather_rows(torch.from_numpy(scores).to(q.device))
        parts_i, _ = D.gather_rows(torch.from_numpy(ids).to(q.device))
        n = all_q.shape[0]
        start = sum(sizes[: D.rank()])
        mine = slice(start, start + sizes[D.rank()])
        scores, ids = merge_topk(parts_s.cpu().numpy().reshape(D.world(), n, k)[:, mine],
                                 parts_i.cpu().numpy().reshape(D.world(), n, k)[:, mine], k)
        out = {"scores": torch.from_numpy(scores), "ids": torch.from_numpy(ids)}
        if with_embeddings:  # every rank reads the stored vectors of its hits from the shared memory map
            out["doc_embeddings"] = torch.from_numpy(self._rows(ids))
            if gold_ids is not None:
                out["gold_embeddings"] = torch.from_numpy(self._rows(gold_ids.cpu().clamp(min=0).numpy()))
        return out

    def _rows(self, ids: np.ndarray) -> np.ndarray:
        flat = ids.reshape(-1).clip(min=0)  # padding slots (-1) read row 0; they are masked downstream
        return np.asarray(self.embeddings[flat], dtype=np.float32).reshape(*ids.shape, -1)

    def _passages(self, ids: torch.Tensor) -> list[list[tuple[str, str]]]:
        b, k = ids.shape
        rows = self.kb[ids.reshape(-1).clamp(min=0).tolist()]  # padding slots (-1): any text, masked in the loss  # column-wise take: several times faster than .select
        titles, texts = rows["title"], rows["text"]
        return [[(titles[i * k + j], texts[i * k + j]) for j in range(k)] for i in range(b)]

    def _passage_inputs(self, kb_ids: list[int]) -> dict:
        """Context-encoder batch of KB rows ``kb_ids``: token ids from this rank's KB token cache (filled by the
        first refresh) where it holds them, the other rows tokenized now."""
        cache = getattr(self, "_kb_tokens_cache", None)
        rows = [cache.get(i) if cache is not None else None for i in kb_ids]
        miss = [j for j, r in enumerate(rows) if r is None]
        if miss:
            kb_rows = self.kb[[kb_ids[j] for j in miss]]
            for j, r in zip(miss, self.collator.passage_ids(kb_rows["title"], kb_rows["text"])):
                rows[j] = r
        return self.collator.pad_passage_ids(rows)

    @torch.no_grad()
    def _rerank(self, q: torch.Tensor, ids: torch.Tensor, k: int) -> torch.Tensor:
        """The ``k`` of each row's retrieved ``ids`` that the *live* context encoder scores highest against ``q``
        (``rag.rerank_top``; Atlas's re-ranking of a stale top-L). Each distinct passage is encoded once, in eval
        mode (no dropout draw), and the encoder is called once a step on every rank (ZeRO-3 lock-step)."""
        t0 = time.time()
        in_training_step = self.unwrapped.training
        enc = self.unwrapped.context_encoder
        was_training = enc.training
        enc.eval()
        uniq, inverse = torch.unique(ids.reshape(-1).clamp(min=0), return_inverse=True)
        batch = self._passage_inputs(uniq.tolist())
        device = self.accelerator.device
        with self.accelerator.autocast():
            c = enc(batch["input_ids"].to(device), batch["attention_mask"].to(device)).float()
        enc.train(was_training)
        scores = torch.einsum("bd,bld->bl", q.detach().float().to(device), c[inverse.to(device)].view(*ids.shape, -1))
        scores = scores.masked_fill(ids.to(device) < 0, float("-inf"))  # retriever padding never wins
        order = scores.topk(k, dim=1).indices.cpu()
        if in_training_step:
            self.rerank_passages += len(uniq)
            self.rerank_seconds += time.time() - t0
        else:
            self.rerank_eval_passages += len(uniq)
        return torch.gather(ids, 1, order)

    def _make_retrieve(self, batch: dict):
        device = self.accelerator.device

        def retrieve(q: torch.Tensor, live_context: bool, with_gold: bool) -> dict:
            gold = batch["gold_ids"] if with_gold else None
            k, top = self.cfg.rag.n_docs, self.cfg.rag.rerank_top
            rerank = bool(top) and live_context and top > k
            res = self.search(q, batch["questions"], top if rerank else k, gold, with_embeddings=not live_context)
            if rerank:
                res["ids"] = self._rerank(q, res["ids"], k)
            passages = self._passages(res["ids"])
            out = self.collator.generator_inputs(batch["questions"], passages, batch["answers"])
            out["doc_ids"] = res["ids"]
            out["doc_mask"] = res["ids"] >= 0  # False on FAISS padding slots
            if live_context:
                # a passage retrieved for several questions of the batch is encoded once (ctx_index maps back)
                flat = res["ids"].reshape(-1).clamp(min=0)
                uniq, out["ctx_index"] = torch.unique(flat, return_inverse=True)
                ctx = self._passage_inputs(uniq.tolist())
                out["ctx_input_ids"], out["ctx_attention_mask"] = ctx["input_ids"], ctx["attention_mask"]
            else:
                out["doc_embeddings"] = res["doc_embeddings"]
            if with_gold:
                out["gold_ids"] = batch["gold_ids"].cpu()
                if live_context:
                    g = self._passage_inputs(batch["gold_ids"].clamp(min=0).tolist())
                    out["gold_input_ids"], out["gold_attention_mask"] = g["input_ids"], g["attention_mask"]
                else:
                    out["gold_embeddings"] = res["gold_embeddings"]
            return {k: v.to(device) if torch.is_tensor(v) else v for k, v in out.items()}

        return retrieve

    # --------------------------------------------------------------------------------- refresh
    def _kb_tokens(self) -> PassageTokens:
        """This rank's KB slice, tokenized on the first refresh and kept for the following ones."""
        bs = self.cfg.index.encode_batch_size
        my = D.equal_slices(len(self.kb), D.world(), bs)[D.rank()]
        if getattr(self, "_kb_tokens_cache", None) is None or self._kb_tokens_cache.rows != my:
            self._kb_tokens_cache = PassageTokens(self.kb, my, self.collator.passage_ids,
                                                  self.collator.pad_passage_ids, progress=self.is_main)
        return self._kb_tokens_cache

    @torch.no_grad()
    def encode_kb(self, shard_dir: Path | None = None) -> np.ndarray | list[Path] | None:
        """Every rank encodes an equal-batch-count slice of the KB (length-sorted batches of token ids cached
        across refreshes).  Without ``shard_dir``: the slices are all-gathered and rank 0 returns all (N, d)
        vectors in KB order.  With ``shard_dir``: each rank writes its slice, batch by batch, to the memory-mapped
        shard ``shard_dir/shard_<rank>.npy`` (``index.embedding_dtype``; written pages are flushed and dropped
        from RAM as it goes) and, after a barrier, rank 0 returns every rank's shard path in rank (= KB) order;
        the vectors never pass through a collective nor sit whole in any process's RAM."""
        enc = self.unwrapped.context_encoder
        was_training = enc.training
        enc.eval()
        bs = self.cfg.index.encode_batch_size
        n = len(self.kb)
        tokens = self._kb_tokens()
        dim = enc.dim
        if shard_dir is None:
            local = torch.zeros((len(tokens), dim))
        else:
            local = ShardWriter(shard_path(shard_dir, D.rank()), len(tokens), dim, self.cfg.index.embedding_dtype)
        batches = tokens.batches(bs)
        # under ZeRO-3 every rank must call the partitioned encoder the same number of times: ranks with fewer
        # batches run a one-passage dummy batch
        dummy = self._passage_inputs([0])
        device = self.accelerator.device
        for _ in tqdm(range(D.n_batches(n, D.world(), bs)), desc=f"encode KB ({n} passages)",
                      disable=not self.is_main):
            pos, ids, mask = next(batches, (None, dummy["input_ids"], dummy["attention_mask"]))
            self._encode_calls["dummy" if pos is None else "real"] += 1
            with self.accelerator.autocast():
                emb = enc(ids.to(device), mask.to(device))
            if pos is None:
                continue
            if shard_dir is None:
                local[torch.from_numpy(pos)] = emb.float().cpu()
            else:
                local.write(pos, emb.float().cpu().numpy())
        enc.train(was_training)
        if shard_dir is not None:
            local.close()  # flushed, pages released
            D.barrier()  # every shard is complete on disk
            return shard_paths(shard_dir, D.world()) if self.is_main else None
        allv, _ = D.gather_rows(local.to(device))
        return allv.cpu().numpy() if self.is_main else None

    # ---------------------------------------------------------------------------- async refresh
    def _start_async_refresh(self) -> None:
        """Snapshot the context encoder (gathered once under ZeRO-3) and start encoding the KB in a child process;
        its index is swapped in at step ``step + index.async_lag`` (:meth:`_finish_async_refresh`)."""
        if self._pending:  # the previous one is still in flight: swap it in first
            self._finish_async_refresh()
        ic = self.cfg.index
        snap = self.out / "refresh" / f"step_{self.step:08d}"
        enc = self.unwrapped.context_encoder
        gathered = contextlib.nullcontext()
        if self.is_zero3:
            import deepspeed

            gathered = deepspeed.zero.GatheredParameters(list(enc.parameters()), modifier_rank=None)
        with gathered:
            if self.is_main:
                model = merged_copy(enc.model) if is_lora(enc.model) else enc.model
                write_snapshot(snap, model, self.tokenizers.context, pooling=enc.pooling, normalize=enc.normalize,
                               max_length=self.cfg.model.max_passage_length,
                               mixed_precision=self.accelerator.mixed_precision, step=self.step)
        if self.is_main:
            self._job = self._async_encode(snap)
        self._pending = {"start_step": self.step, "swap_step": self.step + ic.async_lag, "snapshot": str(snap)}
        log.info("async refresh: encoding the KB with the context encoder of step %d in %d separate process(es) "
                 "(%s); its index is swapped in at step %d", self.step, len(ic.async_devices),
                 ", ".join(ic.async_devices), self._pending["swap_step"])
        D.barrier()

    def _async_encode(self, snapshot: Path) -> AsyncEncode:
        ic = self.cfg.index
        return AsyncEncode(snapshot, self.kb_dir, len(self.kb), ic.async_devices, threads=ic.async_threads,
                           batch_size=ic.encode_batch_size, dtype=ic.embedding_dtype,
                           tokens_root=self.out / "refresh" / TOKENS_DIR)

    def _finish_async_refresh(self) -> None:
        """Wait for the pending encode (if not done yet), build and publish its index and install it."""
        pending, t0 = self._pending, time.time()
        if self.is_main:
            if self._job is None:  # resumed: encode the slices still missing from the recorded snapshot
                self._job = self._async_encode(Path(pending["snapshot"]))
            waited = not self._job.done()
            shards = self._job.results()  # the workers' vectors, memory-mapped shards on disk
            wait_s = time.time() - t0
            self.async_timings.append({"start_step": pending["start_step"], "swap_step": self.step,
                                       "wait_s": round(wait_s, 3), **self._job.timing()})
            version = self._publish_shards(shards, step=pending["start_step"])
            log.info("async refresh: index v%d (context encoder of step %d) swapped in at step %d; training %s "
                     "%.1fs for the encode", version, pending["start_step"], self.step,
                     "waited" if waited else "did not wait; build took", wait_s)
            self._job = None
        else:
            version = None
        self.index_version = D.broadcast_object(version)
        self._install_slice()
        self.refresh_passages += len(self.kb)
        self.last_refresh_step = pending["start_step"]
        self._pending = None
        dt = time.time() - t0
        self.async_wait_seconds += dt
        self.refresh_seconds += dt
        self.accelerator.log({"index/last_refresh_step": self.last_refresh_step, "index/async_wait_s": dt},
                             step=self.step)
        self._prune_snapshots()

    def _prune_snapshots(self) -> None:
        """Delete the snapshot folders no checkpoint and no pending refresh needs."""
        if not self.is_main or not (self.out / "refresh").is_dir():
            return
        keep = ckpt.referenced_snapshots(self.out / "checkpoints")
        if self._pending:
            keep.add(Path(self._pending["snapshot"]).name)
        for p in (self.out / "refresh").iterdir():
            if p.name not in keep and p.name != TOKENS_DIR:  # the workers' token ids serve every refresh
                shutil.rmtree(p, ignore_errors=True)

    def refresh_index(self) -> None:
        """Re-encode the KB with the current context encoder and swap in a new index version.

        ``index.refresh_path=shards``: rank 0 builds the index from the ranks' memory-mapped shards (IVF kinds
        trained on a sample, vectors added shard by shard, chunk by chunk) and publishes a version whose
        ``embeddings.npy`` is streamed from the shards; the stored vectors it keeps are a memory map of that file.
        ``gather``: the former path (all vectors all-gathered into RAM)."""
        t0 = time.time()
        ic = self.cfg.index
        if ic.refresh_path == "shards" or ic.placement == "ranks":
            shard_dir = self.store.root / SHARDS_DIR
            shards = self.encode_kb(shard_dir=shard_dir)
            if self.is_main:
                version = self._publish_shards(shards, step=self.step)
                shutil.rmtree(shard_dir, ignore_errors=True)
        else:
            emb = self.encode_kb()
            if self.is_main:
                self._release_index()
                index = DenseIndex.build(emb, **self._index_kw())
                version = self.store.publish(index, emb, step=self.step, dtype=np.dtype(ic.embedding_dtype))
                self._install(index, emb.astype(ic.embedding_dtype, copy=False))
        if self.is_main:
            log.info("index v%d built at step %d (%d passages) in %.1fs", version, self.step, len(self.kb),
                     time.time() - t0)
        else:
            version = None
        self.index_version = D.broadcast_object(version)
        self._install_slice()
        self.last_refresh_step = self.step
        self.refresh_passages += len(self.kb)
        self.refresh_seconds += time.time() - t0

    def _index_kw(self) -> dict:
        ic = self.cfg.index
        tune_k = max(self.cfg.rag.n_docs, self.cfg.rag.rerank_top)
        return dict(kind=ic.kind, nlist=ic.nlist, nprobe=ic.nprobe, target_recall=ic.target_recall, tune_k=tune_k,
                    hnsw_m=ic.hnsw_m, pq_m=ic.pq_m,
                    pq_bits=ic.pq_bits, train_size=ic.train_size, use_gpu=ic.use_gpu, gpu_fp16=ic.gpu_fp16)

    def _slice_index_kw(self) -> tuple[str, dict]:
        """``(kind, parameters)`` of an index built from stored vectors on a CPU (``index.placement=ranks``)."""
        kw = self._index_kw()
        for key in ("use_gpu", "gpu_fp16"):
            kw.pop(key)
        return kw.pop("kind"), kw

    def _publish_shards(self, shards: list[Path], step: int) -> int:
        """Rank 0: publish a version from the vector ``shards``; with ``index.placement=rank0`` also build its
        index and install it here, with ``ranks`` publish the vectors only (each rank then indexes its slice:
        :meth:`_install_slice`)."""
        if self.cfg.index.placement == "ranks":
            kind, kw = self._slice_index_kw()
            return self.store.publish(None, step=step, shards=shards, index_kind=kind, index_params=kw)
        self._release_index()
        index, emb, version = index_and_publish(self.store, shards, step=step, **self._index_kw())
        self._install(index, emb)
        return version

    def _install_slice(self) -> None:
        """``index.placement=ranks``, on every rank: index this rank's contiguous KB slice of the live version's
        vectors (a memory map every rank also reads stored vectors from). Call after ``index_version`` is set."""
        if self.cfg.index.placement != "ranks":
            return
        emb = np.load(self.store.version_dir(self.index_version) / EMBEDDINGS_FILE, mmap_mode="r")
        kind, kw = self._slice_index_kw()
        rows = D.equal_slices(len(emb), D.world(), self.cfg.index.encode_batch_size)[D.rank()]
        self._slice_index = None  # the old slice's index is released before the new one is built
        self._slice_index = SliceIndex(emb, rows, kind, **kw)
        self.embeddings = emb
        drop_pages(emb)

    def _release_index(self) -> None:
        """Rank 0, right before it builds a new index: drop the old one (and its stored-vector map). Nothing
        searches while the new one is built (every rank is inside the refresh, or at the async swap), so rank 0
        never holds two whole indexes at once."""
        self.retriever = None
        self.embeddings = None

    def _install(self, index: DenseIndex, emb: np.ndarray) -> None:
        self.embeddings = emb
        self.retriever, self._bm25 = build_retriever(self.cfg.index.retriever, index, self.kb,
                                                     getattr(self, "_bm25", None), bm25_dir=self.out / "bm25")

    # ----------------------------------------------------------------------------------- train
    def train(self) -> dict:
        cfg, acc = self.cfg, self.accelerator
        tc = cfg.train
        pbar = tqdm(total=tc.max_steps, initial=self.step, desc="train", disable=not self.is_main)
        if tc.eval_at_start and self.step == 0:
            split = self.final_split()
            self.evaluate_and_log(split, predictions_name=f"predictions_{split}_step0.jsonl")
        t_start = time.time()
        self.model.train()
        try:
            while self.step < tc.max_steps:
                self.train_loader.set_epoch(self.epoch)
                loader = self.train_loader
                if self.batch_in_epoch:
                    loader = acc.skip_first_batches(self.train_loader, self.batch_in_epoch)
                for batch in self._batches(loader):
                    with acc.accumulate(self.model):
                        out = self.model(batch["q_input_ids"], batch["q_attention_mask"],
                                         retrieve=self._make_retrieve(batch))
                        ok = self._finite(out.loss, "loss")
                        if ok:
                            acc.backward(out.loss)
                            if acc.sync_gradients and tc.max_grad_norm > 0:
                                norm = acc.clip_grad_norm_(self.model.parameters(), tc.max_grad_norm)
                                ok = norm is None or self._finite(torch.as_tensor(norm), "gradient norm")
                        if not ok:  # skipped (train.skip_nonfinite): no update from this batch
                            self.optimizer.zero_grad()
                            self.batch_in_epoch += 1
                            continue
                        self.optimizer.step()
                        if acc.sync_gradients:
                            self.scheduler.step()
                        self.optimizer.zero_grad()
                    self.batch_in_epoch += 1
                    step_loss = float(acc.reduce(out.loss.detach(), "mean"))
                    self._loss_sum += step_loss
                    self._loss_n += 1
                    self._step_losses.append(step_loss)
                    # the generator NLL summed over answer tokens, all ranks: per-token NLL of the log window
                    nll_tok = acc.reduce(torch.stack([out.nll.detach().float().sum(),
                                                      out.n_tokens.float()]).to(acc.device), "sum")
                    self._window["loss"] += step_loss
                    self._window["n"] += 1
                    self._window["nll"] += float(nll_tok[0])
                    self._window["tokens"] += float(nll_tok[1])
                    if not acc.sync_gradients:
                        continue
                    self.step += 1
                    pbar.update(1)
                    self._after_step(out)
                    if self.step >= tc.max_steps:
                        break
                else:
                    self.epoch += 1
                    self.batch_in_epoch = 0
        finally:
            pbar.close()  # ends the bar's line, also when a step raises
        train_seconds = time.time() - t_start
        self._write_rank_info()  # now with optimizer state
        self._index_at_end()
        final = self.evaluate_and_log(self.final_split(), final=True)
        self.export()
        acc.end_training()
        if self.is_main:
            self.plot()
        final.update({"train_seconds": train_seconds, "refresh_seconds": self.refresh_seconds,
                      "refresh_passages": self.refresh_passages, "rerank_seconds": self.rerank_seconds,
                      "rerank_passages": self.rerank_passages, "rerank_eval_passages": self.rerank_eval_passages,
                      "async_wait_seconds": self.async_wait_seconds})
        return final

    def _index_at_end(self) -> None:
        """The final evaluation and the export use an index encoded by the final context encoder: re-encode the KB
        when the live index predates it (``index.refresh_at_end``), or mark it stale (no index in the export)."""
        self._stale_index = False
        if self._pending:  # an async refresh still in flight: swap it in first
            self._finish_async_refresh()
        if not self.unwrapped.is_trained("context_encoder") or self.last_refresh_step == self.step:
            return
        if self.cfg.index.refresh_at_end:
            log.info("final refresh: the index (v%d, step %d) predates the context encoder of step %d; re-encoding "
                     "the KB so that the final evaluation and the exported index use the exported encoder",
                     self.index_version, self.last_refresh_step, self.step)
            self.refresh_index()
        else:
            self._stale_index = True
            log.warning("index.refresh_at_end=false: the index (step %d) predates the context encoder of step %d; "
                        "the final evaluation uses it, and the export holds no index (ragtrain eval re-encodes the "
                        "KB with the exported context encoder)", self.last_refresh_step, self.step)

    def _finite(self, value: torch.Tensor, what: str) -> bool:
        """Whether ``value`` is finite on every rank (one agreed answer). A non-finite one is skipped while
        ``train.skip_nonfinite`` allows, else the run stops with :class:`NonFiniteError` naming the step."""
        bad = (~torch.isfinite(value.detach().float())).any().float().to(self.accelerator.device)
        if float(self.accelerator.reduce(bad, "sum")) == 0:
            return True
        step = self.step + 1
        self._nonfinite_skipped = getattr(self, "_nonfinite_skipped", 0) + 1
        if self._nonfinite_skipped > self.cfg.train.skip_nonfinite:
            raise NonFiniteError(
                f"step {step}: non-finite {what} ({float(value.detach().float().reshape(-1)[0])}); stopped before "
                "anything non-finite was saved, indexed or exported (lower the learning rates, or let "
                f"train.skip_nonfinite=N skip up to N such steps; {self._nonfinite_skipped - 1} skipped so far)")
        log.warning("step %d: non-finite %s, update skipped (%d of train.skip_nonfinite=%d)", step, what,
                    self._nonfinite_skipped, self.cfg.train.skip_nonfinite)
        return False

    def _after_step(self, out) -> None:
        tc = self.cfg.train
        if self.is_main:  # one row per optimizer step: mean loss over its micro-batches (all ranks)
            with open(self.out / "train_log.jsonl", "a") as f:
                f.write(json.dumps({"step": self.step, "loss": sum(self._step_losses) / len(self._step_losses),
                                    "index_version": self.index_version}) + "\n")
        self._step_losses = []
        lr = {g.get("name", str(i)): g["lr"] for i, g in enumerate(self.optimizer.param_groups)}
        if self.step % max(tc.log_every, 1) == 0 or self.step == 1:
            w = self._window
            now = time.time()
            per_token = w["nll"] / max(w["tokens"], 1.0)
            logs = {"train/loss": w["loss"] / max(w["n"], 1),  # mean over the optimizer steps since the last log
                    "train/nll_per_token": per_token, "train/perplexity": math.exp(min(per_token, 50.0)),
                    "train/retrieval_loss": float(out.retrieval_loss), "index/version": self.index_version}
            logs.update({f"lr/{k}": v for k, v in lr.items()})
            self.accelerator.log(logs, step=self.step)
            if self.is_main:
                rate = w["n"] / max(now - self._window_t0, 1e-9) if self._window_t0 else float("nan")
                log.info("step %d/%d | loss %.4f | nll/token %.4f | lr %s | %.2f steps/s", self.step, tc.max_steps,
                         logs["train/loss"], per_token, " ".join(f"{k}={v:.2e}" for k, v in lr.items()), rate)
            self._window = {"loss": 0.0, "n": 0, "nll": 0.0, "tokens": 0.0}
            self._window_t0 = now
        if self._pending and self.step >= self._pending["swap_step"]:
            self._finish_async_refresh()
        if self.schedule and self.schedule.should_refresh(self.step):
            if self.cfg.index.refresh_mode == "async":
                self._start_async_refresh()
            else:
                self.refresh_index()
                self.accelerator.log({"index/last_refresh_step": self.last_refresh_step}, step=self.step)
        if tc.eval_every and self.step % tc.eval_every == 0 and self.step < tc.max_steps:
            self.evaluate_and_log("validation")
        if tc.save_every and (self.step % tc.save_every == 0 or self.step >= tc.max_steps):
            self.save_checkpoint()

    # -------------------------------------------------------------------------------- evaluate
    def evaluate(self, examples: list[dict], max_generate: int = -1) -> tuple[dict, list[dict]]:
        """Retrieval metrics on every example; an answer generated (EM/F1/...) for the first ``max_generate``
        (-1 = all, 0 = none). Each rank takes every world-th example of both parts, padded to equal batch counts
        (ZeRO-3 needs every rank to call the partitioned models the same number of times)."""
        ec = self.cfg.eval
        n_docs = ec.decode_docs or self.cfg.rag.n_docs
        n_gen = len(examples) if max_generate < 0 else min(max_generate, len(examples))
        rag = self.unwrapped

        def search(q, questions, k):  # stored vectors of the hits: p(z|x) in modes with a frozen context encoder
            return self.search(q, list(questions), k, with_embeddings=not rag.live_context)

        records = []
        for part, generate in ((examples[:n_gen], True), (examples[n_gen:], False)):
            if not part:
                continue
            n_b = math.ceil(math.ceil(len(part) / D.world()) / ec.batch_size)
            with self.accelerator.autocast():
                mine = predict(rag, self.collator, search, self.kb, part[D.rank()::D.world()], n_docs=n_docs,
                               recall_depth=min(max(ec.recall_ks), len(self.kb)), batch_size=ec.batch_size,
                               num_beams=ec.num_beams, max_new_tokens=ec.max_new_tokens, decoding=ec.decoding,
                               device=self.accelerator.device, synced_gpus=self.is_zero3 and D.world() > 1,
                               show_progress=self.is_main, pad_to_batches=n_b, generate=generate)
            records += [r for p in D.gather_objects(mine) for r in p]
        return summarize(records, [k for k in ec.recall_ks]), records

    @torch.no_grad()
    def evaluation_loss(self, examples: list[dict]) -> dict:
        """The training objective on held-out questions (eval mode, teacher forcing with their first answer):
        ``loss`` = mean per-question RAG NLL (as ``train_loss``, without the retrieval term), ``nll_per_token`` and
        ``perplexity`` over answer tokens.  Every rank takes every world-th question, padded to equal batch counts."""
        if not examples:
            return {}
        rag = self.unwrapped
        was_training = rag.training
        rag.eval()
        bs = self.cfg.eval.batch_size
        mine = examples[D.rank()::D.world()]
        n_b = math.ceil(math.ceil(len(examples) / D.world()) / bs)
        device = self.accelerator.device
        total = torch.zeros(3, dtype=torch.float64)  # nll sum, questions, answer tokens
        for bi in range(n_b):
            part = mine[bi * bs: (bi + 1) * bs]
            real = bool(part)
            batch = self._collate(part or examples[:1])
            with self.accelerator.autocast():
                out = rag(batch["q_input_ids"].to(device), batch["q_attention_mask"].to(device),
                          self._make_retrieve(batch), with_gold=False)
            if real:
                total += torch.tensor([float(out.nll.float().sum()), len(part), float(out.n_tokens)],
                                      dtype=torch.float64)
        rag.train(was_training)
        total = self.accelerator.reduce(total.to(device), "sum").cpu() if D.world() > 1 else total
        per_token = float(total[0] / max(float(total[2]), 1.0))
        return {"loss": float(total[0] / max(float(total[1]), 1.0)), "nll_per_token": per_token,
                "perplexity": math.exp(min(per_token, 50.0))}

    def _eval_settings(self) -> dict:
        ec = self.cfg.eval
        return {"n_docs": ec.decode_docs or self.cfg.rag.n_docs, "num_beams": ec.num_beams,
                "max_new_tokens": ec.max_new_tokens, "decoding": ec.decoding, "batch_size": ec.batch_size,
                "recall_ks": list(ec.recall_ks)}

    def final_split(self) -> str:
        return "test" if self.splits["test"] else "validation"

    def evaluate_and_log(self, split: str, final: bool = False, predictions_name: str | None = None) -> dict:
        """One metrics row; ``final`` (or a ``predictions_name``): the final evaluation's settings and a per-question
        predictions file (``predictions_<split>.jsonl``, or that name)."""
        examples = self.splits.get(split) or []
        # train_loss: the mean training loss since the previous evaluation; loss / nll_per_token / perplexity: the
        # RAG NLL of this split's gold answers (teacher forcing), over the questions that get an answer generated
        row = {"step": self.step, "split": split, "train_loss": self._loss_sum / max(self._loss_n, 1),
               "index_version": self.index_version, "last_refresh_step": self.last_refresh_step}
        self._loss_sum, self._loss_n = 0.0, 0
        if examples:
            ec = self.cfg.eval
            n_gen = ec.max_generate if (final or predictions_name) else ec.max_generate_in_training
            row.update(self.evaluation_loss(examples[: len(examples) if n_gen < 0 else n_gen]))
            metrics, records = self.evaluate(examples, n_gen)
            row.update(metrics)
            name = f"predictions_{split}.jsonl" if final else predictions_name
            if name and self.is_main:
                ckpt.write_text_atomic(self.out / name, "".join(json.dumps(r) + "\n" for r in records))
        if self.is_main:
            with open(self._metrics_path, "a") as f:
                f.write(json.dumps(row) + "\n")
            log.info("eval %s", json.dumps(row))
        self.accelerator.log({f"{split}/{k}": v for k, v in row.items() if isinstance(v, (int, float))},
                             step=self.step)
        return row

    # ------------------------------------------------------------------------- save / resume
    def trainer_state(self) -> dict:
        return {"step": self.step, "epoch": self.epoch, "batch_in_epoch": self.batch_in_epoch,
                "index_version": self.index_version, "last_refresh_step": self.last_refresh_step,
                "world_size": D.world(), "mode": self.cfg.rag.mode,
                # the running loss since the last evaluation (the next metrics row's "loss")
                "loss_sum": self._loss_sum, "loss_n": self._loss_n, "log_window": dict(self._window),
                # an async refresh in flight (resumed: encoded again from its snapshot, swapped at the same step)
                "pending_refresh": self._pending}

    def save_checkpoint(self) -> Path:
        path = ckpt.save_checkpoint(self.out / "checkpoints", self.step, self.trainer_state(),
                                    self.accelerator.save_state, is_main=self.is_main, barrier=D.barrier,
                                    keep=self.cfg.train.keep_checkpoints)
        self.store.pinned = ckpt.referenced_index_versions(self.out / "checkpoints")
        self._prune_snapshots()
        log.info("checkpoint written: %s", path)
        return path

    def _resume(self) -> bool:
        path = ckpt.latest_checkpoint(self.out / "checkpoints", warn=log.warning)
        if path is None:
            log.warning("resume=true but no checkpoint under %s; starting from step 0 (the interrupted attempt's "
                        "log rows and index versions are discarded)", self.out / "checkpoints")
            if self.is_main:
                for name in ("train_log.jsonl", "metrics.jsonl"):
                    ckpt.trim_jsonl(self.out / name, -1)  # every row, step-0 evaluations too
                self.store.discard_all()
            D.barrier()
            return False
        state = ckpt.read_state(path)
        differs = [f"{key}: checkpoint {state.get(key)!r}, this run {now!r}"
                   for key, now in (("world_size", D.world()), ("mode", self.cfg.rag.mode))
                   if key in state and state[key] != now]
        if differs:
            raise ConfigError(f"resume: {path} is not compatible with this run ({'; '.join(differs)}); "
                              "resume with the same launch and rag.mode, or start a new output_dir")
        self.accelerator.load_state(str(path))
        self.step, self.epoch, self.batch_in_epoch = state["step"], state["epoch"], state["batch_in_epoch"]
        self.last_refresh_step = state["last_refresh_step"]
        self._loss_sum, self._loss_n = state.get("loss_sum", 0.0), state.get("loss_n", 0)
        self._window = dict(state.get("log_window", self._window))
        self._pending = state.get("pending_refresh")
        self._undo_next_fetch_rng = self.batch_in_epoch > 0
        version = state["index_version"]
        if self.is_main:
            # the index the checkpoint's step used, not the newest on disk: versions built after the checkpoint
            # are deleted and rebuilt (with the same numbers) by the resumed run
            try:
                self.store.roll_back(version)
            except FileNotFoundError as e:
                raise ConfigError(f"resume: {path} used {e}; cannot resume exactly without it") from None
            if self.cfg.index.placement == "rank0":
                index, emb, _ = self.store.load_version(version, use_gpu=self.cfg.index.use_gpu)
                self._install(index, emb)
            for name in ("train_log.jsonl", "metrics.jsonl"):  # rows after the checkpoint are rewritten
                dropped = ckpt.trim_jsonl(self.out / name, self.step)
                if dropped:
                    log.info("resume: dropped %d row(s) after step %d from %s", dropped, self.step, name)
        self.index_version = version
        D.barrier()
        self._install_slice()
        log.info("resumed from %s at step %d (index version %d)", path, self.step, version)
        return True

    def _batches(self, loader):
        """``loader``'s batches. Right after a mid-epoch resume, fetching the first batch draws once from torch's
        global RNG (the resumed iterator seeds its sampler) where the uninterrupted run drew at the epoch start,
        before the checkpoint: that draw is undone so dropout masks continue exactly as if never stopped."""
        it = iter(loader)
        if getattr(self, "_undo_next_fetch_rng", False):
            self._undo_next_fetch_rng = False
            cpu = torch.random.get_rng_state()
            cuda = torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None
            first = next(it, None)
            torch.random.set_rng_state(cpu)
            if cuda is not None:
                torch.cuda.set_rng_state_all(cuda)
            if first is None:
                return
            yield first
        yield from it

    def plot(self) -> Path | None:
        """``OUTPUT_DIR/curves.png`` (:func:`ragtrain.plot.plot_run`); a failure is a warning, never the run's."""
        try:
            from ragtrain.plot import plot_run

            path = plot_run(self.out)
        except Exception as e:  # noqa: BLE001 - a missing font or backend must not fail a finished run
            log.warning("could not draw %s: %s", self.out / "curves.png", str(e).splitlines()[0] if str(e) else e)
            return None
        log.info("training curves: %s", path)
        return path

    def close(self) -> None:
        """End the job's process group (all ranks, after a barrier) so that no communication thread is still
        running when the interpreter exits; ``train.py`` calls it once the run is done.  A no-op when no group was
        started."""
        import torch.distributed as dist

        if dist.is_available() and dist.is_initialized():
            dist.barrier()
            dist.destroy_process_group()

    def export(self) -> Path:
        """``OUTPUT_DIR/final/{question_encoder,context_encoder,generator}`` (+ the live index), atomically."""
        acc = self.accelerator
        state_dict = acc.get_state_dict(self.model)  # gathers ZeRO-3 partitions (collective: all ranks)
        final = self.out / "final"
        if self.is_main:
            tmp = self.out / "final.tmp"
            shutil.rmtree(tmp, ignore_errors=True)
            export_models(self.unwrapped, self.tokenizers, tmp, state_dict=state_dict,
                          extra={"kb_dir": kb_dir_for_export(self.kb_dir, self.out, final),
                                 "index_version": self.index_version, "step": self.step,
                                 "max_query_length": self.cfg.model.max_query_length,
                                 "max_passage_length": self.cfg.model.max_passage_length,
                                 "max_prompt_length": self.cfg.model.max_prompt_length,
                                 "max_answer_length": self.cfg.model.max_answer_length,
                                 "chat_template": self.collator.chat_template,
                                 "stop_strings": list(self.collator.stop_strings),
                                 # what the in-training evaluation did, so that `ragtrain eval` does the same
                                 "retriever": retriever_settings(self.cfg.index.retriever),
                                 "eval": self._eval_settings()})
            src = None if getattr(self, "_stale_index", False) else self.store.current_dir()
            if src is not None:
                shutil.copytree(src, tmp / "index", copy_function=_link_or_copy)
            ckpt.replace_dir(tmp, final)  # the previous export stays whole until the new one is in place
            log.info("exported models to %s", final)
        D.barrier()
        return final


# what a run leaves in its output_dir (config.yaml and the KB cache are not a run's results: kept)
RUN_OUTPUTS = ("train_log.jsonl", "metrics.jsonl", "checkpoints", "final", "index", "tensorboard", "ranks",
               "bm25", "curves.png", "predictions_validation.jsonl", "predictions_test.jsonl")
# ...and those that show it trained (a start that failed before its first step leaves only ranks/index/tensorboard,
# which a new run replaces or adds to harmlessly)
RUN_EVIDENCE = ("train_log.jsonl", "metrics.jsonl", "checkpoints", "final")


def previous_run(out: Path) -> list[str]:
    """What a previous run that trained left in ``out`` (empty: nothing to refuse or clear)."""
    return [name for name in RUN_EVIDENCE if (out / name).exists()]


def clear_previous_run(out: Path) -> None:
    """``overwrite=true``: move every previous-run output into one ``.overwritten.tmp-*`` folder (renames: the
    run folder never holds a mix of old and new), then delete it (a kill mid-delete leaves a folder that the next
    start-up's :func:`~ragtrain.train.checkpoint.sweep_stale` removes)."""
    trash = out / f".overwritten.tmp-{os.getpid()}"
    trash.mkdir()
    for name in RUN_OUTPUTS:
        if (out / name).exists():
            os.replace(out / name, trash / name)
    shutil.rmtree(trash, ignore_errors=True)


def kb_dir_for_export(kb_dir: Path, run_dir: Path, export_dir: Path) -> str:
    """The KB path recorded in ``ragtrain.json``: relative to the export folder when the KB lies inside the run
    folder (the run stays usable when moved), absolute otherwise (:func:`ragtrain.model.loading.resolve_kb_dir`
    reads it back)."""
    kb, run = Path(os.path.abspath(kb_dir)), Path(os.path.abspath(run_dir))
    if kb == run or run in kb.parents:
        return os.path.relpath(kb, os.path.abspath(export_dir))
    return str(kb)


def _link_or_copy(src, dst):
    try:
        os.link(src, dst)
    except OSError:
        shutil.copy2(src, dst)


def _flat_hparams(cfg: Config) -> dict:
    out = {}
    for section, values in cfg.to_dict().items():
        if isinstance(values, dict):
            for k, v in values.items():
                out[f"{section}.{k}"] = v if isinstance(v, (int, float, str, bool)) else str(v)
        else:
            out[section] = values if isinstance(values, (int, float, str, bool)) else str(values)
    return out
