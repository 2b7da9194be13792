"""Native expert copies: the copy-engine (DMA) fetch behind `EngineConfig.copy_method="dma"`.

`expert_copy.cc` defines two XLA FFI custom calls (see its header). This module compiles it once per
source/jaxlib version with the system C++ compiler into a cache directory (like torch's cpp extensions;
`PREGATED_JAX_NATIVE_LIB` points at a prebuilt library instead), registers the handlers for the CPU and,
when present, CUDA, and wraps the calls:

    tables, token = fetch_start(ids, [HostStack, ...], *after)  # ids [k] int32 on the device, -1 = empty
    tables = fetch_done(tables, ids, token, *after)             # the tables, ready to read

and the staged pair, whose copies land in buffers the library owns until the done copies them out:

    token = stage_start(ids, [HostStack, ...], staging, *after)
    tables = stage_done(ids, token, [HostStack, ...], staging, *after)

`python -m pregated_jax.native` builds and reports where the library is.
"""

from __future__ import annotations

import dataclasses
import hashlib
import itertools
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

SOURCE = Path(__file__).with_name("expert_copy.cc")
KERNEL_SOURCE = Path(__file__).with_name("expert_copy_kernels.cu")
KERNEL_PTX = Path(__file__).with_name("expert_copy_kernels.ptx.inc")  # generated from KERNEL_SOURCE, #included by SOURCE
PTX_ARCH = "compute_75"  # the oldest target nvcc 13 emits; the driver compiles the PTX for the GPU at hand
PTX_VERSION = "6.3"  # the PTX ISA the file declares: the oldest that knows sm_75, for older drivers
_STATE: dict = {}


class NativeUnavailable(RuntimeError):
    """The native library could not be built or loaded (the message says why)."""


def cache_dir() -> Path:
    root = os.environ.get("PREGATED_JAX_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "pregated_jax")
    return Path(root) / "native"


def library_path() -> Path:
    """Where the library for this source and this jaxlib lives (built or not)."""
    import jaxlib
    digest = hashlib.sha256(SOURCE.read_bytes() + KERNEL_PTX.read_bytes() + jaxlib.__version__.encode()).hexdigest()[:16]
    return cache_dir() / f"libpgj_expert_copy-{digest}.so"


def build(force: bool = False) -> Path:
    """Compiles expert_copy.cc (atomic: concurrent builders each write a temporary file) -> its path."""
    prebuilt = os.environ.get("PREGATED_JAX_NATIVE_LIB")
    if prebuilt:
        if not os.path.exists(prebuilt):
            raise NativeUnavailable(f"PREGATED_JAX_NATIVE_LIB={prebuilt} does not exist")
        return Path(prebuilt)
    out = library_path()
    if out.exists() and not force:
        return out
    compiler = os.environ.get("CXX", "g++")
    out.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(suffix=".so", dir=out.parent)
    os.close(fd)
    cmd = [compiler, "-std=c++17", "-O2", "-shared", "-fPIC", f"-I{jax.ffi.include_dir()}", str(SOURCE),
           "-o", tmp, "-ldl", "-lpthread"]
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True)
    except FileNotFoundError as e:
        os.unlink(tmp)
        raise NativeUnavailable(f"no C++ compiler ({compiler!r}; set CXX) to build {SOURCE.name}") from e
    if proc.returncode != 0:
        os.unlink(tmp)
        raise NativeUnavailable(f"building {SOURCE.name} failed ({' '.join(cmd)}):\n{proc.stderr[-3000:]}")
    os.chmod(tmp, 0o755)  # mkstemp creates 0600: keep a shared cache readable
    os.replace(tmp, out)
    return out


def kernel_ptx(nvcc: str = "nvcc") -> str:
    """Compiles expert_copy_kernels.cu to PTX with nvcc -> the text of KERNEL_PTX (a C++ raw string literal)."""
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "kernels.ptx"
        cmd = [nvcc, "-ptx", f"-arch={PTX_ARCH}", "-o", str(out), str(KERNEL_SOURCE)]
        try:
            proc = subprocess.run(cmd, capture_output=True, text=True)
        except FileNotFoundError as e:
            raise NativeUnavailable(f"no nvcc ({nvcc!r}) to compile {KERNEL_SOURCE.name}") from e
        if proc.returncode != 0:
            raise NativeUnavailable(f"compiling {KERNEL_SOURCE.name} failed ({' '.join(cmd)}):\n{proc.stderr[-3000:]}")
        ptx = out.read_text()
    lines = [f".version {PTX_VERSION}" if line.startswith(".version ") else line for line in ptx.splitlines()]
    lines = [line for line in lines if not line.startswith("// Compiler Build ID")]
    return ("// Generated from expert_copy_kernels.cu by `python -m pregated_jax.native --regenerate-ptx`; do not edit.\n"
            'R"PTX(\n' + "\n".join(lines) + '\n)PTX"\n')


