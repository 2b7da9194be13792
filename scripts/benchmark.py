"""`python scripts/benchmark.py` from a source checkout: the same as `python -m pregated_jax.benchmark` (the code is in
pregated_jax/cli/benchmark.py)."""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run from a source checkout

from pregated_jax.cli.benchmark import *  # noqa: E402,F401,F403  (its functions, for callers that load this file)
from pregated_jax.cli.benchmark import main  # noqa: E402

if __name__ == "__main__":
    main()
