"""Process settings the engine's scripts make for the GPU before JAX starts: the decode loop as one CUDA
graph, and CUDA modules loaded eagerly.

XLA records runs of kernels into CUDA graphs ("command buffers"). By default a `while_loop` is not recorded: the
host evaluates its exit condition after every decode step and launches the next step, and the GPU idles at each
step boundary. With WHILE and CONDITIONAL command buffers the whole loop, the native expert copies' kernels
included (they are command-buffer compatible), runs as one graph (docs/design.md, "The decode loop is one CUDA
graph", has the measurement).

XLA reads XLA_FLAGS when it creates its GPU backend: call `use_command_buffer_loops` before the first JAX
computation. It leaves alone an XLA_FLAGS that already sets command buffers.

Eager module loading (`use_eager_module_loading`): the native expert copies' done kernel spins on the GPU
until the copy worker (a host thread) has enqueued its copies. With CUDA's default lazy loading, the first
launch of a kernel may need a context synchronization ("Lazy Loading", CUDA programming guide: a kernel
that waits for other work can deadlock with it). A first launch while a done spins, e.g. a computation
compiled for a new batch shape near the end of a generation, can then stall the worker until the done gives
up (PREGATED_JAX_DMA_WAIT_TIMEOUT_S; docs/design.md, "Eager CUDA module loading with the native copies").
CUDA reads CUDA_MODULE_LOADING once, when JAX initializes it.
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


MODULE_LOADING = "CUDA_MODULE_LOADING"


def use_eager_module_loading(environ=os.environ) -> bool:
    """Sets CUDA_MODULE_LOADING=EAGER in `environ` unless it is set -> whether it changed anything."""
    if environ.get(MODULE_LOADING):
        return False
    environ[MODULE_LOADING] = "EAGER"
    return True
