"""Offloaded MoE inference: experts in host memory, streamed to the device ahead of use."""

from pregated_jax.engine.engine import MODES, EngineConfig, GenerationResult, InferenceEngine
from pregated_jax.engine.stats import RunStats

__all__ = ["MODES", "EngineConfig", "GenerationResult", "InferenceEngine", "RunStats"]
