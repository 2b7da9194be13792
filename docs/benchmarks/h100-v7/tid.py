"""Which thread runs the dones: prints the Python thread's native id; PREGATED_JAX_DMA_TRACE=1 prints the done's."""
import os, sys, threading
import numpy as np
sys.path.insert(0, os.getcwd())
from pregated_jax.bench.random_model import random_model
from pregated_jax.config import get_preset
from pregated_jax.engine import InferenceEngine
cfg = get_preset("switch-base-8", routing="pregated", dtype="bfloat16")
eng = InferenceEngine(random_model(cfg, experts_on_host=True), mode="pregated", check_every=10**9, copy_method="auto")
ids = np.random.default_rng(0).integers(2, 500, (1, 32)).astype(np.int32)
eng.generate(ids, max_new_tokens=3)
print("PYTHON_MAIN_TID", threading.get_native_id(), file=sys.stderr, flush=True)
eng.generate(ids, max_new_tokens=3)
print("END", file=sys.stderr, flush=True)
