"""Expert weights stored quantized: the formats the engine keeps in host memory and copies to the device.

A stack of expert matrices w [E, d_in, d_out] (`Experts.wi` [E, d, ff], `Experts.wo` [E, ff, d]) is either a
plain array (format "bfloat16": unquantized, in the model's dtype) or a `QuantizedExperts` pytree whose
every leaf is stacked on E, so the engine indexes, slices and copies each expert by mapping the same
leading-axis operation over the leaves. Formats (symmetric, no zero point):

- "int8": one float32 scale per expert and output channel, scale = max|w| / 127.5 over d_in.
- "float8_e4m3fn": the same per-channel scale with max|w| mapped to e4m3's largest value, 448.
- "int4": one scale per group of `group_size` consecutive input rows, per output channel (scale =
  max|w| / 7.5 over the group); two values per byte (uint8), so a stack takes half int8's bytes.
  `jnp.int4` arrays take one byte per value in host memory and in a host -> device copy, so they are
  packed here instead.

Scales and rounding come from qwix (`qwix.quantize` / `qwix.dequantize`); this module adds the int4
packing and the stacked container, which qwix's `QArray` cannot be (its values keep the logical shape).
`dequantize` runs on the device inside the jitted block, right before the grouped matmul.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import qwix
from flax import struct

Array = jax.Array

FORMATS = ("bfloat16", "int8", "float8_e4m3fn", "int4")
DEFAULT_GROUP_SIZE = 128
_QTYPES = {"int8": jnp.int8, "float8_e4m3fn": jnp.float8_e4m3fn, "int4": jnp.int4}
_CHUNK_VALUES = 2 ** 26  # weights quantized per device computation (256 MiB of float32)


@struct.dataclass
class QuantizedExperts:
    """A quantized expert stack [E, d_in, d_out]; every leaf has E leading, so `stack[i]` (i an int, an index
    array or a slice on the leading axis) selects experts of every leaf."""

    # int8 / float8_e4m3fn [E, d_in, d_out]; int4: uint8 [E, d_in // 2, d_out], byte r holds input rows 2r
    # (low nibble) and 2r + 1 (high nibble) as two's-complement 4-bit values
    values: Array
    scales: Array  # float32 [E, d_in // group, d_out]; per-channel formats: group = d_in, [E, 1, d_out]
    format: str = struct.field(pytree_node=False)

    @property
    def shape(self) -> tuple[int, ...]:
        """The logical (dequantized) shape [E, d_in, d_out]."""
        *lead, rows, cols = self.values.shape
        return (*lead, rows * 2 if self.format == "int4" else rows, cols)

    @property
    def group_size(self) -> int:
        return self.shape[-2] // self.scales.shape[-2]

    @property
    def nbytes(self) -> int:
        return sum(leaf.nbytes for leaf in jax.tree.leaves(self))

    def __getitem__(self, index) -> "QuantizedExperts":
        if index is Ellipsis:
            return self
        return jax.tree.map(lambda leaf: leaf[index], self)


def check_format(expert_dtype: str) -> None:
    if expert_dtype not in FORMATS:
        raise ValueError(f"unknown expert dtype {expert_dtype!r}; choose one of {', '.join(FORMATS)}")


def check_group_size(group_size: int, d_in: int | None = None) -> None:
    """int4's group size: a positive even number (two values per byte) that divides the input dimension."""
    if not isinstance(group_size, int) or group_size < 2 or group_size % 2:
        raise ValueError(f"int4 group size must be a positive even integer, got {group_size!r}")
    if d_in is not None and d_in % group_size:
        raise ValueError(f"int4 group size {group_size} does not divide the experts' input dimension {d_in}; "
                         f"choose a divisor of {d_in}")


