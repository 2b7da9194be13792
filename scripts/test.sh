#!/usr/bin/env bash
# Sets up .venv with the test dependencies and runs the whole test suite. Extra args go to pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup_env.sh test
exec .venv/bin/python -m pytest -n "${PYTEST_WORKERS:-2}" -q "$@"
