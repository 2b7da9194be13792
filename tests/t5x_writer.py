"""Writes small T5X-format checkpoints for the tests, from Hugging Face Switch weights.

Written from the format t5x saves (t5x/checkpoints.py `_get_spec` and its msgpack layout), independently of
`pregated_jax.t5x_checkpoint`: a step directory with a msgpack file `checkpoint` =
`{'version': 3, 'optimizer': {'target': tree, 'state': {'step': scalar, 'param_states': tree}}}`, where each
leaf of `tree` is a zarr tensorstore spec whose kvstore path ('target.encoder.layers_0...') is relative to the
step directory, or a small array inlined as flax's msgpack extension type 1 ((shape, dtype name, C bytes)).

`write_t5x_orbax` writes the newer t5x layout with Orbax itself, as t5x does.

`hf_to_flaxformer` renames HF tensors to flaxformer's names and layouts (the inverse of transformers'
switch_transformers conversion script): Linear (out, in) -> kernel (in, out); experts stacked [E, in, out];
the relative position table [buckets, H] -> [H, buckets].
"""

from __future__ import annotations

import math
import os
from pathlib import Path

import ml_dtypes
import msgpack
import numpy as np
import tensorstore as ts


def hf_to_flaxformer(hf: dict[str, np.ndarray], config: dict) -> dict[str, np.ndarray]:
    """HF state dict (name -> array) -> {flaxformer param path: array}."""
    out = {"token_embedder/embedding": hf["shared.weight"]}
    if not config.get("tie_word_embeddings", True):
        out["decoder/logits_dense/kernel"] = hf["lm_head.weight"].T
    experts = config["num_experts"]
    for stack, n in (("encoder", config["num_layers"]), ("decoder", config["num_decoder_layers"])):
        out[f"{stack}/relpos_bias/rel_embedding"] = hf[
            f"{stack}.block.0.layer.0.SelfAttention.relative_attention_bias.weight"].T
        out[f"{stack}/{stack}_norm/scale"] = hf[f"{stack}.final_layer_norm.weight"]
        if stack == "encoder":
            attn = [("attention", "0.SelfAttention")]
            norms = [("pre_attention_layer_norm", 0), ("pre_mlp_layer_norm", 1)]
            ffn = 1
        else:
            attn = [("self_attention", "0.SelfAttention"), ("encoder_decoder_attention", "1.EncDecAttention")]
            norms = [("pre_self_attention_layer_norm", 0), ("pre_cross_attention_layer_norm", 1),
                     ("pre_mlp_layer_norm", 2)]
            ffn = 2
        for i in range(n):
            hp, fp = f"{stack}.block.{i}.layer", f"{stack}/layers_{i}"
            for name, k in norms:
                out[f"{fp}/{name}/scale"] = hf[f"{hp}.{k}.layer_norm.weight"]
            for name, sub in attn:
                for t5x, h in (("query", "q"), ("key", "k"), ("value", "v"), ("out", "o")):
                    out[f"{fp}/{name}/{t5x}/kernel"] = hf[f"{hp}.{sub}.{h}.weight"].T
            mlp = f"{hp}.{ffn}.mlp"
            if f"{mlp}.router.classifier.weight" in hf:
                out[f"{fp}/mlp/router/router_weights/w/kernel"] = hf[f"{mlp}.router.classifier.weight"].T
                for w in ("wi", "wo"):
                    out[f"{fp}/mlp/expert/{w}/kernel"] = np.stack(
                        [hf[f"{mlp}.experts.expert_{j}.{w}.weight"].T for j in range(experts)])
            else:
                for w in ("wi", "wo"):
                    out[f"{fp}/mlp/{w}/kernel"] = hf[f"{mlp}.{w}.weight"].T
    return {k: np.ascontiguousarray(v) for k, v in out.items()}


def _inline(a: np.ndarray) -> msgpack.ExtType:
    a = np.asarray(a)
    payload = msgpack.packb((a.shape, a.dtype.name, a.tobytes("C")), use_bin_type=True)
    return msgpack.ExtType(3 if a.ndim == 0 else 1, payload)


def _nest(flat: dict[str, object]) -> dict:
    tree: dict = {}
    for path, leaf in flat.items():
        node = tree
        *parents, last = path.split("/")
        for p in parents:
            node = node.setdefault(p, {})
        node[last] = leaf
    return tree


