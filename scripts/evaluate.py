"""`python scripts/evaluate.py` from a source checkout: the same as `python -m pregated_jax.evaluate` (the code is in
pregated_jax/cli/evaluate.py)."""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run from a source checkout

from pregated_jax.cli.evaluate import *  # noqa: E402,F401,F403  (its functions, for callers that load this file)
from pregated_jax.cli.evaluate import main  # noqa: E402

if __name__ == "__main__":
    main()
