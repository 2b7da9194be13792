"""How much memory a generation request needs, and whether the device has it: checked on the host before
anything is compiled or dispatched, so a request that cannot fit fails at once with the figures instead of
growing until the process is killed or a kernel fails. `put_on_host` does the same for host memory: a stack
that does not fit XLA's pinned host pool fails with its name, its size and the setting that raises the pool.

`estimate_request(config, batch, input_len, max_new_tokens, num_beams, expert_buffer_bytes)` adds up the
tensors a request allocates beyond the weights (which are already resident, and counted as in use). With
s the bytes per element of the compute dtype (`config.dtype`), B the batch, S the input length, T
max_new_tokens, R = B * num_beams decoder rows, H heads, k = d_kv, d = d_model, f = d_ff, E experts,
V the vocabulary and L decoder blocks:

    attention_scores = 4 * B*H*S*S * 4        the encoder's self-attention: the position bias [B, H, S, S]
                                              (float32, held through the stack), the scores, the softmax
                                              and the probabilities of one block
    encoder          = B*S * (6*d + 4*H*k + 2*f) * s + 2 * B*S*E * 4
                                              one block's hidden states (input, norm, attention and FFN
                                              outputs), queries/keys/values/context, the FFN's hidden
                                              layer, the router's logits and probabilities (float32)
    encoder_output   = (B + R) * S*d * s      the encoder's output, and its copy per beam
    cross_kv         = 2 * L * R*S*H*k * s    cross-attention keys and values of every decoder block
    self_kv          = 2 * L * R*T*H*k * s    the decoder's self-attention cache
    decode_step      = 3 * R*H*(S+T) * 4 + 3 * R*V * 4 + R * (6*d + 2*f) * s + 2 * R*T * 4
                                              one step's attention scores, logits (float32: logits, their
                                              log-softmax, the beam candidates), hidden states, and the
                                              generated tokens with the search's state
    experts          = expert_buffer_bytes    the engine's expert slot tables for the request (0 where
                                              every expert is resident)
    workspace        = 64 MiB + (the sum of the above) / 8
                                              compilation scratch (autotuning), library workspaces and
                                              allocator fragmentation

The total is their sum: a conservative bound, since the encoder's temporaries are freed before the decoder's
caches fill. On an H200 (default model, 64 new tokens, 2k-16k input tokens) the engine's measured peak was
0.85-1.01 of the sum without the workspace (the four [B, H, S, S] tensors are all allocated when the engine
dispatches a block at a time), and `pj.generate`'s, one fused program, about half of it.
`available_bytes(device)` is the device's free memory (`bytes_limit - bytes_in_use` from
`device.memory_stats()`) where the device reports it (GPUs), else the host's available memory (CPU: the
device's buffers are host memory).
"""

from __future__ import annotations

import dataclasses
import os

import numpy as np

from pregated_jax.config import SwitchConfig

GIB = 1 << 30
F32 = 4
WORKSPACE_BYTES = 64 << 20  # the fixed part of `RequestMemory.workspace`


class RequestTooLargeError(ValueError):
    """A generation request needs more memory than is available."""


@dataclasses.dataclass(frozen=True)
class RequestMemory:
    """The bytes a request needs beyond the resident weights, by part (see the module's docstring)."""

    attention_scores: int
    encoder: int
    encoder_output: int
    cross_kv: int
    self_kv: int
    decode_step: int
    experts: int
    workspace: int

    @property
    def total(self) -> int:
        return sum(dataclasses.astuple(self))

    def largest(self, n: int = 3) -> str:
        parts = sorted(dataclasses.asdict(self).items(), key=lambda kv: -kv[1])[:n]
        return ", ".join(f"{name} {_gib(b)}" for name, b in parts if b)


