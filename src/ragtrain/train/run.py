"""Entry point shared by ``train.py`` and ``ragtrain train``."""

import argparse
import json
import os
import sys

from ragtrain.config import ConfigError, keys_help, load_config
from ragtrain.data.errors import DataError


def parse_args(argv=None, prog="train.py"):
    p = argparse.ArgumentParser(prog=prog, description="Train a RAG system end to end: generator + question "
                                "encoder + context encoder, with index refresh (README: Quick start).",
                                epilog=keys_help(), formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", help="YAML recipe (launch/recipes/*.yaml)")
    p.add_argument("--deepspeed", default="", help="DeepSpeed JSON config (set by the deepspeed launcher)")
    p.add_argument("--local_rank", "--local-rank", type=int, default=-1, help=argparse.SUPPRESS)
    p.add_argument("overrides", nargs="*", help="key=value overrides, e.g. rag.n_docs=3 output_dir=runs/x")
    return p.parse_args(argv)


def main(argv=None, prog="train.py") -> int:
    args = parse_args(argv, prog)
    overrides = list(args.overrides)
    if args.deepspeed:
        overrides.append(f"train.deepspeed_config={args.deepspeed}")
    try:
        cfg = load_config(args.config, overrides)
        from ragtrain.train.trainer import Trainer  # heavy imports after the config is known to be valid

        trainer = Trainer(cfg)
        result = trainer.train()
        trainer.close()
    except (ConfigError, DataError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except Exception as e:
        from ragtrain.train.trainer import NonFiniteError

        if not isinstance(e, NonFiniteError):
            raise
        print(f"error: {e}", file=sys.stderr)
        return 3
    if os.environ.get("RANK", "0") == "0":  # from the main process: the summary, then one JSON line
        from ragtrain.summary import format_summary

        print(format_summary(cfg.output_dir), file=sys.stderr)
        print(json.dumps(result))
    return 0


