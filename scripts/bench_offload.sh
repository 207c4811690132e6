#!/usr/bin/env bash
# Optimizer host offload on one GPU (BENCHMARKS.md "Optimizer state in host memory"), run from outside the checkout:
#   1. its cost: Llama-3.2-1B at 32K, 2 sequences per step, with and without train.offload_optimizer
#   2. the whole Llama-3-8B (32 layers, 8.03B parameters: 144 GB of weights + fp32 state without offload) at 128K
#      and 256K tokens per step on one GPU, masters and moments in host memory, full recompute and tiles
# Usage: bash scripts/bench_offload.sh [cost|8b|all]
set -euo pipefail
what=${1:-all}
bench() { python3 -m torch.distributed.run --standalone --nproc-per-node 1 -m megalysses.bench --config gpu-bench "$@"; }
if [[ $what == cost || $what == all ]]; then
  for offload in false true; do
    bench model=llama-3.2-1b train.global_batch_size=2 memory.loss_tiles=4 train.offload_optimizer=$offload \
      --seq-lens 32768 --steps 6 --warmup 2
  done
fi
if [[ $what == 8b || $what == all ]]; then
  bench model=llama-3-8b train.offload_optimizer=true memory.recompute=full memory.mlp_tiles=8 memory.loss_tiles=32 \
    --seq-lens 131072,262144 --steps 1 --warmup 1
fi