def estimate_request(config: SwitchConfig, batch: int, input_len: int, max_new_tokens: int, num_beams: int = 1,
                     expert_buffer_bytes: int = 0) -> RequestMemory:
    """The memory a generation request needs beyond the weights (the module's docstring gives the formula)."""
    c, s = config, int(np.dtype(config.dtype).itemsize)
    b, n, t = int(batch), int(input_len), int(max_new_tokens)
    rows = b * int(num_beams)
    h, k, d, f, e, v, layers = c.num_heads, c.d_kv, c.d_model, c.d_ff, c.num_experts, c.vocab_size, \
        c.num_decoder_layers
    parts = dict(
        attention_scores=4 * b * h * n * n * F32,
        encoder=b * n * (6 * d + 4 * h * k + 2 * f) * s + 2 * b * n * e * F32,
        encoder_output=(b + rows) * n * d * s,
        cross_kv=2 * layers * rows * n * h * k * s,
        self_kv=2 * layers * rows * t * h * k * s,
        decode_step=3 * rows * h * (n + t) * F32 + 3 * rows * v * F32 + rows * (6 * d + 2 * f) * s + 2 * rows * t * F32,
        experts=int(expert_buffer_bytes),
    )
    return RequestMemory(**parts, workspace=WORKSPACE_BYTES + sum(parts.values()) // 8)


def available_bytes(device) -> tuple[int | None, str]:
    """-> (bytes free for a request on `device`, where the figure comes from); (None, why) where unknown."""
    stats = None
    try:
        stats = device.memory_stats()
    except Exception:  # noqa: BLE001 -- a backend without memory statistics: fall back to the host's figure
        pass
    if stats and "bytes_limit" in stats:
        free = int(stats["bytes_limit"]) - int(stats.get("bytes_in_use", 0))
        return free, f"free memory of {device} (bytes_limit - bytes_in_use)"
    return host_available_bytes()


def host_available_bytes() -> tuple[int | None, str]:
    """-> (the host's available memory, where it comes from): /proc/meminfo's MemAvailable, else sysconf."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024, "host memory available (MemAvailable, /proc/meminfo)"
    except OSError:
        pass
    try:
        return (os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE"),
                "host memory available (free physical pages, sysconf)")
    except (ValueError, OSError, AttributeError):
        return None, "no figure for the available memory on this system"


def check_request_fits(config: SwitchConfig, device, batch: int, input_len: int, max_new_tokens: int,
                       num_beams: int = 1, expert_buffer_bytes: int = 0) -> RequestMemory:
    """Raises RequestTooLargeError, with the estimate and the available memory, when the request's estimate
    exceeds what `device` has free. -> the estimate. Nothing is checked where the free memory is unknown."""
    need = estimate_request(config, batch, input_len, max_new_tokens, num_beams, expert_buffer_bytes)
    free, source = available_bytes(device)
    if free is not None and need.total > free:
        raise RequestTooLargeError(
            f"this request (batch {batch}, input length {input_len}, max_new_tokens {max_new_tokens}, "
            f"num_beams {num_beams}, {config.dtype}) needs about {_gib(need.total)} ({need.total} bytes; largest: "
            f"{need.largest()}), but only {_gib(free)} ({free} bytes) is available ({source}); shorten the "
            f"input or lower the batch, max_new_tokens or num_beams")
    return need


def _gib(n: int) -> str:
    return f"{n / GIB:.3g} GiB"


HOST_LIMIT_VAR = "XLA_PJRT_GPU_HOST_MEMORY_LIMIT_GB"  # XLA's pinned host pool on a GPU; 64 GB when unset


def put_on_host(value, sharding, name: str = "experts"):
    """`jax.device_put(value, sharding)` for a stack going to host memory. On a GPU, XLA takes pinned host memory
    from one pool per process (64 GB unless XLA_PJRT_GPU_HOST_MEMORY_LIMIT_GB says otherwise); running out of
    it raises a MemoryError that names the stack, its size and that variable instead of XLA's allocator error."""
    import jax

    try:
        return jax.device_put(value, sharding)
    except jax.errors.JaxRuntimeError as e:
        if "Out of host memory" not in str(e):
            raise
        gib = sum(leaf.size * np.dtype(leaf.dtype).itemsize for leaf in jax.tree.leaves(value)) / 2 ** 30
        limit = os.environ.get(HOST_LIMIT_VAR)
        raise MemoryError(
            f"{name}: {gib:.2f} GiB more do not fit in XLA's pinned host memory "
            f"({f'{HOST_LIMIT_VAR}={limit}' if limit else f'{HOST_LIMIT_VAR} unset: 64 GB'}). Set {HOST_LIMIT_VAR} "
            f"to the GB of host memory this process may pin, before JAX starts, or keep the experts in a smaller "
            f"format (expert_dtype; scripts/quantize.py writes a store that loads without the bf16 copy)") from e
