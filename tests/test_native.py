"""The native expert-copy custom calls (CPU handlers; CUDA ones where a GPU runs the suite) and the "dma"
fetch, against numpy and the "xla" fetch."""

import ctypes
import os
import re
import types

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pregated_jax import native
from pregated_jax.engine import fetch as F
from pregated_jax.engine.placement import Memories
from hlo import custom_calls, start_tokens
from routing_examples import numbered_stacks, routed_decision

E = 8


@pytest.fixture(scope="module")
def stacks():
    """Two host stacks with different dtypes and row shapes, random contents (every row distinct)."""
    if not native.available():
        pytest.fail(f"native library unavailable: {native.unavailable_reason()}")
    mem = Memories.for_device()
    rng = np.random.default_rng(0)
    a = rng.standard_normal((E, 3, 4)).astype(jnp.bfloat16)
    b = rng.standard_normal((E, 4, 2)).astype(np.float32)
    host_a, host_b = jax.device_put(a, mem.on_host), jax.device_put(b, mem.on_host)
    # the arrays are returned too: they must outlive every program that reads their addresses
    return (host_a, host_b), (native.HostStack.of(host_a), native.HostStack.of(host_b)), (a, b)


def reference(stack: np.ndarray, ids) -> np.ndarray:
    """Row ids[i] of the stack in row i, zeros where ids[i] < 0 (plain numpy indexing)."""
    ids = np.asarray(ids)
    rows = stack[np.clip(ids, 0, None)]
    return np.where((ids >= 0).reshape((-1,) + (1,) * (stack.ndim - 1)), rows, np.zeros_like(rows))


def _fetch(ids, host_stacks):
    @jax.jit
    def f(ids):
        tables, token = native.fetch_start(ids, list(host_stacks))
        return native.fetch_done(tables, ids, token), token

    return f(jnp.asarray(ids, jnp.int32))


@pytest.mark.parametrize("ids", [
    [-1, 0, 1, 2, 5, -1, 7, -1],   # empty slots at start, middle and end; a run of consecutive ids
    [0, 1, 2, 3, 4, 5, 6, 7],      # one run over the whole stack
    [3, 3, 3, 4, 4, -1, -1, 2],    # repeated ids (a repeat ends a run), then a step back
    [7, 6, 5, 4, 3, 2, 1, 0],      # descending: no run longer than one
    [-1, -1, -1, -1],              # nothing to copy
    [6, 7, -5, 0, 1, 1, 2, 3, 4, 5, -1, 7],  # k > E, another negative id, runs broken by a repeat
    [5],                           # k = 1
    [-1],                          # k = 1, empty
])
def test_fetch_start_done_equals_numpy_indexing(stacks, ids):
    _, host_stacks, (a, b) = stacks
    (got_a, got_b), token = _fetch(ids, host_stacks)
    assert got_a.shape == (len(ids), 3, 4) and got_a.dtype == jnp.bfloat16
    assert got_b.shape == (len(ids), 4, 2) and got_b.dtype == jnp.float32
    np.testing.assert_array_equal(np.asarray(got_a).astype(np.float32), reference(a, ids).astype(np.float32))
    np.testing.assert_array_equal(np.asarray(got_b), reference(b, ids))
    assert token.shape == () and token.dtype == jnp.int32  # (0 on the CPU; the request's number on a GPU)


def test_one_stack_and_reuse_of_the_compiled_program(stacks):
    """One stack alone; the same jitted program called with new ids reads the stack again."""
    _, (_, sb), (_, b) = stacks

    @jax.jit
    def f(ids):
        (table,), token = native.fetch_start(ids, [sb])
        return native.fetch_done([table], ids, token)[0]

    for ids in ([1, 2, -1], [7, 0, 0], [-1, -1, 4]):
        np.testing.assert_array_equal(np.asarray(f(jnp.asarray(ids, jnp.int32))), reference(b, ids))


