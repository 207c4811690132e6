#!/usr/bin/env bash
# The GPU rows of BENCHMARKS.md, suite by suite: each line is one megalysses-bench run (one model + layout, one or
# more sequence lengths), printing its table rows. Extra arguments go to every run (e.g. --steps 3 --profile prof/).
#   scripts/bench_gpu.sh one-gpu     # 1 GPU: Llama-3.2-1B @ 8K per backend/core; 8B geometry (16 layers) TE bf16 vs FP8
#   scripts/bench_gpu.sh scaling     # 1 and 2 GPUs: weak scaling of the 8B geometry (8 layers) with Ulysses
#   scripts/bench_gpu.sh four-gpu    # 4 GPUs: Llama-3-8B sp4 at 32K and 128K; the longest sequence with the savers
#   scripts/bench_gpu.sh peer        # 1 GPU: issue 23's rows against HF transformers + Liger (scripts/bench_peer_hf.py)
# TE rows need transformer_engine, 'flash' rows flash-attn-4 (../shared/DEVICE.md says how to stage both).
set -uo pipefail
suite=${1:?usage: scripts/bench_gpu.sh one-gpu|scaling|four-gpu [megalysses-bench args]}
shift
bench() {  # bench NPROC ARGS...: one megalysses-bench run on NPROC GPUs
  local n=$1
  shift
  echo "+ torchrun --nproc-per-node $n -m megalysses.bench --config gpu-bench $*"
  torchrun --standalone --nproc-per-node "$n" -m megalysses.bench --config gpu-bench "$@" \
    || echo "(that run failed: exit $?)"
}
one_b="model=llama-3.2-1b train.global_batch_size=8 train.micro_batch_size=1 --seq-lens 8192"
stack="model=llama-3-8b model.num_layers=8 train.global_batch_size=4 train.micro_batch_size=1"
deep="model=llama-3-8b model.num_layers=16 train.global_batch_size=4 train.micro_batch_size=1"
case $suite in
  one-gpu)
    bench 1 $one_b model.attention_core=sdpa "$@"
    bench 1 $one_b model.attention_core=flash "$@"
    bench 1 $one_b model.attention_core=flash memory.fused_loss=true "$@"
    bench 1 $one_b model.backend=te model.attention_core=te "$@"
    bench 1 $one_b model.backend=te model.attention_core=flash "$@"
    bench 1 $one_b model.backend=te model.attention_core=flash train.fp8=delayed "$@"
    bench 1 $deep model.backend=te model.attention_core=flash --seq-lens 8192 "$@"
    bench 1 $deep model.backend=te model.attention_core=flash train.fp8=delayed --seq-lens 8192 "$@"
    ;;
  scaling)
    long="model.max_seq_len=131072 train.global_batch_size=1 memory.loss_tiles=4"
    bench 1 $stack $long model.attention_core=flash layout=single --seq-lens 32768 "$@"
    bench 2 $stack $long model.attention_core=flash layout=sp2 layout.zero=1 --seq-lens 65536 "$@"
    ;;
  four-gpu)
    full="model=llama-3-8b model.max_seq_len=4194304 model.attention_core=flash layout=sp4 layout.zero=3"
    bench 4 $full train.global_batch_size=4 memory.loss_tiles=8 --seq-lens 32768 "$@"
    bench 4 $full memory.recompute=around_core memory.mlp_tiles=4 memory.loss_tiles=8 --seq-lens 131072 "$@"
    # the longest sequences: everything recomputed, block inputs in host memory; one step at 1M tokens is about
    # 9e17 model FLOPs (~11 minutes on 4 H200s at the 512K row's rate), so it runs once, without warm-up
    savers="memory.recompute=full memory.offload_activations=true memory.mlp_tiles=16 memory.loss_tiles=32"
    bench 4 $full $savers --seq-lens 262144,524288 --steps 1 --warmup 1 "$@"
    bench 4 $full $savers --seq-lens 1048576 --steps 1 --warmup 0 "$@"
    ;;
  peer)
    peer() {  # peer ARGS...: one bench_peer_hf.py run (megalysses row and HF + Liger row in one process)
      echo "+ python3 scripts/bench_peer_hf.py --config gpu-bench --liger $*"
      python3 scripts/bench_peer_hf.py --config gpu-bench --liger "$@" || echo "(that run failed: exit $?)"
    }
    long="memory.recompute=full memory.offload_activations=true memory.mlp_tiles=8 memory.loss_tiles=16"
    peer model=llama-3.2-1b train.global_batch_size=8 train.micro_batch_size=1 --seq-len 8192 "$@"
    peer $deep --seq-len 8192 "$@"
    peer model=llama-3.2-1b train.global_batch_size=2 train.micro_batch_size=1 memory.loss_tiles=4 --seq-len 32768 "$@"
    peer model=llama-3.2-1b train.global_batch_size=1 $long --seq-len 131072 --hf-checkpointing --steps 2 --warmup 1 "$@"
    peer model=llama-3.2-1b model.max_seq_len=262144 train.global_batch_size=1 $long --seq-len 262144 \
      --hf-checkpointing --steps 1 --warmup 1 "$@"
    ;;
  *) echo "unknown suite $suite: one-gpu, scaling, four-gpu or peer" >&2; exit 2 ;;
esac
