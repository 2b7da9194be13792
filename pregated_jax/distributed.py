"""Several processes through `jax.distributed`: start-up from flags or the environment, and each process's
share of the global batch.

`initialize(coordinator_address, num_processes, process_id, local_device_ids)` resolves each argument as t5x
and MaxText do: an explicit value first, else the environment (JAX_COORDINATOR_ADDRESS, JAX_NUM_PROCESSES,
JAX_PROCESS_ID, JAX_LOCAL_DEVICE_IDS), else nothing: one process, `jax.distributed` untouched. It must run
before anything touches the devices (`jax.devices()`, an array), is idempotent, and refuses a partial
specification (an address without a process count, a process id without an address). On the CPU the
collectives across processes go through gloo (`jax_cpu_collectives_implementation`).

Every process then builds the same global mesh (`pregated_jax.mesh.make_mesh` over `jax.devices()`, all
processes' devices), reads only its own rows of the global batch (`process_batch_slice`) and turns them into
global arrays (`make_global_batch`, through `jax.make_array_from_process_local_data`). Every process must run
the same computations in the same order.
"""

from __future__ import annotations

import os
from typing import Mapping, Sequence

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding

ENV_VARS = {"coordinator_address": "JAX_COORDINATOR_ADDRESS", "num_processes": "JAX_NUM_PROCESSES",
            "process_id": "JAX_PROCESS_ID", "local_device_ids": "JAX_LOCAL_DEVICE_IDS"}

_started: dict | None = None  # the arguments this module passed to jax.distributed.initialize


def resolve(coordinator_address: str | None = None, num_processes: int | None = None, process_id: int | None = None,
            local_device_ids: Sequence[int] | int | None = None,
            environ: Mapping[str, str] | None = None) -> dict | None:
    """The `jax.distributed.initialize` arguments from the explicit ones, else `environ` (default os.environ);
    None when neither names a coordinator nor a process count (one process). Raises ValueError for a partial
    or inconsistent specification."""
    env = os.environ if environ is None else environ
    given = {"coordinator_address": coordinator_address, "num_processes": num_processes, "process_id": process_id,
             "local_device_ids": local_device_ids}
    args, source = {}, {}
    for name, value in given.items():
        if value is None and env.get(ENV_VARS[name], "").strip():
            value, source[name] = env[ENV_VARS[name]].strip(), ENV_VARS[name]
        elif value is not None:
            source[name] = f"--{name}" if name != "local_device_ids" else "local_device_ids"
        args[name] = value
    if args["coordinator_address"] is None and args["num_processes"] is None and args["process_id"] is None:
        if args["local_device_ids"] is not None:
            raise ValueError(f"{source['local_device_ids']} is set but no coordinator: give --coordinator_address, "
                             f"--num_processes and --process_id (or {ENV_VARS['coordinator_address']}, ...)")
        return None
    for name in ("num_processes", "process_id"):
        if args[name] is not None:
            try:
                args[name] = int(args[name])
            except ValueError:
                raise ValueError(f"{source[name]}={args[name]!r}: must be an integer") from None
    missing = [f"--{n} (or {ENV_VARS[n]})" for n in ("coordinator_address", "num_processes", "process_id")
               if args[n] is None]
    if missing:
        have = ", ".join(f"{source[n]}={args[n]}" for n in ("coordinator_address", "num_processes", "process_id")
                         if args[n] is not None)
        raise ValueError(f"several processes need a coordinator address, the process count and this process's id; "
                         f"{have} given, missing {', '.join(missing)}")
    if args["num_processes"] < 1:
        raise ValueError(f"{source['num_processes']}={args['num_processes']}: must be at least 1")
    if not 0 <= args["process_id"] < args["num_processes"]:
        raise ValueError(f"{source['process_id']}={args['process_id']}: must be in [0, {args['num_processes']})")
    ids = args["local_device_ids"]
    if isinstance(ids, str):
        ids = [int(i) for i in ids.split(",") if i.strip()]
    args["local_device_ids"] = [ids] if isinstance(ids, int) else (None if ids is None else list(ids))
    return args


def initialize(coordinator_address: str | None = None, num_processes: int | None = None,
               process_id: int | None = None, local_device_ids: Sequence[int] | int | None = None) -> bool:
    """Starts `jax.distributed` from the arguments, else the environment (see `resolve`); returns whether this
    is a multi-process run (False: nothing was configured, one process). A second call with the same (or no)
    specification does nothing; one with a different specification raises."""
    global _started
    args = resolve(coordinator_address, num_processes, process_id, local_device_ids)
    if _started is not None or jax.distributed.is_initialized():
        if args is not None and _started is not None and args != _started:
            raise ValueError(f"jax.distributed is already initialized with {_started}, not {args}")
        return True
    if args is None:
        return False
    jax.distributed.initialize(**args)
    _started = args
    return True


def process_batch_slice(global_batch_size: int, sharding: NamedSharding | None = None) -> slice:
    """The rows of a global batch [global_batch_size, ...] that this process reads.

    With `sharding` (e.g. `pregated_jax.expert_parallel.batch_sharding(mesh)`): the rows its devices hold in
    it, which must be one contiguous range (they are for `make_mesh`'s device order). Without: an equal,
    contiguous share by `jax.process_index()`.
    """
    if sharding is None:
        n, i = jax.process_count(), jax.process_index()
        if global_batch_size % n:
            raise ValueError(f"global batch size {global_batch_size} does not split over {n} processes")
        per = global_batch_size // n
        return slice(i * per, (i + 1) * per)
    rows = set()
    for index in sharding.addressable_devices_indices_map((global_batch_size,)).values():
        rows.update(range(*index[0].indices(global_batch_size)))
    lo, hi = min(rows), max(rows) + 1
    if len(rows) != hi - lo:
        raise ValueError(f"this process's devices hold rows {sorted(rows)} of the batch: not one contiguous range")
    return slice(lo, hi)


def make_global_batch(local_batch, sharding: NamedSharding | Mesh, global_batch_size: int):
    """A pytree of per-process numpy arrays (this process's rows, `process_batch_slice`) -> global jax.Arrays
    [global_batch_size, ...] laid out by `sharding` (a Mesh: rows over ("data", "expert"))."""
    if isinstance(sharding, Mesh):
        from pregated_jax.expert_parallel import batch_sharding
        sharding = batch_sharding(sharding)
    return jax.tree.map(lambda x: jax.make_array_from_process_local_data(
        sharding, np.asarray(x), (global_batch_size,) + np.shape(x)[1:]), local_batch)


def put_global(value, sharding: NamedSharding) -> jax.Array:
    """`jax.device_put(value, sharding)`, also where `sharding` spans other processes' devices: there each
    process supplies the whole value (the same in every process, e.g. params from the same seed) and keeps its
    devices' pieces (`jax.device_put` refuses a committed array onto non-addressable devices)."""
    if sharding.is_fully_addressable:
        return jax.device_put(value, sharding)
    if isinstance(value, jax.Array) and jax.dtypes.issubdtype(value.dtype, jax.dtypes.prng_key):  # RNG keys
        return jax.random.wrap_key_data(put_global(jax.random.key_data(value), sharding),
                                        impl=jax.random.key_impl(value))
    host = np.asarray(value)
    return jax.make_array_from_callback(host.shape, sharding, lambda index: host[index])
