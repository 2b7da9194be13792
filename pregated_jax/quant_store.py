"""A quantized expert store on disk: a model whose expert stacks are saved already quantized (`quant`).

A store is a directory with `config.json` (the `SwitchConfig`) and `quantized.safetensors`: every
non-expert param in float32 under its dotted path (`decoder.blocks.1.ffn_norm.scale`), and each expert
stack as `<path>.values` and `<path>.scales` (`encoder.blocks.1.experts.wi.values` [E, d_in(/2), d_out]).
The file's metadata records the format and the int4 group size. float8 values are written as their raw
bytes (uint8: safetensors' numpy API has no float8 type) and viewed back on load.

Loading reads the quantized values and scales straight into `QuantizedExperts`: the unquantized experts
are never built, so host memory holds only the quantized bytes. `pj.load_model` recognizes a store.
"""

from __future__ import annotations

import dataclasses
import json
import os
import tempfile
from pathlib import Path

import ml_dtypes
import numpy as np
from flax import nnx

from pregated_jax.config import SwitchConfig
from pregated_jax.model import SwitchTransformer, abstract_model, expert_memory_kind, materialize, require_finite
from pregated_jax.quant import DEFAULT_GROUP_SIZE, FORMATS, QuantizedExperts, as_format

STORE_FILE = "quantized.safetensors"
_KIND = "pregated_jax quantized expert store"


def is_quantized_store(path: str | os.PathLike) -> bool:
    return (Path(path) / STORE_FILE).is_file()


def _is_expert(path: tuple) -> bool:
    return len(path) >= 2 and path[-2] == "experts" and path[-1] in ("wi", "wo")


def save_quantized(model: SwitchTransformer, path: str | os.PathLike, expert_dtype: str,
                   group_size: int = DEFAULT_GROUP_SIZE) -> Path:
    """Writes `model` to the directory `path` (created if needed) with its experts in `expert_dtype` (not
    "bfloat16": an unquantized model is saved with `save_pretrained`). The file is written beside its
    final name first, then renamed."""
    if expert_dtype == "bfloat16" or expert_dtype not in FORMATS:
        raise ValueError(f"a quantized store needs a quantized expert dtype, got {expert_dtype!r}; choose one of "
                         f"{', '.join(f for f in FORMATS if f != 'bfloat16')}")
    from safetensors.numpy import save_file

    tensors = {}
    for p, var in nnx.to_flat_state(nnx.state(model, nnx.Param)):
        name, value = ".".join(map(str, p)), var.get_value()
        if not _is_expert(p):
            tensors[name] = np.asarray(value, np.float32)
            continue
        q = as_format(value, expert_dtype, group_size, None, name)
        values = np.asarray(q.values)
        tensors[f"{name}.values"] = values.view(np.uint8) if expert_dtype == "float8_e4m3fn" else values
        tensors[f"{name}.scales"] = np.asarray(q.scales)
        group_size = q.group_size if expert_dtype == "int4" else group_size
    target = Path(path)
    target.mkdir(parents=True, exist_ok=True)
    (target / "config.json").write_text(json.dumps(dataclasses.asdict(model.config), indent=2, sort_keys=True) + "\n")
    metadata = {"kind": _KIND, "expert_dtype": expert_dtype, "group_size": str(group_size)}
    fd, tmp = tempfile.mkstemp(prefix=f".{STORE_FILE}.", dir=target)
    os.close(fd)
    try:
        save_file({k: np.ascontiguousarray(v) for k, v in tensors.items()}, tmp, metadata=metadata)
        os.replace(tmp, target / STORE_FILE)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return target


def store_format(path: str | os.PathLike) -> tuple[str, int]:
    """(expert dtype, int4 group size) recorded in a store."""
    from pregated_jax.hf_checkpoint import SafetensorsFile

    file = Path(path) / STORE_FILE
    meta = SafetensorsFile(file).metadata
    if meta.get("kind") != _KIND or meta.get("expert_dtype") not in FORMATS:
        raise ValueError(f"{file}: not a quantized expert store (metadata {meta})")
    return meta["expert_dtype"], int(meta["group_size"])


def load_quantized(path: str | os.PathLike, dtype: str | None = None, seed: int = 0,
                   experts_on: str = "device") -> SwitchTransformer:
    """The model of a store, its experts as `QuantizedExperts` (eval mode). `dtype` sets the compute dtype.
    `experts_on="host"` puts the quantized stacks straight into host memory, where the inference engine keeps
    them (`model.materialize`); "device" (default) puts them with the rest.
    Errors name the file and the tensor that is missing, unexpected, misshaped or not finite."""
    from pregated_jax.hf_checkpoint import SafetensorsFile

    directory = Path(path)
    file = directory / STORE_FILE
    memory_kind = expert_memory_kind(experts_on)
    config = SwitchConfig(**json.loads((directory / "config.json").read_text()))
    if dtype is not None:
        config = config.replace(dtype=dtype)
    fmt, _ = store_format(directory)
    model = abstract_model(config)
    params, read = {}, set()
    f = SafetensorsFile(file)  # plain reads, one tensor at a time
    present = f.names()

    def get(name, shape=None):
        if name not in present:
            raise ValueError(f"{file}: missing tensor {name!r}")
        read.add(name)
        if shape is not None and f.shape(name) != tuple(shape):
            raise ValueError(f"{file}: tensor {name!r} has shape {f.shape(name)}, expected {tuple(shape)}")
        return f.get(name)

    for p, var in nnx.to_flat_state(nnx.state(model, nnx.Param)):
        name, shape = ".".join(map(str, p)), var.get_value().shape
        if not _is_expert(p):
            params[p] = get(name, shape)
            continue
        values, scales = get(f"{name}.values"), get(f"{name}.scales")
        if fmt == "float8_e4m3fn":
            values = values.view(ml_dtypes.float8_e4m3fn)
        q = QuantizedExperts(values, scales, fmt)  # numpy: `materialize` places it
        if tuple(q.shape) != tuple(shape):
            raise ValueError(f"{file}: tensor {name!r} holds experts of shape {tuple(q.shape)}, "
                             f"expected {tuple(shape)}")
        params[p] = q
    unexpected = present - read
    if unexpected:
        raise ValueError(f"{file}: unexpected tensor(s) {sorted(unexpected)[:8]} for a model with this config.json")
    require_finite([(".".join(map(str, p)), v if isinstance(v, np.ndarray) else v.scales) for p, v in params.items()],
                   str(file))
    return materialize(model, params, seed, memory_kind, release=True)
