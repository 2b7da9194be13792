"""Loading and saving Hugging Face `SwitchTransformersForConditionalGeneration` checkpoints.

    model = from_pretrained("path/to/switch-base-8")       # config.json + weights -> SwitchTransformer
    save_pretrained(model, "out/dir")                      # config.json + model.safetensors

A checkpoint directory holds config.json and one of (looked for in this order) model.safetensors,
model.safetensors.index.json (sharded), pytorch_model.bin, pytorch_model.bin.index.json (sharded).
`.bin` files are read with `torch.load(..., weights_only=True)`, which never runs pickled code; torch is
imported only for them. Safetensors files are parsed here (header + raw bytes, bfloat16 through
ml_dtypes), so neither torch nor the safetensors package is needed to load them.

Names: HF stores Linear weights as (out, in); our kernels are (in, out), the transpose. HF keeps each
expert as its own `experts.expert_{k}.{wi,wo}.weight`; we stack them into `experts.wi` [E, d, ff] and
`experts.wo` [E, ff, d]. `shared.weight` is our `shared`; HF's tied duplicates (`encoder.embed_tokens`,
`decoder.embed_tokens`, and `lm_head` when tied) are accepted on load when they equal `shared`.
Pre-gated models (ours only) store block N's pre-gate as
`{stack}.block.{N}.layer.{L}.mlp.pregate.classifier.weight` and record the routing in config.json
(`"pregated_jax": {"routing": "pregated"}`); transformers would not load those.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Iterable

import ml_dtypes
import numpy as np
from flax import nnx

from pregated_jax.config import SwitchConfig
from pregated_jax.model import (SwitchTransformer, abstract_model, expert_memory_kind, loaded_param_dtype, materialize,
                                 require_finite, routing_roles)

SAFETENSORS, SAFETENSORS_INDEX = "model.safetensors", "model.safetensors.index.json"
TORCH_BIN, TORCH_BIN_INDEX = "pytorch_model.bin", "pytorch_model.bin.index.json"
WEIGHT_FILES = (SAFETENSORS, SAFETENSORS_INDEX, TORCH_BIN, TORCH_BIN_INDEX)
EMBEDDING_COPIES = ("encoder.embed_tokens.weight", "decoder.embed_tokens.weight")


class CheckpointError(ValueError):
    """A checkpoint directory that does not hold a model we can load (the message names what)."""


# --- name mapping -----------------------------------------------------------------------------------
# Each of our params maps to HF tensors with one of three layouts:
#   "copy": same array;  "T": 2-D transpose;  "experts": stack of E HF tensors, each transposed.

def hf_layout(config: SwitchConfig) -> dict[tuple, tuple[str, tuple[str, ...]]]:
    """Our flat param path -> (layout, HF tensor names) for every param of a model with `config`."""
    out: dict[tuple, tuple[str, tuple[str, ...]]] = {("shared",): ("copy", ("shared.weight",))}
    if not config.tie_word_embeddings:
        out[("lm_head",)] = ("T", ("lm_head.weight",))
    for stack in ("encoder", "decoder"):
        n = config.num_layers if stack == "encoder" else config.num_decoder_layers
        ffn = 1 if stack == "encoder" else 2  # index of the FFN sublayer in HF's `block.{i}.layer`
        out[(stack, "relative_bias", "embedding")] = (
            "copy", (f"{stack}.block.0.layer.0.SelfAttention.relative_attention_bias.weight",))
        out[(stack, "final_norm", "weight")] = ("copy", (f"{stack}.final_layer_norm.weight",))
        roles = routing_roles(config, stack)
        for i in range(n):
            ours, hf = (stack, "blocks", i), f"{stack}.block.{i}.layer"
            out[(*ours, "self_attn_norm", "weight")] = ("copy", (f"{hf}.0.layer_norm.weight",))
            for w in "qkvo":
                out[(*ours, "self_attn", w)] = ("T", (f"{hf}.0.SelfAttention.{w}.weight",))
            if stack == "decoder":
                out[(*ours, "cross_attn_norm", "weight")] = ("copy", (f"{hf}.1.layer_norm.weight",))
                for w in "qkvo":
                    out[(*ours, "cross_attn", w)] = ("T", (f"{hf}.1.EncDecAttention.{w}.weight",))
            out[(*ours, "ffn_norm", "weight")] = ("copy", (f"{hf}.{ffn}.layer_norm.weight",))
            mlp = f"{hf}.{ffn}.mlp"
            if i in roles:
                has_router, has_pregate = roles[i]
                if has_router:
                    out[(*ours, "router", "classifier")] = ("T", (f"{mlp}.router.classifier.weight",))
                if has_pregate:
                    out[(*ours, "pregate", "classifier")] = ("T", (f"{mlp}.pregate.classifier.weight",))
                for w in ("wi", "wo"):
                    out[(*ours, "experts", w)] = (
                        "experts", tuple(f"{mlp}.experts.expert_{k}.{w}.weight" for k in range(config.num_experts)))
            else:
                for w in ("wi", "wo"):
                    out[(*ours, "ffn", w)] = ("T", (f"{mlp}.{w}.weight",))
    return out


def _hf_shape(layout: str, shape: tuple[int, ...]) -> tuple[int, ...]:
    """Shape of each HF tensor behind one of our params of `shape`."""
    if layout == "copy":
        return shape
    if layout == "T":
        return shape[::-1]
    return shape[1:][::-1]  # "experts": [E, a, b] -> E tensors of [b, a]


def _param_shapes(model: SwitchTransformer) -> dict[tuple, tuple[int, ...]]:
    state = nnx.state(model, nnx.Param)
    return {path: tuple(v.get_value().shape) for path, v in nnx.to_flat_state(state)}


def _checked_layout(config: SwitchConfig, model: SwitchTransformer):
    layout, shapes = hf_layout(config), _param_shapes(model)
    if set(layout) != set(shapes):  # a bug here, not in the checkpoint
        diff = sorted(set(layout) ^ set(shapes), key=str)
        raise RuntimeError(f"hf_layout does not match the model's params: {diff[:5]}")
    return layout, shapes


# --- reading tensors --------------------------------------------------------------------------------

_ST_DTYPES = {
    "F64": np.float64, "F32": np.float32, "F16": np.float16, "BF16": ml_dtypes.bfloat16,
    "F8_E4M3": ml_dtypes.float8_e4m3fn, "F8_E5M2": ml_dtypes.float8_e5m2,
    "I64": np.int64, "I32": np.int32, "I16": np.int16, "I8": np.int8, "U8": np.uint8, "BOOL": np.bool_,
}


class SafetensorsFile:
    """One .safetensors file: the header is parsed and checked up front, and each tensor's bytes are read on
    demand with plain reads into one array (no memory map, whose pages would count in the process's memory
    while the file is read). Also reads the quantized expert stores (`quant_store`)."""

    def __init__(self, path: Path):
        self.path = path
        try:
            with open(path, "rb") as f:
                n = int.from_bytes(f.read(8), "little")
                size = path.stat().st_size
                if n > size - 8:  # checked before reading: a corrupt length would allocate n bytes
                    raise CheckpointError(f"{path}: not a safetensors file: its header length field says {n} "
                                          f"bytes, but the file has {max(size - 8, 0)} bytes after it")
                header = json.loads(f.read(n))
        except CheckpointError:
            raise
        except (OSError, ValueError) as e:
            raise CheckpointError(f"{path}: not a readable safetensors file ({e})") from e
        self.data_start = 8 + n
        self.metadata = header.get("__metadata__") or {}  # str -> str
        self.entries = {k: v for k, v in header.items() if k != "__metadata__"}
        size = path.stat().st_size
        for name, e in self.entries.items():
            begin, end = e["data_offsets"]
            if e["dtype"] not in _ST_DTYPES:
                raise CheckpointError(f"{path}: tensor {name!r} has unsupported dtype {e['dtype']}")
            nbytes = int(np.prod(e["shape"], dtype=np.int64)) * np.dtype(_ST_DTYPES[e["dtype"]]).itemsize
            if end - begin != nbytes or self.data_start + end > size:
                raise CheckpointError(f"{path}: tensor {name!r} has corrupt data offsets {e['data_offsets']}")

    def names(self) -> set[str]:
        return set(self.entries)

    def shape(self, name: str) -> tuple[int, ...]:
        return tuple(self.entries[name]["shape"])

    def get(self, name: str) -> np.ndarray:
        e = self.entries[name]
        begin, end = e["data_offsets"]
        with open(self.path, "rb") as f:
            f.seek(self.data_start + begin)
            raw = f.read(end - begin)
        return np.frombuffer(raw, dtype=_ST_DTYPES[e["dtype"]]).reshape(e["shape"])


class _TorchBin:
    """One pytorch_model.bin, loaded with `weights_only=True` (no pickled code runs)."""

    def __init__(self, path: Path):
        import torch  # only .bin checkpoints need torch

        self.path = path
        try:
            with open(path, "rb") as f:
                state = torch.load(f, map_location="cpu", weights_only=True)
        except Exception as e:  # noqa: BLE001 - torch raises many kinds; name the file
            raise CheckpointError(f"{path}: cannot load with torch.load(weights_only=True): {e}") from e
        if not isinstance(state, dict):
            raise CheckpointError(f"{path}: expected a state dict, got {type(state).__name__}")
        self.entries = state

    def shape(self, name: str) -> tuple[int, ...]:
        return tuple(self.entries[name].shape)

    def get(self, name: str) -> np.ndarray:
        t = self.entries[name].detach()
        if not t.dtype.is_floating_point:
            return t.numpy()
        return t.float().numpy()  # bf16/f16 -> f32 is exact; numpy has no bf16 torch bridge


class _Tensors:
    """All tensors of a checkpoint directory: name -> file, across shards."""

    def __init__(self, directory: Path):
        found = next((f for f in WEIGHT_FILES if (directory / f).is_file()), None)
        if found is None:
            raise CheckpointError(f"{directory}: no weights file (looked for {', '.join(WEIGHT_FILES)})")
        reader = SafetensorsFile if "safetensors" in found else _TorchBin
        self.source = directory / found
        if found.endswith(".index.json"):
            try:
                weight_map = json.loads(self.source.read_text())["weight_map"]
            except (OSError, ValueError, KeyError, TypeError) as e:
                raise CheckpointError(f"{self.source}: not a valid index file ({e!r})") from e
            shards = {}
            for file in sorted(set(weight_map.values())):
                if not (directory / file).is_file():
                    raise CheckpointError(f"{self.source}: shard {file} is missing from {directory}")
                shards[file] = reader(directory / file)
            self.files = {name: shards[file] for name, file in weight_map.items()}
            for name, file in weight_map.items():
                if name not in shards[file].entries:
                    raise CheckpointError(f"{directory / file}: missing tensor {name!r} listed in {found}")
        else:
            single = reader(self.source)
            self.files = {name: single for name in single.entries}

    def names(self) -> set[str]:
        return set(self.files)

    def where(self, name: str) -> Path:
        return self.files[name].path

    def shape(self, name: str) -> tuple[int, ...]:
        return self.files[name].shape(name)

    def get(self, name: str) -> np.ndarray:
        """The tensor `name`; a CheckpointError naming it and its file if it holds a NaN or infinity."""
        value = self.files[name].get(name)
        require_finite([(name, value)], str(self.where(name)), CheckpointError)
        return value


def _listing(names: Iterable[str], limit: int = 8) -> str:
    names = sorted(names)
    more = f" (and {len(names) - limit} more)" if len(names) > limit else ""
    return ", ".join(repr(n) for n in names[:limit]) + more


# --- public API -------------------------------------------------------------------------------------

def read_config(path: str | os.PathLike) -> SwitchConfig:
    """The `SwitchConfig` of a checkpoint directory's config.json."""
    directory = Path(path)
    if not directory.is_dir():
        raise CheckpointError(f"{directory}: not a checkpoint directory")
    config_file = directory / "config.json"
    if not config_file.is_file():
        raise CheckpointError(f"{directory}: no config.json")
    try:
        d = json.loads(config_file.read_text())
    except (OSError, ValueError) as e:
        raise CheckpointError(f"{config_file}: cannot read JSON ({e})") from e
    try:
        return SwitchConfig.from_hf_dict(d, source=str(config_file))
    except ValueError as e:
        raise CheckpointError(str(e)) from e