@pytest.mark.parametrize("ids,slot,bad", [([0, 1, 8, 2], 2, 8), ([1000], 0, 1000), ([-1, 3, 2, 9], 3, 9)])
def test_out_of_range_id_names_the_id_slot_and_range(stacks, ids, slot, bad):
    _, host_stacks, _ = stacks
    with pytest.raises((ValueError, jax.errors.JaxRuntimeError, RuntimeError),
                       match=rf"expert id {bad} at slot {slot} is out of range \[0, {E}\)"):
        jax.block_until_ready(_fetch(ids, host_stacks))
        # On the CPU the call above raises. On a GPU the copy worker checks the ids after the call was
        # launched and records the failure, which the next check reports.
        assert jax.devices()[0].platform == "gpu", "the failing call did not raise"
        native.check_device_wait()
    # the library still works after a failed call
    (got_a, _), _ = _fetch([1, 2], host_stacks)
    np.testing.assert_array_equal(np.asarray(got_a).astype(np.float32),
                                  reference(stacks[2][0], [1, 2]).astype(np.float32))


@pytest.mark.parametrize("ids", [[-1, 0, 1, 2, 5, -1, 7, -1], [3, 3, 3, 4, 4, -1, -1, 2], [-1, -1, -1], [5]])
def test_staged_fetch_equals_numpy_indexing(stacks, ids):
    """The staged pair: rows land in the library's staging buffers and the done copies them out."""
    _, host_stacks, (a, b) = stacks
    key = native.new_staging_key()

    @jax.jit
    def f(ids):
        token = native.stage_start(ids, list(host_stacks), key)
        return native.stage_done(ids, token, list(host_stacks), key)

    got_a, got_b = f(jnp.asarray(ids, jnp.int32))
    assert got_a.shape == (len(ids), 3, 4) and got_a.dtype == jnp.bfloat16 and got_b.shape == (len(ids), 4, 2)
    np.testing.assert_array_equal(np.asarray(got_a).astype(np.float32), reference(a, ids).astype(np.float32))
    np.testing.assert_array_equal(np.asarray(got_b), reference(b, ids))


def test_staged_fetch_crosses_a_loop_iteration(stacks):
    """The use the staging is for: each iteration of a loop collects the fetch the previous one started
    (only ids and the token cross the carry) and starts the next, ordered after its own done; the rows
    collected at iteration i are those started at i - 1. The area is reused once per iteration."""
    _, (_, sb), (_, b) = stacks
    key = native.new_staging_key()
    schedule = jnp.asarray([[1, 2], [7, -1], [-1, -1], [0, 6], [4, 5]], jnp.int32)  # ids started at each step

    @jax.jit
    def run(schedule):
        def body(carry, ids_next):
            ids, token = carry
            (table,) = native.stage_done(ids, token, [sb], key)
            return (ids_next, native.stage_start(ids_next, [sb], key, table)), table

        first = schedule[0]
        carry, tables = jax.lax.scan(body, (first, native.stage_start(first, [sb], key)), schedule[1:])
        ids, token = carry
        return tables, native.stage_done(ids, token, [sb], key)[0]

    tables, last = run(schedule)
    for i, ids in enumerate(np.asarray(schedule)[:-1]):
        np.testing.assert_array_equal(np.asarray(tables[i]), reference(b, ids))
    np.testing.assert_array_equal(np.asarray(last), reference(b, np.asarray(schedule)[-1]))


def test_staged_fetch_rejects_bad_ids_and_results(stacks):
    _, (_, sb), _ = stacks
    key = native.new_staging_key()

    @jax.jit
    def f(ids):
        return native.stage_done(ids, native.stage_start(ids, [sb], key), [sb], key)[0]

    with pytest.raises((ValueError, jax.errors.JaxRuntimeError, RuntimeError),
                       match=rf"expert id 9 at slot 1 is out of range \[0, {E}\)"):
        jax.block_until_ready(f(jnp.asarray([1, 9], jnp.int32)))
        assert jax.devices()[0].platform == "gpu", "the failing call did not raise"
        native.check_device_wait()
    with pytest.raises(ValueError, match="same number of rows"):
        other = jax.device_put(jnp.zeros((E - 3, 4, 2), jnp.float32), Memories.for_device().on_host)
        native.stage_start(jnp.zeros((2,), jnp.int32), [sb, native.HostStack.of(other)], key)
    # a done whose start never ran on that key (or ran with other shapes) is refused, not read as zeros
    fresh = native.new_staging_key()
    with pytest.raises((ValueError, jax.errors.JaxRuntimeError),
                       match=rf"no pgj_stage_start ran on staging key {fresh} with tables of 96 bytes"):
        ids = jnp.asarray([1, 2, 3], jnp.int32)
        jax.block_until_ready(jax.jit(lambda i: native.stage_done(i, jnp.int32(0), [sb], fresh))(ids))


