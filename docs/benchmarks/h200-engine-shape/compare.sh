#!/usr/bin/env bash
# Before/after the engine restructure, on one GPU: switch-base-128 at batch 1, greedy, gpu-only / on-demand /
# pregated (the guess on, as by default at one row), each tree in turn. The tree before is the package and
# scripts of commit f6c74fc, exported into .bench_before (git archive f6c74fc pregated_jax scripts pyproject.toml,
# without pregated_jax/assets); the tree after is this checkout. Results under $OUT/{before,after}-N.
#   bash docs/benchmarks/h200-engine-shape/compare.sh ROUNDS
set -uo pipefail
cd "$(dirname "$0")/../../.."
out="${OUT:-/tmp/compare}"; rounds="${1:-1}"
export PYTHONUNBUFFERED=1 CUDA_MODULE_LOADING=EAGER PREGATED_JAX_CACHE=/tmp/pgjc NCCL_NVLS_ENABLE=0
nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.sm --format=csv,noheader > "$out/machine.txt"
common=(--repeats 3 --presets switch-base-128 --modes gpu-only on-demand pregated --batches 1 --beams 1 --timeout 300)
for ((r = 1; r <= rounds; r++)); do
  (cd .bench_before && PYTHONPATH=$PWD python3 scripts/benchmark.py "${common[@]}" --peer-modes --out "$out/before-$r") \
    > "$out/before-$r.log" 2>&1
  echo "before-$r rc=$? $(date +%T)"
  PYTHONPATH=$PWD python3 scripts/benchmark.py "${common[@]}" --peer_modes --out "$out/after-$r" > "$out/after-$r.log" 2>&1
  echo "after-$r rc=$? $(date +%T)"
done
