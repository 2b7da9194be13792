"""On a CUDA GPU: the native copies (CUDA handlers), every engine mode and the device expert cache give the
tokens of gpu-only, and the custom calls copy the right rows from pinned host memory into device memory.

Every test here is marked `gpu`: tests/conftest.py skips them where JAX's default device is not a GPU, and
scripts/test_gpu.sh runs them (with tests/test_native.py and tests/test_engine.py) on the GPU machine.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax.sharding import SingleDeviceSharding

import pregated_jax as pj
from pregated_jax import native
from test_native import _fetch, reference

pytestmark = pytest.mark.gpu

E = 8  # experts per MoE block: decode steps route to a few of them, so copies, guesses and misses all happen
IDS = np.random.default_rng(1).integers(2, 128, (3, 9))
MASK = np.array([[1] * 9, [1] * 6 + [0] * 3, [1] * 4 + [0] * 5])
SHAPES = [(1, 1), (1, 2), (3, 1), (3, 2)]  # (batch, beams): greedy and 2-beam search at batch 1 and 3
NEW_TOKENS = 6
ROUTED_MODE = {"pregated": "pregated", "conventional": "speculative"}  # the mode that predicts, per routing


@pytest.fixture(scope="module")
def models():
    """A tiny pre-gated and a tiny conventional model in float32, built once for the module."""
    out = {}
    for routing in ROUTED_MODE:
        cfg = pj.get_preset("tiny", routing=routing, num_experts=E, expert_capacity=6, dtype="float32")
        out[routing] = pj.SwitchTransformer(cfg, rngs=nnx.Rngs(0))
    return out


def generate_all(engine) -> dict:
    """{(batch, beams): GenerationResult} over SHAPES, with no implicit host<->device transfer."""
    results = {}
    with jax.transfer_guard("disallow"):
        for batch, beams in SHAPES:
            results[batch, beams] = engine.generate(IDS[:batch], MASK[:batch], max_new_tokens=NEW_TOKENS,
                                                    num_beams=beams)
    return results


@pytest.fixture(scope="module")
def references(models):
    """{routing: {(batch, beams): tokens}} of gpu-only (every expert resident on the GPU)."""
    refs = {}
    for routing, model in models.items():
        # copy_method="dma" asked, but gpu-only copies nothing: it reports XLA's copies and none made
        results = generate_all(pj.InferenceEngine(model, mode="gpu-only", copy_method="dma"))
        for shape, res in results.items():
            assert (res.stats.copy_method, res.stats.experts_copied) == ("xla", 0), shape
        refs[routing] = {shape: res.tokens for shape, res in results.items()}
        # gpu-only's greedy tokens are the plain model's
        np.testing.assert_array_equal(refs[routing][3, 1], pj.generate(model, IDS, MASK, NEW_TOKENS))
    return refs


def test_native_library_builds_with_cuda_handlers(capsys):
    assert jax.devices()[0].platform == "gpu"
    assert native.available(), f"the native expert copies do not build or load here: {native.unavailable_reason()}"
    assert native.main([]) == 0
    assert "CUDA handlers: yes" in capsys.readouterr().out


def _cases():
    for routing, routed_mode in ROUTED_MODE.items():
        for mode in ("on-demand", "prefetch-all", routed_mode):
            for copy_method in ("dma", "xla"):
                if mode == "prefetch-all" and copy_method == "xla":
                    continue  # prefetch-all copies whole blocks with XLA's copies whatever was asked
                for cache in (None, "lru"):
                    if cache and mode == "prefetch-all":
                        continue  # whole blocks resident: no cache
                    yield pytest.param(routing, mode, copy_method, cache,
                                       id=f"{routing}-{mode}-{copy_method}-{cache or 'nocache'}")


@pytest.mark.parametrize("routing,mode,copy_method,cache", list(_cases()))
def test_every_mode_gives_gpu_only_tokens(models, references, routing, mode, copy_method, cache):
    kw = dict(cache_policy=cache, cache_experts=6) if cache else {}  # of 8; at least batch x beams
    if mode in ("pregated", "speculative") and not cache:
        kw["guess_first_block"] = True  # the guess's copies on the GPU too
    engine = pj.InferenceEngine(models[routing], mode=mode, copy_method=copy_method, **kw)
    results = generate_all(engine)
    want_method = "xla" if mode == "prefetch-all" else copy_method  # (whole blocks: XLA's copies)
    for shape, res in results.items():
        np.testing.assert_array_equal(res.tokens, references[routing][shape], err_msg=str(shape))
        assert res.stats.copy_method == want_method, shape
        assert res.stats.experts_copied > 0, shape
    stats = [res.stats for res in results.values()]
    if cache:  # the device cache both served experts and fetched missing ones
        assert sum(s.cache_hits for s in stats) > 0 and sum(s.cache_misses for s in stats) > 0
    if mode == "speculative" and not cache:  # predictions made; the mispredicted experts fetched after the gate
        needed, hits = (sum(getattr(s, f) or 0 for s in stats) for f in ("speculative_needed", "speculative_hits"))
        assert needed > hits >= 0, (needed, hits)
    if mode == "pregated" and not cache:  # the first decoder MoE block's experts were guessed, except where a
        # step routes half the experts or more (then it copies the routed ones after the gate)
        for (batch, beams), res in results.items():
            guessed = 2 * batch * beams < E
            assert (res.stats.speculative_needed is not None) == guessed, (batch, beams)


@pytest.mark.parametrize("routing,mode", [("pregated", "pregated"), ("conventional", "speculative")])
def test_staged_guess_gives_gpu_only_tokens(models, references, routing, mode):
    """The first-block guess staged across steps (`guess_staging`): its copies stay in flight over the step
    boundary in the native library's buffers; every batch and beam shape, one and many steps per dispatch."""
    for per_call in (1, 64):
        engine = pj.InferenceEngine(models[routing], mode=mode, copy_method="dma", guess_first_block=True,
                                    guess_staging=True, decode_steps_per_call=per_call)
        for shape, res in generate_all(engine).items():
            np.testing.assert_array_equal(res.tokens, references[routing][shape], err_msg=str((shape, per_call)))
            if 2 * shape[0] * shape[1] < E:  # the steps guessed
                assert res.stats.speculative_needed is not None, shape


