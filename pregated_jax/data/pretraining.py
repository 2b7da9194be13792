"""T5's span-corruption objective for pretraining from scratch (Raffel et al. 2020, section 3.1.4).

A random ~15% of the tokens, in spans of mean length 3, is removed from the input; each removed span is
replaced by one sentinel, and the target lists the sentinels each followed by the span it stands for:

  tokens   a b c d e f g h        noise mask . . X X . . X .
  inputs   a b <S0> e f <S1> h </s>
  targets  <S0> c d <S1> g <S2> </s>

Sentinel k has id `sentinel_start - k` (32099 - k for T5: `<extra_id_k>`). As in T5, a sequence that
ends with non-noise tokens gets a closing sentinel in the targets. The random mask follows T5's
`random_spans_noise_mask`: round(L * density) noise tokens in round(noise / mean_span) spans, the
sequence starting with a non-noise span and ending with a noise span.
"""

from __future__ import annotations

from typing import Iterable, Iterator, Sequence

import numpy as np

from pregated_jax.data.tokenizer import EOS_ID, Tokenizer

T5_FIRST_SENTINEL = 32099  # <extra_id_0> in T5's 32,000 pieces + 100 extra ids


def _rng(rng) -> np.random.Generator:
    return rng if isinstance(rng, np.random.Generator) else np.random.default_rng(rng)


def _random_segmentation(num_items: int, num_segments: int, rng: np.random.Generator) -> np.ndarray:
    """Lengths of a uniformly random split of num_items into num_segments non-empty parts. [num_segments]"""
    first_in_segment = np.zeros(num_items, np.int64)  # [num_items]
    first_in_segment[1 + rng.permutation(num_items - 1)[: num_segments - 1]] = 1
    return np.bincount(np.cumsum(first_in_segment), minlength=num_segments)


def random_spans_noise_mask(length: int, noise_density: float = 0.15, mean_span_length: float = 3.0,
                            rng=None) -> np.ndarray:
    """Boolean noise mask [length] with T5's span statistics (see the module docstring)."""
    rng = _rng(rng)
    padded = max(length, 2)
    num_noise = int(np.clip(round(padded * noise_density), 1, padded - 1))
    num_spans = max(int(round(num_noise / mean_span_length)), 1)
    num_spans = min(num_spans, padded - num_noise)  # every noise span needs a non-noise span before it
    noise_lengths = _random_segmentation(num_noise, num_spans, rng)              # [num_spans]
    nonnoise_lengths = _random_segmentation(padded - num_noise, num_spans, rng)  # [num_spans]
    interleaved = np.stack([nonnoise_lengths, noise_lengths], axis=1).reshape(-1)  # [2 * num_spans]
    is_noise = np.repeat(np.tile([False, True], num_spans), interleaved)         # [padded]
    return is_noise[:length]


def span_corruption_lengths(inputs_length: int, noise_density: float = 0.15,
                            mean_span_length: float = 3.0) -> tuple[int, int]:
    """(raw tokens per example, targets length) so that corrupted inputs fill `inputs_length` incl. EOS.

    T5's `random_spans_helper`: 512 -> (568, 114) at density 0.15, mean span 3.
    """
    def lengths(tokens_length):
        num_noise = int(round(tokens_length * noise_density))
        num_spans = int(round(num_noise / mean_span_length))
        return tokens_length - num_noise + num_spans + 1, num_noise + num_spans + 1

    tokens_length = inputs_length - 1
    while lengths(tokens_length + 1)[0] <= inputs_length:
        tokens_length += 1
    return tokens_length, lengths(tokens_length)[1]


def span_corruption(token_ids: Sequence[int], noise_density: float = 0.15, mean_span_length: float = 3.0,
                    rng=None, *, noise_mask: Sequence[bool] | None = None,
                    sentinel_start: int = T5_FIRST_SENTINEL, add_eos: bool = True,
                    ) -> tuple[np.ndarray, np.ndarray]:
    """(inputs, targets) int32 id arrays of T5 span corruption of `token_ids` (the text's ids, without EOS).

    rng: a np.random.Generator, an int seed or None. noise_mask: a fixed boolean mask [len(token_ids)]
    instead of a random one. Both outputs end with EOS when add_eos (a trailing EOS in token_ids is dropped
    first). Sentinel k is `sentinel_start - k`.
    """
    tokens = np.asarray(token_ids, np.int32).reshape(-1)  # [L]
    if tokens.size and tokens[-1] == EOS_ID:
        tokens = tokens[:-1]
    if tokens.size == 0:
        raise ValueError("span_corruption needs at least one token")
    if noise_mask is None:
        mask = random_spans_noise_mask(tokens.size, noise_density, mean_span_length, rng)  # [L]
    else:
        mask = np.asarray(noise_mask, bool).reshape(-1)
        if mask.shape != tokens.shape:
            raise ValueError(f"noise_mask has length {mask.size}, token_ids {tokens.size}")
    inputs = _spans_to_sentinels(tokens, mask, sentinel_start)
    # Targets: the same operation on the complementary mask. A virtual non-noise token in front makes the
    # span before noise span k carry sentinel k even when the sequence starts with noise.
    targets = _spans_to_sentinels(np.concatenate([[0], tokens]), np.concatenate([[True], ~mask]),
                                  sentinel_start)
    if add_eos:
        inputs, targets = (np.append(x, np.int32(EOS_ID)) for x in (inputs, targets))
    return inputs.astype(np.int32), targets.astype(np.int32)


def _spans_to_sentinels(tokens: np.ndarray, mask: np.ndarray, sentinel_start: int) -> np.ndarray:
    """Replace each run of masked tokens by one sentinel, counting down from sentinel_start. [L] -> [L']"""
    prev = np.concatenate([[False], mask[:-1]])          # [L]
    first = mask & ~prev                                  # [L] first token of each masked run
    sentinels = sentinel_start + 1 - np.cumsum(first)     # [L]
    out = np.where(first, sentinels, tokens)
    return out[~(mask & prev)]


def span_corruption_examples(texts: Iterable[str], tokenizer: Tokenizer, inputs_length: int,
                             noise_density: float = 0.15, mean_span_length: float = 3.0,
                             seed: int = 0) -> Iterator[dict]:
    """Pretraining examples {"inputs": ids, "targets": ids} from raw text, as T5 builds them from C4.

    The texts' ids (no EOS) are concatenated into one stream and cut into chunks of
    `span_corruption_lengths(inputs_length)[0]` tokens; each chunk is span-corrupted, so its inputs fit
    `inputs_length` exactly and its targets `span_corruption_lengths(...)[1]` (the final, shorter chunk
    gives shorter ones). Feed the result to `batches(...)` with those lengths.
    """
    tokens_length, _ = span_corruption_lengths(inputs_length, noise_density, mean_span_length)
    rng = np.random.default_rng(seed)
    buffer: list[int] = []
    for text in texts:
        buffer.extend(tokenizer.encode(text, add_eos=False))
        while len(buffer) >= tokens_length:
            chunk, buffer = buffer[:tokens_length], buffer[tokens_length:]
            inputs, targets = span_corruption(chunk, noise_density, mean_span_length, rng,
                                              sentinel_start=tokenizer.sentinel_id(0))
            yield {"inputs": inputs, "targets": targets}
    if len(buffer) >= 2:
        inputs, targets = span_corruption(buffer, noise_density, mean_span_length, rng,
                                          sentinel_start=tokenizer.sentinel_id(0))
        yield {"inputs": inputs, "targets": targets}