def load() -> None:
    """Builds if needed and registers the custom calls (once per process). Raises NativeUnavailable.

    A failure is remembered for the rest of the process (a fixed compiler or library takes a restart)."""
    if "error" in _STATE:
        raise NativeUnavailable(_STATE["error"])
    if "lib" in _STATE:
        return
    import ctypes
    try:
        path = build()
        lib = ctypes.cdll.LoadLibrary(str(path))
        for name, symbol in (("pgj_fetch_start", "PgjFetchStart"), ("pgj_fetch_done", "PgjFetchDone"),
                             ("pgj_stage_start", "PgjStageStart"), ("pgj_stage_done", "PgjStageDone")):
            jax.ffi.register_ffi_target(name, jax.ffi.pycapsule(getattr(lib, symbol + "Cpu")), platform="cpu")
            if _has_cuda():
                jax.ffi.register_ffi_target(name, jax.ffi.pycapsule(getattr(lib, symbol + "Cuda")),
                                            platform="CUDA")
    except NativeUnavailable as e:
        _STATE["error"] = str(e)
        raise
    except (OSError, AttributeError, ValueError) as e:
        _STATE["error"] = f"loading the native expert-copy library failed: {e}"
        raise NativeUnavailable(_STATE["error"]) from e
    _STATE["lib"], _STATE["path"] = lib, path


def available() -> bool:
    try:
        load()
        return True
    except NativeUnavailable:
        return False


def unavailable_reason() -> str | None:
    return None if available() else _STATE.get("error")


def _has_cuda() -> bool:
    try:
        return any(d.platform == "gpu" for d in jax.devices())
    except RuntimeError:
        return False


@dataclasses.dataclass(frozen=True)
class HostStack:
    """What a fetch needs to know about a stack [E, ...] in host memory: its address and row layout.

    The address is baked into compiled programs: whoever holds a HostStack keeps the array alive.
    """

    address: int
    row_shape: tuple[int, ...]
    dtype: np.dtype
    num_rows: int

    @classmethod
    def of(cls, stack: jax.Array) -> "HostStack":
        if not cls.readable(stack):
            raise ValueError(f"a host stack must be one array in host memory, got memory kind "
                             f"{stack.sharding.memory_kind!r} on {len(stack.devices())} device(s)")
        stack.block_until_ready()  # the copies read it behind XLA's back: it must be written already
        return cls(stack.unsafe_buffer_pointer(), tuple(stack.shape[1:]), np.dtype(stack.dtype), stack.shape[0])

    @staticmethod
    def readable(stack: jax.Array) -> bool:
        """Whether the native copies can read `stack` from the host: on one device, and in host memory
        (on the CPU every memory is host memory)."""
        if len(stack.devices()) != 1:
            return False
        device = next(iter(stack.devices()))
        return device.platform == "cpu" or "host" in (stack.sharding.memory_kind or "")

    @property
    def row_bytes(self) -> int:
        return int(np.prod(self.row_shape)) * self.dtype.itemsize


def fetch_start(ids: jax.Array, stacks: list[HostStack], *after):
    """Starts copying rows `ids` [k] of each stack -> (tables [k, *row_shape] per stack, token []).

    Inside jit. The tables must go through `fetch_done` before they are read. The token orders later calls
    after this one: pass it as `after` to a later start (whose copies then queue behind these) or done.
    `after` orders this call after their producers; XLA keeps custom-call operands, where it may drop an
    `optimization_barrier`'s ordering.
    """
    load()
    k = ids.shape[0]
    shapes = [jax.ShapeDtypeStruct((k,) + s.row_shape, s.dtype) for s in stacks]
    shapes.append(jax.ShapeDtypeStruct((), jnp.int32))
    num_rows = {s.num_rows for s in stacks}
    if len(num_rows) != 1:
        raise ValueError(f"stacks fetched together must have the same number of rows, got {num_rows}")
    out = jax.ffi.ffi_call("pgj_fetch_start", shapes)(
        ids.astype(jnp.int32), *after, srcs=np.array([s.address for s in stacks], np.int64),
        row_bytes=np.array([s.row_bytes for s in stacks], np.int64), num_rows=np.int64(num_rows.pop()))
    return list(out[:-1]), out[-1]


