#!/usr/bin/env bash
# One node, one process per GPU (NCCL), or CPU ranks with gloo when train.device=cpu.
#   scripts/train_single_node.sh NPROC --config RUN.yaml [dotted overrides...]
# e.g. scripts/train_single_node.sh 4 --config scripts/configs/runs/gpu-sp4-8b-long.yaml
set -euo pipefail
nproc=${1:?usage: $0 NPROC --config RUN.yaml [key=value ...]}; shift
exec torchrun --standalone --nproc-per-node "$nproc" -m megalysses.train "$@"
