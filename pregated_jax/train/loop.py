"""`train_and_evaluate`: the training loop (jitted, donated train step; eval; Orbax checkpoints; logs).

The model is split once into a graph definition and two pure states: params (float32 master weights,
whatever the compute dtype) and the dropout / router-jitter RNG state. A `TrainState` holds params,
optimizer state, step and RNG state as plain arrays, so `train_step(state, batch) -> (state, metrics)` is
a pure function that `jax.jit` compiles once, with the state donated.

Exact resume: every random choice lives in the state (RNG counters) or is a function of the step (the
batch order: a stateful iterator such as the grain pipeline's is set to the state saved with the checkpoint;
otherwise the loop skips the first `step` batches of the iterator, or calls `train_batches(step)`), so
a run restarted from its last checkpoint reproduces the uninterrupted loss curve bit for bit.
"""

from __future__ import annotations

import dataclasses
import functools
import itertools
import json
import logging
import math
import numbers
import os
import socket
import sys
import time
from pathlib import Path
from typing import Any, Callable, Iterable

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx, struct
from tqdm import tqdm

from pregated_jax.config import SwitchConfig
from pregated_jax.distributed import put_global
from pregated_jax.expert_parallel import batch_sharding, expert_state_shardings, replicated, shard_model
from pregated_jax.mesh import MeshConfig
from pregated_jax.model import SwitchTransformer, router_loss
from pregated_jax.train.checkpoints import (CHECKPOINT_SUBDIR, CheckpointStore, finite_flags, load_run_config,
                                            model_from_params, restore_model, step_dir)
from pregated_jax.train.config import ModelConfig, OptimizerConfig, TrainConfig
from pregated_jax.train.inputs import (PACKING_KEYS, Batch, batches_from, default_batches, eval_batches_view,
                                       host_batch, is_stateful)
from pregated_jax.train.optim import make_optimizer


_log = logging.getLogger(__name__)


@struct.dataclass
class TrainState:
    step: jax.Array  # [] int32, number of completed steps
    params: dict  # nested dict of float32 arrays (nnx.to_pure_dict of the model's nnx.Param state)
    opt_state: Any
    rngs: dict  # the model's RNG state; PRNG keys as raw uint32 key data (see RngCodec)

    def to_dict(self) -> dict:
        return {"step": self.step, "params": self.params, "opt_state": self.opt_state, "rngs": self.rngs}


class RngCodec:
    """Typed PRNG keys <-> raw uint32 key data, so that a TrainState holds only plain arrays."""

    def __init__(self, template: dict):
        leaves, self.treedef = jax.tree.flatten(template)
        self.impls = tuple(jax.random.key_impl(x) if jnp.issubdtype(x.dtype, jax.dtypes.prng_key) else None
                           for x in leaves)

    def __eq__(self, other) -> bool:
        return isinstance(other, RngCodec) and (self.treedef, self.impls) == (other.treedef, other.impls)

    def __hash__(self) -> int:
        return hash((self.treedef, self.impls))

    def encode(self, rngs: dict) -> dict:
        return jax.tree.map(lambda x: jax.random.key_data(x)
                            if jnp.issubdtype(x.dtype, jax.dtypes.prng_key) else x, rngs)

    def decode(self, data: dict) -> dict:
        leaves = self.treedef.flatten_up_to(data)
        return self.treedef.unflatten([x if impl is None else jax.random.wrap_key_data(x, impl=impl)
                                       for x, impl in zip(leaves, self.impls)])


