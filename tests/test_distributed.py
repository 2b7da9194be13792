"""Several processes through `jax.distributed` (pregated_jax.distributed) on the CPU: 2 processes x 4 fake CPU
devices, gloo collectives, a coordinator on a free localhost port.

Each process (this file run as a script) starts `jax.distributed` (process 0 from explicit arguments, process 1
from the JAX_* environment variables), builds the global (2, 4) mesh over all 8 devices, reads only its own rows
of a fixed global batch and makes global arrays from them, then runs the expert-parallel MoE layer (dense
all-to-all) forward and backward, and the tiny pre-gated model's loss and gradients on the mesh. It writes the
results (gathered to the host) to an .npz; the test compares both processes' files with the single-device
results computed here, within 1e-5.

In a second mode (`train`), both processes run `train_and_evaluate` on the (2, 4) mesh with one shared workdir:
3 steps, then a resume to 5; the test compares the primary's metrics.jsonl and the checkpoints (restored on one
device) with a single-device run on the same global batches.
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


def _train_batches(n: int = 5) -> list[dict]:
    """`n` fixed global batches [B, ...] (numpy, identical in every process)."""
    rng = np.random.default_rng(1)

    def batch():
        return {"input_ids": rng.integers(2, 128, (B, S)), "decoder_input_ids": rng.integers(2, 128, (B, T)),
                "labels": rng.integers(2, 128, (B, T)), "attention_mask": np.ones((B, S), np.int32),
                "decoder_attention_mask": (np.arange(T)[None] < rng.integers(2, T + 1, (B, 1))).astype(np.int32)}
    return [batch() for _ in range(n)]


TRAIN_STEPS = (3, 5)  # a run of 3 steps (checkpoint at 3), then resumed to 5 (checkpoint at 5)


def _train_config(num_steps: int, mesh: tuple[int, int] | None):
    """The tiny pre-gated model (8 experts, dropout off: deterministic losses) on `mesh` (None: one device)."""
    from pregated_jax.mesh import MeshConfig
    from pregated_jax.train.config import ModelConfig, TrainConfig, TrainingConfig

    return TrainConfig(model=ModelConfig("tiny", {"num_experts": E, "dropout_rate": 0.0, "routing": "pregated"}),
                       training=TrainingConfig(batch_size=B, max_input_len=S, max_target_len=T, num_steps=num_steps,
                                               checkpoint_every=3, log_every=1, eval_every=100, tensorboard=True),
                       mesh=MeshConfig() if mesh is None else MeshConfig(*mesh))


class _Batches:
    """Fixed global batches as a stateful iterator: the loop saves its position with each checkpoint (one file
    per process) and a resume sets it from there."""

    def __init__(self, batches: list[dict]):
        self.batches, self.next = batches, 0

    def __iter__(self):
        return self

    def __next__(self) -> dict:
        if self.next >= len(self.batches):
            raise StopIteration
        self.next += 1
        return self.batches[self.next - 1]

    def get_state(self) -> dict:
        return {"next": self.next}

    def set_state(self, state: dict) -> None:
        self.next = state["next"]


def _train(workdir: str, mesh: tuple[int, int] | None) -> list[list]:
    """`train_and_evaluate` for each of TRAIN_STEPS in `workdir`, each from a fresh iterator over the same
    batches (a resume continues at the saved position): [[step, loss], ...]."""
    from pregated_jax.train.loop import train_and_evaluate

    losses = []
    for num_steps in TRAIN_STEPS:
        final = train_and_evaluate(_train_config(num_steps, mesh), workdir, _Batches(_train_batches()),
                                   step_callback=lambda step, m: losses.append([step, m["train/loss"]]))
        assert final["step"] == num_steps, final
    return losses


def _train_worker(port: str, process_id: int, workdir: str, out: str) -> None:
    """One process of the 2-process training run: its losses (seen by every process) go to `out` (JSON)."""
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.config.update("jax_default_matmul_precision", "highest")
    from pregated_jax.distributed import initialize

    assert initialize(f"127.0.0.1:{port}", PROCESSES, process_id)
    Path(out).write_text(json.dumps({"process": process_id, "losses": _train(workdir, (2, 4))}))


def _run_processes(argv, env_of) -> list[tuple[str, str]]:
    """Runs this file as PROCESSES subprocesses (`argv(i)`, `env_of(i)`); their (stdout, stderr), after
    asserting each exited 0 within TIMEOUT_S."""
    procs = [subprocess.Popen([sys.executable, __file__, *argv(i)], env=env_of(i), stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True) for i in range(PROCESSES)]
    outputs = []
    try:
        for p in procs:
            outputs.append(p.communicate(timeout=TIMEOUT_S))
    except subprocess.TimeoutExpired:
        for p in procs:
            p.kill()
        errors = [err for _, err in outputs] + [p.communicate()[1] for p in procs[len(outputs):]]
        tails = "\n".join(f"process {i} stderr:\n{(err or '')[-4000:]}" for i, err in enumerate(errors))
        pytest.fail(f"the {PROCESSES} processes did not finish within {TIMEOUT_S} s\n{tails}")
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
    for i, (p, (out, err)) in enumerate(zip(procs, outputs)):
        assert p.returncode == 0, f"process {i} failed (rc {p.returncode}):\n{err[-6000:]}"
    return outputs


def _cpu_env() -> dict:
    """os.environ without JAX_* plus LOCAL_DEVICES fake CPU devices with patient collectives."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("JAX_")}
    env.update(JAX_PLATFORMS="cpu",
               XLA_FLAGS=f"--xla_force_host_platform_device_count={LOCAL_DEVICES} {PATIENT_COLLECTIVES}")
    return env


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
    port, env = _free_port(), _cpu_env()
    outputs = _run_processes(
        lambda i: [str(port), str(i), str(tmp_path / f"p{i}.npz")],
        lambda i: dict(env, **({} if i == 0 else {"JAX_COORDINATOR_ADDRESS": f"127.0.0.1:{port}",
                                                  "JAX_NUM_PROCESSES": str(PROCESSES), "JAX_PROCESS_ID": str(i)})))
    ref = _reference()
    for i in range(PROCESSES):
        got = dict(np.load(tmp_path / f"p{i}.npz"))
        assert sorted(got) == sorted(ref), (i, sorted(set(got) ^ set(ref)))
        diffs = {k: float(np.max(np.abs(got[k] - ref[k]))) for k in ref}
        print(f"process {i}: max diff {max(diffs.values()):.2e} over {len(diffs)} arrays;",
              json.loads(outputs[i][0].strip().splitlines()[-1]))
        assert max(diffs.values()) <= TOL, {k: v for k, v in diffs.items() if v > TOL}


