"""The mesh (`pj.make_mesh`, `--mesh` parsing, the training config's mesh section) and the expert-parallel MoE
layer against the single-device model.

The 8-device checks run in a subprocess of this file with 8 fake CPU devices
(`--xla_force_host_platform_device_count=8`), so the rest of the suite keeps one default device. Each
subprocess compiles once per mesh shape and reports max abs differences as JSON; the tests assert on them.
On the CPU the layer moves tokens with the dense all-to-all (XLA:CPU lacks ragged-all-to-all); the ragged
path is traced and lowered here (forward and gradient) and run by tests/test_gpu.py on several GPUs.
"""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from fake_devices import fake_device_env

MESH_SHAPES = [(1, 8), (2, 4), (8, 1)]  # (data, expert)
TOL = 1e-5
NUM_DEVICES = 8


# --- 8-device worker (runs in the subprocess) ------------------------------------------------------

def _max_diff(a, b) -> float:
    """Max abs difference over two pytrees' leaves (on the host: they may live on different devices)."""
    return max(float(np.max(np.abs(np.asarray(x) - np.asarray(y)))) for x, y in
               zip(jax.tree.leaves(a), jax.tree.leaves(b)))


def _layer_checks() -> dict:
    """The layer alone: random tokens, router and experts (16 experts: 2 per device on (1, 8)), dropless
    and with capacity drops; forward and gradients of x, router, wi, wo; the ragged path lowered."""
    from pregated_jax.expert_parallel import ExpertParallel, default_collective
    from pregated_jax.mesh import make_mesh
    from pregated_jax.moe import apply_experts
    from pregated_jax.routing import decide

    e, d, ff = 16, 12, 20
    k = jax.random.split(jax.random.key(0), 4)
    x = jax.random.normal(k[0], (4, 7, d))  # [B, S, d]: 28 tokens, padded to 32 over 8 devices
    router = jax.random.normal(k[1], (d, e))  # [d, E]
    wi = jax.random.normal(k[2], (e, d, ff)) * 0.3  # [E, d, ff]
    wo = jax.random.normal(k[3], (e, ff, d)) * 0.3  # [E, ff, d]
    out = {"layer": {}}

    def run(layer, capacity):
        def f(x, router, wi, wo):
            decision = decide(jnp.einsum("bsd,de->bse", x, router), capacity)
            y = layer(x, decision, wi, wo, jnp.float32)  # [B, S, d]
            return jnp.sum(jnp.sin(y)), y
        return jax.jit(jax.value_and_grad(f, argnums=(0, 1, 2, 3), has_aux=True))

    for capacity in (None, 1):
        (_, ref), ref_grads = run(apply_experts, capacity)(x, router, wi, wo)
        for shape in MESH_SHAPES if capacity is None else [(2, 4)]:
            layer = ExpertParallel(make_mesh(*shape), "dense")
            (_, y), grads = run(layer, capacity)(x, router, wi, wo)
            out["layer"][f"{shape}-{capacity}"] = {"forward": _max_diff(y, ref), "grad": _max_diff(grads, ref_grads)}
    ragged = ExpertParallel(make_mesh(2, 4), "ragged")
    text = run(ragged, None).lower(x, router, wi, wo).as_text()
    out["ragged_lowered"] = "ragged-all-to-all" in text or "ragged_all_to_all" in text
    out["auto_on_cpu"] = default_collective(make_mesh(2, 4)) == "dense"
    return out


