"""Several processes through `jax.distributed` (pregated_jax.distributed) on the CPU: 2 processes x 4 fake CPU
devices, gloo collectives, a coordinator on a free localhost port.

Each process (this file run as a script) starts `jax.distributed` (process 0 from explicit arguments, process 1
from the JAX_* environment variables), builds the global (2, 4) mesh over all 8 devices, reads only its own rows
of a fixed global batch and makes global arrays from them, then runs the expert-parallel MoE layer (dense
all-to-all) forward and backward, and the tiny pre-gated model's loss and gradients on the mesh. It writes the
results (gathered to the host) to an .npz; the test compares both processes' files with the single-device
results computed here, within 1e-5.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from fake_devices import PATIENT_COLLECTIVES

TOL = 1e-5
PROCESSES, LOCAL_DEVICES = 2, 4
TIMEOUT_S = 600
E, D, FF = 8, 12, 20
B, S, T = 8, 10, 6  # global batch: 4 rows per process, 1 per device


def _inputs():
    """The fixed global inputs (numpy, identical in every process)."""
    rng = np.random.default_rng(0)
    layer = {"x": rng.normal(size=(B, S, D)).astype(np.float32),  # [B, S, d]
             "router": rng.normal(size=(D, E)).astype(np.float32),  # [d, E]
             "wi": (rng.normal(size=(E, D, FF)) * 0.3).astype(np.float32),  # [E, d, ff]
             "wo": (rng.normal(size=(E, FF, D)) * 0.3).astype(np.float32)}  # [E, ff, d]
    batch = {"input_ids": rng.integers(2, 128, (B, S)), "decoder_input_ids": rng.integers(2, 128, (B, T)),
             "labels": rng.integers(2, 128, (B, T)),
             "attention_mask": (np.arange(S)[None] < rng.integers(3, S + 1, (B, 1))),
             "decoder_attention_mask": (np.arange(T)[None] < rng.integers(2, T + 1, (B, 1)))}
    return layer, {k: v.astype(np.int32) for k, v in batch.items()}  # each [B, S] or [B, T]


def _layer_fn(layer):
    from pregated_jax.routing import decide

    def f(x, router, wi, wo):
        y = layer(x, decide(jnp.einsum("bsd,de->bse", x, router), None), wi, wo, jnp.float32)  # [B, S, d]
        return jnp.sum(jnp.sin(y)), y
    return jax.jit(jax.value_and_grad(f, argnums=(0, 1, 2, 3), has_aux=True))


def _model_and_measure():
    from pregated_jax.config import get_preset
    from pregated_jax.model import SwitchTransformer, router_loss

    cfg = get_preset("tiny", routing="pregated", num_experts=E, expert_capacity=None)

    @nnx.jit
    def measure(model, batch):
        def loss(model):
            logits, aux = model(batch["input_ids"], batch["decoder_input_ids"], batch["attention_mask"],
                                batch["decoder_attention_mask"], return_aux=True)  # [B, T, V]
            mask = batch["decoder_attention_mask"].astype(jnp.float32)  # [B, T]
            ce = optax.softmax_cross_entropy_with_integer_labels(logits, batch["labels"])  # [B, T]
            return jnp.sum(ce * mask) / jnp.sum(mask) + router_loss(cfg, aux), logits
        (value, logits), grads = nnx.value_and_grad(loss, has_aux=True)(model)
        return value, logits, nnx.to_pure_dict(grads)

    model = SwitchTransformer(cfg, rngs=nnx.Rngs(0))
    model.eval()
    return model, measure


def _flat(prefix: str, tree) -> dict:
    return {prefix + jax.tree_util.keystr(p): np.asarray(v) for p, v in jax.tree_util.tree_leaves_with_path(tree)}


def _worker(port: str, process_id: int, out: str) -> None:
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.config.update("jax_default_matmul_precision", "highest")
    from jax.sharding import NamedSharding, PartitionSpec as P

    from pregated_jax.distributed import initialize, make_global_batch, process_batch_slice
    from pregated_jax.expert_parallel import ExpertParallel, batch_sharding, shard_model
    from pregated_jax.mesh import make_mesh

    if process_id == 0:  # explicit arguments (the train script's flags)
        assert initialize(f"127.0.0.1:{port}", PROCESSES, 0)
    else:  # the environment (JAX_COORDINATOR_ADDRESS, JAX_NUM_PROCESSES, JAX_PROCESS_ID)
        assert initialize()
    assert initialize()  # idempotent
    assert jax.process_count() == PROCESSES and jax.process_index() == process_id
    assert jax.local_device_count() == LOCAL_DEVICES and jax.device_count() == PROCESSES * LOCAL_DEVICES
    mesh = make_mesh(data=2, expert=4)
    rows = process_batch_slice(B, batch_sharding(mesh))
    assert rows == process_batch_slice(B) == slice(process_id * B // 2, (process_id + 1) * B // 2), rows
    layer_in, batch = _inputs()
    def gather(tree):  # global arrays -> numpy, whole in every process (one replicating jit for the tree)
        whole = jax.jit(lambda t: t, out_shardings=NamedSharding(mesh, P()))(tree)
        return jax.tree.map(lambda a: np.asarray(a.addressable_data(0)), whole)

    # the layer: x's rows from this process only; router and experts whole in every process (replicated)
    x = make_global_batch(layer_in["x"][rows], mesh, B)
    weights = [jax.make_array_from_process_local_data(NamedSharding(mesh, P()), layer_in[k])
               for k in ("router", "wi", "wo")]
    (_, y), grads = _layer_fn(ExpertParallel(mesh, "dense"))(x, *weights)
    result = {"layer/y": gather(y), **_flat("layer/grad", gather(grads))}

    # the tiny model on the mesh: its own rows of the batch in each process
    model, measure = _model_and_measure()
    model = shard_model(model, mesh, "dense")
    loss, logits, model_grads = measure(model, make_global_batch({k: v[rows] for k, v in batch.items()}, mesh, B))
    result.update({"model/loss": gather(loss), "model/logits": gather(logits), **_flat("model/grad", gather(model_grads))})
    np.savez(out, **result)
    print(json.dumps({"process": process_id, "devices": [d.id for d in mesh.devices.flat], "rows": [rows.start, rows.stop]}))


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _reference() -> dict:
    """The single-device results, in this process."""
    from pregated_jax.moe import apply_experts

    layer_in, batch = _inputs()
    with jax.default_matmul_precision("highest"):
        (_, y), grads = _layer_fn(apply_experts)(*(jnp.asarray(layer_in[k]) for k in ("x", "router", "wi", "wo")))
        model, measure = _model_and_measure()
        loss, logits, model_grads = measure(model, {k: jnp.asarray(v) for k, v in batch.items()})
    return {"layer/y": np.asarray(y), **_flat("layer/grad", grads), "model/loss": np.asarray(loss),
            "model/logits": np.asarray(logits), **_flat("model/grad", model_grads)}


@pytest.mark.slow
def test_two_processes_match_one_device(tmp_path):
    """2 processes x 4 CPU devices, mesh (data=2, expert=4) across both, each feeding its half of the global
    batch: the expert-parallel layer's output and gradients, the model's loss, logits and gradients equal one
    device's within 1e-5, in both processes."""
    port = _free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("JAX_")}
    env.update(JAX_PLATFORMS="cpu",
               XLA_FLAGS=f"--xla_force_host_platform_device_count={LOCAL_DEVICES} {PATIENT_COLLECTIVES}")
    procs = []
    for i in range(PROCESSES):
        penv = dict(env, **({} if i == 0 else {"JAX_COORDINATOR_ADDRESS": f"127.0.0.1:{port}",
                                               "JAX_NUM_PROCESSES": str(PROCESSES), "JAX_PROCESS_ID": str(i)}))
        procs.append(subprocess.Popen([sys.executable, __file__, str(port), str(i), str(tmp_path / f"p{i}.npz")],
                                      env=penv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
    outputs = []
    try:
        for p in procs:
            outputs.append(p.communicate(timeout=TIMEOUT_S))
    except subprocess.TimeoutExpired:
        for p in procs:
            p.kill()
        pytest.fail(f"the {PROCESSES} processes did not finish within {TIMEOUT_S} s")
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
    for i, (p, (out, err)) in enumerate(zip(procs, outputs)):
        assert p.returncode == 0, f"process {i} failed (rc {p.returncode}):\n{err[-6000:]}"
    ref = _reference()
    for i in range(PROCESSES):
        got = dict(np.load(tmp_path / f"p{i}.npz"))
        assert sorted(got) == sorted(ref), (i, sorted(set(got) ^ set(ref)))
        diffs = {k: float(np.max(np.abs(got[k] - ref[k]))) for k in ref}
        print(f"process {i}: max diff {max(diffs.values()):.2e} over {len(diffs)} arrays;",
              json.loads(outputs[i][0].strip().splitlines()[-1]))
        assert max(diffs.values()) <= TOL, {k: v for k, v in diffs.items() if v > TOL}


def test_initialize_resolves_flags_then_environment():
    from pregated_jax.distributed import resolve

    env = {"JAX_COORDINATOR_ADDRESS": "10.0.0.1:1234", "JAX_NUM_PROCESSES": "4", "JAX_PROCESS_ID": "2"}
    assert resolve(environ={}) is None  # nothing: one process
    assert resolve(environ=env) == {"coordinator_address": "10.0.0.1:1234", "num_processes": 4, "process_id": 2,
                                    "local_device_ids": None}
    assert resolve("h:1", 2, 1, environ=env)["coordinator_address"] == "h:1"  # flags first
    assert resolve(process_id=3, environ=env)["process_id"] == 3
    for kwargs, environ, match in (({"coordinator_address": "h:1"}, {}, "missing --num_processes"),
                                   ({"num_processes": 2, "process_id": 0}, {}, "missing --coordinator_address"),
                                   ({}, {"JAX_PROCESS_ID": "1"}, "missing --coordinator_address"),
                                   ({"coordinator_address": "h:1", "num_processes": 2, "process_id": 2}, {}, r"\[0, 2\)"),
                                   ({}, dict(env, JAX_NUM_PROCESSES="x"), "integer")):
        with pytest.raises(ValueError, match=match):
            resolve(**kwargs, environ=environ)


def test_train_script_refuses_a_partial_specification(tmp_path, monkeypatch):
    from pregated_jax.cli.train import main

    for name in ("JAX_COORDINATOR_ADDRESS", "JAX_NUM_PROCESSES", "JAX_PROCESS_ID", "JAX_LOCAL_DEVICE_IDS"):
        monkeypatch.delenv(name, raising=False)
    tiny = str(Path(__file__).parents[1] / "configs" / "tiny.py")
    with pytest.raises(SystemExit, match="missing --num_processes"):
        main(["--config", tiny, "--workdir", str(tmp_path), "--coordinator_address", "127.0.0.1:1234"])


if __name__ == "__main__":  # one process of the 2-process run: python tests/test_distributed.py PORT ID OUT.npz
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    _worker(sys.argv[1], int(sys.argv[2]), sys.argv[3])