@pytest.mark.parametrize("routing,mode,want", [
    pytest.param("pregated", "on-demand", "dma", id="on-demand"),
    pytest.param("pregated", "pregated", "dma", id="pregated"),
    pytest.param("conventional", "speculative", "dma, speculative misses: xla", id="speculative"),
])
def test_auto_copies_with_the_native_calls_on_the_gpu(models, references, routing, mode, want):
    engine = pj.InferenceEngine(models[routing], mode=mode)  # copy_method="auto"
    with jax.transfer_guard("disallow"):
        res = engine.generate(IDS, MASK, max_new_tokens=NEW_TOKENS)
    assert res.stats.copy_method == want
    np.testing.assert_array_equal(res.tokens, references[routing][3, 1])


# --- the custom calls themselves, with rows of realistic size ---------------------------------------------

@pytest.fixture(scope="module")
def big_stacks():
    """Two stacks [E, ...] in pinned host memory with rows of 64 KiB (bfloat16) and 96 KiB (float32)."""
    device = jax.devices()[0]
    on_host = SingleDeviceSharding(device, memory_kind="pinned_host")
    rng = np.random.default_rng(0)
    a = rng.standard_normal((E, 64, 512)).astype(jnp.bfloat16)
    b = rng.standard_normal((E, 96, 256)).astype(np.float32)
    host = (jax.device_put(a, on_host), jax.device_put(b, on_host))
    # the arrays are returned too: they must outlive every program that reads their addresses
    return host, tuple(native.HostStack.of(x) for x in host), (a, b)


def _assert_rows(tables, ids, stacks):
    device = jax.devices()[0]
    for got, want in zip(tables, stacks):
        assert got.sharding.memory_kind == "device" and got.devices() == {device}
        np.testing.assert_array_equal(np.asarray(got).astype(np.float32),
                                      reference(want, ids).astype(np.float32), err_msg=str(ids))


@pytest.mark.parametrize("ids", [
    [-1, 0, 1, 2, 5, -1, 7, -1],                    # empty slots at start, middle and end; a run 0-1-2
    [3, 3, 3, 4, 4, -1, -1, 2],                     # repeated consecutive ids, then a step back
    [7, 7, 6, 6, 5, 0, 1, 2, 3, 4, 5, 6, 7, -1, 0],  # k > E: repeats, a run over the stack, a wrap to 0
    [-1, -1, -1],                                   # nothing to copy (the done does not wait)
])
def test_custom_calls_copy_the_rows_into_device_memory(big_stacks, ids):
    _, host_stacks, stacks = big_stacks
    tables, token = _fetch(ids, host_stacks)
    _assert_rows(tables, ids, stacks)
    assert token.shape == () and token.dtype == jnp.int32
    native.check_device_wait()


def test_two_fetches_in_flight_in_one_program(big_stacks):
    """The engine's pattern: a second start queued behind the first (its token as `after`) before the first
    done, then both dones; each gets its own rows."""
    _, host_stacks, stacks = big_stacks

    @jax.jit
    def f(ids1, ids2):
        t1, tok1 = native.fetch_start(ids1, list(host_stacks))
        t2, tok2 = native.fetch_start(ids2, list(host_stacks), tok1)
        return native.fetch_done(t1, ids1, tok1, tok2), native.fetch_done(t2, ids2, tok2)

    ids1, ids2 = [5, 5, -1, 0, 1], [-1, 2, 2, 3, 7]
    got1, got2 = f(jnp.asarray(ids1, jnp.int32), jnp.asarray(ids2, jnp.int32))
    _assert_rows(got1, ids1, stacks)
    _assert_rows(got2, ids2, stacks)
    native.check_device_wait()


def test_many_dispatches_queued_without_waiting(big_stacks):
    """300 dispatches of one program (more requests than the worker's ring of 256 holds), queued before any
    result is read: every one gets its own rows."""
    _, host_stacks, stacks = big_stacks

    @jax.jit
    def f(ids):
        tables, token = native.fetch_start(ids, list(host_stacks))
        return native.fetch_done(tables, ids, token)

    rng = np.random.default_rng(1)
    id_lists = [rng.integers(-1, E, 6).tolist() for _ in range(300)]
    id_lists[7] = [-1] * 6  # a request with nothing to copy among them
    device_ids = [jax.device_put(np.asarray(ids, np.int32), jax.devices()[0]) for ids in id_lists]
    outs = [f(ids) for ids in device_ids]
    for ids, tables in zip(id_lists, outs):
        _assert_rows(tables, ids, stacks)
    native.check_device_wait()