def from_pretrained(path: str | os.PathLike, dtype: str | None = None, routing: str | None = None,
                    seed: int = 0, experts_on: str = "device") -> SwitchTransformer:
    """Loads a HF Switch checkpoint directory into a `SwitchTransformer` in eval mode.

    Params are float32 (converted from whatever the files hold). `dtype` ("float32"/"bfloat16") sets the
    config's compute dtype only; params stay float32 master copies. `routing` None keeps the routing
    recorded in config.json; "pregated" on a conventional checkpoint converts it
    (`pregated_jax.convert.pregated_params`: each pre-gate starts as the next MoE block's gate); a pre-gated
    checkpoint cannot be loaded as conventional. `seed` seeds the model's dropout/jitter RNG state.
    `experts_on="host"` puts the expert stacks straight into host memory (`model.materialize`), where the
    inference engine keeps them, so they never take device memory; "device" (default) puts them with the rest.
    Raises `CheckpointError` naming the missing/unexpected/misshaped tensor, bad config field or file.
    """
    directory = Path(path)
    from pregated_jax.t5x_checkpoint import is_t5x_checkpoint, load_t5x  # T5X directories have no config.json

    if is_t5x_checkpoint(directory):
        return load_t5x(directory, dtype=dtype, routing=routing, seed=seed, experts_on=experts_on)
    memory_kind = expert_memory_kind(experts_on)
    config = read_config(directory)
    if dtype is not None:
        if dtype not in ("float32", "bfloat16"):
            raise ValueError(f"dtype must be 'float32' or 'bfloat16', got {dtype!r}")
        config = config.replace(dtype=dtype)
    convert = False
    if routing is not None and routing != config.routing:
        if routing != "pregated":
            raise CheckpointError(f"{directory}: a {config.routing} checkpoint cannot be loaded with "
                                  f"routing={routing!r}")
        convert = True
    tensors = _Tensors(directory)
    model = abstract_model(config)
    layout, shapes = _checked_layout(config, model)

    expected = {name for _, names in layout.values() for name in names}
    copies = set(EMBEDDING_COPIES) | ({"lm_head.weight"} if config.tie_word_embeddings else set())
    present = tensors.names()
    unexpected = present - expected - copies
    if unexpected:
        raise CheckpointError(f"{tensors.source}: unexpected tensor(s) {_listing(unexpected)} for a "
                              f"{config.routing} Switch model with this config.json")
    missing = expected - present
    if missing:
        raise CheckpointError(f"{tensors.source}: missing tensor(s) {_listing(missing)}")
    for path_, (kind, names) in layout.items():
        want = _hf_shape(kind, shapes[path_])
        for name in names:
            if tensors.shape(name) != want:
                raise CheckpointError(f"{tensors.where(name)}: tensor {name!r} has shape "
                                      f"{tensors.shape(name)}, expected {want}")

    params = {}
    for path_, (kind, names) in layout.items():
        if kind == "copy":
            value = tensors.get(names[0])
        elif kind == "T":
            value = tensors.get(names[0]).T
        else:
            value = np.stack([tensors.get(n).T for n in names])
        params[path_] = np.ascontiguousarray(value, dtype=loaded_param_dtype(config, path_, memory_kind))
    for name in sorted(copies & present):  # tied duplicates must really be duplicates
        if tensors.shape(name) != shapes[("shared",)] or not np.array_equal(
                tensors.get(name).astype(np.float32), params[("shared",)]):
            raise CheckpointError(f"{tensors.where(name)}: tensor {name!r} differs from 'shared.weight'; "
                                  "separate input/output embeddings are not supported")
    if convert:  # straight to the pre-gated model: each pre-gate starts as the next MoE block's gate
        from pregated_jax.convert import pregated_params

        model, params = abstract_model(config.replace(routing="pregated")), pregated_params(config, params)
    return materialize(model, params, seed, memory_kind, release=True)


