#!/usr/bin/env bash
# GPU tests: the native copy-engine copies (CUDA handlers), every engine mode and the device expert cache, on
# a CUDA GPU. Runs tests/test_gpu.py, tests/test_native.py, tests/test_engine.py and tests/test_engine_quant.py
# (quantized experts through every mode and copy path) in full, and every test
# marked `gpu` in the other modules under tests/ (on a CPU those are skipped; see tests/conftest.py).
#
#   bash scripts/test_gpu.sh [pytest args...]      # on the GPU machine; e.g. -x, or -k "dma and not beam"
#
# Needs: a CUDA GPU visible to JAX; python3 (or $PYTHON) with jax[cuda12], flax, optax, orbax-checkpoint,
# numpy and pytest (optional packages such as gin-config or rouge-score are not needed); g++ (or $CXX) for
# the native library. It creates no venv and installs nothing (the machine may have no network): the
# repository goes on PYTHONPATH. A missing package is named and the run stops; a module of the gpu sweep
# that needs an optional package that is not installed is named and left out.
# Writes "${OUT:-.}/gpu-tests.log" (machine, versions, the library, the shards' summaries, then their logs)
# and gpu-tests.shard<i>.log per shard, which are there even if the run is killed. Exit status 0: all passed.
# GPU_TEST_JOBS (default 12): pytest processes sharing the GPU, each running every n-th test. The cost is
# compiling the tiny models, which runs on the CPU cores side by side (12 shards on 16 cores: 449 s in all). GPU_TEST_TIMEOUT_S (default 540): a shard that runs longer is stopped.
set -uo pipefail
cd "$(dirname "$0")/.."
PY="${PYTHON:-python3}"
out="${OUT:-.}"
mkdir -p "$out"
log="$out/gpu-tests.log"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
export CUDA_MODULE_LOADING=EAGER            # lazy loading can stall a kernel behind the done's spinning one
export XLA_PYTHON_CLIENT_PREALLOCATE=false  # several pytest processes share the GPU
jobs="${GPU_TEST_JOBS:-12}"
timeout_s="${GPU_TEST_TIMEOUT_S:-540}"
core=(tests/test_gpu.py tests/test_native.py tests/test_engine.py tests/test_engine_quant.py)

fail() { echo "[test_gpu] FAILED: $*"; exit 2; }

# Prints the names of missing packages the GPU tests need, and exits 1 if there are any.
check_packages() {
  "$PY" - <<'PYEOF'
import importlib, importlib.util, sys
need = {"jax": "jax[cuda12]", "jaxlib": "jaxlib", "flax": "flax", "optax": "optax",
        "orbax.checkpoint": "orbax-checkpoint", "numpy": "numpy", "ml_dtypes": "ml_dtypes", "pytest": "pytest"}
missing = []
for module, package in need.items():
    try:
        importlib.import_module(module)
    except ImportError as e:
        missing.append(f"{package} (import {module}: {e})")
if not missing:
    try:
        import pregated_jax  # noqa: F401  (and what it imports: tqdm, ...)
    except ModuleNotFoundError as e:
        missing.append(f"{e.name} (imported by pregated_jax)")
for m in missing:
    print(f"[test_gpu] missing: {m}")
optional = [m for m in ("gin", "rouge_score", "sentencepiece", "tensorboard", "torch", "transformers")
            if importlib.util.find_spec(m) is None]
if optional:
    print(f"[test_gpu] not installed (other test modules use them): {', '.join(optional)}")
sys.exit(1 if missing else 0)
PYEOF
}

# Prints the versions and devices; exits 1 unless JAX's first device is a GPU.
describe_jax() {
  "$PY" - <<'PYEOF'
import platform, sys
import flax, jax, jaxlib, numpy, pytest
import pregated_jax
print(f"[test_gpu] python {platform.python_version()}, jax {jax.__version__}, jaxlib {jaxlib.__version__}, "
      f"flax {flax.__version__}, numpy {numpy.__version__}, pytest {pytest.__version__}")
print(f"[test_gpu] pregated_jax from {pregated_jax.__file__}")
print(f"[test_gpu] devices: {jax.devices()}")
sys.exit(0 if jax.devices()[0].platform == "gpu" else 1)
PYEOF
}