def loss_and_metrics(model: SwitchTransformer, batch: Batch, cfg: SwitchConfig) -> tuple[jax.Array, dict]:
    """Token cross-entropy over real label tokens + the weighted router losses."""
    packing = {k: batch[k] for k in PACKING_KEYS if k in batch}  # packed rows: segment ids and positions
    logits, aux = model(batch["input_ids"], batch["decoder_input_ids"], batch["attention_mask"],
                        batch["decoder_attention_mask"], return_aux=True, **packing)  # [B, T, V] float32
    mask = batch["decoder_attention_mask"].astype(jnp.float32)  # [B, T]
    labels = jnp.where(mask > 0, batch["labels"], 0)  # [B, T]
    ce = optax.softmax_cross_entropy_with_integer_labels(logits, labels)  # [B, T]
    tokens = jnp.sum(mask)
    ce_sum = jnp.sum(ce * mask)
    correct = jnp.sum((jnp.argmax(logits, axis=-1) == labels) * mask)
    cross_entropy = ce_sum / jnp.maximum(tokens, 1.0)
    rl = router_loss(cfg, aux)
    loss = cross_entropy + rl
    return loss, {"loss": loss, "cross_entropy": cross_entropy, "router_loss": rl, "ce_sum": ce_sum,
                  "correct": correct, "tokens": tokens, "accuracy": correct / jnp.maximum(tokens, 1.0)}


def make_train_step(graphdef, cfg: SwitchConfig, tx: optax.GradientTransformation, schedule, codec: RngCodec):
    """-> jitted `train_step(state, batch) -> (state, metrics)`; `state` is donated."""

    def train_step(state: TrainState, batch: Batch):
        rngs = codec.decode(state.rngs)

        def loss_fn(params):
            model = nnx.merge(graphdef, params, rngs)
            loss, metrics = loss_and_metrics(model, batch, cfg)
            return loss, (metrics, nnx.to_pure_dict(nnx.state(model, nnx.RngState)))

        (_, (metrics, new_rngs)), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
        updates, opt_state = tx.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        grad_norm = optax.global_norm(grads)
        # One flag for the whole new state, so the loop can refuse to save or continue from a diverged one
        # (a finite loss can come with NaN gradients, and those with NaN params) at no extra host sync.
        floats = [x for x in jax.tree.leaves((params, opt_state)) if jnp.issubdtype(x.dtype, jnp.inexact)]
        finite = jnp.all(jnp.stack([jnp.isfinite(metrics["loss"]), jnp.isfinite(grad_norm)]
                                   + [jnp.isfinite(x).all() for x in floats]))
        metrics.update(grad_norm=grad_norm, learning_rate=schedule(state.step), finite=finite)
        return TrainState(state.step + 1, params, opt_state, codec.encode(new_rngs)), metrics

    return jax.jit(train_step, donate_argnums=0)


def make_eval_step(graphdef, cfg: SwitchConfig, codec: RngCodec):
    """-> jitted `eval_step(params, rngs, batch) -> sums` (eval-mode model: no dropout, no jitter)."""

    def eval_step(params, rngs, batch):
        _, m = loss_and_metrics(nnx.merge(graphdef, params, codec.decode(rngs)), batch, cfg)
        return {k: m[k] for k in ("ce_sum", "correct", "tokens", "router_loss")}

    return jax.jit(eval_step)


@functools.lru_cache(maxsize=4)
def _steps(train_def, eval_def, cfg: SwitchConfig, opt: OptimizerConfig, num_steps: int, codec: RngCodec):
    """(optimizer, jitted train step, jitted eval step), cached per graph, configs and RNG layout so that
    repeated `train_and_evaluate` calls in one process (a restart, a sweep, tests) reuse compiled code."""
    tx, schedule = make_optimizer(opt, num_steps)
    return tx, make_train_step(train_def, cfg, tx, schedule, codec), make_eval_step(eval_def, cfg, codec)


# --- model and data setup --------------------------------------------------------------------------

def _model_overrides(config: TrainConfig) -> dict:
    """Fields a loaded checkpoint's config is overridden with (a full SwitchConfig replaces them all)."""
    if isinstance(config.model, ModelConfig):
        return dict(config.model.overrides)
    return dataclasses.asdict(config.model)


def _load_init_checkpoint(path: str, seed: int) -> SwitchTransformer:
    """One of our workdirs / step dirs (Orbax), else a local Hugging Face checkpoint directory."""
    p = Path(path)
    if (p / "params").is_dir() or (p / CHECKPOINT_SUBDIR).is_dir():
        return restore_model(p, seed)
    from pregated_jax.hf_checkpoint import from_pretrained  # imported only when used
    return from_pretrained(path, seed=seed)


