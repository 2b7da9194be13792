"""Loading with `experts_on="host"`: expert stacks go straight from the files into host memory (pinned host memory
on the CPU backend, which has it beside its "device" memory), and the engine takes them there without a copy
through the device; outputs equal the default load's."""

import gc

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from pregated_jax import quant as Q
from pregated_jax.config import get_preset
from pregated_jax.convert import to_pregated
from pregated_jax.engine import InferenceEngine
from pregated_jax.engine import placement
from pregated_jax.hf_checkpoint import from_pretrained, save_pretrained
from pregated_jax.loading import load_model
from pregated_jax.model import SwitchTransformer, host_memory_kind, is_expert_param
from pregated_jax.quant_store import save_quantized

IDS = np.asarray(jax.random.randint(jax.random.key(1), (2, 7), 2, 128))
MASK = np.array([[1] * 7, [1] * 4 + [0] * 3])


def _checkpoint(tmp_path_factory, routing):
    cfg = get_preset("tiny", routing=routing, num_experts=8, expert_capacity=6)
    model = SwitchTransformer(cfg, rngs=nnx.Rngs(0))
    out = tmp_path_factory.mktemp(routing)
    save_pretrained(model, out / "hf")
    save_quantized(model, out / "int8", "int8")
    return out


@pytest.fixture(scope="module")
def pregated_dir(tmp_path_factory):
    return _checkpoint(tmp_path_factory, "pregated")


@pytest.fixture(scope="module")
def conventional_dir(tmp_path_factory):
    return _checkpoint(tmp_path_factory, "conventional")


def _params(model):
    return {p: v.get_value() for p, v in nnx.to_flat_state(nnx.state(model, nnx.Param))}


def _experts(model):
    return {p: v for p, v in _params(model).items() if is_expert_param(p)}


def _stack_shapes(model):
    return {tuple(a.shape) for v in _experts(model).values() for a in jax.tree.leaves(v)}


def _moe_blocks(model):
    return sum(len(model.config.sparse_blocks(stack)) for stack in ("encoder", "decoder"))


def _device_arrays(kind):
    return [a for a in jax.live_arrays() if a.sharding.memory_kind == kind]


def test_cpu_backend_has_a_host_memory_beside_the_device():
    device = jax.devices()[0]
    assert host_memory_kind(device) == "pinned_host" != device.default_memory().kind


@pytest.mark.parametrize("what", ["hf", "int8"])
def test_host_load_puts_no_expert_stack_in_device_memory(pregated_dir, what, monkeypatch):
    gc.collect()
    default = jax.devices()[0].default_memory().kind
    before = _device_arrays(default)  # kept alive, so that no new array reuses an id
    placed = []  # every array jnp.asarray or jax.device_put makes during the load (transients too)
    for module, name in ((jnp, "asarray"), (jax, "device_put")):
        real = getattr(module, name)

        def spy(*args, _real=real, **kwargs):
            out = _real(*args, **kwargs)
            placed.extend(a for a in jax.tree.leaves(out) if isinstance(a, jax.Array))
            return out

        monkeypatch.setattr(module, name, spy)
    model = load_model(pregated_dir / what, experts_on="host")
    monkeypatch.undo()
    experts = _experts(model)
    assert len(experts) == 2 * _moe_blocks(model)  # wi and wo of each
    for path, value in experts.items():
        assert isinstance(value, Q.QuantizedExperts) == (what == "int8")
        for leaf in jax.tree.leaves(value):
            assert leaf.sharding.memory_kind == "pinned_host", path
    for path, value in _params(model).items():
        if not is_expert_param(path):
            assert value.sharding.memory_kind == default, path
    # what the load left in device memory: the other params and RNG state, no expert stack
    new = [a for a in _device_arrays(default) if id(a) not in {id(b) for b in before}]
    shapes = _stack_shapes(model)
    assert new and not [a.shape for a in new if tuple(a.shape) in shapes]
    assert placed and not [a.shape for a in placed if tuple(a.shape) in shapes and a.sharding.memory_kind == default]
    want = sum(a.nbytes for p, v in _params(model).items() if not is_expert_param(p) for a in jax.tree.leaves(v))
    assert want <= sum(a.nbytes for a in new) < want + 4096  # + the RNG keys and counts
    with pytest.raises(ValueError, match="experts_on must be one of device, host, got 'gpu'"):
        load_model(pregated_dir / what, experts_on="gpu")


