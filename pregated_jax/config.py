"""Model configuration: one frozen dataclass and the public Switch Transformer presets.

Field names follow Hugging Face's `SwitchTransformersConfig` so that a checkpoint's config.json maps
onto this class one to one (`SwitchConfig.from_hf_dict` / `to_hf_dict`).
"""

from __future__ import annotations

import dataclasses
import functools
import numbers
import types
import typing
from typing import Any, Literal

Routing = Literal["conventional", "pregated"]

# HF config.json fields we read; anything else that changes the computation is refused.
_HF_FIELDS = (
    "vocab_size", "d_model", "d_kv", "d_ff", "num_heads", "num_layers", "num_decoder_layers",
    "num_sparse_encoder_layers", "num_sparse_decoder_layers", "num_experts", "expert_capacity",
    "router_jitter_noise", "router_z_loss_coef", "router_aux_loss_coef",
    "relative_attention_num_buckets", "relative_attention_max_distance", "dropout_rate",
    "layer_norm_epsilon", "tie_word_embeddings", "pad_token_id", "eos_token_id",
    "decoder_start_token_id",
)


@dataclasses.dataclass(frozen=True)
class SwitchConfig:
    """Shape and behaviour of a Switch Transformer (T5-style encoder-decoder, top-1 MoE)."""

    vocab_size: int = 32128
    d_model: int = 768
    d_kv: int = 64
    d_ff: int = 3072
    num_heads: int = 12
    num_layers: int = 12  # encoder blocks
    num_decoder_layers: int = 12
    num_sparse_encoder_layers: int = 6
    num_sparse_decoder_layers: int = 6
    num_experts: int = 8
    # Capacity. `expert_capacity` is HF's absolute per-sequence, per-expert token count (earlier tokens
    # win). `capacity_factor`, when set, overrides it Switch-style: capacity = ceil(factor * seq_len / E).
    # Both None means dropless routing.
    expert_capacity: int | None = 64
    capacity_factor: float | None = None
    router_jitter_noise: float = 0.01
    router_z_loss_coef: float = 0.001
    router_aux_loss_coef: float = 0.001
    relative_attention_num_buckets: int = 32
    relative_attention_max_distance: int = 128
    dropout_rate: float = 0.1
    layer_norm_epsilon: float = 1e-6
    tie_word_embeddings: bool = True
    pad_token_id: int = 0
    eos_token_id: int = 1
    decoder_start_token_id: int = 0
    routing: Routing = "conventional"
    dtype: str = "float32"  # compute dtype of everything but the router ("float32" or "bfloat16")

    def __post_init__(self):
        check_field_types(self)
        if self.routing not in ("conventional", "pregated"):
            raise ValueError(f"SwitchConfig.routing must be 'conventional' or 'pregated', got {self.routing!r}")
        if self.dtype not in ("float32", "bfloat16"):
            raise ValueError(f"SwitchConfig.dtype must be 'float32' or 'bfloat16', got {self.dtype!r}")
        for name in ("vocab_size", "d_model", "d_kv", "d_ff", "num_heads", "num_layers",
                     "num_decoder_layers", "num_experts"):
            if getattr(self, name) <= 0:
                raise ValueError(f"SwitchConfig.{name} must be positive, got {getattr(self, name)}")
        for name, total in (("num_sparse_encoder_layers", self.num_layers),
                            ("num_sparse_decoder_layers", self.num_decoder_layers)):
            if not 0 <= getattr(self, name) <= total:
                raise ValueError(f"SwitchConfig.{name}={getattr(self, name)} must be in [0, {total}]")
        if self.expert_capacity is not None and self.expert_capacity <= 0:
            raise ValueError(f"SwitchConfig.expert_capacity must be positive or None, got {self.expert_capacity}")
        if self.capacity_factor is not None and self.capacity_factor <= 0:
            raise ValueError(f"SwitchConfig.capacity_factor must be positive or None, got {self.capacity_factor}")

    # --- sparse layout (exactly HF's rule) -------------------------------------------------------
    @property
    def encoder_sparse_step(self) -> int:
        return _sparse_step(self.num_layers, self.num_sparse_encoder_layers)

    @property
    def decoder_sparse_step(self) -> int:
        return _sparse_step(self.num_decoder_layers, self.num_sparse_decoder_layers)

    def sparse_blocks(self, stack: Literal["encoder", "decoder"]) -> tuple[int, ...]:
        """Indices of the MoE blocks of a stack: block i is sparse when i % step == 1 (or step == 1)."""
        n, step = ((self.num_layers, self.encoder_sparse_step) if stack == "encoder"
                   else (self.num_decoder_layers, self.decoder_sparse_step))
        return tuple(i for i in range(n) if step > 0 and (i % step == 1 or step == 1))

    def capacity(self, seq_len: int) -> int | None:
        """Tokens each expert may take per sequence, or None for dropless routing."""
        if self.capacity_factor is not None:
            return max(1, int(-(-self.capacity_factor * seq_len // self.num_experts)))
        return self.expert_capacity

    def replace(self, **changes: Any) -> "SwitchConfig":
        return dataclasses.replace(self, **changes)

    # --- Hugging Face config.json ----------------------------------------------------------------
    @classmethod
    def from_hf_dict(cls, d: dict[str, Any], source: str = "config.json") -> "SwitchConfig":
        """Builds a config from a HF `SwitchTransformersConfig` dict; refuses settings we don't implement."""
        if not isinstance(d, dict):
            raise ValueError(f"{source}: expected a JSON object of config fields, got {_json_kind(d)}")
        mt = d.get("model_type", "switch_transformers")
        if mt != "switch_transformers":
            raise ValueError(f"{source}: model_type is {mt!r}, expected 'switch_transformers'")
        act = d.get("dense_act_fn", d.get("feed_forward_proj", "relu"))
        if act != "relu":
            raise ValueError(f"{source}: dense_act_fn/feed_forward_proj={act!r} is not supported (only 'relu')")
        if d.get("is_gated_act", False):
            raise ValueError(f"{source}: is_gated_act=True is not supported")
        if d.get("router_bias", False):
            raise ValueError(f"{source}: router_bias=True is not supported")
        if d.get("router_type", "tokens_masked") != "tokens_masked":
            raise ValueError(f"{source}: router_type={d['router_type']!r} is not supported")
        kw = {k: d[k] for k in _HF_FIELDS if k in d and d[k] is not None}
        if "num_decoder_layers" not in kw and "num_layers" in kw:
            kw["num_decoder_layers"] = kw["num_layers"]
        capacity = kw.get("expert_capacity")
        if isinstance(capacity, numbers.Integral) and capacity >= _NO_CAPACITY:  # to_hf_dict's "dropless"
            kw["expert_capacity"] = None
        if isinstance(kw.get("eos_token_id"), list):
            kw["eos_token_id"] = kw["eos_token_id"][0]
        extra = d.get("pregated_jax", {})  # our own fields, written by to_hf_dict
        if not isinstance(extra, dict):
            raise ValueError(f"{source}: pregated_jax must be a JSON object, got {extra!r} ({_json_kind(extra)})")
        kw.update({k: v for k, v in extra.items() if k in ("routing", "capacity_factor")})
        try:
            return cls(**kw)
        except (TypeError, ValueError) as e:
            raise ValueError(f"{source}: {e}") from e

    def to_hf_dict(self) -> dict[str, Any]:
        d = {k: getattr(self, k) for k in _HF_FIELDS}
        d.update(
            model_type="switch_transformers",
            architectures=["SwitchTransformersForConditionalGeneration"],
            dense_act_fn="relu", feed_forward_proj="relu", is_gated_act=False, router_bias=False,
            router_type="tokens_masked", router_dtype="float32", is_encoder_decoder=True,
            expert_capacity=self.expert_capacity if self.expert_capacity is not None else _NO_CAPACITY,
            pregated_jax={"routing": self.routing, "capacity_factor": self.capacity_factor},
        )
        return d


_NO_CAPACITY = 2**31 - 1  # HF needs an int; this stands for "no capacity limit"


# --- field type checks (shared with the training configs) ------------------------------------------

def check_field_types(obj: Any) -> None:
    """Raises ValueError naming the first field of dataclass `obj` whose value does not match its annotation
    (int, float, bool, str, dict, Literal[...], X | None; other annotations are not checked). An int field
    refuses floats (32.0) and bools; a float field takes ints; a bool field takes only true bools, so that
    a string such as "false" (truthy) or "abc" is refused where the config is built, not at first use."""
    owner = type(obj).__name__
    for name, tp in _field_hints(type(obj)).items():
        value = getattr(obj, name)
        if not _matches(value, tp):
            raise ValueError(f"{owner}.{name} must be {_describe(tp)}, got {value!r} ({_json_kind(value)})")


@functools.lru_cache(maxsize=None)
def _field_hints(cls) -> dict[str, Any]:
    hints = typing.get_type_hints(cls)
    return {f.name: hints[f.name] for f in dataclasses.fields(cls) if f.name in hints}


def _matches(value: Any, tp: Any) -> bool:
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin in (typing.Union, types.UnionType):
        return any(_matches(value, a) for a in args)
    if origin is Literal:
        return any(value == a and type(value) is type(a) for a in args)
    if tp is type(None):
        return value is None
    if tp is bool:
        return isinstance(value, (bool, _np_bool()))
    if tp is int:
        return isinstance(value, numbers.Integral) and not isinstance(value, (bool, _np_bool()))
    if tp is float:
        return isinstance(value, numbers.Real) and not isinstance(value, (bool, _np_bool()))
    if tp is str:
        return isinstance(value, str)
    if tp is dict or origin is dict:
        return isinstance(value, dict)
    return True  # other annotations (nested configs, Any) are checked by their own classes


def _describe(tp: Any) -> str:
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin in (typing.Union, types.UnionType):
        return " or ".join(_describe(a) for a in args)
    if origin is Literal:
        return "one of " + ", ".join(repr(a) for a in args)
    return {type(None): "null/None", bool: "a boolean (true/false)", int: "an integer",
            float: "a number", str: "a string", dict: "a dict"}.get(tp, getattr(tp, "__name__", str(tp)))


def _json_kind(value: Any) -> str:
    """How a value reads in JSON/Python terms: 'a string', 'a float', 'an array', ..."""
    if value is None:
        return "None"
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, numbers.Integral):
        return "an integer"
    if isinstance(value, numbers.Real):
        return "a float"
    return {str: "a string", list: "an array", tuple: "a tuple", dict: "an object"}.get(
        type(value), type(value).__name__)


def _np_bool():
    import numpy as np  # imported on first use: this module stays light

    return np.bool_


def _sparse_step(num_layers: int, num_sparse: int) -> int:
    # HF: num_layers // num_sparse, or num_layers when there are none.
    return num_layers // num_sparse if num_sparse > 0 else num_layers


def _switch_base(num_experts: int) -> SwitchConfig:
    return SwitchConfig(num_experts=num_experts)


PRESETS: dict[str, SwitchConfig] = {
    **{f"switch-base-{e}": _switch_base(e) for e in (8, 16, 32, 64, 128, 256)},
    "switch-large-128": SwitchConfig(d_model=1024, d_ff=4096, num_heads=16, num_layers=24,
                                     num_decoder_layers=24, num_sparse_encoder_layers=12,
                                     num_sparse_decoder_layers=12, num_experts=128),
    # flaxformer's switch_xxl.gin: 4096 wide, MLP 10240, 64 heads of 64, 24+24 layers.
    "switch-xxl-128": SwitchConfig(d_model=4096, d_ff=10240, d_kv=64, num_heads=64, num_layers=24,
                                   num_decoder_layers=24, num_sparse_encoder_layers=12,
                                   num_sparse_decoder_layers=12, num_experts=128),
    # Tiny shapes for tests and the CPU smoke runs.
    "tiny": SwitchConfig(vocab_size=128, d_model=32, d_kv=8, d_ff=64, num_heads=4, num_layers=4,
                         num_decoder_layers=4, num_sparse_encoder_layers=2,
                         num_sparse_decoder_layers=2, num_experts=4, expert_capacity=None,
                         relative_attention_num_buckets=8, relative_attention_max_distance=16),
}


def get_preset(name: str, **overrides: Any) -> SwitchConfig:
    """Returns a preset by name (see `PRESETS`), with optional field overrides."""
    if name not in PRESETS:
        raise KeyError(f"unknown preset {name!r}; known: {', '.join(sorted(PRESETS))}")
    return PRESETS[name].replace(**overrides)
