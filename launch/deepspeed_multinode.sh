#!/usr/bin/env bash
# Multi-node training with the DeepSpeed launcher (no accelerate launch involved).
#
# Two ways, both from the repository root, same repository + venv path on every node:
#
# 1) pdsh/ssh (default): run ONCE on the first node of the hostfile; DeepSpeed ssh-es into the others.
#      HOSTFILE=launch/hostfile RECIPE=launch/recipes/<recipe>.yaml bash launch/deepspeed_multinode.sh [key=value ...]
#    which runs exactly:
#      deepspeed --hostfile launch/hostfile --no_local_rank --master_addr node1 --master_port 29500 \
#        train.py --deepspeed ds_configs/zero3.json --config launch/recipes/<recipe>.yaml [key=value ...]
#    Needs pdsh and passwordless ssh between nodes. Environment variables to forward to the remote ranks
#    (NCCL_*, HF_HOME, ...) go one per line as NAME=value into ./.deepspeed_env or ~/.deepspeed_env.
#
# 2) no ssh (clusters without pdsh, SLURM; see launch/slurm/deepspeed.sbatch): run on EVERY node, with its own rank:
#      NO_SSH=1 NODE_RANK=<0..N-1> HOSTFILE=launch/hostfile RECIPE=... bash launch/deepspeed_multinode.sh [key=value ...]
#    -> deepspeed --hostfile launch/hostfile --no_ssh --node_rank <r> --no_local_rank --master_addr node1 --master_port 29500 train.py ...
#
# Variables: HOSTFILE (launch/hostfile; format in launch/hostfile.example), RECIPE (required), DS_CONFIG
# (ds_configs/zero3.json; zero2.json / zero3_offload.json also fit), MASTER_ADDR (default: first host of the
# hostfile), MASTER_PORT (29500), TRAIN_SCRIPT (train.py; launch/check_deepspeed_cpu.py for a smoke test).
#
# Single node, N GPUs, no hostfile needed:
#   deepspeed --num_gpus 8 --no_local_rank train.py --deepspeed ds_configs/zero2.json --config launch/recipes/<recipe>.yaml
# CPU-only host, 2 processes over gloo (--num_accelerators is an alias of --num_gpus and is REQUIRED on CPU):
#   deepspeed --num_accelerators 2 --no_local_rank train.py --deepspeed ds_configs/zero2.json --config launch/recipes/<recipe>.yaml
#
# --no_local_rank: without it the launcher appends --local_rank=<n> to the script's arguments; LOCAL_RANK is set in
# the environment either way, which is what Accelerate reads. Hyper-parameters stay in the recipe: the JSON's "auto" values are filled from
# it by the trainer (train.deepspeed_config=... in the recipe is the same as --deepspeed).
set -euo pipefail

HOSTFILE=${HOSTFILE:-launch/hostfile}
RECIPE=${RECIPE:?set RECIPE=launch/recipes/<recipe>.yaml}
DS_CONFIG=${DS_CONFIG:-ds_configs/zero3.json}
MASTER_PORT=${MASTER_PORT:-29500}
TRAIN_SCRIPT=${TRAIN_SCRIPT:-train.py}

if [[ ! -f "$HOSTFILE" ]]; then
  echo "hostfile not found: $HOSTFILE (copy launch/hostfile.example and edit it)" >&2
  exit 2
fi
# First non-comment line of the hostfile = main node.
MASTER_ADDR=${MASTER_ADDR:-$(grep -v '^\s*#' "$HOSTFILE" | awk 'NF {print $1; exit}')}

ssh_args=()
if [[ "${NO_SSH:-0}" == "1" ]]; then
  ssh_args=(--no_ssh --node_rank "${NODE_RANK:?NO_SSH=1 needs NODE_RANK}")
fi

set -x
exec deepspeed --hostfile "$HOSTFILE" "${ssh_args[@]}" --no_local_rank \
  --master_addr "$MASTER_ADDR" --master_port "$MASTER_PORT" \
  "$TRAIN_SCRIPT" --deepspeed "$DS_CONFIG" --config "$RECIPE" "$@"
