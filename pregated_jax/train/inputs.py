"""Batches for the training loop: the default data path, resumable iteration, eval views, host arrays.

A batch is a dict of int32 numpy arrays (the format of `pregated_jax.data.pipeline`):
  input_ids, attention_mask                       [B, S]  encoder tokens, 1 = real token
  decoder_input_ids, labels, decoder_attention_mask  [B, T]  shifted targets, targets, 1 = real label
and, packed (several examples per row), PACKING_KEYS: encoder_* [B, S], decoder_* [B, T] segment ids / positions.
"""

from __future__ import annotations

import itertools
from typing import Callable, Iterable

import numpy as np

from pregated_jax.data.pipeline import PACKING_KEYS  # packed batches (DataConfig.pack): segment ids, positions
from pregated_jax.train.config import TrainConfig

BATCH_KEYS = ("input_ids", "attention_mask", "decoder_input_ids", "labels", "decoder_attention_mask")
Batch = dict  # BATCH_KEYS -> int32 [B, S] (encoder side) or [B, T] (decoder side)


def default_batches(config: TrainConfig, shard_index: int | None = None, shard_count: int | None = None):
    """(train batch iterator, eval batch factory or None) from `pregated_jax.data` by task name.

    Train batches come from the grain pipeline (`pregated_jax.data.grain_pipeline.train_dataset`): the
    task's train split (or `train_path`), shuffled with `training.seed` and reshuffled every epoch, packed when
    `data.pack`. Each process reads only its shard (shard_index / shard_count, default
    `jax.process_index()` / `jax.process_count()`) and gets its `batch_size // shard_count` rows of each
    global batch. The iterator is a grain DatasetIterator (`get_state` / `set_state`: the loop saves its
    state with each checkpoint). Eval batches: the eval split, one example per row, whole global batches.
    """
    from pregated_jax.data.grain_pipeline import train_dataset
    from pregated_jax.data.pipeline import batches
    from pregated_jax.data.sources import EVAL_SPLITS, get_task, grain_source, local_grain_source, local_source
    from pregated_jax.data.tokenizer import default_tokenizer

    d, t = config.data, config.training
    if shard_index is None or shard_count is None:
        import jax
        shard_index, shard_count = jax.process_index(), jax.process_count()
    if t.batch_size % shard_count:
        raise ValueError(f"TrainingConfig.batch_size {t.batch_size} does not split over {shard_count} processes")
    if d.task == "local":
        if d.train_path is None:
            raise ValueError("DataConfig.task='local' needs DataConfig.train_path")
        train_src = local_grain_source(d.train_path, d.input_field, d.target_field, d.input_prefix)
        eval_src = d.eval_path and (lambda: local_source(d.eval_path, d.input_field, d.target_field,
                                                         d.input_prefix))
    else:
        task_source = get_task(d.task).source
        split = d.eval_split or EVAL_SPLITS[d.task]
        train_src = grain_source(d.task, "train", data_dir=d.data_dir)
        eval_src = lambda: task_source(split, data_dir=d.data_dir)  # noqa: E731
    tok = default_tokenizer()
    shape = (t.batch_size, t.max_input_len, t.max_target_len)
    train = iter(train_dataset(train_src, tok, t.batch_size // shard_count, t.max_input_len, t.max_target_len,
                               seed=t.seed, pack=d.pack, num_packing_bins=d.packing_bins,
                               shard_index=shard_index, shard_count=shard_count, worker_count=d.worker_count))
    return train, ((lambda: batches(eval_src(), tok, *shape)) if eval_src else None)


def is_stateful(source) -> bool:
    """Whether a train batch source is an iterator whose position can be saved and restored (a grain
    DatasetIterator, or anything with get_state() / set_state(state))."""
    return callable(getattr(source, "get_state", None)) and callable(getattr(source, "set_state", None))


def batches_from(source, start: int) -> Iterable[Batch]:
    """Batches for steps start, start+1, ...: `source(step)` if callable, else the iterable minus `start`."""
    if callable(source) and not hasattr(source, "__iter__"):
        return (source(s) for s in itertools.count(start))
    return itertools.islice(iter(source), start, None)


def eval_batches_view(source, limit: int) -> Callable[[], Iterable[Batch]] | None:
    """A re-iterable view of eval batches: a factory, a sequence, or a one-shot iterable (cached)."""
    if source is None or callable(source):
        return source
    cached = source if isinstance(source, (list, tuple)) else list(itertools.islice(source, limit))
    return lambda: cached


def host_batch(batch, step: int) -> Batch:
    """The batch's BATCH_KEYS (+ PACKING_KEYS for a packed batch) as int32 numpy arrays (other keys
    dropped); None means the data ran out."""
    if batch is None:
        raise ValueError(f"train batches ran out at step {step}")
    packed = [k for k in PACKING_KEYS if k in batch]
    if packed and len(packed) != len(PACKING_KEYS):
        raise KeyError(f"batch of step {step} is packed ({', '.join(packed)}) but lacks "
                       f"{sorted(set(PACKING_KEYS) - set(packed))}; a packed batch needs all of {PACKING_KEYS}")
    try:
        return {k: np.asarray(batch[k], np.int32) for k in BATCH_KEYS + (PACKING_KEYS if packed else ())}
    except KeyError as e:
        raise KeyError(f"batch of step {step} lacks {e}; a batch needs {BATCH_KEYS}") from None
