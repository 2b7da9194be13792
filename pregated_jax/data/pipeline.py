"""Batching: examples -> fixed-shape numpy batches for the encoder-decoder.

Every batch is a dict with exactly these int32 arrays (B = batch size, Li = max_input_len,
Lt = max_target_len):
  input_ids               [B, Li]  encoder tokens, EOS-terminated, padded with 0
  attention_mask          [B, Li]  1 for a real token, 0 for padding
  decoder_input_ids       [B, Lt]  labels shifted right by one, starting with decoder_start (0)
  labels                  [B, Lt]  target tokens incl. EOS, padded with 0
  decoder_attention_mask  [B, Lt]  1 where `labels` holds a real token
"""

from __future__ import annotations

from typing import Iterable, Iterator, Sequence

import numpy as np

from pregated_jax.data.tokenizer import EOS_ID, PAD_ID, Tokenizer

DECODER_START_ID = 0
BATCH_KEYS = ("input_ids", "attention_mask", "decoder_input_ids", "labels", "decoder_attention_mask")
# Packed batches (`grain_pipeline.train_dataset(pack=True)`) add these int32 arrays, 0 = padding:
# encoder_* [B, Li] and decoder_* [B, Lt], segment ids 1, 2, ... per example in a row, positions 0, 1, ... within it.
PACKING_KEYS = ("encoder_segment_ids", "encoder_positions", "decoder_segment_ids", "decoder_positions")


def _token_ids(value, tokenizer: Tokenizer, max_len: int) -> np.ndarray:
    """Ids of a str (EOS appended) or of an int sequence (taken as is), cut to max_len keeping EOS last."""
    # Shape: [<= max_len]
    if isinstance(value, str):
        ids = np.asarray(tokenizer.encode(value, add_eos=True), dtype=np.int32)
    else:
        ids = np.asarray(value, dtype=np.int32).reshape(-1)
    if ids.shape[0] > max_len:
        ids = np.concatenate([ids[: max_len - 1], np.array([EOS_ID], np.int32)])
    return ids


def encode_example(example: dict, tokenizer: Tokenizer, max_input_len: int,
                   max_target_len: int) -> tuple[np.ndarray, np.ndarray]:
    """(input ids [<= Li], target ids [<= Lt]) of one {"inputs", "targets"} example.

    Strings are tokenized with EOS appended; sequences of ints are taken as complete token ids (EOS included,
    as `span_corruption` returns them). Too long sequences are truncated, EOS kept at the end.
    """
    try:
        inputs, targets = example["inputs"], example["targets"]
    except (KeyError, TypeError):
        raise ValueError("an example must be a dict with 'inputs' and 'targets', "
                         f"got {example!r:.200}") from None
    return _token_ids(inputs, tokenizer, max_input_len), _token_ids(targets, tokenizer, max_target_len)


def collate(encoded: Sequence[tuple[np.ndarray, np.ndarray]], max_input_len: int,
            max_target_len: int) -> dict[str, np.ndarray]:
    """Pad a list of (input ids, target ids) into one batch dict (see the module docstring)."""
    b = len(encoded)
    input_ids = np.full((b, max_input_len), PAD_ID, np.int32)        # [B, Li]
    attention_mask = np.zeros((b, max_input_len), np.int32)          # [B, Li]
    labels = np.full((b, max_target_len), PAD_ID, np.int32)          # [B, Lt]
    decoder_attention_mask = np.zeros((b, max_target_len), np.int32)  # [B, Lt]
    for row, (inp, tgt) in enumerate(encoded):
        input_ids[row, : len(inp)] = inp
        attention_mask[row, : len(inp)] = 1
        labels[row, : len(tgt)] = tgt
        decoder_attention_mask[row, : len(tgt)] = 1
    decoder_input_ids = np.concatenate(                               # [B, Lt]
        [np.full((b, 1), DECODER_START_ID, np.int32), labels[:, :-1]], axis=1)
    return {"input_ids": input_ids, "attention_mask": attention_mask, "decoder_input_ids": decoder_input_ids,
            "labels": labels, "decoder_attention_mask": decoder_attention_mask}


def batches(examples: Iterable[dict], tokenizer: Tokenizer, batch_size: int, max_input_len: int,
            max_target_len: int, shuffle_seed: int | None = None, repeat: bool = False,
            drop_remainder: bool = False, return_examples: bool = False) -> Iterator:
    """Fixed-shape numpy batches of `examples` ({"inputs", "targets"} dicts, str or token ids).

    shuffle_seed: None keeps the source order; an int shuffles all examples, again every epoch, with
        `np.random.default_rng([shuffle_seed, epoch])` — the same seed gives the same batches.
    repeat: cycle through the examples forever (epochs are concatenated before batching, like
        tf.data's repeat-then-batch, so no partial batch ever appears).
    drop_remainder: drop a final batch smaller than batch_size (only matters when repeat is False).
    return_examples: yield (batch, list of the source example dicts in batch order) instead of the batch,
        e.g. for evaluation against the reference texts / all gold answers.

    Shuffling or repeating tokenizes and holds every example in memory (49k Debian examples: a few
    seconds, tens of MB); without either the source is streamed.
    """
    if batch_size <= 0 or max_input_len <= 0 or max_target_len <= 0:
        raise ValueError("batch_size, max_input_len and max_target_len must be positive, got "
                         f"{batch_size}, {max_input_len}, {max_target_len}")

    def encoded_stream(items):
        for ex in items:
            yield encode_example(ex, tokenizer, max_input_len, max_target_len), ex

    if shuffle_seed is None and not repeat:
        stream = encoded_stream(examples)
    else:
        cache = list(encoded_stream(examples))
        if not cache:
            raise ValueError("batches: the example source is empty")
        stream = _epochs(cache, shuffle_seed, repeat)

    pending: list = []
    for item in stream:
        pending.append(item)
        if len(pending) == batch_size:
            yield _emit(pending, max_input_len, max_target_len, return_examples)
            pending = []
    if pending and not drop_remainder:
        yield _emit(pending, max_input_len, max_target_len, return_examples)


def _epochs(cache: list, shuffle_seed: int | None, repeat: bool) -> Iterator:
    epoch = 0
    while True:
        if shuffle_seed is None:
            order = range(len(cache))
        else:
            order = np.random.default_rng([shuffle_seed, epoch]).permutation(len(cache))
        for i in order:
            yield cache[i]
        epoch += 1
        if not repeat:
            return


def _emit(pending: list, max_input_len: int, max_target_len: int, return_examples: bool):
    batch = collate([enc for enc, _ in pending], max_input_len, max_target_len)
    return (batch, [ex for _, ex in pending]) if return_examples else batch