# Prints the test modules under tests/ other than the core ones that import here; names on stderr those
# left out because a third-party package is missing (any other import error is left to pytest to report).
sweep_modules() {
  "$PY" - "${core[@]}" <<'PYEOF'
import glob, importlib, os, sys
sys.path.insert(0, "tests")
core = set(sys.argv[1:])
local = {os.path.basename(p)[:-3] for p in glob.glob("tests/*.py")}
for path in sorted(glob.glob("tests/test_*.py")):
    if path in core:
        continue
    try:
        importlib.import_module(os.path.basename(path)[:-3])
    except ModuleNotFoundError as e:
        top = (e.name or "").split(".")[0]
        if top and top != "pregated_jax" and top not in local:
            print(f"[test_gpu] left out of the gpu sweep: {path} needs {e.name}, not installed", file=sys.stderr)
            continue
    except Exception:
        pass
    print("MODULE " + path)
PYEOF
}

main() {
  echo "[test_gpu] $(date -u '+%Y-%m-%d %H:%M:%S UTC') on $(hostname), $(nproc) CPU cores"
  # the tree under test (a copy sent to a GPU machine may carry no or a stale .git: set TEST_COMMIT there)
  echo "[test_gpu] commit ${TEST_COMMIT:-$(git rev-parse --short HEAD 2>/dev/null || echo unknown)}"
  if command -v nvidia-smi >/dev/null; then
    nvidia-smi -L
    nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader
  else
    echo "[test_gpu] (no nvidia-smi)"
  fi
  check_packages || fail "missing Python packages (named above); install them from wheels: pip install --no-deps x.whl"
  describe_jax || fail "JAX sees no CUDA GPU here (jax[cuda12] installed? CUDA_VISIBLE_DEVICES?)"

  echo "[test_gpu] python -m pregated_jax.native"
  local native
  native="$("$PY" -m pregated_jax.native 2>&1)" || { echo "$native"; fail "the native library does not build or load"; }
  echo "$native"
  grep -q "CUDA handlers: yes" <<<"$native" || fail "the native library registered no CUDA handlers"

  local -a sweep=() ids=() pids=() shard=()
  local listed line collected more rc
  listed="$(sweep_modules)"
  while IFS= read -r line; do
    [[ "$line" == "MODULE "* ]] && sweep+=("${line#MODULE }")
  done <<<"$listed"

  collected="$("$PY" -m pytest -p no:cacheprovider --collect-only -q "$@" "${core[@]}")" || {
    echo "$collected"; fail "collecting ${core[*]}"; }
  if [ "${#sweep[@]}" -gt 0 ]; then
    more="$("$PY" -m pytest -p no:cacheprovider --collect-only -q -m gpu "$@" "${sweep[@]}")"; rc=$?
    # 5: no test there is marked gpu
    [ "$rc" -eq 0 ] || [ "$rc" -eq 5 ] || { echo "$more"; fail "collecting the gpu tests of ${sweep[*]}"; }
    collected+=$'\n'"$more"
  fi
  while IFS= read -r line; do
    [[ "$line" == *::* ]] && ids+=("$line")
  done <<<"$collected"
  [ "${#ids[@]}" -gt 0 ] || fail "no tests collected"
  echo "[test_gpu] ${#ids[@]} tests in $jobs shards: ${core[*]}, and -m gpu over ${#sweep[@]} other modules"

  local start i j entry status=0
  start=$(date +%s)
  for ((i = 0; i < jobs; i++)); do
    shard=()
    for ((j = i; j < ${#ids[@]}; j += jobs)); do shard+=("${ids[j]}"); done
    [ "${#shard[@]}" -gt 0 ] || continue
    timeout "$timeout_s" "$PY" -m pytest -p no:cacheprovider -v -ra "$@" "${shard[@]}" \
      > "$out/gpu-tests.shard$i.log" 2>&1 &
    pids+=("$i:$!")
  done
  for entry in "${pids[@]}"; do
    i="${entry%%:*}"
    wait "${entry#*:}"; rc=$?
    [ "$rc" -eq 0 ] || status=1
    [ "$rc" -ne 124 ] || echo "[test_gpu] shard $i timed out after $timeout_s s"
    echo "[test_gpu] shard $i (exit $rc): $(tail -n 1 "$out/gpu-tests.shard$i.log")"
  done
  for entry in "${pids[@]}"; do
    i="${entry%%:*}"
    printf '\n=================== shard %s ===================\n' "$i"
    cat "$out/gpu-tests.shard$i.log"
  done
  printf '\n[test_gpu] %s in %s s\n' "$([ "$status" -eq 0 ] && echo PASSED || echo FAILED)" "$(( $(date +%s) - start ))"
  return "$status"
}

main "$@" 2>&1 | tee "$log"
exit "${PIPESTATUS[0]}"
