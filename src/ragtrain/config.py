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
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional, Union, get_args, get_origin, get_type_hints

import yaml


class ConfigError(ValueError):
    """A bad recipe or override; the message names the key."""


MODES = ("end2end", "original", "generator_only", "retriever_only")
LOSS_TYPES = ("sequence", "token")
POOLINGS = ("pooler", "cls", "mean")
INDEX_KINDS = ("flat", "ivf", "hnsw")
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

    kb: list[str] = field(default_factory=list)  # source files (csv/tsv/jsonl/squad) or a built KB dir
    kb_dir: str = ""  # where the built KB is stored; default OUTPUT_DIR/kb
    passage_words: int = 100
    skip_bad_rows: bool = False
    train: str = ""  # QA file (jsonl / squad json / train.source)
    validation: str = ""  # optional; empty with split_by_article -> carved out of `train`
    test: str = ""
    split_by_article: bool = False  # split `train` by article into train/validation/test
    split_fractions: list[float] = field(default_factory=lambda: [0.8, 0.1, 0.1])
    max_eval_examples: int = 0  # 0 = all


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
    encode_batch_size: int = 64
    nlist: int = 1024
    nprobe: int = 32
    hnsw_m: int = 32
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
    save_every: int = 0  # 0 = no intermediate checkpoints
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
    for key in ("eval_every", "save_every", "log_every", "warmup_steps", "num_workers",
                "generator_lr", "question_encoder_lr", "context_encoder_lr", "weight_decay", "max_grad_norm"):
        positive(f"train.{key}", getattr(cfg.train, key), allow_zero=True)
    for key in ("encode_batch_size", "nlist", "nprobe", "hnsw_m", "keep_versions"):
        positive(f"index.{key}", getattr(cfg.index, key))
    positive("eval.num_beams", cfg.eval.num_beams)
    choice("eval.decoding", cfg.eval.decoding, DECODINGS)
    choice("model.chat_template", cfg.model.chat_template, ("auto", "yes", "no"))
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
            if value and not value.startswith("tiny:") and not Path(value).is_dir():
                raise ConfigError(f"model.{key}: not a local model folder: {value} "
                                  "(models load from disk only; use tiny:<family> for a random tiny model)")
        if cfg.train.deepspeed_config and not Path(cfg.train.deepspeed_config).is_file():
            raise ConfigError(f"train.deepspeed_config: file not found: {cfg.train.deepspeed_config}")


def dump_config(cfg: Config, path: str | os.PathLike) -> None:
    """Write the resolved config as YAML, atomically (a temporary name, then a rename)."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    tmp.write_text(yaml.safe_dump(cfg.to_dict(), sort_keys=False))
    os.replace(tmp, path)
