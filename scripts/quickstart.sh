#!/usr/bin/env bash
# Sets up .venv (first run only) and runs the main job, scripts/infer.py, on the built-in default model. It
# compiles with a first, untimed run (--warmup), so the timings it prints are those of a warm engine.
# Extra arguments go to infer.py, e.g.: bash scripts/quickstart.sh --text "summarize: ..." --num_beams 4
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup_env.sh main
exec .venv/bin/python scripts/infer.py --warmup "$@"
