"""Smoke test: Accelerate + DeepSpeed ZeRO on N processes, on a CPU-only host (gloo) or on GPUs.

It mirrors the ragtrain pattern: ONE wrapper nn.Module holding several sub-models, one AdamW with a parameter
group per sub-model (own LR), the DataLoader passed to ``accelerator.prepare`` together with the model so that
the "auto" batch sizes in ds_configs/*.json are filled. Every rank prints one ``[check]`` line with the ZeRO
stage, world size, backend and the values Accelerate resolved; rank 0 prints ``CHECK OK`` at the end.

On a host with no accelerator, DeepSpeed needs the gloo backend, given to Accelerate as
``InitProcessGroupKwargs(backend="gloo")`` (``Accelerator(cpu=True)`` would silently fall back to DDP). The script
does that automatically when ``torch.cuda.is_available()`` is False.

Command lines (from the repository root; each starts 2 processes):

    # accelerate launcher, config file holds distributed_type: DEEPSPEED + deepspeed_config_file
    accelerate launch --config_file launch/accelerate/cpu_2proc_zero2.yaml launch/check_deepspeed_cpu.py
    accelerate launch --config_file launch/accelerate/cpu_2proc_zero3.yaml launch/check_deepspeed_cpu.py

    # torchrun: the script builds the DeepSpeedPlugin itself from --deepspeed
    torchrun --standalone --nproc_per_node 2 launch/check_deepspeed_cpu.py --deepspeed ds_configs/zero3.json

    # deepspeed launcher. --num_accelerators (alias of --num_gpus) is required on CPU: without it DeepSpeed's CPU
    # accelerator counts NUMA nodes (1 here) and starts one process. It appends --local_rank=N to the script's
    # arguments unless --no_local_rank is given. DS_ACCELERATOR=cpu is optional (auto-detected without CUDA).
    deepspeed --num_accelerators 2 --master_port 29511 launch/check_deepspeed_cpu.py --deepspeed ds_configs/zero2.json

Unknown arguments are ignored, so the launch/slurm/*.sbatch and launch/deepspeed_multinode.sh scripts can be
tried with ``TRAIN_SCRIPT=launch/check_deepspeed_cpu.py`` instead of train.py.

Options: ``--grad_clip 0.5`` checks that a recipe value reaches DeepSpeed's gradient_clipping (the "auto" default
Accelerate would otherwise fill is 1.0); ``--grad_accum 2`` the same for gradient_accumulation_steps.
"""

from __future__ import annotations

import argparse
import os
import sys

import torch
from torch import nn


