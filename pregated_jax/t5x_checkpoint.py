"""Reading T5X checkpoints, the format of Google's original Switch Transformer releases (t5x `switch_classic`).

    model = load_t5x("switch_base_8/checkpoint_500100")             # model config inferred from the shapes
    model = load_t5x(path, config="switch-base-8")                  # or a preset, a config.json, a SwitchConfig

`pregated_jax.load_model`, `pregated_jax.from_pretrained` and the scripts' `--checkpoint` recognize such a
directory (`is_t5x_checkpoint`) and come here.

Layout (t5x's msgpack format, the one of the Switch releases): a step directory `checkpoint_<step>/` holds
a msgpack file `checkpoint` and one zarr array (written by tensorstore, usually gzip-compressed and in several chunks)
per parameter. The msgpack holds `{'version': 3, 'optimizer': {'target': params, 'state': {'step': ...,
'param_states': ...}}}`. Each `params` leaf is either a tensorstore spec — a dict whose kvstore path names
the array's directory relative to the step directory, the parameter path with '/' -> '.', e.g.
`target.encoder.layers_1.mlp.expert.wi.kernel` — or, for a small array, the array itself (flax's msgpack
extension types). Newer t5x saves through Orbax instead: `checkpoint_<step>/state/` is an Orbax PyTree
item (`_METADATA` + an OCDBT database of zarr arrays) holding `{'target': params, 'state': ...}` under the
same names. Either way only `target` is read; the optimizer state is never opened. A model directory holding
several `checkpoint_<step>/` folders resolves to its highest step; unfinished saves (`*.tmp-*`) are skipped.

Names (flaxformer, unscanned layers; kernels are (in, out) like ours, experts stacked [E, d, ff] / [E, ff, d]
like ours, so only the relative position table is transposed):
    token_embedder/embedding                                   shared                  [V, d]
    {encoder,decoder}/relpos_bias/rel_embedding                {stack}.relative_bias   [H, buckets] -> .T
    encoder/layers_i/attention/{query,key,value,out}/kernel    self_attn.{q,k,v,o}
    decoder/layers_i/self_attention/..., encoder_decoder_attention/...   self_attn / cross_attn
    encoder/layers_i/{pre_attention_layer_norm,pre_mlp_layer_norm}/scale
    decoder/layers_i/{pre_self_attention_layer_norm,pre_cross_attention_layer_norm,pre_mlp_layer_norm}/scale
    {stack}/layers_i/mlp/{wi,wo}/kernel                        dense FFN blocks
    {stack}/layers_i/mlp/router/router_weights/w/kernel        router classifier [d, E]
    {stack}/layers_i/mlp/expert/{wi,wo}/kernel                 experts [E, d, ff], [E, ff, d]
    {encoder,decoder}/{encoder,decoder}_norm/scale             final norms
    decoder/logits_dense/kernel                                lm_head [d, V] (untied models only)

Model config: a T5X checkpoint holds no model config we read (t5x keeps it in gin files). Pass one, or let
`infer_config` read the shapes: vocabulary, d_model, d_ff, heads (from the relative position table), d_kv,
both stacks' depths, the experts, which blocks are sparse and whether the LM head is tied all follow from
the arrays. What no array records takes the value of the public Switch checkpoints' Hugging Face configs:
relative_attention_max_distance 128, expert_capacity 64, layer_norm_epsilon 1e-6, dropout 0.1, ReLU
experts, pad/eos/decoder-start ids 0/1/0; a checkpoint trained otherwise needs `config=`.
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path
from typing import Any

import numpy as np
from flax import nnx

from pregated_jax.config import PRESETS, SwitchConfig, get_preset
from pregated_jax.hf_checkpoint import CheckpointError
from pregated_jax.model import (SwitchTransformer, abstract_model, expert_memory_kind, loaded_param_dtype, materialize,
                                 require_finite)

MSGPACK_FILE = "checkpoint"
ORBAX_STATE = "state"  # the Orbax item that holds the train state in newer t5x checkpoints
_STEP_DIR = re.compile(r"checkpoint_(\d+)")
_LAYER = re.compile(r"(encoder|decoder)/layers_(\d+)/")
# The attention, norm and FFN names of each stack: (attention sublayers, norm names).
_ATTENTION = {"encoder": (("attention", "self_attn"),),
              "decoder": (("self_attention", "self_attn"), ("encoder_decoder_attention", "cross_attn"))}
_NORMS = {"encoder": (("pre_attention_layer_norm", "self_attn_norm"), ("pre_mlp_layer_norm", "ffn_norm")),
          "decoder": (("pre_self_attention_layer_norm", "self_attn_norm"),
                      ("pre_cross_attention_layer_norm", "cross_attn_norm"), ("pre_mlp_layer_norm", "ffn_norm"))}
_ROUTER = "mlp/router/router_weights/w/kernel"
_EXPERT_WI = "mlp/expert/wi/kernel"


def _listing(names, limit: int = 8) -> str:
    names = sorted(names)
    more = f" (and {len(names) - limit} more)" if len(names) > limit else ""
    return ", ".join(repr(n) for n in names[:limit]) + more


# --- finding a checkpoint ---------------------------------------------------------------------------

def _is_msgpack_checkpoint(file: Path) -> bool:
    """A t5x msgpack `checkpoint` file (a msgpack map), not TensorFlow's text file of the same name."""
    try:
        with open(file, "rb") as f:
            first = f.read(1)
    except OSError:
        return False
    return len(first) == 1 and (0x80 <= first[0] <= 0x8F or first[0] in (0xDE, 0xDF))


