"""The gpu-only decode's expert computation, three ways, at the decoder's real shapes (one jitted call per step
over every decoder MoE block, each block its own weights, so nothing is served from L2).

    python docs/benchmarks/h100-v12/moe-decode/moe_paths.py OUT_JSON

- gathered: each token's expert weights gathered and multiplied densely (what `apply_experts` ran when
  tokens <= experts / 2 before h100-v12);
- ragged-all: one grouped matmul over all E experts (`apply_experts` with the identity slot table);
- unique-slots: the distinct experts of the step gathered into T slots, then one grouped matmul over the slots
  (what `apply_experts` runs for tokens <= experts / 2 since h100-v12).
Rows: T tokens (batch x beams) routed to U distinct experts (U = T: all differ; U < T: beams share experts).
"""
import json
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[4]))
import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from pregated_jax.config import get_preset  # noqa: E402
from pregated_jax.moe import apply_experts  # noqa: E402
from pregated_jax.routing import RouterDecision  # noqa: E402


def decision(index):  # index [T] -> RouterDecision over [T, 1]
    t = index.shape[0]
    return RouterDecision(expert_index=index[:, None], combine_weight=jnp.full((t, 1), 0.5, jnp.float32),
                          keep=jnp.ones((t, 1), bool), logits=jnp.zeros((t, 1, 1), jnp.float32))


def gathered(x, index, wi, wo):  # x [T, 1, d], index [T]
    h = jax.nn.relu(jnp.einsum("td,tdf->tf", x[:, 0], wi[index]))  # [T, ff]
    return (jnp.einsum("tf,tfd->td", h, wo[index]) * 0.5)[:, None]


def ragged_all(x, index, wi, wo):
    return apply_experts(x, decision(index), wi, wo, jnp.bfloat16, None, jnp.arange(wi.shape[0], dtype=jnp.int32))


def unique_slots(x, index, wi, wo):
    return apply_experts(x, decision(index), wi, wo, jnp.bfloat16, None)  # T <= E / 2 here


def main(out):
    rows = []
    for preset in ("switch-base-128", "switch-large-128"):
        cfg = get_preset(preset)
        blocks = cfg.num_layers // 2  # decoder MoE blocks (every other FFN)
        e, d, ff = cfg.num_experts, cfg.d_model, cfg.d_ff
        key = jax.random.PRNGKey(0)
        wis = [jax.random.normal(jax.random.fold_in(key, 2 * n), (e, d, ff), jnp.bfloat16) * 0.02 for n in range(blocks)]
        wos = [jax.random.normal(jax.random.fold_in(key, 2 * n + 1), (e, ff, d), jnp.bfloat16) * 0.02
               for n in range(blocks)]
        expert_bytes = 2 * d * ff * 2
        for name, fn in (("gathered", gathered), ("ragged-all", ragged_all), ("unique-slots", unique_slots)):
            step = jax.jit(lambda x, idx, wis, wos, fn=fn: sum(fn(x, idx[n], wis[n], wos[n]) for n in range(blocks)))
            for t, u in ((1, 1), (8, 8), (8, 2), (32, 32), (32, 8)):
                rng = np.random.default_rng(t * 100 + u)
                idx = jnp.asarray(np.stack([rng.choice(rng.choice(e, u, replace=False), t) for _ in range(blocks)]),
                                  jnp.int32)  # [blocks, T]
                x = jax.random.normal(key, (t, 1, d), jnp.bfloat16)
                ref = jax.jit(lambda x, idx, wis, wos: sum(gathered(x, idx[n], wis[n], wos[n]) for n in range(blocks)))
                np.testing.assert_allclose(np.asarray(step(x, idx, wis, wos), np.float32),
                                           np.asarray(ref(x, idx, wis, wos), np.float32), rtol=0.05, atol=0.05)
                times = []
                for _ in range(30):
                    t0 = time.perf_counter()
                    jax.block_until_ready(step(x, idx, wis, wos))
                    times.append(time.perf_counter() - t0)
                ms = statistics.median(times[5:]) * 1e3
                distinct = sum(len(set(np.asarray(i).tolist())) for i in idx)
                row = dict(preset=preset, path=name, tokens=t, distinct_experts=u, blocks=blocks, step_ms=ms,
                           ideal_ms=distinct * expert_bytes / 3.35e12 * 1e3)
                print(json.dumps(row), flush=True)
                rows.append(row)
        del wis, wos
    Path(out).write_text(json.dumps(dict(device=str(jax.devices()[0].device_kind), jax=jax.__version__, rows=rows),
                                    indent=1))


if __name__ == "__main__":
    main(sys.argv[1])
