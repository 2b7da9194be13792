"""XLA flags the engine's scripts set for the GPU: the decode loop as one CUDA graph.

XLA records runs of kernels into CUDA graphs ("command buffers"). By default a `while_loop` is not recorded: the
host evaluates its exit condition after every decode step and launches the next step, and the GPU idles at each
step boundary. With WHILE and CONDITIONAL command buffers the whole loop, the native expert copies' kernels
included (they are command-buffer compatible), runs as one graph. On an H100, switch-base-128, batch 1, pregated
with the first-block guess: 762.1 -> 790.5 decode tokens/s (docs/benchmarks/h100-v9).

XLA reads XLA_FLAGS when it creates its GPU backend: call `use_command_buffer_loops` before the first JAX
computation. It leaves alone an XLA_FLAGS that already sets command buffers.
"""

from __future__ import annotations

import os

COMMAND_BUFFER_TYPES = ("FUSION", "CUBLAS", "CUBLASLT", "CUSTOM_CALL", "CUDNN", "CONDITIONAL", "WHILE")
FLAG = "--xla_gpu_enable_command_buffer"


def use_command_buffer_loops(environ=os.environ) -> bool:
    """Adds WHILE and CONDITIONAL command buffers to XLA_FLAGS in `environ` -> whether it changed anything."""
    flags = environ.get("XLA_FLAGS", "")
    if FLAG in flags:
        return False
    environ["XLA_FLAGS"] = (flags + " " if flags else "") + f"{FLAG}={','.join(COMMAND_BUFFER_TYPES)}"
    return True