def test_stacks_with_different_numbers_of_rows_are_rejected(stacks):
    _, (sa, _), _ = stacks
    other = jax.device_put(jnp.zeros((E - 3, 4, 2), jnp.float32), Memories.for_device().on_host)
    with pytest.raises(ValueError, match="same number of rows"):
        native.fetch_start(jnp.zeros((2,), jnp.int32), [sa, native.HostStack.of(other)])


def test_host_stack_describes_the_layout():
    for shape, dtype, row_bytes in (((5, 3, 4), jnp.bfloat16, 24), ((7, 4, 2), jnp.float32, 32),
                                    ((3, 10), jnp.int8, 10), ((1, 2, 3, 4), jnp.float32, 96)):
        x = jax.device_put(jnp.ones(shape, dtype), Memories.for_device().on_host)
        s = native.HostStack.of(x)
        assert (s.num_rows, s.row_shape, s.dtype, s.row_bytes) == (shape[0], shape[1:], np.dtype(dtype),
                                                                    row_bytes)
        assert s.address == x.unsafe_buffer_pointer() and s.address != 0


def test_build_compiles_once_into_the_cache_dir(tmp_path, monkeypatch):
    monkeypatch.delenv("PREGATED_JAX_NATIVE_LIB", raising=False)
    monkeypatch.setenv("PREGATED_JAX_CACHE", str(tmp_path))
    path = native.library_path()
    assert path.parent == tmp_path / "native" and not path.exists()
    built = native.build()
    assert built == path and path.is_file()
    assert [p.name for p in path.parent.iterdir()] == [path.name]  # no temporary file left behind
    mtime = path.stat().st_mtime_ns
    os.utime(path, ns=(mtime - 10**9, mtime - 10**9))  # a rebuild would be visible even within one tick
    assert native.build() == path and path.stat().st_mtime_ns == mtime - 10**9
    lib = ctypes.CDLL(str(path))  # a loadable library with the four handlers
    for symbol in ("PgjFetchStartCpu", "PgjFetchDoneCpu", "PgjFetchStartCuda", "PgjFetchDoneCuda"):
        assert getattr(lib, symbol)


def test_library_path_depends_on_the_cache_env(tmp_path, monkeypatch):
    monkeypatch.setenv("PREGATED_JAX_CACHE", str(tmp_path / "a"))
    a = native.library_path()
    monkeypatch.setenv("PREGATED_JAX_CACHE", str(tmp_path / "b"))
    b = native.library_path()
    assert a.parent == tmp_path / "a" / "native" and b.parent == tmp_path / "b" / "native" and a.name == b.name


def test_prebuilt_library_env(tmp_path, monkeypatch):
    missing = tmp_path / "nowhere" / "libpgj.so"
    monkeypatch.setenv("PREGATED_JAX_NATIVE_LIB", str(missing))
    with pytest.raises(native.NativeUnavailable, match=str(missing)):
        native.build()
    present = tmp_path / "libpgj.so"
    present.write_bytes(b"")
    monkeypatch.setenv("PREGATED_JAX_NATIVE_LIB", str(present))
    assert native.build() == present  # taken as given, nothing compiled


def test_main_reports_the_library(capsys):
    assert native.main([]) == 0
    out = capsys.readouterr().out
    on_gpu = jax.devices()[0].platform == "gpu"
    assert str(native.build()) in out and f"CUDA handlers: {'yes' if on_gpu else 'no'}" in out


def test_checked_in_ptx_is_what_the_kernel_source_compiles_to():
    """expert_copy_kernels.ptx.inc is generated from expert_copy_kernels.cu (`python -m pregated_jax.native --regenerate-ptx`)."""
    import shutil
    if shutil.which("nvcc") is None:
        pytest.skip("no nvcc to compile expert_copy_kernels.cu")
    fresh, checked_in = native.kernel_ptx(), native.KERNEL_PTX.read_text()
    release = lambda text: re.search(r"Cuda compilation tools, release [\d.]+", text).group(0)  # noqa: E731
    if release(fresh) != release(checked_in):
        pytest.skip(f"the PTX was generated by {release(checked_in)}, this nvcc is {release(fresh)}")
    assert fresh == checked_in, "regenerate the PTX after editing expert_copy_kernels.cu"


# --- engine/fetch.py: "dma" against "xla" ------------------------------------------------------------