def _model_checks() -> dict:
    """The whole model (tiny, 8 experts) on each mesh shape against the single-device model on the same
    global batch: logits, router losses, decisions, training loss and its gradients; a training-mode step
    (dropout in the experts) runs."""
    from pregated_jax.config import get_preset
    from pregated_jax.expert_parallel import batch_sharding, shard_model
    from pregated_jax.mesh import make_mesh
    from pregated_jax.model import SwitchTransformer, router_loss

    rng = np.random.default_rng(0)
    b, s, t = 8, 10, 6
    batch = {"input_ids": rng.integers(2, 128, (b, s)), "decoder_input_ids": rng.integers(2, 128, (b, t)),
             "labels": rng.integers(2, 128, (b, t)),
             "attention_mask": (np.arange(s)[None] < rng.integers(3, s + 1, (b, 1))).astype(np.int32),
             "decoder_attention_mask": (np.arange(t)[None] < rng.integers(2, t + 1, (b, 1))).astype(np.int32)}
    batch = {k: jnp.asarray(v, jnp.int32) for k, v in batch.items()}  # each [B, S] or [B, T]
    out = {}
    for routing, capacity, shapes in (("pregated", None, MESH_SHAPES), ("conventional", 3, [(2, 4)])):
        # 2 + 2 blocks, all MoE: in each stack the first block's pre-gate drives the second block's dispatch
        cfg = get_preset("tiny", routing=routing, num_experts=8, expert_capacity=capacity, num_layers=2,
                         num_decoder_layers=2, num_sparse_encoder_layers=2, num_sparse_decoder_layers=2)

        @nnx.jit
        def measure(model, batch):
            """-> ((training loss, (logits [B, T, V], ModelAux)), gradients of every param)."""
            def loss(model):
                logits, aux = model(batch["input_ids"], batch["decoder_input_ids"], batch["attention_mask"],
                                    batch["decoder_attention_mask"], return_aux=True)  # [B, T, V]
                mask = batch["decoder_attention_mask"].astype(jnp.float32)  # [B, T]
                ce = optax.softmax_cross_entropy_with_integer_labels(logits, batch["labels"])  # [B, T]
                return jnp.sum(ce * mask) / jnp.sum(mask) + router_loss(cfg, aux), (logits, aux)
            return nnx.value_and_grad(loss, has_aux=True)(model)

        ref = SwitchTransformer(cfg, rngs=nnx.Rngs(1))
        ref.eval()
        (ref_loss, (ref_logits, ref_aux)), ref_grads = measure(ref, batch)
        ref_decisions = ref_aux.encoder_decisions + ref_aux.decoder_decisions
        for shape in shapes:
            mesh = make_mesh(*shape)
            model = shard_model(nnx.merge(*nnx.split(ref)), mesh)
            sharded = jax.device_put(batch, batch_sharding(mesh))
            (loss, (logits, aux)), grads = measure(model, sharded)
            decisions = aux.encoder_decisions + aux.decoder_decisions
            wi = model.encoder.blocks[0].experts.wi.get_value()
            losses = ("encoder_z_loss", "encoder_aux_loss", "decoder_z_loss", "decoder_aux_loss")
            out[f"{routing}-{shape}"] = {
                "logits": _max_diff(logits, ref_logits),
                "router_losses": {n: _max_diff(getattr(aux, n), getattr(ref_aux, n)) for n in losses},
                "same_experts": all(bool(jnp.array_equal(a.expert_index, r.expert_index))
                                    for a, r in zip(decisions, ref_decisions)),
                "dropped": int(sum(int((~r.keep).sum()) for r in ref_decisions)),
                "loss": _max_diff(loss, ref_loss),
                "grad": _max_diff(grads, ref_grads),
                "grad_scale": _max_diff(ref_grads, jax.tree.map(jnp.zeros_like, ref_grads)),
                "expert_shard": list(wi.addressable_shards[0].data.shape),
            }
            if routing == "conventional":  # training mode: dropout 0.1 inside the experts, router jitter
                model.train()
                (loss, _), grads = measure(model, sharded)
                out["train_finite"] = bool(jnp.isfinite(loss)) and all(
                    bool(jnp.isfinite(g).all()) for g in jax.tree.leaves(grads))
    return out


