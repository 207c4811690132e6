#!/usr/bin/env bash
# Optimizer host offload on one GPU (BENCHMARKS.md "Optimizer state in host memory"), run from outside the checkout:
#   1. its cost: Llama-3.2-1B at 32K, 2 sequences per step, with and without train.offload_optimizer
#   2. the whole Llama-3-8B (32 layers, 8.03B parameters: 144 GB of weights + fp32 state without offload) at 128K
#      and 256K tokens per step on one GPU, masters and moments in host memory, full recompute and tiles
# Usage: bash scripts/bench_offload.sh [cost|8b|all]   (each row also appended as JSON to $OUT, default
# offload-rows.jsonl: the two 1B rows train on the same tokens from the same weights, so their losses must be equal)
set -euo pipefail
what=${1:-all}
OUT=${OUT:-offload-rows.jsonl}
PINNED="memory.offload_activations=false memory.fused_loss=false"  # the rows' savers, not the planner's choice
bench() { python3 -m torch.distributed.run --standalone --nproc-per-node 1 -m megalysses.bench --config gpu-bench \
  --out "$OUT" "$@"; }
if [[ $what == cost || $what == all ]]; then
  for offload in false true; do
    bench model=llama-3.2-1b train.global_batch_size=2 $PINNED memory.recompute=none memory.mlp_tiles=1 \
      memory.loss_tiles=4 train.offload_optimizer=$offload --seq-lens 32768 --steps 6 --warmup 2
  done
fi
if [[ $what == 8b || $what == all ]]; then
  # 256K leaves a few GiB free: growable segments keep the caching allocator from fragmenting them away
  export PYTORCH_CUDA_ALLOC_CONF=${PYTORCH_CUDA_ALLOC_CONF:-expandable_segments:True}
  EIGHT_B="model=llama-3-8b model.max_seq_len=262144 train.offload_optimizer=true memory.recompute=full
    memory.mlp_tiles=8 memory.loss_tiles=32 memory.fused_loss=false"
  bench $EIGHT_B memory.offload_activations=false --seq-lens 131072 --steps 1 --warmup 1
  # 256K: the 32 block inputs (64 GiB) no longer fit next to the gradients; the first 8 layers' go to the host, which
  # has about 33 GiB free beside the 90 GiB of optimizer state (the planner's host margin would refuse it)
  bench $EIGHT_B memory.offload_activations=true memory.offload_layers=8 --skip-memory-check \
    --seq-lens 262144 --steps 1 --warmup 1
fi
