#!/usr/bin/env bash
# Usage: bash .gpu/sweep.sh PART   (runs in the background under setsid; progress in /root/results/PART.log)
# (Flags are spelled as scripts/benchmark.py spells them now; the runs themselves used the dashed spellings of their date.)
# Each line of the part's plan is "NAME ARGS..." for one benchmark invocation into /root/results/PART/NAME.
PART=$1
R=/root/results/$PART; mkdir -p $R
export PYTHONUNBUFFERED=1 PREGATED_JAX_CACHE=/root/pgjc
B="python3 scripts/benchmark.py --timeout 420"
case $PART in
  m1) PLAN="base8|--repeats 2 --presets switch-base-8
base64|--repeats 2 --presets switch-base-64
base256|--repeats 1 --presets switch-base-256 --modes gpu-only on-demand pregated speculative
base256-prefetch-all|--repeats 1 --presets switch-base-256 --modes prefetch-all --batches 1 --beams 1 --peer_modes
base128-prefetch-all|--repeats 1 --presets switch-base-128 --modes prefetch-all --batches 1 --beams 1 --peer_modes" ;;
  m2) PLAN="large128|--repeats 1 --presets switch-large-128 --modes gpu-only on-demand pregated speculative --device_budget_gib 8
large128-prefetch-all|--repeats 1 --presets switch-large-128 --modes prefetch-all --batches 1 --beams 1 --peer_modes" ;;
  smoke) PLAN="smoke|--repeats 1 --presets switch-base-8 --modes pregated --batches 1 --beams 1 --peer_modes" ;;
esac
{
  date; nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.sm --format=csv,noheader
  echo "$PLAN" | while IFS='|' read -r name args; do
    echo "=== $name: $B $args --out $R/$name  ($(date +%T))"
    $B $args --out $R/$name 2>&1 | grep -v "^|" | grep -v "^$"
    echo "=== $name done rc=${PIPESTATUS[0]} ($(date +%T))"
  done
  echo ALLDONE; date
} > /root/results/$PART.log 2>&1