def _train_checks(workdir: str) -> dict:
    """`train_and_evaluate` on the (2, 4) mesh, resumed for a third step on (1, 8), against one device: per-step
    losses, gradient norms, and the params after steps 2 and 3 of Adafactor (read back from the run's
    checkpoints); where the optimizer state lives. Then the step-2 checkpoints cross over: the (2, 4) run's
    resumes on one device and the one-device run's on (1, 8) (restored params, third step, params after it);
    and the (2, 4) run's loads with `load_model` into the single-device engine (greedy tokens)."""
    import shutil

    import pregated_jax as pj
    from pregated_jax.engine import EngineConfig, InferenceEngine
    from pregated_jax.expert_parallel import shard_model
    from pregated_jax.loading import load_model
    from pregated_jax.mesh import MeshConfig
    from pregated_jax.model import SwitchTransformer
    from pregated_jax.train import load_params, restore_model
    from pregated_jax.train.config import ModelConfig, TrainConfig, TrainingConfig
    from pregated_jax.train.loop import init_opt_state, train_and_evaluate
    from pregated_jax.train.optim import make_optimizer

    rng = np.random.default_rng(0)
    b, s, t = 8, 10, 6

    def batch():
        return {"input_ids": rng.integers(2, 128, (b, s)), "decoder_input_ids": rng.integers(2, 128, (b, t)),
                "labels": rng.integers(2, 128, (b, t)), "attention_mask": np.ones((b, s), np.int32),
                "decoder_attention_mask": (np.arange(t)[None] < rng.integers(2, t + 1, (b, 1))).astype(np.int32)}
    batches = [batch(), batch(), batch()]
    # dropout 0: the experts' dropout masks are drawn per device on a mesh; router jitter stays on
    config = TrainConfig(model=ModelConfig("tiny", {"num_experts": 8, "dropout_rate": 0.0, "routing": "pregated"}),
                         training=TrainingConfig(batch_size=b, num_steps=2, checkpoint_every=2, log_every=1,
                                                 tensorboard=False))
    runs = {}
    # 2 steps, then a third resumed from the step-2 checkpoint: the (2, 4) run resumes on (1, 8)
    for name, first, then in (("one", MeshConfig(), MeshConfig()), ("mesh", MeshConfig(2, 4), MeshConfig(1, 8))):
        steps, params = [], []
        for mesh, num_steps in ((first, 2), (then, 3)):
            run = config.replace(mesh=mesh, training=dataclasses.replace(config.training, num_steps=num_steps))
            train_and_evaluate(run, f"{workdir}/{name}", batches,
                               step_callback=lambda step, m: steps.append((m["train/loss"], m["train/grad_norm"])))
            params.append(load_params(f"{workdir}/{name}"))
        runs[name] = steps, params
    (one_steps, one_params), (mesh_steps, mesh_params) = runs["one"], runs["mesh"]
    mesh = MeshConfig(2, 4).make()  # the optimizer state's layout, as train_and_evaluate builds it
    model = shard_model(SwitchTransformer(config.model_config(), rngs=nnx.Rngs(0)), mesh)
    params = nnx.to_pure_dict(nnx.state(model, nnx.Param))
    opt_state = init_opt_state(make_optimizer(config.optimizer, 2)[0], params, mesh)
    expert_moments = [leaf for path, leaf in jax.tree_util.tree_leaves_with_path(opt_state)
                      if "experts" in jax.tree_util.keystr(path) and leaf.ndim >= 2]

    def resume_on(source: str, mesh: MeshConfig) -> dict:
        """`source`'s step-2 checkpoint, copied to a fresh workdir and resumed on `mesh`: the restored params
        against the saved ones (and the expert stacks' rows per device), then the third step against one
        device's."""
        name = f"{source}_on_{mesh.data}x{mesh.expert}"
        shutil.copytree(f"{workdir}/{source}/checkpoints/2", f"{workdir}/{name}/checkpoints/2")
        saved, seen, steps = runs[source][1][0], {}, []

        def restored(model, step):  # the restored train state, as an eval-mode model on `mesh`
            seen["restored"] = _max_diff(nnx.to_pure_dict(nnx.state(model, nnx.Param)), saved)
            seen["expert_rows"] = model.encoder.blocks[1].experts.wi.get_value().addressable_shards[0].data.shape[0]
            return {}
        for num_steps, hook in ((2, restored), (3, None)):  # 2: nothing to train, only the restore
            run = config.replace(mesh=mesh, training=dataclasses.replace(config.training, num_steps=num_steps))
            train_and_evaluate(run, f"{workdir}/{name}", batches, eval_fn=hook,
                               step_callback=lambda step, m: steps.append(m["train/loss"]))
        return {**seen, "next_loss": abs(steps[0] - one_steps[2][0]),
                "params": _max_diff(load_params(f"{workdir}/{name}"), one_params[1])}

    crossed = {"(2, 4) -> (1, 1)": resume_on("mesh", MeshConfig()),
               "(1, 1) -> (1, 8)": resume_on("one", MeshConfig(1, 8))}
    # the (2, 4) run's step 2 in the single-device engine against generate on one device's step 2
    ids = jnp.asarray(batches[0]["input_ids"][:3], jnp.int32)  # [3, S]
    engine = InferenceEngine(load_model(f"{workdir}/mesh/checkpoints/2"), EngineConfig(mode="pregated"))
    tokens = engine.generate(ids, max_new_tokens=5).tokens  # [3, <=5]
    reference = pj.generate(restore_model(f"{workdir}/one/checkpoints/2"), ids, max_new_tokens=5)  # [3, <=5]
    return {"train": {
        "crossed": crossed,
        "engine_tokens": np.asarray(tokens).tolist(), "reference_tokens": np.asarray(reference).tolist(),
        "engine_ids": np.asarray(ids).tolist(), "workdir": workdir,
        "losses": [abs(a[0] - c[0]) for a, c in zip(one_steps, mesh_steps)],
        "grad_norms": [abs(a[1] - c[1]) for a, c in zip(one_steps, mesh_steps)],
        "steps": len(mesh_steps),
        "params": _max_diff(mesh_params, one_params),
        "trained": _max_diff(one_params[0], nnx.to_pure_dict(nnx.state(
            SwitchTransformer(config.model_config(), rngs=nnx.Rngs(0)), nnx.Param))),
        "expert_moment_shards": sorted({leaf.addressable_shards[0].data.shape[0] for leaf in expert_moments}),
        "expert_moments": len(expert_moments),
    }}


