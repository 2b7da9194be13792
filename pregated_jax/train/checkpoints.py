"""Orbax checkpoints of training runs, and params-only loading for other programs.

Layout: `<workdir>/checkpoints/<step>/` holds three Orbax items:
  state   the full train state {step, params, opt_state, rngs} (exact resume)
  params  the params alone, a nested dict of float32 arrays keyed like the model's attributes
          ('encoder' / 'blocks' / '1' / 'experts' / 'wi'); any program can read it with
          `orbax.checkpoint.StandardCheckpointer().restore(<step dir>/'params')`
  config  JSON {"model_config": SwitchConfig fields, "train_config": TrainConfig.to_dict()}
  data    (when training reads a stateful iterator, e.g. the grain pipeline) the train iterator's state,
          one JSON file per process (`process_<i>-of-<n>.json`, grain's Orbax handler), so a resume
          continues at the next example instead of replaying the earlier batches
Orbax writes each step into a temporary folder and renames it when complete, so a run killed mid-save
leaves no partial step that a restart could pick up; we rely on that instead of our own markers.
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec

from pregated_jax.config import SwitchConfig
from pregated_jax.model import SwitchTransformer, abstract_model, expert_memory_kind, materialize, require_finite

CHECKPOINT_SUBDIR = "checkpoints"


def _handlers() -> dict:
    import grain  # its Orbax handler for iterator states (registers grain.checkpoint.CheckpointSave)

    return {"state": ocp.StandardCheckpointHandler(), "params": ocp.StandardCheckpointHandler(),
            "config": ocp.JsonCheckpointHandler(), "data": grain.checkpoint.CheckpointHandler()}


class _StateSnapshot:
    """An iterator state frozen when the save starts: grain's handler writes `get_state()` of what it is
    given (bytes are written as they are), and the live iterator moves on while an async save runs."""

    def __init__(self, state: dict):
        self.state = json.dumps(state, indent=1).encode()

    def get_state(self) -> bytes:
        return self.state


class CheckpointStore:
    """A `ocp.CheckpointManager` with async saves, keeping the last `keep` steps."""

    def __init__(self, directory: str | Path, keep: int, async_save: bool = True):
        """Raises an OSError naming `directory` and the cause when it cannot be created or written to
        (checked here, before any training, by creating and removing a probe folder in it)."""
        self.directory = Path(directory).absolute()  # Orbax's tensorstore writes refuse relative paths
        # Step folders are created on the calling thread. When Orbax creates them in a background thread
        # and that fails, its other save threads wait 300 s for the folder's signal and hold up the
        # process's exit; created here, a failure raises from `save` and leaves no thread waiting.
        options = ocp.CheckpointManagerOptions(
            max_to_keep=keep, enable_async_checkpointing=async_save, create=True,
            async_options=ocp.AsyncOptions(create_directories_asynchronously=False))
        # Several processes: the manager creates `directory` on the primary and waits for all of them, and
        # `save` creates each step's folder on the primary behind a barrier. Every process writes its own
        # array shards there, so each probes it, in a folder of a unique name (no race between processes).
        try:
            self.manager = ocp.CheckpointManager(self.directory, options=options, item_handlers=_handlers())
            os.rmdir(tempfile.mkdtemp(prefix=".write-probe-", dir=self.directory))
        except OSError as e:
            raise type(e)(f"cannot write checkpoints to {self.directory}: {e}") from e

    def latest_step(self) -> int | None:
        return self.manager.latest_step()

    def save(self, step: int, state: dict, config: dict, data_state: dict | None = None) -> None:
        """Starts an async save of `state` ({step, params, opt_state, rngs}) and, if given, the train
        iterator's `data_state` (a JSON-able dict, this process's); returns once the arrays are copied off
        the accelerator, so the caller may donate them to the next step."""
        import grain

        items = dict(state=ocp.args.StandardSave(state), params=ocp.args.StandardSave(state["params"]),
                     config=ocp.args.JsonSave(config))
        if data_state is not None:
            items["data"] = grain.checkpoint.CheckpointSave(_StateSnapshot(data_state))
        args = ocp.args.Composite(**items)
        try:
            self.manager.save(step, args=args, force=True)
        except OSError as e:
            raise type(e)(f"cannot save checkpoint step {step} to {self.directory}: {e}") from e

    def restore(self, step: int, target: dict) -> dict:
        """The state saved at `step`, restored into the structure, shapes and dtypes of `target`.

        Fails with a ValueError naming every param whose path or shape differs from `target['params']`,
        or the first param / optimizer state array that holds a NaN or an infinity.
        """
        saved = self.manager.item_metadata(step)["params"]
        check_params_fit(getattr(saved, "tree", saved), target["params"], f"{self.directory / str(step)}")
        abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, target)
        state = self.manager.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore(abstract)))["state"]
        _require_finite_state(flat_leaves({"params": state["params"], "opt_state": state["opt_state"]}),
                              f"checkpoint {self.directory / str(step)}")
        return state

    def has_data_state(self, step: int) -> bool:
        """Whether step `step` saved a train iterator state (runs on user batches, or older ones, did not)."""
        return (self.directory / str(step) / "data").is_dir()

    def restore_data_state(self, step: int, iterator, worker_count: int | None = None) -> None:
        """Sets `iterator` (get_state / set_state) to this process's train iterator state of `step` (the file
        grain's handler wrote, read directly so any iterator with set_state(dict) can take it). `worker_count`
        (the grain pipeline's `DataConfig.worker_count`) must be the one the state was saved with: a state of
        one worker layout set into another either fails deep in grain or silently resumes elsewhere."""
        path = self.directory / str(step) / "data" / f"process_{jax.process_index()}-of-{jax.process_count()}.json"
        if not path.is_file():
            raise FileNotFoundError(f"no train iterator state for this process ({jax.process_index()} of "
                                    f"{jax.process_count()}) in {path.parent}: was the run saved with another "
                                    f"process count? ({', '.join(sorted(p.name for p in path.parent.iterdir()))})")
        state = json.loads(path.read_text())
        if worker_count is not None:
            from pregated_jax.data.grain_pipeline import state_worker_count

            saved = state_worker_count(state)
            if saved != worker_count:
                raise ValueError(f"{path} was saved with DataConfig.worker_count={saved}, but this run has "
                                 f"worker_count={worker_count}: resume with worker_count={saved} (each worker's "
                                 f"position is part of the state)")
        iterator.set_state(state)

    def wait(self) -> None:
        """Waits for an in-flight save; an OSError from it names the checkpoint folder."""
        try:
            self.manager.wait_until_finished()
        except OSError as e:
            raise type(e)(f"cannot save a checkpoint to {self.directory}: {e}") from e

    def close(self) -> None:
        self.manager.close()


def _finite_flags(arrays: list) -> jax.Array:
    """[n] bool: whether each array holds only finite values."""
    return jnp.stack([jnp.isfinite(x).all() for x in arrays])


def finite_flags(arrays: list) -> np.ndarray:
    """bool [n] on the host: whether each (floating) array holds only finite values, computed in one jitted
    program. An eager reduction per sharded array dispatches hundreds of small collective programs back to
    back, and with several processes on the CPU (gloo) those can hang one process while the others go on;
    on a mesh the flags come back replicated, so every process reads them."""
    if not arrays:
        return np.zeros((0,), bool)
    sharding = getattr(arrays[0], "sharding", None)
    out = NamedSharding(sharding.mesh, PartitionSpec()) if isinstance(sharding, NamedSharding) else None
    return np.asarray(jax.device_get(jax.jit(_finite_flags, out_shardings=out)(list(arrays))))


def _require_finite_state(leaves: list[tuple[str, Any]], where: str) -> None:
    """`require_finite` of restored (name, array) pairs, checked in one jitted program (`finite_flags`). The
    first non-finite array is then named by `require_finite` (gathered to the host first where other processes
    hold parts of it)."""
    floats = [(n, x) for n, x in leaves if jnp.issubdtype(x.dtype, jnp.inexact)]
    flags = finite_flags([x for _, x in floats])
    for (name, x), ok in zip(floats, flags):
        if not ok:
            if isinstance(x, jax.Array) and not x.is_fully_addressable:
                from jax.experimental import multihost_utils
                x = multihost_utils.process_allgather(x, tiled=True)
            require_finite([(name, x)], where)


def flat_shapes(tree: Any, prefix: tuple = ()) -> dict[str, tuple]:
    """Nested dict of arrays / array metadata -> {"a.b.0.c": shape}; keys stringified like Orbax does."""
    if isinstance(tree, dict):
        out = {}
        for k, v in tree.items():
            out.update(flat_shapes(v, prefix + (str(k),)))
        return out
    return {".".join(prefix): tuple(tree.shape)}


def flat_leaves(tree: Any) -> list[tuple[str, Any]]:
    """[(path, array)] of a pytree, paths dotted like `flat_shapes` ("params.encoder.blocks.1.experts.wi")."""
    def name(path) -> str:
        return ".".join(str(getattr(k, "key", getattr(k, "idx", getattr(k, "name", k)))) for k in path)
    return [(name(p), x) for p, x in jax.tree_util.tree_flatten_with_path(tree)[0] if hasattr(x, "dtype")]


def check_params_fit(saved: Any, target: Any, where: str) -> None:
    """Raises ValueError naming missing / unexpected params and shape mismatches (saved vs target)."""
    have, want = flat_shapes(saved), flat_shapes(target)
    problems = [f"{p}: checkpoint shape {have[p]}, model shape {want[p]}"
                for p in sorted(set(have) & set(want)) if have[p] != want[p]]
    problems += [f"{p}: missing from the checkpoint (model shape {want[p]})" for p in sorted(set(want) - set(have))]
    problems += [f"{p}: in the checkpoint {have[p]} but not in the model" for p in sorted(set(have) - set(want))]
    if problems:
        shown = "; ".join(problems[:20]) + (f"; ... {len(problems) - 20} more" if len(problems) > 20 else "")
        raise ValueError(f"checkpoint {where} does not fit the model: {shown}")


def step_dir(path: str | Path) -> Path:
    """A step folder (absolute: Orbax refuses relative paths) from a workdir, its checkpoints/ folder or a step
    folder (the latest step wins)."""
    p = Path(path).absolute()
    if (p / "params").is_dir():
        return p
    root = p / CHECKPOINT_SUBDIR if (p / CHECKPOINT_SUBDIR).is_dir() else p
    steps = sorted(int(d.name) for d in root.iterdir() if d.is_dir() and d.name.isdigit()) if root.is_dir() else []
    if not steps:
        raise FileNotFoundError(f"no checkpoint under {p} "
                                f"(expected <step>/params or {CHECKPOINT_SUBDIR}/<step>/params)")
    return root / str(steps[-1])


def load_params(path: str | Path) -> dict:
    """Params-only restore -> nested dict of arrays (str keys, e.g. params['encoder']['blocks']['1']), all on the
    default device, whatever mesh the run was saved from (Orbax alone refuses another topology's checkpoint).

    Raises ValueError naming the param and the checkpoint if one holds a NaN or an infinity."""
    where = step_dir(path) / "params"
    checkpointer = ocp.StandardCheckpointer()
    saved = checkpointer.metadata(where)
    saved = getattr(saved, "item_metadata", saved)  # newer Orbax: StepMetadata around the tree
    one = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    target = jax.tree.map(lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype, sharding=one), getattr(saved, "tree", saved))
    params = checkpointer.restore(where, target)
    require_finite(flat_leaves(params), f"checkpoint {where}")
    return params


def load_run_config(path: str | Path) -> dict:
    """The JSON config item of a step: {"model_config": ..., "train_config": ...}."""
    return ocp.Checkpointer(ocp.JsonCheckpointHandler()).restore(step_dir(path) / "config")


def restore_model(path: str | Path, seed: int = 0, dtype: str | None = None,
                  experts_on: str = "device") -> SwitchTransformer:
    """The model of an Orbax checkpoint of ours (eval mode), built from its saved SwitchConfig (with `dtype`
    as the compute dtype, if given) and params. `pregated_jax.load_model` reads every kind of checkpoint.
    `experts_on="host"` moves the restored expert stacks to host memory (Orbax restores them to the device)."""
    cfg = SwitchConfig(**load_run_config(path)["model_config"])
    return model_from_params(cfg if dtype is None else cfg.replace(dtype=dtype), load_params(path), seed,
                             expert_memory_kind(experts_on))


def model_from_params(cfg: SwitchConfig, params: dict, seed: int = 0,
                      memory_kind: str | None = None) -> SwitchTransformer:
    """Materializes `cfg` with a nested params dict (int or str keys); mismatches name the param path.
    `memory_kind`: where expert stacks go (`model.materialize`'s `expert_memory_kind`)."""
    model = abstract_model(cfg)
    by_path = {}
    for path, _ in nnx.to_flat_state(nnx.state(model, nnx.Param)):
        node = params
        for key in path:
            node = node.get(key, node.get(str(key))) if isinstance(node, dict) else None
            if node is None:
                break
        if node is not None:
            by_path[path] = node
    extra = set(flat_shapes(params)) - {".".join(map(str, p)) for p in by_path}
    if extra:
        raise ValueError(f"params not in a model of this config: {sorted(extra)[:20]}")
    return materialize(model, by_path, seed, memory_kind, release=True)
