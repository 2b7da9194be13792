"""Batches for the training loop: the default data path, resumable iteration, eval views, host arrays.

A batch is a dict of int32 numpy arrays (the format of `pregated_jax.data.pipeline`):
  input_ids, attention_mask                       [B, S]  encoder tokens, 1 = real token
  decoder_input_ids, labels, decoder_attention_mask  [B, T]  shifted targets, targets, 1 = real label
"""

from __future__ import annotations

import itertools
from typing import Callable, Iterable

import numpy as np

from pregated_jax.train.config import TrainConfig

BATCH_KEYS = ("input_ids", "attention_mask", "decoder_input_ids", "labels", "decoder_attention_mask")
Batch = dict  # BATCH_KEYS -> int32 [B, S] (encoder side) or [B, T] (decoder side)


def default_batches(config: TrainConfig):
    """(train batch iterator, eval batch factory or None) from `pregated_jax.data` by task name."""
    from pregated_jax.data.pipeline import batches
    from pregated_jax.data.sources import EVAL_SPLITS, get_task, local_source
    from pregated_jax.data.tokenizer import default_tokenizer

    d, t = config.data, config.training
    if d.task == "local":
        if d.train_path is None:
            raise ValueError("DataConfig.task='local' needs DataConfig.train_path")
        source = lambda path: local_source(path, d.input_field, d.target_field, d.input_prefix)  # noqa: E731
        train_src, eval_src = (lambda: source(d.train_path)), (d.eval_path and (lambda: source(d.eval_path)))
    else:
        task_source = get_task(d.task).source
        split = d.eval_split or EVAL_SPLITS[d.task]
        train_src = lambda: task_source("train", data_dir=d.data_dir)  # noqa: E731
        eval_src = lambda: task_source(split, data_dir=d.data_dir)  # noqa: E731
    tok = default_tokenizer()
    shape = (t.batch_size, t.max_input_len, t.max_target_len)
    train = batches(train_src(), tok, *shape, shuffle_seed=t.seed, repeat=True)
    return train, ((lambda: batches(eval_src(), tok, *shape)) if eval_src else None)


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
    """The batch's BATCH_KEYS as int32 numpy arrays (extra keys dropped); None means the data ran out."""
    if batch is None:
        raise ValueError(f"train batches ran out at step {step}")
    try:
        return {k: np.asarray(batch[k], np.int32) for k in BATCH_KEYS}
    except KeyError as e:
        raise KeyError(f"batch of step {step} lacks {e}; a batch needs {BATCH_KEYS}") from None
