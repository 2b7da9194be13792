"""Host cost of calling a jitted function with the engine's program, on any machine (the CPU suffices).

    python docs/benchmarks/h100-decode-profile/dispatch_cost.py

switch-base-128's structure (24 blocks, 128 experts) at tiny widths, so that only the per-call host work
differs: passing the nested ModelProgram vs the same arrays as a flat list, and hashing a block's nnx
GraphDef (what jit does with a static argument on every call) vs a `Static` wrapper.
"""
import os
import sys
import time

import jax

sys.path.insert(0, os.getcwd())
from pregated_jax.bench.random_model import random_model  # noqa: E402
from pregated_jax.config import get_preset  # noqa: E402
from pregated_jax.engine.placement import ModelProgram  # noqa: E402


def per_call_ms(fn, *args, n=200):
    fn(*args)
    t = time.perf_counter()
    for _ in range(n):
        fn(*args)
    return 1e3 * (time.perf_counter() - t) / n


cfg = get_preset("switch-base-128", routing="pregated", dtype="float32", d_model=64, d_ff=64, d_kv=16,
                 num_heads=4, vocab_size=512)
program = ModelProgram.from_model(random_model(cfg))
leaves = jax.tree.leaves(program)
with_program = jax.jit(lambda p: p.shared.sum())
with_leaves = jax.jit(lambda ls: ls[0].sum())
graphdef = program.decoder.blocks[1].graphdef  # Static(nnx.GraphDef)
print(f"{len(leaves)} arrays in the program")
print(f"jit call, nested program: {per_call_ms(with_program, program):.3f} ms")
print(f"jit call, flat leaves:    {per_call_ms(with_leaves, leaves):.3f} ms")
print(f"hash(nnx.GraphDef):       {per_call_ms(hash, graphdef.value):.3f} ms")
print(f"hash(Static):             {per_call_ms(hash, graphdef):.4f} ms")