def _orbax_metadata(step: Path) -> dict | None:
    """The `state/_METADATA` of a t5x Orbax step directory whose tree has a `target`; else None (our own
    training checkpoints also have a `state` item, keyed `params`, never `target`)."""
    try:
        meta = json.loads((step / ORBAX_STATE / "_METADATA").read_text())
        keys = [[k["key"] for k in v["key_metadata"]] for v in meta["tree_metadata"].values()]
    except (OSError, ValueError, KeyError, TypeError):
        return None
    return meta if any(k and k[0] == "target" for k in keys) else None


def _step_format(step: Path) -> str | None:
    if _is_msgpack_checkpoint(step / MSGPACK_FILE):
        return "msgpack"
    return "orbax" if _orbax_metadata(step) is not None else None


def step_directory(path: str | os.PathLike) -> Path | None:
    """The T5X step directory `path` names: itself, or its highest finished `checkpoint_<step>/`; else None."""
    p = Path(path)
    if not p.is_dir():
        return None
    if _step_format(p):
        return p
    steps = sorted((int(m.group(1)), d) for d in p.iterdir() if (m := _STEP_DIR.fullmatch(d.name)) and _step_format(d))
    return steps[-1][1] if steps else None


def is_t5x_checkpoint(path: str | os.PathLike) -> bool:
    """Whether `path` is a T5X step directory (either layout) or a T5X model directory holding them."""
    return step_directory(path) is not None


def _is_float(dtype) -> bool:
    import jax.numpy as jnp  # knows ml_dtypes' bfloat16, which numpy classes as a void type

    return bool(jnp.issubdtype(dtype, jnp.floating))


# --- reading arrays ---------------------------------------------------------------------------------

def _flatten(tree: Any, prefix: str = "") -> dict[str, Any]:
    """Nested msgpack dicts -> {'encoder/layers_0/...': leaf}; a tensorstore spec (a dict with 'driver') is a leaf."""
    if isinstance(tree, dict) and "driver" not in tree:
        out = {}
        for key, value in tree.items():
            out.update(_flatten(value, f"{prefix}{key}/"))
        return out
    return {prefix[:-1]: tree}