def _write_array(step_dir: Path, name: str, value: np.ndarray, dtype: str, gcs: bool = False) -> dict:
    """One zarr array under `step_dir`, gzip, about two chunks along every axis longer than 1; returns the
    spec as t5x records it: a relative kvstore path, or for a checkpoint saved to a gs:// directory a `gcs`
    kvstore with t5x's placeholder bucket and the relative path at the spec's top level."""
    rel = name.replace("/", ".")
    chunks = [max(1, math.ceil(s / 2)) for s in value.shape]
    spec = {"driver": "zarr", "dtype": dtype, "kvstore": {"driver": "file", "path": rel},
            "metadata": {"chunks": chunks, "compressor": {"id": "gzip"}, "shape": list(value.shape)}}
    store = ts.open({**spec, "kvstore": {"driver": "file", "path": os.path.join(step_dir, rel)}},
                    create=True, open=True).result()
    store.write(value.astype(ml_dtypes.bfloat16 if dtype == "bfloat16" else np.float32)).result()
    if gcs:
        spec = {**spec, "kvstore": {"driver": "gcs", "bucket": "t5x-dummy-bucket"}, "path": rel}
    return spec


def write_t5x(step_dir: str | os.PathLike, params: dict[str, np.ndarray], dtype: str = "float32",
              inline: tuple[str, ...] = (), step: int = 1000, optimizer_state: bool = True,
              gcs_specs: bool = False) -> Path:
    """Writes `params` ({flaxformer path: array}) as a T5X step directory. Names in `inline` are stored in
    the msgpack file itself; the rest as zarr arrays of `dtype`, their specs as t5x writes them on GCS with
    `gcs_specs`. With `optimizer_state`, Adafactor-style factored second moments (`v_row`, `v_col`) of the
    first two params are written too (never read)."""
    step_dir = Path(step_dir)
    step_dir.mkdir(parents=True, exist_ok=True)
    target = {}
    for name, value in params.items():
        value = np.asarray(value, np.float32)
        if name in inline:
            target[name] = _inline(value.astype(ml_dtypes.bfloat16) if dtype == "bfloat16" else value)
        else:
            target[name] = _write_array(step_dir, f"target/{name}", value, dtype, gcs_specs)
    states = {}
    if optimizer_state:
        for name in list(params)[:2]:
            shape = np.shape(params[name])
            states[f"{name}/v_row"] = _write_array(step_dir, f"state/param_states/{name}/v_row",
                                                   np.ones(shape[:-1] or (1,), np.float32), "float32")
            states[f"{name}/v_col"] = _inline(np.ones(shape[-1:], np.float32))
    contents = {"version": 3, "optimizer": {"target": _nest(target),
                                            "state": {"step": _inline(np.int32(step)),
                                                      "param_states": _nest(states)}}}
    (step_dir / "checkpoint").write_bytes(msgpack.packb(contents, use_bin_type=True))
    return step_dir


def write_t5x_orbax(model_dir: str | os.PathLike, step: int, params: dict[str, np.ndarray],
                    dtype: str = "float32") -> Path:
    """Writes `params` the way newer t5x saves (t5x/checkpoints.py's Orbax `CheckpointManager`): an Orbax
    item `state` = {'target': params, 'state': {'step', 'param_states'}} through
    `PyTreeCheckpointHandler(use_ocdbt=True)`, in `model_dir/checkpoint_<step>/`."""
    import orbax.checkpoint as ocp

    cast = ml_dtypes.bfloat16 if dtype == "bfloat16" else np.float32
    target = _nest({name: np.asarray(value, np.float32).astype(cast) for name, value in params.items()})
    first = next(iter(params))
    tree = {"target": target, "state": {"step": np.int32(step), "param_states": _nest(
        {f"{first}/v": np.ones(np.shape(params[first]), np.float32)})}}
    manager = ocp.CheckpointManager(Path(model_dir).resolve(),
                                    item_handlers={"state": ocp.PyTreeCheckpointHandler(use_ocdbt=True)},
                                    options=ocp.CheckpointManagerOptions(step_prefix="checkpoint", create=True))
    manager.save(step, args=ocp.args.Composite(state=ocp.args.PyTreeSave(tree)))
    manager.wait_until_finished()
    manager.close()
    return Path(model_dir) / f"checkpoint_{step}"
