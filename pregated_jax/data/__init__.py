"""Data and tokenization: the T5 tokenizer, example sources, the task registry, batching, span corruption.

    from pregated_jax import data
    tok = data.default_tokenizer()
    source, metric = data.get_task("debian")
    for batch in data.batches(source("train"), tok, batch_size=32, max_input_len=256, max_target_len=64,
                              shuffle_seed=0, repeat=True):
        ...  # batch: dict of int32 numpy arrays, keys data.BATCH_KEYS

Training reads through grain instead (`pregated_jax.data.grain_pipeline.train_dataset`: per-epoch shuffling,
per-process shards, optional packing with data.PACKING_KEYS, a checkpointable iterator; imported on use).
"""

from pregated_jax.data.pipeline import (BATCH_KEYS, DECODER_START_ID, PACKING_KEYS, batches, collate,
                                       encode_example)
from pregated_jax.data.sources import (
    DEBIAN_SPLIT_SIZES, EVAL_SPLITS, TASKS, MissingFieldError, Task, count_examples, debian_source,
    get_task, grain_source, local_grain_source, local_source, tfds_grain_source, tfds_source)
from pregated_jax.data.pretraining import (
    random_spans_noise_mask, span_corruption, span_corruption_examples, span_corruption_lengths)
from pregated_jax.data.tokenizer import EOS_ID, PAD_ID, Tokenizer, default_tokenizer, default_vocab_path

__all__ = [
    "BATCH_KEYS", "DEBIAN_SPLIT_SIZES", "DECODER_START_ID", "EOS_ID", "EVAL_SPLITS", "PACKING_KEYS", "PAD_ID",
    "TASKS", "MissingFieldError", "Task", "Tokenizer", "batches", "collate", "count_examples", "debian_source",
    "default_tokenizer", "default_vocab_path", "encode_example", "get_task", "grain_source",
    "local_grain_source", "local_source", "tfds_grain_source",
    "random_spans_noise_mask", "span_corruption", "span_corruption_examples", "span_corruption_lengths",
    "tfds_source",
]