@pytest.mark.parametrize("dtype, expert_dtype, what", [
    ("float32", "bfloat16", "hf"),    # stacks already in the engine's format: kept as loaded
    pytest.param("bfloat16", "bfloat16", "hf", marks=pytest.mark.slow),  # read as bfloat16 stacks: kept
    pytest.param("float32", "int8", "hf", marks=pytest.mark.slow),  # quantized a few experts at a time
    pytest.param("float32", "int8", "int8", marks=pytest.mark.slow),  # a quantized store: kept as loaded
])
def test_engine_takes_host_stacks_as_they_are_and_generates_the_default_loads_tokens(
        pregated_dir, monkeypatch, dtype, expert_dtype, what):
    ref_model = load_model(pregated_dir / what, dtype=dtype)
    ref = InferenceEngine(ref_model, mode="pregated", expert_dtype=expert_dtype)
    with jax.transfer_guard("disallow"):
        want = ref.generate(IDS, MASK, max_new_tokens=5).tokens

    model = load_model(pregated_dir / what, dtype=dtype, experts_on="host")
    calls = []  # (the stack given is numpy, the stack returned is the one given)
    real = placement.as_format

    def as_format(w, *args):
        out = real(w, *args)
        calls.append((all(isinstance(a, np.ndarray) for a in jax.tree.leaves(w)), out is w))
        return out

    monkeypatch.setattr(placement, "as_format", as_format)
    engine = InferenceEngine(model, mode="pregated", expert_dtype=expert_dtype)
    monkeypatch.undo()
    # host stacks are read in the compute dtype (`model.loaded_param_dtype`): kept when unquantized
    kept = expert_dtype == "bfloat16" or what == "int8"
    # a host stack is converted from numpy, or kept as it is: no jax operation runs on it
    assert all(numpy or same for numpy, same in calls)
    assert sum(numpy for numpy, _ in calls) == (0 if kept else 2 * _moe_blocks(model))
    host = engine.mem.on_host
    for sp, stack in ((engine.program.encoder, model.encoder), (engine.program.decoder, model.decoder)):
        for i in sp.moe_blocks:
            b = sp.blocks[i]
            for got, loaded in ((b.host_wi, stack.blocks[i].experts.wi[...]),
                                (b.host_wo, stack.blocks[i].experts.wo[...])):
                assert all(a.sharding == host for a in jax.tree.leaves(got))
                same = all(x is y for x, y in zip(jax.tree.leaves(got), jax.tree.leaves(loaded)))
                assert same == kept
    with jax.transfer_guard("disallow"):
        got = engine.generate(IDS, MASK, max_new_tokens=5).tokens
    np.testing.assert_array_equal(got, want)


@pytest.mark.slow
def test_gpu_only_moves_host_stacks_to_the_device(pregated_dir):
    model = load_model(pregated_dir / "hf", dtype="bfloat16", experts_on="host")
    engine = InferenceEngine(model, mode="gpu-only")
    b = engine.program.decoder.blocks[engine.program.decoder.moe_blocks[0]]
    assert b.host_wi.sharding.memory_kind == jax.devices()[0].default_memory().kind
    ref = InferenceEngine(load_model(pregated_dir / "hf", dtype="bfloat16"), mode="gpu-only")
    with jax.transfer_guard("disallow"):
        np.testing.assert_array_equal(engine.generate(IDS, MASK, max_new_tokens=5).tokens,
                                      ref.generate(IDS, MASK, max_new_tokens=5).tokens)


def test_conventional_checkpoint_loaded_pregated_keeps_its_experts_on_the_host(conventional_dir):
    host = load_model(conventional_dir / "hf", experts_on="host")
    converted = to_pregated(host)  # a copy, still in host memory
    direct = from_pretrained(conventional_dir / "hf", routing="pregated", experts_on="host")
    reference = to_pregated(load_model(conventional_dir / "hf"))
    want = _params(reference)
    for model in (converted, direct):
        got = _params(model)
        assert got.keys() == want.keys()
        for path, value in got.items():
            kind = "pinned_host" if is_expert_param(path) else "device"
            assert value.sharding.memory_kind == kind, path
            np.testing.assert_array_equal(np.asarray(value), np.asarray(want[path]), err_msg=str(path))
    for path, value in _experts(converted).items():  # to_pregated copies
        assert value is not _experts(host)[path]


def test_host_stacks_are_read_in_the_compute_dtype(pregated_dir):
    """experts_on="host": a Hugging Face checkpoint's expert stacks are read straight into the compute dtype
    (bfloat16 stacks take half of float32's host bytes) with the values of the float32 load rounded; on the
    device every param stays a float32 master weight."""
    ref = _experts(load_model(pregated_dir / "hf", dtype="bfloat16"))
    for path, value in ref.items():
        assert value.dtype == jnp.float32, path
    for dtype in ("float32", "bfloat16"):
        host = _experts(load_model(pregated_dir / "hf", dtype=dtype, experts_on="host"))
        assert host.keys() == ref.keys()
        for path, value in host.items():
            assert value.dtype == jnp.dtype(dtype) and value.sharding.memory_kind == "pinned_host", path
            np.testing.assert_array_equal(np.asarray(value), np.asarray(ref[path]).astype(jnp.dtype(dtype)))
