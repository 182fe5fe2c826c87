#!/usr/bin/env python
"""Train a RAG system end to end: generator + question encoder + context encoder, with index refresh.

    python train.py --config launch/recipes/tiny-cpu.yaml output_dir=runs/tiny
    accelerate launch --config_file launch/accelerate/zero2.yaml train.py --config RECIPE [key=value ...]
    deepspeed --num_gpus 8 train.py --deepspeed ds_configs/zero3.json --config RECIPE [key=value ...]
    torchrun --nproc_per_node 8 train.py --config RECIPE train.deepspeed_config=ds_configs/zero2.json

Any config key can be overridden as ``section.key=value`` (see README "Configuration").
"""

import sys

from ragtrain.train.run import main

if __name__ == "__main__":
    sys.exit(main())