def build_model(config: TrainConfig, resume_from: Path | None = None) -> SwitchTransformer:
    """The model training starts from.

    Fresh: `config.model_config()` with seed `training.seed`. From `init.from_checkpoint`: that checkpoint,
    converted to pre-gating if asked (`pregated_jax.convert.to_pregated`), then the model overrides
    applied. When resuming such a run (`resume_from`, a step dir of this workdir), the weights come from
    the workdir, so only its saved model config is read and the model is freshly initialized.
    """
    init, seed = config.init, config.training.seed
    if init.from_checkpoint is None:
        if init.convert_to_pregated:
            raise ValueError("InitConfig.convert_to_pregated needs InitConfig.from_checkpoint")
        return SwitchTransformer(config.model_config(), rngs=nnx.Rngs(seed))
    if resume_from is not None:
        saved = SwitchConfig(**load_run_config(resume_from)["model_config"])
        return SwitchTransformer(saved.replace(**_model_overrides(config)), rngs=nnx.Rngs(seed))
    model = _load_init_checkpoint(init.from_checkpoint, seed)
    if init.convert_to_pregated:
        from pregated_jax.convert import to_pregated  # the conversion lives with the model code
        model = to_pregated(model, seed=seed)
    target = model.config.replace(**_model_overrides(config))
    if target != model.config:
        model = model_from_params(target, nnx.to_pure_dict(nnx.state(model, nnx.Param)), seed)
    return model


class MetricsWriter:
    """Appends `{"step", **metrics}` lines to <workdir>/metrics.jsonl (always) and, with `tensorboard`
    set, writes the numeric metrics as TensorBoard scalars to an event file in <workdir>/tensorboard/.

    `start_step`: the step the run starts from (the restored checkpoint's). Lines of an earlier run with a
    later step (written between that checkpoint and a kill, and about to be written again) are dropped
    from metrics.jsonl, as is a line cut short by the kill, so the file keeps one line per step and kind.
    The event file starts with a TensorBoard restart marker (`SessionLog.START` at `start_step + 1`), so
    TensorBoard likewise discards the earlier run's scalars after `start_step`.

    The events are written with the `tensorboard` package's protobufs and record framing only (neither
    TensorFlow nor tensorboardX, no module replaced); view them with `tensorboard --logdir
    <workdir>/tensorboard`. Without `tensorboard` installed, one warning is logged and only metrics.jsonl is
    written. Non-numeric metrics (and bools) go to metrics.jsonl only. Each run (a resume too) adds its own
    event file to the directory.
    """

    def __init__(self, workdir: Path, tensorboard: bool, start_step: int = 0):
        path = workdir / "metrics.jsonl"
        if path.exists():
            _keep_lines_up_to(path, start_step)
        self.file = open(path, "a")
        self.tb = None
        if tensorboard:
            try:
                self.tb = _TensorBoardScalars(workdir / "tensorboard", start_step)
            except ImportError as err:
                _log.warning("no TensorBoard events: the `tensorboard` package is missing (%s); "
                             "writing metrics.jsonl only (pip install tensorboard)", err)

    def write(self, step: int, metrics: dict) -> None:
        self.file.write(json.dumps({"step": step, **metrics}) + "\n")
        self.file.flush()
        if self.tb is not None:
            self.tb.write(step, {k: float(v) for k, v in metrics.items()
                                 if isinstance(v, numbers.Real) and not isinstance(v, (bool, np.bool_))})

    def close(self) -> None:
        self.file.close()
        if self.tb is not None:
            self.tb.close()


class _NoMetrics:
    """The metrics writer of a process other than the primary: the run's files are the primary's alone."""

    def write(self, step: int, metrics: dict) -> None:
        pass

    def close(self) -> None:
        pass


