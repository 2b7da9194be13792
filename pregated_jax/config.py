"""Model configuration: one frozen dataclass and the public Switch Transformer presets.

Field names follow Hugging Face's `SwitchTransformersConfig` so that a checkpoint's config.json maps
onto this class one to one (`SwitchConfig.from_hf_dict` / `to_hf_dict`).
"""

from __future__ import annotations

import dataclasses
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
        if kw.get("expert_capacity", 0) >= _NO_CAPACITY:  # how to_hf_dict writes "dropless"
            kw["expert_capacity"] = None
        if isinstance(kw.get("eos_token_id"), list):
            kw["eos_token_id"] = kw["eos_token_id"][0]
        extra = d.get("pregated_jax", {})  # our own fields, written by to_hf_dict
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