@pytest.mark.slow
def test_two_processes_train_and_resume_like_one_device(tmp_path):
    """`train_and_evaluate` in 2 processes x 4 CPU devices, mesh (2, 4), one shared workdir, each process
    feeding its rows of the same global batches (a stateful iterator): 3 steps, then resumed to 5 (each
    process's iterator continues at its saved position). Both processes see the
    single-device run's losses (1e-5); the primary alone writes metrics.jsonl (one line per step) and the
    TensorBoard events (one file per run); the checkpoints at steps 3 and 5 restore on one device with the
    single-device run's params (1e-5)."""
    from pregated_jax.loading import load_model
    from pregated_jax.train import load_params
    from pregated_jax.train.checkpoints import flat_leaves

    port, env, workdir = _free_port(), _cpu_env(), tmp_path / "two"
    _run_processes(lambda i: ["train", str(port), str(i), str(workdir), str(tmp_path / f"p{i}.json")],
                   lambda i: env)
    ref = _train(str(tmp_path / "one"), None)
    assert [s for s, _ in ref] == [1, 2, 3, 4, 5], ref
    for i in range(PROCESSES):
        got = json.loads((tmp_path / f"p{i}.json").read_text())["losses"]
        assert [s for s, _ in got] == [s for s, _ in ref], (i, got)
        diff = max(abs(a - b) for (_, a), (_, b) in zip(got, ref))
        print(f"process {i}: losses {[round(l, 6) for _, l in got]}, max diff {diff:.2e} from one device")
        assert diff <= TOL, (i, got, ref)
    lines = [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in lines] == [1, 2, 3, 4, 5], lines  # the primary's lines only, none twice
    assert max(abs(m["train/loss"] - l) for m, (_, l) in zip(lines, ref)) <= TOL, (lines, ref)
    assert len(list((workdir / "tensorboard").glob("events.out.tfevents.*"))) == len(TRAIN_STEPS)
    assert json.loads((workdir / "config.json").read_text())["train_config"]["training"]["num_steps"] == 5
    for step in (3, 5):  # the iterator's position, one file per process
        files = sorted((workdir / "checkpoints" / str(step) / "data").glob("process_*.json"))
        assert [p.name for p in files] == [f"process_{i}-of-{PROCESSES}.json" for i in range(PROCESSES)], files
        assert all(json.loads(p.read_text()) == {"next": step} for p in files)

    def flat(params) -> dict:
        return {k: np.asarray(v) for k, v in flat_leaves(params)}
    for step in (3, 5):
        want = flat(load_params(tmp_path / "one" / "checkpoints" / str(step)))
        model = load_model(workdir / "checkpoints" / str(step))  # one device, from the 8-device checkpoint
        got = flat(nnx.to_pure_dict(nnx.state(model, nnx.Param)))
        assert sorted(got) == sorted(want), sorted(set(got) ^ set(want))
        diff = max(float(np.max(np.abs(got[k] - want[k]))) for k in want)
        print(f"step {step}: params max diff {diff:.2e} from one device over {len(want)} arrays")
        assert diff <= TOL


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


if __name__ == "__main__":  # one process of a 2-process run: python tests/test_distributed.py [train] PORT ID ...
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    import faulthandler
    faulthandler.dump_traceback_later(TIMEOUT_S - 30, exit=True)  # a hang shows where, in the test's failure
    if sys.argv[1] == "train":  # train PORT ID WORKDIR OUT.json
        _train_worker(sys.argv[2], int(sys.argv[3]), sys.argv[4], sys.argv[5])
    else:  # PORT ID OUT.npz
        _worker(sys.argv[1], int(sys.argv[2]), sys.argv[3])