def _mesh_checks() -> dict:
    from pregated_jax.mesh import make_mesh

    return {"shapes": {spec: list(make_mesh(*map(int, spec.split(","))).devices.shape)
                       for spec in ("-1,1", "1,-1", "2,-1", "-1,4", "1,1", "2,2")}}


def _run_worker(*args: str) -> dict:
    env = fake_device_env(NUM_DEVICES)
    proc = subprocess.run([sys.executable, __file__, *args], env=env, capture_output=True, text=True, timeout=900)
    part = args[0]
    assert proc.returncode == 0, f"worker {part} failed:\n{proc.stderr[-6000:]}"
    return json.loads(proc.stdout.strip().splitlines()[-1])


# --- one device, in this process ---------------------------------------------------------------------

def test_parse_mesh_and_config():
    from pregated_jax.mesh import MeshConfig, parse_mesh

    assert parse_mesh("data=2,expert=4") == MeshConfig(2, 4)
    assert parse_mesh("expert=-1") == MeshConfig(1, -1)
    assert parse_mesh(" data = 8 ") == MeshConfig(8, 1)
    assert parse_mesh("") == parse_mesh(None) == MeshConfig()
    for bad, match in (("model=2", "NAME=SIZE"), ("data=2,data=4", "twice"), ("data=x", "integer"),
                       ("data=0", "positive"), ("data=-1,expert=-1", "at most one")):
        with pytest.raises(ValueError, match=match):
            parse_mesh(bad)