def _keep_lines_up_to(path: Path, step: int) -> None:
    """Rewrites metrics.jsonl (atomically) without the lines whose step is after `step` or that do not parse."""
    kept = []
    for line in path.read_text().splitlines():
        try:
            record = json.loads(line)
        except ValueError:
            continue  # a line cut short by a kill mid-write
        if isinstance(record, dict) and isinstance(record.get("step"), int) and record["step"] <= step:
            kept.append(line + "\n")
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text("".join(kept))
    os.replace(tmp, path)


_EVENT_FILE_UIDS = itertools.count()


class _TensorBoardScalars:
    """Scalar summaries (`simple_value`) in a TensorBoard event file: `Event` protobufs in TFRecord framing,
    from the `tensorboard` package alone (its writer would do its file I/O through TensorFlow when that is
    importable: seconds of import for a local file). Raises ImportError without the package."""

    def __init__(self, logdir: Path, start_step: int = 0):
        from tensorboard.compat.proto import event_pb2, summary_pb2
        from tensorboard.summary.writer.record_writer import RecordWriter
        self.event_pb2, self.summary_pb2 = event_pb2, summary_pb2
        logdir.mkdir(parents=True, exist_ok=True)
        # TensorBoard's own file name pattern, events.out.tfevents.<time>.<host>.<pid>.<uid>, with a uid that
        # grows within the process, so that two writers of one second neither collide nor read out of order.
        while True:
            name = (f"events.out.tfevents.{int(time.time()):010d}.{socket.gethostname()}.{os.getpid()}."
                    f"{next(_EVENT_FILE_UIDS):06d}")
            try:
                file = open(logdir / name, "xb")
                break
            except FileExistsError:
                continue
        self.writer = RecordWriter(file)
        self._add(event_pb2.Event(wall_time=time.time(), file_version="brain.Event:2"))
        # A restart marker: TensorBoard drops the scalars of earlier event files with a step >= this one.
        self._add(event_pb2.Event(wall_time=time.time(), step=start_step + 1,
                                  session_log=event_pb2.SessionLog(status=event_pb2.SessionLog.START)))

    def _add(self, event) -> None:
        self.writer.write(event.SerializeToString())
        self.writer.flush()  # as metrics.jsonl: visible at once, nothing lost if the run dies

    def write(self, step: int, scalars: dict[str, float]) -> None:
        if not scalars:
            return
        summary = self.summary_pb2.Summary(value=[self.summary_pb2.Summary.Value(tag=k, simple_value=v)
                                                  for k, v in scalars.items()])
        self._add(self.event_pb2.Event(wall_time=time.time(), step=step, summary=summary))

    def close(self) -> None:
        self.writer.close()


def _first_non_finite(state: TrainState) -> str | None:
    """The path of the first params / optimizer state array holding a NaN or infinity (one jitted check)."""
    floats = [(path, x) for name in ("params", "opt_state")  # params first (a dict would sort them last)
              for path, x in jax.tree_util.tree_flatten_with_path({name: getattr(state, name)})[0]
              if jnp.issubdtype(x.dtype, jnp.inexact)]
    for (path, _), ok in zip(floats, finite_flags([x for _, x in floats])):
        if not ok:
            return jax.tree_util.keystr(path)
    return None


def _host_window(pending: list[dict], last_step: int, state: TrainState) -> dict:
    """Fetches a window of per-step metrics and returns their means; raises FloatingPointError naming the
    first step whose loss, gradient norm or updated params / optimizer state is non-finite. `state` is the
    state after `last_step`; it is searched for the offending array when that step is the first bad one."""
    window = jax.device_get(pending)
    first = last_step - len(window) + 1
    for i, m in enumerate(window):
        step = first + i
        if not math.isfinite(float(m["loss"])):
            raise FloatingPointError(f"non-finite loss at step {step}: {float(m['loss'])}")
        if not math.isfinite(float(m["grad_norm"])):
            raise FloatingPointError(f"non-finite gradient norm at step {step}: {float(m['grad_norm'])} "
                                     f"(loss {float(m['loss']):.4g}); its state is not saved")
        if not bool(m["finite"]):
            where = _first_non_finite(state) if step == last_step else None
            raise FloatingPointError(f"non-finite updated params or optimizer state at step {step}"
                                     + (f" (first: {where})" if where else "") + "; its state is not saved")
    keys = ("loss", "cross_entropy", "router_loss", "accuracy", "grad_norm", "learning_rate")
    return {f"train/{k}": float(np.mean([m[k] for m in window])) for k in keys}