class T5XArrays:
    """The `target` arrays of one T5X step directory: names and shapes up front, data read on demand.

    `leaves` maps each parameter to an array inlined in the msgpack file, or to (tensorstore spec that
    opens it, where it lives). In the msgpack layout the spec's relative kvstore path is re-rooted at the
    step directory with the file driver (checkpoints saved on GCS name a bucket or a `gfile` driver). In
    the Orbax layout every array is `<dotted name>` in `state/`, inside its OCDBT database when
    `_METADATA` says `use_ocdbt`, zarr v3 when it says `use_zarr3`. Chunking, compression and dtype are
    always read from the array's own zarr metadata."""

    def __init__(self, directory: Path):
        self.directory = directory
        self.leaves: dict[str, Any] = {}
        self._stores: dict[str, Any] = {}
        if _step_format(directory) == "orbax":
            self._init_orbax(directory)
        else:
            self._init_msgpack(directory)

    def _init_msgpack(self, directory: Path):
        from flax.serialization import msgpack_restore

        self.file = directory / MSGPACK_FILE
        try:
            contents = msgpack_restore(self.file.read_bytes())
        except Exception as e:  # noqa: BLE001 - msgpack and flax raise many kinds; name the file
            raise CheckpointError(f"{self.file}: not a readable T5X msgpack checkpoint ({e!r})") from e
        if not isinstance(contents, dict):
            raise CheckpointError(f"{self.file}: expected a msgpack map, got {type(contents).__name__}")
        # Version >= 1 nests the train state under 'optimizer'; version 0 is a bare flax optimizer state.
        state = contents.get("optimizer", contents) if "version" in contents else contents
        if not isinstance(state, dict) or not isinstance(state.get("target"), dict):
            raise CheckpointError(f"{self.file}: no parameter tree at 'optimizer/target' "
                                  f"(top-level keys: {sorted(contents)})")
        for name, leaf in _flatten(state["target"]).items():
            if not isinstance(leaf, dict):
                self.leaves[name] = leaf
                continue
            kvstore = leaf.get("kvstore")
            rel = kvstore.get("path") if isinstance(kvstore, dict) else None
            rel = rel if rel is not None else leaf.get("path")  # tensorstore < 0.1.14 kept the path at the top
            if not isinstance(rel, str) or not rel or os.path.isabs(rel) or ".." in Path(rel).parts:
                raise CheckpointError(f"{self.file}: parameter {name!r} has a tensorstore spec without a relative "
                                      f"array path inside the checkpoint directory: {leaf!r}")
            array_dir = directory / rel
            spec = {"driver": leaf.get("driver", "zarr"), "kvstore": {"driver": "file", "path": str(array_dir)}}
            self.leaves[name] = (spec, str(array_dir), (leaf.get("metadata") or {}).get("shape"))

    def _init_orbax(self, directory: Path):
        meta = _orbax_metadata(directory)
        state = directory / ORBAX_STATE
        self.file = state / "_METADATA"
        driver = "zarr3" if meta.get("use_zarr3") else "zarr"
        for entry in meta["tree_metadata"].values():
            keys = [str(k["key"]) for k in entry["key_metadata"]]
            if keys[0] != "target":
                continue
            dotted = ".".join(keys)
            if meta.get("use_ocdbt"):
                kvstore = {"driver": "ocdbt", "base": f"file://{state.resolve()}/", "path": dotted}
                where = f"{state} (array {dotted!r} of its OCDBT database)"
            else:
                kvstore = {"driver": "file", "path": str(state / dotted)}
                where = str(state / dotted)
            self.leaves["/".join(keys[1:])] = ({"driver": driver, "kvstore": kvstore}, where, None)

    def names(self) -> set[str]:
        return set(self.leaves)

    def where(self, name: str) -> str:
        """The file or array that holds `name`."""
        leaf = self.leaves[name]
        return leaf[1] if isinstance(leaf, tuple) else str(self.file)

    def _store(self, name: str):
        """The opened tensorstore of `name`."""
        if name not in self._stores:
            import tensorstore as ts

            spec, where, declared = self.leaves[name]
            if spec["kvstore"]["driver"] == "file" and not Path(spec["kvstore"]["path"]).is_dir():
                raise CheckpointError(f"{where}: array directory of parameter {name!r} is missing "
                                      f"(listed in {self.file})")
            try:
                store = ts.open(spec, open=True, read=True).result()
            except Exception as e:  # noqa: BLE001 - tensorstore raises ValueError/RuntimeError variants
                raise CheckpointError(f"{where}: cannot open the array of parameter {name!r} ({e})") from e
            if declared is not None and tuple(declared) != tuple(store.shape):
                raise CheckpointError(f"{where}: parameter {name!r} has shape {tuple(store.shape)} on disk "
                                      f"but {tuple(declared)} in {self.file}")
            if not _is_float(store.dtype.numpy_dtype):
                raise CheckpointError(f"{where}: parameter {name!r} has dtype {store.dtype.name}, "
                                      "expected a floating type")
            self._stores[name] = store
        return self._stores[name]

    def shape(self, name: str) -> tuple[int, ...]:
        leaf = self.leaves[name]
        if isinstance(leaf, tuple):
            return tuple(self._store(name).shape)
        return tuple(np.shape(leaf))

    def get(self, name: str, transpose: bool = False, dtype=np.float32) -> np.ndarray:
        """`name` as a C-contiguous array of `dtype` (transposed if asked). A stacked expert array is read
        into its result in slabs of experts as deep as its chunks: each chunk is decompressed once (t5x's
        chunks often span every expert), and only one slab in the stored dtype is held beside it."""
        leaf = self.leaves[name]
        if not isinstance(leaf, tuple):
            value = np.asarray(leaf)
            if not _is_float(value.dtype):
                raise CheckpointError(f"{self.file}: parameter {name!r} has dtype {value.dtype}, "
                                      "expected a floating type")
            value = value.astype(np.float32)
        else:
            store = self._store(name)
            try:
                if store.ndim == 3:
                    value = np.empty(store.shape, dtype)
                    slab = store.chunk_layout.read_chunk.shape[0] or 1
                    for j in range(0, store.shape[0], slab):
                        value[j:j + slab] = store[j:j + slab].read().result()
                else:
                    value = np.asarray(store.read().result(), np.float32)
            except Exception as e:  # noqa: BLE001 - a truncated or corrupt chunk
                raise CheckpointError(f"{self.where(name)}: cannot read parameter {name!r} ({e})") from e
        if transpose:
            value = value.T
        require_finite([(name, value)], self.where(name), CheckpointError)
        return np.ascontiguousarray(value, dtype)


