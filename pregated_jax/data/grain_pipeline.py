"""Training input on `grain`: random-access sources, seeded per-epoch shuffling, per-process shards, optional
T5-style example packing, and a checkpointable iterator.

    ds = train_dataset(examples, tok, batch_size=32, max_input_len=256, max_target_len=64, seed=0, pack=True)
    it = iter(ds)                 # a grain DatasetIterator: it.get_state() / it.set_state(state)
    batch = next(it)              # dict of int32 numpy arrays

Unpacked batches have exactly the keys and layout of `pregated_jax.data.pipeline` (BATCH_KEYS). Packed batches
(`pack=True`) hold several examples per row, placed by grain's `FirstFitPackIterDataset` with one shared
segment id per example on both sides, and add (t5x's names, 0 = padding):
  encoder_segment_ids, encoder_positions   [B, Li]  1, 2, ... per example in the row; 0, 1, ... within it
  decoder_segment_ids, decoder_positions   [B, Lt]  the same example numbering on the target side
and `decoder_input_ids` is shifted per segment: each example's targets start with decoder_start (0).

Order: the source is split into `shard_count` strided shards (`source[shard_index::shard_count]`, one per
process), each shard is shuffled with `seed` and reshuffled every epoch (grain's index shuffle seeded with
seed + epoch), encoded (tokenized, truncated keeping EOS last), packed if asked, and batched. The iterator's
state is a small JSON dict (source position, packer buffer), so a resume continues at the next example.
With `worker_count` > 0, that many processes make batches ahead (grain's `mp_prefetch`), each from its own
slice of the shard, interleaved in a fixed order; the state then holds each worker's position, so a resume
needs the same worker_count.
"""

from __future__ import annotations

from typing import Callable, Sequence

import grain
import numpy as np

from pregated_jax.data.pipeline import BATCH_KEYS, DECODER_START_ID, PACKING_KEYS, collate, encode_example
from pregated_jax.data.tokenizer import PAD_ID, Tokenizer


def as_map_dataset(source) -> grain.MapDataset:
    """A grain MapDataset of examples from a MapDataset, a random-access source (`__len__` + `__getitem__`,
    e.g. `tfds.data_source`) or any iterable (materialized into a list of example dicts)."""
    if isinstance(source, grain.MapDataset):
        return source
    if not (hasattr(source, "__len__") and hasattr(source, "__getitem__")):
        source = list(source)
    if len(source) == 0:
        raise ValueError("train_dataset: the example source is empty")
    return grain.MapDataset.source(source)


def shard(ds: grain.MapDataset, shard_index: int, shard_count: int) -> grain.MapDataset:
    """Strided shard `shard_index` of `shard_count` (every shard_count-th example): disjoint shards that
    together cover `ds`, each within one example of the same size."""
    if shard_count < 1 or not 0 <= shard_index < shard_count:
        raise ValueError(f"shard_index must be in [0, shard_count) and shard_count >= 1, got shard_index "
                         f"{shard_index}, shard_count {shard_count}")
    if len(ds) < shard_count:
        raise ValueError(f"{len(ds)} example(s) cannot be split into {shard_count} non-empty shards")
    return ds[shard_index::shard_count]


def encoded_examples(ds: grain.MapDataset, tokenizer: Tokenizer, max_input_len: int,
                     max_target_len: int) -> grain.MapDataset:
    """{"inputs": int32 [<= Li], "targets": int32 [<= Lt]} per example (`pipeline.encode_example`)."""
    def encode(example: dict) -> dict:
        inputs, targets = encode_example(example, tokenizer, max_input_len, max_target_len)
        return {"inputs": inputs, "targets": targets}
    return ds.map(encode)


def collate_unpacked(max_input_len: int, max_target_len: int) -> Callable[[Sequence[dict]], dict]:
    """batch_fn: encoded examples -> one padded batch dict in `pipeline.collate`'s format."""
    def batch_fn(rows: Sequence[dict]) -> dict:
        return collate([(r["inputs"], r["targets"]) for r in rows], max_input_len, max_target_len)
    return batch_fn