def evaluate(eval_step, state: TrainState, batches: Iterable[Batch], limit: int) -> dict:
    """Token-averaged eval cross-entropy and accuracy, mean router loss, over up to `limit` batches."""
    sums, n = None, 0
    for i, batch in enumerate(itertools.islice(batches, limit)):
        out = eval_step(state.params, state.rngs, host_batch(batch, i))
        sums = out if sums is None else jax.tree.map(jnp.add, sums, out)
        n += 1
    if sums is None:
        return {}
    s = jax.device_get(sums)
    tokens = max(float(s["tokens"]), 1.0)
    ce, rl = float(s["ce_sum"]) / tokens, float(s["router_loss"]) / n
    return {"eval/loss": ce + rl, "eval/cross_entropy": ce, "eval/router_loss": rl,
            "eval/accuracy": float(s["correct"]) / tokens, "eval/tokens": float(s["tokens"])}


# --- the loop ----------------------------------------------------------------------------------------

def _metrics_text(metrics: dict, prefix: str = "") -> str:
    """'name=value, ...' of the numeric metrics whose names start with `prefix`."""
    return ", ".join(f"{k}={v:.5g}" for k, v in sorted(metrics.items())
                     if k.startswith(prefix) and isinstance(v, numbers.Number))


def init_opt_state(tx: optax.GradientTransformation, params: dict, mesh=None):
    """`tx.init(params)`; on a mesh, the moments of the expert stacks are split on E like the stacks and the
    rest is replicated (`expert_state_shardings`)."""
    if mesh is None:
        return tx.init(params)
    return jax.jit(tx.init, out_shardings=expert_state_shardings(jax.eval_shape(tx.init, params), mesh))(params)


def _with_batch_sharding(train_step, eval_step, sharding, local_train_rows: bool = False):
    """The steps with each batch's rows split over the mesh (`sharding`) before the jitted call.

    One process: `jax.device_put` of the whole batch. Several processes: global arrays from each process's
    rows (`make_global_batch`); train batches are already this process's rows when `local_train_rows` (the
    grain pipeline reads one shard per process), other batches are global and this process takes its rows
    (`process_batch_slice`).
    """
    if jax.process_count() == 1:
        return (lambda state, batch: train_step(state, jax.device_put(batch, sharding)),
                lambda params, rngs, batch: eval_step(params, rngs, jax.device_put(batch, sharding)))
    from pregated_jax.distributed import make_global_batch, process_batch_slice

    def global_batch(batch: Batch, local: bool) -> Batch:
        if local:
            return make_global_batch(batch, sharding, len(batch["input_ids"]) * jax.process_count())
        rows = process_batch_slice(len(batch["input_ids"]), sharding)
        return make_global_batch({k: v[rows] for k, v in batch.items()}, sharding, len(batch["input_ids"]))

    return (lambda state, batch: train_step(state, global_batch(batch, local_train_rows)),
            lambda params, rngs, batch: eval_step(params, rngs, global_batch(batch, False)))


def _check_mesh_spans_processes(mesh, spec: MeshConfig) -> None:
    """Raises ValueError unless `mesh` holds devices of every process (several processes train one model:
    each feeds its rows of the batch to its own devices of the mesh)."""
    n = jax.process_count()
    if mesh is None:
        raise ValueError(f"{n} processes need a mesh over their {jax.device_count()} devices; the config's mesh "
                         f"is one device (set --mesh, e.g. data={n},expert=-1, or the config's mesh section)")
    missing = sorted(set(range(n)) - {d.process_index for d in mesh.devices.flat})
    if missing:
        raise ValueError(f"mesh data={spec.data} x expert={spec.expert} ({mesh.size} of {jax.device_count()} "
                         f"devices) holds no device of process(es) {missing}: a mesh must span every process")


