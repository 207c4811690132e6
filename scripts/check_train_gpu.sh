#!/usr/bin/env bash
# The training entry point on 2 GPUs (NCCL) under several layouts, from the GPU smoke config; prints each run's
# first and last loss, throughput and peak memory. The single-GPU run is the reference the others should track.
#   bash scripts/check_train_gpu.sh [OUT_DIR]
set -uo pipefail
out=${1:-runs/check-train-gpu}
mkdir -p "$out"
common=(--config scripts/configs/runs/gpu-smoke.yaml train.steps=20 logging.interval=5 train.eval_every=0)
run() {  # name nproc overrides...
  local name=$1 nproc=$2; shift 2
  echo "== $name: $*"
  OMP_NUM_THREADS=4 torchrun --standalone --nproc-per-node "$nproc" -m megalysses.train "${common[@]}" \
    train.nproc="$nproc" logging.run_dir="$out/$name" "$@" > "$out/$name.log" 2>&1 || { tail -20 "$out/$name.log"; }
  python3 - "$out/$name" <<'PY'
import json, sys, pathlib
p = pathlib.Path(sys.argv[1]) / "metrics.jsonl"
rows = [json.loads(l) for l in p.read_text().splitlines()] if p.exists() else []
if rows:
    a, b = rows[0], rows[-1]
    print(f"   loss {a['loss']:.4f} (step {a['step']}) -> {b['loss']:.4f} (step {b['step']}), "
          f"{b['tokens_per_s']:,.0f} tok/s, {b['tflops_per_device']:.1f} TFLOP/s/GPU, peak {b['peak_mem_gib']:.2f} GiB")
else:
    print("   no metrics: the run failed")
PY
}
run single 1 layout=single
run tp2 2 layout=tp2
run tp2-seqpar-zero1 2 "layout={tp: 2, sequence_parallel: true, zero: 1}"
run sp2 2 layout=sp2
run dp2-fsdp 2 "layout={dp: 2, zero: 3}"
run pp2-1f1b 2 "layout={pp: 2}"
run sp2-flash 2 layout=sp2 model.attention_core=auto
run tp2-te-fp8 2 "layout={tp: 2, sequence_parallel: true}" model.backend=te model.attention_core=te train.fp8=delayed
