#!/usr/bin/env bash
# Several nodes through a torchrun (c10d) rendezvous. Run the same command on every node:
#   NNODES=2 NPROC=8 MASTER=node0:29500 RUN_ID=job42 scripts/train_multi_node.sh --config RUN.yaml [overrides...]
# MASTER is any reachable host:port (usually the first node). All nodes must see the same code and config.
set -euo pipefail
: "${NNODES:?set NNODES}" "${NPROC:?set NPROC (processes per node)}" "${MASTER:?set MASTER=host:port}"
exec torchrun --nnodes "$NNODES" --nproc-per-node "$NPROC" --rdzv-backend c10d --rdzv-endpoint "$MASTER" \
  --rdzv-id "${RUN_ID:-megalysses}" -m megalysses.train "$@"