def train_and_evaluate(config: TrainConfig, workdir: str | Path, train_batches=None, eval_batches=None, *,
                       eval_fn: Callable[[SwitchTransformer, int], dict] | None = None,
                       step_callback: Callable[[int, dict], None] | None = None) -> dict:
    """Trains `config.training.num_steps` steps into `workdir`, resuming from its last checkpoint.

    train_batches: an iterable of batches (the first `step` are skipped on resume), a callable
        `step -> batch`, or None: `pregated_jax.data` by `config.data.task` through grain (`default_batches`;
        packed when `config.data.pack`, this process's shard only). An iterator with `get_state()` /
        `set_state()` (a grain DatasetIterator, also the default's) has its state saved with each checkpoint
        and restored on resume, so it continues at the next batch without replaying the earlier ones.
    eval_batches: a sequence, an iterable (its first `eval_steps` batches are kept), a callable returning
        a fresh iterable, or None (the task's eval split when train_batches is None too; else no eval).
    eval_fn: a hook `(eval-mode model, step) -> metrics` run at each evaluation (e.g. generation
        metrics); the model shares the train state's buffers, so don't keep it.
    step_callback: `(step, train metrics of that step) -> None` after each step (forces a host sync).
    `config.mesh` other than one device: the model is placed with `pregated_jax.expert_parallel.shard_model`
    (expert stacks and their optimizer moments split on E over `expert`, the rest replicated) and each batch's
    rows are split over `data` x `expert`; the losses are those of the single-device step on the same batch.
    Several processes (`pregated_jax.distributed.initialize`): every process calls this with the same
    arguments and a mesh over every process's devices, and feeds its own rows of each batch (train_batches
    and eval_batches are global batches, except the default grain pipeline's, which reads this process's
    shard). Every process saves and restores the checkpoints (Orbax coordinates them; the train iterator's
    state is one file per process); only the primary (`jax.process_index() == 0`) writes config.json,
    metrics.jsonl and the TensorBoard events.
    Returns the final metrics: {"step", "train/...", "eval/..."}.
    """
    workdir, t = Path(workdir), config.training
    primary = jax.process_index() == 0  # writes the run's files that are not per process
    workdir.mkdir(parents=True, exist_ok=True)
    store = CheckpointStore(workdir / CHECKPOINT_SUBDIR, t.keep_checkpoints, async_save=t.async_checkpointing)
    latest = store.latest_step()
    model = build_model(config, None if latest is None else step_dir(workdir / CHECKPOINT_SUBDIR / str(latest)))
    cfg = model.config
    mesh = None if config.mesh == MeshConfig() else config.mesh.make()
    if jax.process_count() > 1:
        _check_mesh_spans_processes(mesh, config.mesh)
    if mesh is not None:  # data + expert parallel: experts split over `expert`, batches over both axes
        if t.batch_size % mesh.size:
            raise ValueError(f"TrainingConfig.batch_size {t.batch_size} must divide by the mesh's "
                             f"{mesh.size} devices (data={mesh.shape['data']} x expert={mesh.shape['expert']})")
        model = shard_model(model, mesh)
    model.train()
    train_def, params, rngs = nnx.split(model, nnx.Param, nnx.RngState)
    model.eval()
    eval_def, _, _ = nnx.split(model, nnx.Param, nnx.RngState)
    del model  # its buffers now belong to the train state (donated every step)
    params = jax.tree.map(lambda x: x.astype(jnp.float32) if jnp.issubdtype(x.dtype, jnp.floating) else x,
                          nnx.to_pure_dict(params))  # float32 master weights
    rngs = nnx.to_pure_dict(rngs)
    codec = RngCodec(rngs)
    tx, train_step, eval_step = _steps(train_def, eval_def, cfg, config.optimizer, t.num_steps, codec)
    step = jnp.zeros((), jnp.int32)
    if mesh is not None:  # on the mesh like the rest of the state (a restore puts it where the target is)
        step = put_global(step, replicated(mesh))
    state = TrainState(step, params, init_opt_state(tx, params, mesh), codec.encode(rngs))
    if mesh is not None:
        train_step, eval_step = _with_batch_sharding(train_step, eval_step, batch_sharding(mesh),
                                                     local_train_rows=train_batches is None)
    if latest is not None:
        state = TrainState(**store.restore(latest, state.to_dict()))
    start = int(state.step)
    run_config = {"model_config": dataclasses.asdict(cfg), "train_config": config.to_dict()}
    if primary:
        (workdir / "config.json").write_text(json.dumps(run_config, indent=2) + "\n")
    _log.info("workdir %s, resolved config: %s", workdir, json.dumps(run_config, sort_keys=True))

    default_input = train_batches is None  # the grain pipeline of config.data
    if default_input:
        train_batches, default_eval = default_batches(config)
        eval_batches = default_eval if eval_batches is None else eval_batches
    data_iter = None  # a train iterator whose position is saved with each checkpoint (e.g. grain's)
    if not callable(train_batches) or hasattr(train_batches, "__iter__"):
        candidate = iter(train_batches)
        if is_stateful(candidate):
            train_batches = data_iter = candidate
    if data_iter is not None and latest is not None and store.has_data_state(latest):
        # continues at the next example: nothing is replayed
        store.restore_data_state(latest, data_iter, config.data.worker_count if default_input else None)
        batches = data_iter
    else:  # a step -> batch callable, or an iterable whose first `start` batches are skipped
        batches = batches_from(train_batches, start)
    eval_source = eval_batches_view(eval_batches, t.eval_steps)
    writer = MetricsWriter(workdir, t.tensorboard, start_step=start) if primary else _NoMetrics()
    bar = tqdm(total=t.num_steps, initial=start, desc="train", disable=None, dynamic_ncols=True)
    # Without a terminal there is no progress bar: every logged step's metrics go to `logging` instead.
    log_metrics = not sys.stdout.isatty()
    pending: list[dict] = []
    final: dict = {"step": start}
    window_start, window_first = time.perf_counter(), start  # throughput over train steps only

    def run_eval(step: int) -> dict:
        metrics = evaluate(eval_step, state, eval_source(), t.eval_steps) if eval_source else {}
        if eval_fn is not None:
            metrics.update(eval_fn(nnx.merge(eval_def, state.params, codec.decode(state.rngs)), step))
        if metrics:
            writer.write(step, metrics)
            if log_metrics:
                _log.info("step %d: %s", step, _metrics_text(metrics))
        return metrics

    try:
        for step in range(start, t.num_steps):
            state, metrics = train_step(state, host_batch(next(batches, None), step))
            pending.append(metrics)
            done = step + 1
            bar.update(1)
            save_now = done % t.checkpoint_every == 0 or done == t.num_steps
            log_now = done % t.log_every == 0 or save_now or step_callback is not None
            if log_now:
                # Raises on a non-finite loss, gradient norm or new state, before that state can be saved.
                final.update(_host_window(pending, done, state), step=done)
                pending = []
                seconds = time.perf_counter() - window_start  # the host sync above ends the window
                final["train/steps_per_s"] = (done - window_first) / seconds
                final["train/examples_per_s"] = (done - window_first) * t.batch_size / seconds
                writer.write(done, {k: v for k, v in final.items() if k.startswith("train/")})
                bar.set_postfix(loss=f"{final['train/loss']:.4f}")
                if log_metrics:
                    _log.info("step %d: %s", done, _metrics_text(final, "train/"))
            if save_now:
                store.save(done, state.to_dict(), run_config,
                           None if data_iter is None else data_iter.get_state())
            if done % t.eval_every == 0 or done == t.num_steps:
                final.update(run_eval(done))
            if step_callback is not None:
                step_callback(done, dict(final))
            if log_now:  # the next window starts after this step's save and evaluation
                window_start, window_first = time.perf_counter(), done
        if start >= t.num_steps:  # nothing left to train: report the final evaluation
            final.update(run_eval(start))
    finally:
        bar.close()
        store.wait()  # let an in-flight async save finish (a hard kill leaves only Orbax's tmp dir)
        store.close()
        writer.close()
    return final
