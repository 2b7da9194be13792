"""Offloaded MoE inference: experts in host memory, streamed to the device ahead of use."""

from pregated_jax.engine.engine import (GUESS_FIRST_BLOCK_CHOICES, MODES, EngineConfig, GenerationResult,
                                        InferenceEngine)
from pregated_jax.engine.stats import RunStats

__all__ = ["GUESS_FIRST_BLOCK_CHOICES", "MODES", "EngineConfig", "GenerationResult", "InferenceEngine", "RunStats"]