def _decision_and_stacks():
    """The shared routing example (tests/routing_examples.py) with its host stacks."""
    mem = Memories.for_device()
    host_wi, host_wo = numbered_stacks(mem.on_host)
    stacks = (native.HostStack.of(host_wi), native.HostStack.of(host_wo))
    return mem, host_wi, host_wo, stacks, routed_decision()


def _block(host_wi, host_wo, stacks):
    """What a CopyQueue reads of a block program: its host stacks and their native descriptions."""
    return types.SimpleNamespace(host_wi=host_wi, host_wo=host_wo, host_stacks=stacks)


@pytest.mark.parametrize("exclude", [None, [4, 1], [0, 1, 3, 4, 6]])
@pytest.mark.parametrize("k", [8, 3])  # k = 3 < 5 routed experts: needed_experts truncates
def test_dma_fetch_equals_xla_fetch(exclude, k):
    mem, host_wi, host_wo, stacks, decision = _decision_and_stacks()
    excl = None if exclude is None else jnp.asarray(exclude, jnp.int32)
    results = {}
    for method in F.COPY_METHODS:
        pending, copied = F.CopyQueue(mem.on_device).start(method, _block(host_wi, host_wo, stacks), decision, k,
                                                           excl)
        assert isinstance(pending, F.PendingSlots) and (pending.token is None) == (method == "xla")
        slots = F.finish_fetch(pending)
        results[method] = (np.asarray(slots.wi), np.asarray(slots.wo), np.asarray(slots.expert_ids), int(copied))
    for got, want in zip(results["dma"], results["xla"]):
        np.testing.assert_array_equal(got, want)
    # and both against the plain reference: distinct kept experts, ascending, the excluded ones -1
    routed = [0, 1, 3, 4, 6][:k]
    want_ids = [e if e not in (exclude or []) else -1 for e in routed] + [-1] * (k - len(routed))
    wi, wo, ids, copied = results["dma"]
    assert ids.tolist() == want_ids and copied == sum(e >= 0 for e in want_ids)
    np.testing.assert_array_equal(wi, reference(np.asarray(host_wi), want_ids))
    np.testing.assert_array_equal(wo, reference(np.asarray(host_wo), want_ids))


def test_dma_fetch_with_compact_holds_the_same_experts():
    """compact (prefill) only reorders the xla table (valid slots first): the same expert -> weights map."""
    mem, host_wi, host_wo, stacks, decision = _decision_and_stacks()
    excl = jnp.asarray([4, 1], jnp.int32)
    tables = {}
    for method in F.COPY_METHODS:
        pending, copied = F.CopyQueue(mem.on_device).start(method, _block(host_wi, host_wo, stacks), decision, E,
                                                           excl, compact=True)
        slots = F.finish_fetch(pending)
        assert int(copied) == 3
        tables[method] = {int(e): (np.asarray(slots.wi[j]), np.asarray(slots.wo[j]))
                          for j, e in enumerate(np.asarray(slots.expert_ids)) if e >= 0}
    assert sorted(tables["dma"]) == sorted(tables["xla"]) == [0, 3, 6]
    for e, (wi, wo) in tables["dma"].items():
        np.testing.assert_array_equal(wi, tables["xla"][e][0])
        np.testing.assert_array_equal(wo, np.asarray(host_wo)[e])


def test_dma_fetch_inside_a_traced_step_is_ordered_by_the_queue():
    """Inside one jit (the fused decode step's path): the second start takes the first start's token (its
    copies queue behind), and the first fetch's wait takes the value it must follow and the second start's
    token (issued before the wait, so its copies overlap what runs in between). The tables are right."""
    mem, host_wi, host_wo, stacks, decision = _decision_and_stacks()
    block = _block(host_wi, host_wo, stacks)

    @jax.jit
    def step(decision, x):
        queue = F.CopyQueue(mem.on_device)
        first, copied = queue.start("dma", block, decision, 6)
        second, _ = queue.start_ids("dma", block, jnp.asarray([2, -1], jnp.int32))
        x = x * 2
        slots = queue.finish(first, x)
        return slots, queue.finish(second), copied, x

    slots, other, copied, x = step(decision, jnp.arange(4.0))
    want_ids = [0, 1, 3, 4, 6, -1]
    assert np.asarray(slots.expert_ids).tolist() == want_ids and int(copied) == 5
    np.testing.assert_array_equal(slots.wi, reference(np.asarray(host_wi), want_ids))
    np.testing.assert_array_equal(slots.wo, reference(np.asarray(host_wo), want_ids))
    np.testing.assert_array_equal(other.wi, reference(np.asarray(host_wi), [2, -1]))
    np.testing.assert_array_equal(x, np.arange(4.0) * 2)
    hlo = step.lower(decision, jnp.arange(4.0)).compile().as_text()
    starts, tokens = custom_calls(hlo, "pgj_fetch_start"), start_tokens(hlo)
    assert len(starts) == 2
    (first, _), (second, second_ops) = starts
    assert [tokens.get(o) for o in second_ops][1:] == [first], starts
    dones = {tokens.get(ops[3]): ops for _, ops in custom_calls(hlo, "pgj_fetch_done")}  # by the start waited for
    assert second in [tokens.get(o) for o in dones[first][4:]], dones