def hf_state_dict(model: SwitchTransformer) -> dict[str, np.ndarray]:
    """HF tensor name -> float32 array, as `save_pretrained` writes them (tied duplicates left out;
    untied models also get `encoder/decoder.embed_tokens.weight`, which transformers 5 keeps apart)."""
    config = model.config
    layout, _ = _checked_layout(config, model)
    values = {p: np.asarray(v.get_value(), np.float32) for p, v in nnx.to_flat_state(nnx.state(model, nnx.Param))}
    for path_, module in nnx.iter_modules(model):  # expert stacks in the router's (logical) order, whatever the
        if getattr(module, "phys_of_logical", None) is not None:  # placement (`expert_placement`)
            rows = np.asarray(module.phys_of_logical)
            values[(*path_, "wi")], values[(*path_, "wo")] = values[(*path_, "wi")][rows], values[(*path_, "wo")][rows]
    out = {}
    for path_, (kind, names) in layout.items():
        value = values[path_]
        if kind == "copy":
            out[names[0]] = value
        elif kind == "T":
            out[names[0]] = value.T
        else:
            out.update({name: value[k].T for k, name in enumerate(names)})
    if not config.tie_word_embeddings:
        out.update({name: out["shared.weight"] for name in EMBEDDING_COPIES})
    return {k: np.ascontiguousarray(v) for k, v in out.items()}