class Wrapper(nn.Module):
    """Stand-in for ragtrain's RagModel: several sub-models, no ``config.hidden_size`` attribute."""

    def __init__(self, d: int = 16):
        super().__init__()
        self.question_encoder = nn.Linear(d, d)
        self.generator = nn.Linear(d, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # DeepSpeed bf16/fp16 casts the weights, not the inputs (token ids need no cast; float features do).
        x = x.to(self.question_encoder.weight.dtype)
        return self.generator(torch.tanh(self.question_encoder(x))).squeeze(-1).float()


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--deepspeed", default="", help="ds_configs/*.json; needed with torchrun / deepspeed launchers")
    p.add_argument("--local_rank", type=int, default=-1, help="appended by the deepspeed launcher; unused")
    p.add_argument("--steps", type=int, default=2, help="optimizer steps")
    p.add_argument("--batch_size", type=int, default=2, help="per-process micro batch")
    p.add_argument("--grad_accum", type=int, default=1)
    p.add_argument("--grad_clip", type=float, default=0.5, help="<= 0: leave it to Accelerate (fills 1.0)")
    p.add_argument("--keep_persistence", action="store_true",
                   help="ZeRO-3: keep the JSON's stage3_param_persistence_threshold; by default it is set to 0 so "
                        "that the tiny test parameters really are partitioned")
    p.add_argument("--backend", default="auto",
                   help="auto: gloo when no GPU; none: pass no InitProcessGroupKwargs (shows the failure mode)")
    p.add_argument("--mixed_precision", default=None, help="no | bf16 | fp16 (default: launcher's choice)")
    # Unknown arguments (e.g. train.py's ``--config recipe.yaml key=value``) are ignored, so this script can stand in
    # for train.py when testing a launcher script: TRAIN_SCRIPT=launch/check_deepspeed_cpu.py sbatch ...
    args, unknown = p.parse_known_args(argv)
    args.ignored = unknown
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    from accelerate import Accelerator
    from accelerate.utils import DeepSpeedPlugin, InitProcessGroupKwargs, set_seed

    ds_file = args.deepspeed or os.environ.get("ACCELERATE_DEEPSPEED_CONFIG_FILE", "")
    if not ds_file:
        print("no DeepSpeed config: pass --deepspeed or launch with an accelerate YAML that names one", file=sys.stderr)
        return 2
    # Recipe values go into the plugin; DeepSpeedPlugin fills the JSON's "auto" entries from them.
    plugin = DeepSpeedPlugin(
        hf_ds_config=ds_file,
        gradient_accumulation_steps=args.grad_accum,
        gradient_clipping=args.grad_clip if args.grad_clip > 0 else None,
    )
    zero_cfg = plugin.deepspeed_config["zero_optimization"]
    if zero_cfg.get("stage") == 3 and not args.keep_persistence:
        zero_cfg["stage3_param_persistence_threshold"] = 0
    if args.backend == "auto":
        handlers = [] if torch.cuda.is_available() else [InitProcessGroupKwargs(backend="gloo")]
    elif args.backend == "none":
        handlers = []
    else:
        handlers = [InitProcessGroupKwargs(backend=args.backend)]
    accelerator = Accelerator(
        deepspeed_plugin=plugin,
        gradient_accumulation_steps=args.grad_accum,
        mixed_precision=args.mixed_precision,
        kwargs_handlers=handlers,
    )
    set_seed(0)

    model = Wrapper()
    optimizer = torch.optim.AdamW(
        [
            {"params": model.question_encoder.parameters(), "lr": 1e-2, "name": "question_encoder"},
            {"params": model.generator.parameters(), "lr": 2e-2, "name": "generator"},
        ],
        lr=1e-2,
    )
    n = args.batch_size * accelerator.num_processes * args.steps * args.grad_accum
    data = torch.utils.data.TensorDataset(torch.randn(n, 16), torch.randn(n))
    loader = torch.utils.data.DataLoader(data, batch_size=args.batch_size)
    model, optimizer, loader = accelerator.prepare(model, optimizer, loader)

    ds_cfg = accelerator.state.deepspeed_plugin.deepspeed_config
    zero = ds_cfg["zero_optimization"]
    stage = zero["stage"]

    losses = []
    for x, y in loader:
        with accelerator.accumulate(model):
            loss = nn.functional.mse_loss(model(x), y)
            accelerator.backward(loss)
            optimizer.step()
            optimizer.zero_grad()
        losses.append(loss.detach().float().item())

    # Full weights on every rank: under ZeRO-3 the local parameter is an empty shard until gathered.
    inner = accelerator.unwrap_model(model)
    w = inner.question_encoder.weight
    local_numel = w.numel()
    if stage == 3:
        import deepspeed

        with deepspeed.zero.GatheredParameters(list(inner.parameters()), modifier_rank=None):
            full_numel = w.numel()
            checksum = sum(float(p.detach().double().sum()) for p in inner.parameters())
    else:
        full_numel = w.numel()
        checksum = sum(float(p.detach().double().sum()) for p in inner.parameters())
    sums = accelerator.gather(torch.tensor([checksum], dtype=torch.float64, device=accelerator.device))
    same = bool(torch.allclose(sums, sums[0].expand_as(sums)))

    engine_opt = getattr(model, "optimizer", None)  # the ZeRO optimizer inside the DeepSpeedEngine
    opt_name = type(engine_opt).__name__
    inner_name = type(getattr(engine_opt, "optimizer", None)).__name__  # AdamW, or DeepSpeedCPUAdam with offload
    group_lrs = [g["lr"] for g in engine_opt.param_groups] if engine_opt is not None else []
    import torch.distributed as dist

    backend = dist.get_backend() if dist.is_initialized() else "none"
    print(
        f"[check] rank={accelerator.process_index} world_size={accelerator.num_processes} "
        f"distributed_type={accelerator.distributed_type} backend={backend} device={accelerator.device} "
        f"zero_stage={stage} offload_optimizer={zero.get('offload_optimizer', {}).get('device', 'none')} "
        f"offload_param={zero.get('offload_param', {}).get('device', 'none')} "
        f"micro_bs={ds_cfg['train_micro_batch_size_per_gpu']} train_bs={ds_cfg['train_batch_size']} "
        f"grad_accum={ds_cfg['gradient_accumulation_steps']} grad_clip={ds_cfg['gradient_clipping']} "
        f"bf16={ds_cfg['bf16']['enabled']} fp16={ds_cfg['fp16']['enabled']} "
        f"reduce_bucket_size={zero.get('reduce_bucket_size')} engine_optimizer={opt_name} "
        f"inner_optimizer={inner_name} group_lrs={group_lrs} "
        f"local_numel={local_numel} gathered_numel={full_numel} losses={[round(v, 4) for v in losses]}",
        flush=True,
    )
    accelerator.wait_for_everyone()
    partitioned = stage != 3 or args.keep_persistence or local_numel == 0
    ok = same and partitioned and full_numel == 16 * 16 and accelerator.distributed_type == "DEEPSPEED"
    if accelerator.is_main_process:
        print(f"CHECK {'OK' if ok else 'FAILED'} world_size={accelerator.num_processes} zero_stage={stage} "
              f"params_equal_across_ranks={same} ignored_args={args.ignored}", flush=True)
    accelerator.end_training()
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
