"""Training steps/s and tokens/s against the device mesh, expert placement off and on, per-device expert load.

  python scripts/mesh_benchmark.py --cpu_devices 8 --meshes 1x1 2x4 --preset tiny --num_experts 8 --skew 0.5
  python scripts/mesh_benchmark.py --devices 1 2 4 8 --preset switch-base-64 --dtype bfloat16 --per_device_batch 8

The logic and every flag are in pregated_jax/bench/mesh_train.py (`--help`); writes results.json and
results.md into --out.
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run from a source checkout

from pregated_jax.bench.mesh_train import main  # noqa: E402  (imports no JAX backend: --cpu_devices applies)

if __name__ == "__main__":
    sys.exit(main())