def test_train_config_mesh_section(tmp_path):
    from pregated_jax.mesh import MeshConfig
    from pregated_jax.train.config import TrainConfig, apply_override, config_from_gin

    cfg = apply_override(TrainConfig(), "mesh.expert", "4")
    assert cfg.mesh == MeshConfig(1, 4)
    assert TrainConfig.from_dict(json.loads(json.dumps(cfg.to_dict()))) == cfg
    legacy = TrainConfig().to_dict()
    del legacy["mesh"]  # a config.json written before the mesh section
    assert TrainConfig.from_dict(legacy).mesh == MeshConfig()
    gin_file = tmp_path / "mesh.gin"
    gin_file.write_text("MeshConfig.data = 2\nMeshConfig.expert = -1\n")
    assert config_from_gin([gin_file])[0].mesh == MeshConfig(2, -1)


def test_one_device_mesh_keeps_the_single_device_path():
    """A one-device mesh moves arrays only: no expert-parallel dispatch, bit-identical outputs."""
    import pregated_jax as pj
    from pregated_jax.expert_parallel import shard_model
    from pregated_jax.moe import Experts

    mesh = pj.make_mesh()
    assert mesh.devices.shape == (1, 1) and mesh.axis_names == ("data", "expert")
    with pytest.raises(ValueError, match="needs 2 devices"):
        pj.make_mesh(data=2)
    cfg = pj.get_preset("tiny", routing="pregated")
    model = pj.SwitchTransformer(cfg, rngs=nnx.Rngs(0))
    model.eval()
    ids = jnp.asarray(np.random.default_rng(0).integers(2, 128, (2, 5)))
    ref = model(ids, ids)
    placed = shard_model(model, mesh)
    assert all(m.expert_parallel is None for _, m in placed.iter_modules() if isinstance(m, Experts))
    np.testing.assert_array_equal(placed(ids, ids), ref)


# --- 8 fake devices, in a subprocess -------------------------------------------------------------------

@pytest.fixture(scope="module")
def layer_results():
    return _run_worker("layer")


@pytest.fixture(scope="module")
def model_results(tmp_path_factory):
    return _run_worker("model", str(tmp_path_factory.mktemp("ep_train")))


@pytest.mark.slow
def test_make_mesh_shapes_on_8_devices(layer_results):
    assert layer_results["shapes"] == {"-1,1": [8, 1], "1,-1": [1, 8], "2,-1": [2, 4], "-1,4": [2, 4],
                                       "1,1": [1, 1], "2,2": [2, 2]}


@pytest.mark.slow
@pytest.mark.parametrize("case", [f"{s}-None" for s in MESH_SHAPES] + ["(2, 4)-1"])  # (data, expert)-capacity
def test_layer_matches_single_device(layer_results, case):
    r = layer_results["layer"][case]
    assert r["forward"] <= TOL and r["grad"] <= TOL, r