# --- names and config -------------------------------------------------------------------------------

def t5x_layout(config: SwitchConfig) -> dict[tuple, tuple[str, bool]]:
    """Our flat param path -> (T5X parameter name, transposed?) for a conventional model with `config`."""
    if config.routing != "conventional":
        raise ValueError("T5X checkpoints hold conventional Switch models; convert after loading")
    out: dict[tuple, tuple[str, bool]] = {("shared",): ("token_embedder/embedding", False)}
    if not config.tie_word_embeddings:
        out[("lm_head",)] = ("decoder/logits_dense/kernel", False)
    for stack in ("encoder", "decoder"):
        n = config.num_layers if stack == "encoder" else config.num_decoder_layers
        out[(stack, "relative_bias", "embedding")] = (f"{stack}/relpos_bias/rel_embedding", True)
        out[(stack, "final_norm", "weight")] = (f"{stack}/{stack}_norm/scale", False)
        sparse = set(config.sparse_blocks(stack))
        for i in range(n):
            ours, t5x = (stack, "blocks", i), f"{stack}/layers_{i}"
            for theirs, mine in _NORMS[stack]:
                out[(*ours, mine, "weight")] = (f"{t5x}/{theirs}/scale", False)
            for theirs, mine in _ATTENTION[stack]:
                for w, ow in (("query", "q"), ("key", "k"), ("value", "v"), ("out", "o")):
                    out[(*ours, mine, ow)] = (f"{t5x}/{theirs}/{w}/kernel", False)
            if i in sparse:
                out[(*ours, "router", "classifier")] = (f"{t5x}/{_ROUTER}", False)
                for w in ("wi", "wo"):
                    out[(*ours, "experts", w)] = (f"{t5x}/mlp/expert/{w}/kernel", False)
            else:
                for w in ("wi", "wo"):
                    out[(*ours, "ffn", w)] = (f"{t5x}/mlp/{w}/kernel", False)
    return out