def save_pretrained(model: SwitchTransformer, path: str | os.PathLike, dtype: str | None = None) -> Path:
    """Writes config.json and model.safetensors to `path` (created if needed), atomically per file:
    everything is written to a temporary directory beside it first. Other weight files in `path` that
    transformers or `from_pretrained` would prefer or confuse (.bin, indexes and their shards) are removed.
    Conventional models load in `transformers.SwitchTransformersForConditionalGeneration`. `dtype`
    ("float32" or "bfloat16") stores the floating-point tensors in that type (default: as they are)."""
    from safetensors.numpy import save_file

    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    tensors = hf_state_dict(model)
    if dtype is not None:
        if dtype not in ("float32", "bfloat16"):
            raise ValueError(f"save_pretrained: dtype {dtype!r} is not one of 'float32', 'bfloat16'")
        tensors = {k: v.astype(np.float32 if dtype == "float32" else ml_dtypes.bfloat16)
                   if np.issubdtype(v.dtype, np.floating) or v.dtype == ml_dtypes.bfloat16 else v
                   for k, v in tensors.items()}
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-", dir=target.parent))
    try:
        (tmp / "config.json").write_text(json.dumps(model.config.to_hf_dict(), indent=2, sort_keys=True) + "\n")
        save_file(tensors, str(tmp / SAFETENSORS), metadata={"format": "pt"})
        # mkdtemp makes the folder 0700 and safetensors its file 0600; give them the modes a plain mkdir /
        # open would under the user's umask.
        umask = _current_umask()
        os.chmod(tmp, 0o777 & ~umask)
        for name in ("config.json", SAFETENSORS):
            os.chmod(tmp / name, 0o666 & ~umask)
        if not target.exists():
            os.rename(tmp, target)
            return target
        _remove_stale_weights(target)
        for name in ("config.json", SAFETENSORS):
            os.replace(tmp / name, target / name)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target


def _current_umask() -> int:
    """The process's umask: read from /proc (Linux), else by setting and restoring it."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except OSError:
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def _remove_stale_weights(directory: Path) -> None:
    for index in (SAFETENSORS_INDEX, TORCH_BIN_INDEX):
        if (directory / index).is_file():
            try:
                shards = set(json.loads((directory / index).read_text())["weight_map"].values())
            except (OSError, ValueError, KeyError, TypeError):
                shards = set()
            for shard in shards:
                if Path(shard).name == shard:  # never follow paths out of the directory
                    (directory / shard).unlink(missing_ok=True)
            (directory / index).unlink()
    (directory / TORCH_BIN).unlink(missing_ok=True)