@pytest.mark.slow
def test_training_on_the_mesh_matches_one_device(model_results):
    """`train_and_evaluate` with `mesh` (2, 4), then resumed from its checkpoint on (1, 8): the same per-step
    losses and gradient norms as one device, the same params after steps 2 and 3 (Adafactor did move them),
    the expert moments split on E."""
    r = model_results["train"]
    assert r["steps"] == 3, r
    assert max(r["losses"]) <= TOL and max(r["grad_norms"]) <= TOL and r["params"] <= TOL, r
    assert r["trained"] > 1e-3, r
    assert r["expert_moments"] > 0 and r["expert_moment_shards"] == [8 // 4], r


@pytest.mark.slow
@pytest.mark.parametrize("case,expert_rows", [("(2, 4) -> (1, 1)", 8), ("(1, 1) -> (1, 8)", 8 // 8)])
def test_training_checkpoint_restores_on_another_mesh(model_results, case, expert_rows):
    """A step-2 checkpoint resumed on another mesh shape (8 devices -> 1, 1 -> 8): the params restore exactly,
    split as the new mesh splits them, and the third step's loss and params are one device's."""
    r = model_results["train"]["crossed"][case]
    assert r["restored"] == 0 and r["expert_rows"] == expert_rows, r
    assert r["next_loss"] <= TOL and r["params"] <= TOL, r


@pytest.mark.slow
def test_training_checkpoint_of_the_mesh_runs_in_the_single_device_engine(model_results):
    """The (2, 4) run's checkpoint, read by `load_model`, generates in the inference engine (mode pregated)
    the greedy tokens of `generate` with the one-device run's params: in the 8-device worker, and here, in a
    process with one device (where Orbax alone refuses the 8-device topology)."""
    from pregated_jax.engine import EngineConfig, InferenceEngine
    from pregated_jax.loading import load_model

    r = model_results["train"]
    assert r["engine_tokens"] == r["reference_tokens"], r
    assert len(r["engine_tokens"]) == 3 and len(r["engine_tokens"][0]) > 0, r
    assert len(jax.devices()) == 1
    engine = InferenceEngine(load_model(f"{r['workdir']}/mesh/checkpoints/2"), EngineConfig(mode="pregated"))
    tokens = engine.generate(np.asarray(r["engine_ids"]), max_new_tokens=5).tokens  # [3, <=5]
    assert np.asarray(tokens).tolist() == r["reference_tokens"]


def test_train_script_takes_the_mesh(tmp_path):
    import importlib.util
    from pathlib import Path

    from pregated_jax.mesh import MeshConfig

    spec = importlib.util.spec_from_file_location("train_script", Path(__file__).parents[1] / "scripts" / "train.py")
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    tiny = str(Path(__file__).parents[1] / "configs" / "tiny.py")
    config, _, _ = script.parse_args(["--config", tiny, "--workdir", str(tmp_path), "--mesh", "data=2,expert=-1"])
    assert config.mesh == MeshConfig(2, -1)
    config, _, _ = script.parse_args(["--config", tiny, "--workdir", str(tmp_path), "--config.mesh.expert=4"])
    assert config.mesh == MeshConfig(1, 4)
    with pytest.raises(SystemExit, match="NAME=SIZE"):
        script.main(["--config", tiny, "--workdir", str(tmp_path), "--mesh", "experts=4"])


@pytest.mark.slow
def test_dropout_in_training_mode_runs_on_the_mesh(model_results):
    assert model_results["train_finite"]


@pytest.mark.slow
def test_ragged_path_lowers_and_auto_picks_dense_on_cpu(layer_results):
    assert layer_results["ragged_lowered"]
    assert layer_results["auto_on_cpu"]


@pytest.mark.slow
@pytest.mark.parametrize("case", [f"pregated-{s}" for s in MESH_SHAPES] + ["conventional-(2, 4)"])
def test_model_matches_single_device(model_results, case):
    r = model_results[case]
    assert r["same_experts"], r
    assert r["logits"] <= TOL and r["loss"] <= TOL, r
    assert max(r["router_losses"].values()) <= TOL, r
    assert r["grad"] <= TOL, r
    assert r["expert_shard"][0] == 8 // eval(case.split("-")[1])[1], r  # E / expert experts per device
    if case.startswith("conventional"):
        assert r["dropped"] > 0, "capacity 3 must drop tokens here"


# --- several GPUs: the ragged collective ----------------------------------------------------------------

def _gpu_meshes():
    """(data, expert) shapes over the GPUs here: all on expert, and data 2 when they split evenly."""
    n = len(jax.devices())
    return [(1, n)] + ([(2, n // 2)] if n >= 4 and n % 2 == 0 else [])


@pytest.mark.gpu
def test_ragged_all_to_all_matches_single_device_on_gpus():
    """On 2 or more GPUs, `auto` picks `jax.lax.ragged_all_to_all`; the layer (forward, gradients) and the
    whole model (logits, loss, gradients) equal the single-device ones, and the dense path's result."""
    from pregated_jax.config import get_preset
    from pregated_jax.expert_parallel import ExpertParallel, batch_sharding, default_collective, shard_model
    from pregated_jax.mesh import make_mesh
    from pregated_jax.model import SwitchTransformer, router_loss
    from pregated_jax.moe import apply_experts
    from pregated_jax.routing import decide

    if len(jax.devices()) < 2 or jax.devices()[0].platform != "gpu":
        pytest.skip(f"needs 2 or more GPUs, found {len(jax.devices())} {jax.devices()[0].platform} device(s)")
    n = len(jax.devices())
    e, d, ff = 2 * n, 16, 24
    k = jax.random.split(jax.random.key(0), 4)
    x = jax.random.normal(k[0], (n, 9, d))  # [B, S, d]
    router = jax.random.normal(k[1], (d, e))  # [d, E]
    wi = jax.random.normal(k[2], (e, d, ff)) * 0.3  # [E, d, ff]
    wo = jax.random.normal(k[3], (e, ff, d)) * 0.3  # [E, ff, d]

    def run(layer):
        def f(x, router, wi, wo):
            y = layer(x, decide(jnp.einsum("bsd,de->bse", x, router), None), wi, wo, jnp.float32)  # [B, S, d]
            return jnp.sum(jnp.sin(y)), y
        return jax.jit(jax.value_and_grad(f, argnums=(0, 1, 2, 3), has_aux=True))(x, router, wi, wo)

    (_, ref), ref_grads = run(apply_experts)
    for shape in _gpu_meshes():
        mesh = make_mesh(*shape)
        assert default_collective(mesh) == "ragged"
        (_, y), grads = run(ExpertParallel(mesh, "ragged"))
        (_, y_dense), _ = run(ExpertParallel(mesh, "dense"))
        assert _max_diff(y, ref) <= TOL and _max_diff(grads, ref_grads) <= TOL, shape
        assert _max_diff(y, y_dense) <= TOL, shape

    cfg = get_preset("tiny", routing="pregated", num_experts=2 * n, expert_capacity=None)
    rng = np.random.default_rng(0)
    ids = jnp.asarray(rng.integers(2, 128, (2 * n, 10)), jnp.int32)  # [B, S]
    labels = jnp.asarray(rng.integers(2, 128, (2 * n, 6)), jnp.int32)  # [B, T]

    @nnx.jit
    def measure(model, ids, labels):
        def loss(model):
            logits, aux = model(ids, labels, return_aux=True)  # [B, T, V]
            ce = optax.softmax_cross_entropy_with_integer_labels(logits, labels)  # [B, T]
            return jnp.mean(ce) + router_loss(cfg, aux), logits
        return nnx.value_and_grad(loss, has_aux=True)(model)

    ref_model = SwitchTransformer(cfg, rngs=nnx.Rngs(0))
    ref_model.eval()
    (ref_loss, ref_logits), ref_grads = measure(ref_model, ids, labels)
    for shape in _gpu_meshes():
        mesh = make_mesh(*shape)
        model = shard_model(nnx.merge(*nnx.split(ref_model)), mesh)  # collective "auto": ragged here
        sharded = jax.device_put((ids, labels), batch_sharding(mesh))
        (loss, logits), grads = measure(model, *sharded)
        assert _max_diff(logits, ref_logits) <= TOL and _max_diff(loss, ref_loss) <= TOL, shape
        assert _max_diff(grads, ref_grads) <= TOL, shape


if __name__ == "__main__":  # the 8-device worker: python tests/test_expert_parallel.py layer|model
    jax.config.update("jax_default_matmul_precision", "highest")
    assert len(jax.devices()) == NUM_DEVICES, jax.devices()
    part = sys.argv[1]
    if part == "layer":
        result = {**_layer_checks(), **_mesh_checks()}
    else:
        result = {**_model_checks(), **_train_checks(sys.argv[2])}
    print(json.dumps(result))