def test_unknown_copy_method_is_rejected():
    mem, host_wi, host_wo, stacks, decision = _decision_and_stacks()
    with pytest.raises(ValueError, match="unknown copy method 'teleport'"):
        F.CopyQueue(mem.on_device).start("teleport", _block(host_wi, host_wo, stacks), decision, 4)


def test_done_zeroes_empty_slots_over_stale_memory(stacks):
    """Rows of ids -1 are zeros even where the table's memory held NaNs before: a freed NaN buffer of the
    same size comes first in the program, so XLA's buffer assignment may place the table there."""
    _, (sa, sb), (a, b) = stacks

    @jax.jit
    def f(ids):
        junk = jnp.full((ids.shape[0],) + sb.row_shape, jnp.nan, sb.dtype)
        before = jnp.sum(junk)
        tables, token = native.fetch_start(ids, [sa, sb], before)
        return native.fetch_done(tables, ids, token), before

    ids = [-1, 3, -1, -1, 6, -1]
    (got_a, got_b), before = f(jnp.asarray(ids, jnp.int32))
    assert np.isnan(before)
    np.testing.assert_array_equal(np.asarray(got_a).astype(np.float32), reference(a, ids).astype(np.float32))
    np.testing.assert_array_equal(np.asarray(got_b), reference(b, ids))


def test_done_rejects_ids_that_do_not_match_the_tables(stacks):
    _, (_, sb), _ = stacks

    @jax.jit
    def f(ids):
        tables, token = native.fetch_start(ids, [sb])
        return native.fetch_done(tables, ids[:2], token)

    with pytest.raises((ValueError, jax.errors.JaxRuntimeError), match="does not have one row per id"):
        jax.block_until_ready(f(jnp.asarray([1, 2, 3], jnp.int32)))


def test_no_device_wait_fault_after_normal_fetches(stacks):
    _, host_stacks, _ = stacks
    jax.block_until_ready(_fetch([1, -1, 2], host_stacks))
    native.check_device_wait()  # raises if a wait ever timed out




_TIMEOUT_SCRIPT = """
import jax, jax.numpy as jnp, numpy as np
from pregated_jax import native
from pregated_jax.engine.placement import Memories
mem = Memories.for_device()
host = jax.device_put(np.ones((16, 1024, 4096), np.float16), mem.on_host)  # 128 MiB: ~2.5 ms to copy
stack = native.HostStack.of(host)
ids = jnp.arange(16, dtype=jnp.int32)
def fetch(ids):
    tables, token = native.fetch_start(ids, [stack])
    return native.fetch_done(tables, ids, token)[0]
f = jax.jit(fetch)
jax.block_until_ready(f(ids))
try:
    native.check_device_wait()
except RuntimeError as e:
    print("FAULT:", e)
"""


def test_a_device_wait_that_times_out_is_reported():
    """With a 1 ns timeout the done's kernel gives up before 128 MiB have landed: check_device_wait names it."""
    import subprocess
    import sys
    if jax.devices()[0].platform != "gpu":
        pytest.skip("the device-side wait runs on a GPU")
    env = dict(os.environ, PREGATED_JAX_DMA_WAIT_TIMEOUT_S="1e-9")
    proc = subprocess.run([sys.executable, "-c", _TIMEOUT_SCRIPT], env=env, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "FAULT: pgj_fetch_done: the device waited over PREGATED_JAX_DMA_WAIT_TIMEOUT_S" in proc.stdout, proc.stdout
    assert "copies of request #1 " in proc.stdout