def quantize(w, expert_dtype: str, group_size: int = DEFAULT_GROUP_SIZE):
    """w [E, d_in, d_out] (any float dtype) -> QuantizedExperts (numpy leaves for concrete w, traced ones
    inside a trace), or w itself for "bfloat16"."""
    check_format(expert_dtype)
    if expert_dtype == "bfloat16":
        return w
    if len(w.shape) != 3:
        raise ValueError(f"an expert stack is [E, d_in, d_out], got shape {tuple(w.shape)}")
    if expert_dtype == "int4":
        check_group_size(group_size, w.shape[1])
    if isinstance(w, jax.core.Tracer):  # traced (jit, eval_shape): one computation
        return _quantize(w, expert_dtype, group_size)
    # Concrete weights (possibly a stack in pinned host memory, where a jitted op would compute in place): read
    # once to the host, quantized a few experts at a time on the default device (bounded float32
    # temporaries), and returned as host (numpy) leaves for the caller to place.
    host = np.asarray(w)
    per = max(1, _CHUNK_VALUES // max(1, host.shape[1] * host.shape[2]))
    device = jax.devices()[0]
    pieces = [jax.device_get(_quantize(jax.device_put(host[s:s + per], device), expert_dtype, group_size))
              for s in range(0, host.shape[0], per)]
    return jax.tree.map(lambda *parts: np.concatenate(parts), *pieces)


@functools.partial(jax.jit, static_argnums=(1, 2))
def _quantize(w, expert_dtype, group_size):
    tiles = {1: group_size} if expert_dtype == "int4" else {}
    q = qwix.quantize(w.astype(jnp.float32), _QTYPES[expert_dtype], channelwise_axes=(0, 2), tiled_axes=tiles,
                      scale_dtype=jnp.float32)
    values = _pack_int4(q.qvalue.astype(jnp.int8)) if expert_dtype == "int4" else q.qvalue
    return QuantizedExperts(values, q.scale, expert_dtype)


def dequantize(w, dtype) -> Array:
    """A plain stack or a QuantizedExperts -> the weights [..., d_in, d_out] in `dtype` (traced: on the device)."""
    if not isinstance(w, QuantizedExperts):
        return w.astype(dtype)
    values = _unpack_int4(w.values) if w.format == "int4" else w.values  # [..., d_in, d_out]
    qtype = jnp.int8 if w.format == "int4" else _QTYPES[w.format]
    return qwix.dequantize(qwix.QArray(values, w.scales, None, qtype)).astype(dtype)


def _pack_int4(q: Array) -> Array:
    """int8 values in [-8, 7], [..., 2r, n] -> uint8 [..., r, n]: row 2r in the low nibble, 2r + 1 in the high."""
    nibbles = q.astype(jnp.uint8) & 0xF
    return nibbles[..., 0::2, :] | (nibbles[..., 1::2, :] << 4)


def _unpack_int4(packed: Array) -> Array:
    """uint8 [..., r, n] -> int8 [..., 2r, n] (the inverse of `_pack_int4`)."""
    low = (packed & 0xF).astype(jnp.int8)
    high = (packed >> 4).astype(jnp.int8)
    pairs = jnp.stack([low, high], axis=-2)  # [..., r, 2, n]
    pairs = jnp.where(pairs > 7, pairs - 16, pairs)  # two's complement
    return pairs.reshape(*packed.shape[:-2], 2 * packed.shape[-2], packed.shape[-1])


def expert_nbytes(d_in: int, d_out: int, expert_dtype: str, group_size: int = DEFAULT_GROUP_SIZE,
                  plain_dtype="bfloat16") -> int:
    """Bytes one expert's [d_in, d_out] matrix takes in `expert_dtype` (values + scales), from the shapes
    `quantize` produces (no weights materialized)."""
    check_format(expert_dtype)
    w = jax.ShapeDtypeStruct((1, d_in, d_out), jnp.dtype(plain_dtype))
    out = jax.eval_shape(functools.partial(quantize, expert_dtype=expert_dtype, group_size=group_size), w)
    return sum(int(leaf.size) * leaf.dtype.itemsize for leaf in jax.tree.leaves(out))


def as_format(w, expert_dtype: str, group_size: int, dtype, name: str = "experts"):
    """An expert stack in the engine's format: a plain stack is cast to `dtype` ("bfloat16") or quantized; a
    stack already quantized (a quantized store) must be in `expert_dtype` and is kept as it is."""
    check_format(expert_dtype)
    if isinstance(w, QuantizedExperts):
        if w.format != expert_dtype:
            raise ValueError(f"{name} are stored as {w.format}, but expert_dtype is {expert_dtype!r}: "
                             f"use expert_dtype={w.format!r} with this checkpoint")
        return w
    if expert_dtype == "bfloat16":
        return w.astype(dtype)
    return quantize(w, expert_dtype, group_size)