def collate_packed(rows: Sequence[dict]) -> dict:
    """batch_fn: rows of grain's packer ({inputs, targets} + their _segment_ids / _positions) -> a packed
    batch dict: BATCH_KEYS + PACKING_KEYS, int32."""
    stack = lambda key: np.stack([np.asarray(r[key], np.int32) for r in rows])  # noqa: E731
    input_ids, labels = stack("inputs"), stack("targets")  # [B, Li], [B, Lt]
    enc_seg, enc_pos = stack("inputs_segment_ids"), stack("inputs_positions")  # [B, Li]
    dec_seg, dec_pos = stack("targets_segment_ids"), stack("targets_positions")  # [B, Lt]
    labels = np.where(dec_seg > 0, labels, PAD_ID)
    shifted = np.concatenate([np.full((len(rows), 1), DECODER_START_ID, np.int32), labels[:, :-1]], axis=1)
    decoder_input_ids = np.where(dec_pos == 0, DECODER_START_ID, shifted).astype(np.int32)  # [B, Lt]
    return {"input_ids": np.where(enc_seg > 0, input_ids, PAD_ID), "attention_mask": (enc_seg > 0).astype(np.int32),
            "decoder_input_ids": decoder_input_ids, "labels": labels,
            "decoder_attention_mask": (dec_seg > 0).astype(np.int32),
            "encoder_segment_ids": enc_seg, "encoder_positions": enc_pos,
            "decoder_segment_ids": dec_seg, "decoder_positions": dec_pos}


def train_dataset(source, tokenizer: Tokenizer, batch_size: int, max_input_len: int, max_target_len: int, *,
                  seed: int | None = 0, pack: bool = False, num_epochs: int | None = None,
                  shard_index: int = 0, shard_count: int = 1, num_packing_bins: int | None = None,
                  read_threads: int = 2, worker_count: int = 0) -> grain.IterDataset:
    """A grain IterDataset of batch dicts (see the module docstring) over `source`'s examples.

    source: a grain MapDataset, a random-access source, or an iterable of {"inputs", "targets"} examples.
    seed: shuffle seed (None: source order); num_epochs None: repeat forever; batch_size: rows per batch of
        this shard (the process-local batch); num_packing_bins: rows grain packs at once (default batch_size;
        more bins pack tighter); read_threads: threads that read and tokenize ahead; worker_count: processes
        that make whole batches ahead (grain's mp_prefetch; 0: none), each over its slice of the examples.
    """
    if batch_size <= 0 or max_input_len <= 0 or max_target_len <= 0:
        raise ValueError("batch_size, max_input_len and max_target_len must be positive, got "
                         f"{batch_size}, {max_input_len}, {max_target_len}")
    if worker_count < 0:
        raise ValueError(f"worker_count must be >= 0, got {worker_count}")
    ds = shard(as_map_dataset(source), shard_index, shard_count)
    if seed is not None:
        ds = ds.shuffle(seed=seed)
    ds = ds.repeat(num_epochs)
    ds = encoded_examples(ds, tokenizer, max_input_len, max_target_len)
    ds = ds.to_iter_dataset(grain.ReadOptions(num_threads=read_threads, prefetch_buffer_size=4 * batch_size))
    if not pack:
        ds = ds.batch(batch_size, drop_remainder=False, batch_fn=collate_unpacked(max_input_len, max_target_len))
    else:
        ds = grain.experimental.FirstFitPackIterDataset(
            ds, length_struct={"inputs": max_input_len, "targets": max_target_len},
            num_packing_bins=num_packing_bins or batch_size, shuffle_bins=False)
        ds = ds.batch(batch_size, drop_remainder=False, batch_fn=collate_packed)
    if worker_count:
        _absl_flags_parsed()
        ds = ds.mp_prefetch(grain.MultiprocessingOptions(num_workers=worker_count))
    return ds


def _absl_flags_parsed() -> None:
    """grain's worker processes read absl flags; a program that is not an absl app never parses them, so mark
    them parsed (their defaults) instead of letting the workers fail on the first flag they read."""
    from absl import flags

    if not flags.FLAGS.is_parsed():
        flags.FLAGS.mark_as_parsed()


def state_worker_count(state: dict) -> int:
    """The worker_count a `train_dataset` iterator's state was saved with: grain's mp_prefetch state holds one
    iterator state per worker; an in-process iterator's state has none."""
    return len(state["iterators_in_use_states"]) if "iterators_in_use_states" in state else 0


def non_pad_tokens(batch: dict) -> int:
    """Real (non-padding) tokens of a batch, inputs plus targets."""
    return int(np.sum(batch["attention_mask"]) + np.sum(batch["decoder_attention_mask"]))


__all__ = ["BATCH_KEYS", "PACKING_KEYS", "as_map_dataset", "collate_packed", "collate_unpacked",
           "encoded_examples", "non_pad_tokens", "shard", "state_worker_count", "train_dataset"]