def infer_config(arrays: T5XArrays) -> SwitchConfig:
    """The SwitchConfig that the arrays' names and shapes determine (see the module docstring for the
    fields no array records). Raises CheckpointError saying what cannot be inferred, and why."""
    names, where = arrays.names(), arrays.file

    def need(name: str, what: str) -> tuple[int, ...]:
        if name not in names:
            raise CheckpointError(f"{where}: cannot infer {what}: parameter {name!r} is missing; "
                                  "pass config= (a preset name, a config.json path or a SwitchConfig)")
        return arrays.shape(name)

    gated = sorted(n for n in names if re.search(r"/wi_\d+/kernel$", n))
    if gated:
        raise CheckpointError(f"{where}: gated-activation FFN parameters {_listing(gated)} (flaxformer's gated "
                              "GELU); only ReLU Switch models with a single 'wi' are supported")
    vocab, d_model = need("token_embedder/embedding", "vocab_size and d_model")
    heads, buckets = need("encoder/relpos_bias/rel_embedding", "num_heads and relative_attention_num_buckets")
    layers: dict[str, set[int]] = {"encoder": set(), "decoder": set()}
    for n in names:
        if m := _LAYER.match(n):
            layers[m.group(1)].add(int(m.group(2)))
    depth, sparse, d_ff, experts = {}, {}, set(), set()
    for stack, found in layers.items():
        if not found:
            raise CheckpointError(f"{where}: cannot infer the number of {stack} layers: no '{stack}/layers_<i>/' "
                                  "parameters (scanned checkpoints, layers stacked along one axis, are not supported)")
        if found != set(range(len(found))):
            raise CheckpointError(f"{where}: cannot infer the number of {stack} layers: layer indices "
                                  f"{sorted(found)} are not 0..n-1")
        depth[stack] = len(found)
        sparse[stack] = tuple(i for i in sorted(found) if f"{stack}/layers_{i}/{_EXPERT_WI}" in names)
        for i in sorted(found):
            if i in sparse[stack]:
                e, _, ff = arrays.shape(f"{stack}/layers_{i}/{_EXPERT_WI}")
                experts.add(e)
                d_ff.add(ff)
            elif f"{stack}/layers_{i}/mlp/wi/kernel" in names:
                d_ff.add(arrays.shape(f"{stack}/layers_{i}/mlp/wi/kernel")[-1])
    if len(d_ff) != 1 or len(experts) > 1:
        raise CheckpointError(f"{where}: cannot infer d_ff / num_experts: one FFN width and one expert count "
                              f"are supported, the layers have widths {sorted(d_ff)} and expert counts "
                              f"{sorted(experts)}")
    inner = need("encoder/layers_0/attention/query/kernel", "d_kv")[-1]
    if inner % heads:
        raise CheckpointError(f"{where}: cannot infer d_kv: the query kernel's width {inner} is not a multiple "
                              f"of num_heads={heads} (from encoder/relpos_bias/rel_embedding)")
    config = get_preset("switch-base-8").replace(
        vocab_size=vocab, d_model=d_model, d_kv=inner // heads, d_ff=d_ff.pop(), num_heads=heads,
        num_layers=depth["encoder"], num_decoder_layers=depth["decoder"],
        num_sparse_encoder_layers=len(sparse["encoder"]), num_sparse_decoder_layers=len(sparse["decoder"]),
        num_experts=experts.pop() if experts else 1, relative_attention_num_buckets=buckets,
        tie_word_embeddings="decoder/logits_dense/kernel" not in names)
    for stack in ("encoder", "decoder"):
        if config.sparse_blocks(stack) != sparse[stack]:
            raise CheckpointError(
                f"{where}: the {stack}'s MoE layers are {list(sparse[stack])} of {depth[stack]}; a model with "
                f"{len(sparse[stack])} places them at {list(config.sparse_blocks(stack))} (Hugging Face's rule: "
                "layer i when i % (layers // MoE layers) == 1, or every layer), so this one cannot be represented")
    return config


def _resolve_config(config: SwitchConfig | str | os.PathLike | None, arrays: T5XArrays,
                    given: Path) -> SwitchConfig:
    """`config` as a SwitchConfig: itself, a preset name, a config.json (or a directory holding one);
    None: a config.json in the step directory or in the directory `given` (a model directory), else
    `infer_config`."""
    from pregated_jax.hf_checkpoint import read_config

    if isinstance(config, SwitchConfig):
        return config
    if config is None:
        beside = [d for d in (arrays.directory, given) if (d / "config.json").is_file()]
        return read_config(beside[0]) if beside else infer_config(arrays)
    if str(config) in PRESETS:
        return get_preset(str(config))
    p = Path(config)
    if p.is_dir():
        return read_config(p)
    if p.is_file():
        try:
            return SwitchConfig.from_hf_dict(json.loads(p.read_text()), source=str(p))
        except (OSError, ValueError) as e:
            raise CheckpointError(f"{p}: not a usable config.json ({e})") from e
    raise CheckpointError(f"config {str(config)!r} is neither a preset ({', '.join(sorted(PRESETS))}) "
                          "nor a config.json file or a directory holding one")