def fetch_done(tables: list, ids: jax.Array, token: jax.Array, *after):
    """-> the tables, once their copies have landed (rows of ids < 0 zeroed). `ids` [k] and `token` are the
    start's; `after` only orders the call after their producers.

    On a GPU, a kernel on the compute stream waits for the copies (not at all where every id is -1); the
    host thread is never blocked, and XLA may record the call into a CUDA graph.
    """
    load()
    shapes = [jax.ShapeDtypeStruct(t.shape, t.dtype) for t in tables]
    aliases = {i: i for i in range(len(tables))}  # the tables pass through in place
    call = jax.ffi.ffi_call("pgj_fetch_done", shapes, input_output_aliases=aliases)
    return list(call(*tables, ids.astype(jnp.int32), token, *after))


_STAGING_KEYS = itertools.count(1)


def new_staging_key() -> int:
    """A staging key no other caller in this process has: one per sequence of staged fetches (one in flight
    at a time). Each (key, k, row sizes) names buffers the library allocates on first use and keeps for the
    life of the process."""
    return next(_STAGING_KEYS)


def stage_start(ids: jax.Array, stacks: list[HostStack], staging: int, *after) -> jax.Array:
    """Starts copying rows `ids` [k] of each stack into staging area `staging` -> token [].

    Inside jit. Nothing XLA owns is written: the copy may stay in flight across a loop iteration or a
    dispatch (XLA copies loop carries and donated buffers where it likes; a table written behind its back
    must not cross one). `stage_done` with the same ids, stacks and key collects the rows. The area holds
    one staged fetch: a later start on the key must take something the last `stage_done` produced as `after`.
    """
    load()
    num_rows = {s.num_rows for s in stacks}
    if len(num_rows) != 1:
        raise ValueError(f"stacks fetched together must have the same number of rows, got {num_rows}")
    return jax.ffi.ffi_call("pgj_stage_start", jax.ShapeDtypeStruct((), jnp.int32))(
        ids.astype(jnp.int32), *after, srcs=np.array([s.address for s in stacks], np.int64),
        row_bytes=np.array([s.row_bytes for s in stacks], np.int64), num_rows=np.int64(num_rows.pop()),
        staging=np.int64(staging))


def stage_done(ids: jax.Array, token: jax.Array, stacks: list[HostStack], staging: int, *after) -> list:
    """-> tables [k, *row_shape] per stack, the staged rows once their copies have landed (rows of ids < 0
    zeroed); `ids`, `token`, `stacks` and `staging` are the start's. On a GPU a kernel waits for the copies
    as in `fetch_done`, then the rows are copied device to device on the compute stream."""
    load()
    k = ids.shape[0]
    shapes = [jax.ShapeDtypeStruct((k,) + s.row_shape, s.dtype) for s in stacks]
    return list(jax.ffi.ffi_call("pgj_stage_done", shapes)(
        ids.astype(jnp.int32), token, *after, row_bytes=np.array([s.row_bytes for s in stacks], np.int64),
        staging=np.int64(staging)))


def check_device_wait() -> None:
    """Raises RuntimeError with the first failure the GPU copies recorded since the last check (an expert id
    out of range, or a done that waited over PREGATED_JAX_DMA_WAIT_TIMEOUT_S for its copies), and clears it.
    Results computed since may be wrong. Cheap (it reads pinned host memory); the engine calls it before every
    decode dispatch and after every generation."""
    if "lib" not in _STATE:
        return
    import ctypes
    buf = ctypes.create_string_buffer(2048)
    if _STATE["lib"].PgjTakeFault(buf, ctypes.c_size_t(len(buf))):
        raise RuntimeError(buf.value.decode(errors="replace"))


def main(argv: list[str] | None = None) -> int:
    import argparse
    parser = argparse.ArgumentParser(prog="python -m pregated_jax.native",
                                     description="Builds the native expert-copy library and says where it is.")
    parser.add_argument("--regenerate-ptx", action="store_true",
                        help=f"recompile {KERNEL_SOURCE.name} into {KERNEL_PTX.name} with nvcc (after editing it)")
    args = parser.parse_args(argv)
    try:
        if args.regenerate_ptx:
            KERNEL_PTX.write_text(kernel_ptx())
            print(f"wrote {KERNEL_PTX}")
        load()
    except NativeUnavailable as e:
        print(f"native expert copies unavailable: {e}", file=sys.stderr)
        return 1
    print(f"native expert copies: {_STATE['path']} (CUDA handlers: {'yes' if _has_cuda() else 'no'})")
    return 0
