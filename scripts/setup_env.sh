#!/usr/bin/env bash
# Creates .venv (once) and installs pregated-jax with pinned dependencies. Usage: scripts/setup_env.sh [main|test]
set -euo pipefail
cd "$(dirname "$0")/.."
what="${1:-main}"
py="${PYTHON:-python3}"
if [ ! -x .venv/bin/python ]; then
  echo "[setup] creating .venv with $($py --version)"
  "$py" -m venv .venv
  .venv/bin/python -m pip install -q --upgrade pip
fi
reqs=requirements.txt
[ "$what" = test ] && reqs=requirements-test.txt
stamp=".venv/.installed-$what-$(cat requirements*.txt pyproject.toml | md5sum | cut -c1-12)"
if [ ! -f "$stamp" ]; then
  echo "[setup] installing $reqs (first run takes a few minutes)"
  .venv/bin/python -m pip install -q -r "$reqs"
  .venv/bin/python -m pip install -q --no-deps -e .
  touch "$stamp"
fi
# The native expert-copy library (copy-engine transfers; see pregated_jax/native). Built once per source and
# jaxlib version into ~/.cache/pregated_jax; without a C++ compiler the engine falls back to XLA's copies.
.venv/bin/python -m pregated_jax.native || echo "[setup] native expert copies unavailable: the engine will use XLA's copies"