# --- public API -------------------------------------------------------------------------------------

def load_t5x(path: str | os.PathLike, config: SwitchConfig | str | os.PathLike | None = None,
             dtype: str | None = None, routing: str | None = None, seed: int = 0,
             experts_on: str = "device") -> SwitchTransformer:
    """Loads a T5X checkpoint (step directory, or a model directory: its highest step) into a
    `SwitchTransformer` in eval mode, params float32 whatever the arrays' dtype.

    `config`: a SwitchConfig, a preset name, or a Hugging Face config.json (file or directory); None
    reads a config.json in the step directory or in `path`, else infers it from the arrays (`infer_config`).
    `dtype` sets the compute dtype. T5X checkpoints hold conventional models: `routing="pregated"` (or a
    config whose routing is pregated, unless `routing="conventional"`) loads it as its pre-gated counterpart
    (`pregated_jax.convert.pregated_params`: each pre-gate starts as the next MoE block's gate). `seed` seeds
    the RNG state. `experts_on="host"` puts the expert stacks straight into host memory, where the inference
    engine keeps them (`hf_checkpoint.from_pretrained`). Raises CheckpointError naming the file, parameter and
    shape for missing, unexpected or misshaped arrays, and what cannot be inferred when no config is given.
    """
    directory = step_directory(path)
    if directory is None:
        raise CheckpointError(f"{path}: not a T5X checkpoint (neither it nor a checkpoint_<step>/ folder under it "
                              f"holds a msgpack '{MSGPACK_FILE}' file or an Orbax '{ORBAX_STATE}/' item with a "
                              "'target' tree)")
    memory_kind = expert_memory_kind(experts_on)
    arrays = T5XArrays(directory)
    cfg = _resolve_config(config, arrays, Path(path))
    if dtype is not None:
        if dtype not in ("float32", "bfloat16"):
            raise ValueError(f"dtype must be 'float32' or 'bfloat16', got {dtype!r}")
        cfg = cfg.replace(dtype=dtype)
    if routing not in (None, "conventional", "pregated"):
        raise ValueError(f"routing must be 'conventional' or 'pregated', got {routing!r}")
    convert = routing == "pregated" or (routing is None and cfg.routing == "pregated")
    cfg = cfg.replace(routing="conventional")

    model = abstract_model(cfg)
    shapes = {p: tuple(v.get_value().shape) for p, v in nnx.to_flat_state(nnx.state(model, nnx.Param))}
    layout = t5x_layout(cfg)
    if set(layout) != set(shapes):  # a bug here, not in the checkpoint
        diff = sorted(set(layout) ^ set(shapes), key=str)
        raise RuntimeError(f"t5x_layout does not match the model's params: {diff[:5]}")
    expected, present = {name for name, _ in layout.values()}, arrays.names()
    if unexpected := present - expected:
        raise CheckpointError(f"{arrays.file}: unexpected parameter(s) {_listing(unexpected)} for a Switch model "
                              f"with {cfg.num_layers}+{cfg.num_decoder_layers} layers, MoE layers "
                              f"{list(cfg.sparse_blocks('encoder'))}+{list(cfg.sparse_blocks('decoder'))}, "
                              f"{'tied' if cfg.tie_word_embeddings else 'untied'} embeddings")
    if missing := expected - present:
        raise CheckpointError(f"{arrays.file}: missing parameter(s) {_listing(missing)}")
    for ours, (name, transpose) in layout.items():
        want = shapes[ours][::-1] if transpose else shapes[ours]
        if arrays.shape(name) != want:
            raise CheckpointError(f"{arrays.where(name)}: parameter {name!r} has shape {arrays.shape(name)}, "
                                  f"expected {want}")
    params = {ours: arrays.get(name, transpose, loaded_param_dtype(cfg, ours, memory_kind))
              for ours, (name, transpose) in layout.items()}
    if convert:  # straight to the pre-gated model: each pre-gate starts as the next MoE block's gate
        from pregated_jax.convert import pregated_params

        model, params = abstract_model(cfg.replace(routing="pregated")), pregated_params(cfg, params)
    return materialize(model, params, seed, memory_kind, release=True)
