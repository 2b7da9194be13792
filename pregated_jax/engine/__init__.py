"""Offloaded MoE inference: experts in host memory, streamed to the device ahead of use.

Module map: `engine` (InferenceEngine: construction and the generation loop), `config` (EngineConfig),
`stack_pass` (the block loop of one stack), `schedule` (what each mode copies ahead of a block),
`sources` (the typed expert sources), `fetch` (host -> device copies and their ordering), `cache` (the
device expert cache), `guess` (the decoder's first-block guess), `placement` (where weights live),
`search` (greedy and beam steps), `stats` (run statistics), `cache_sim` (the cache's reference).
"""

from pregated_jax.engine.config import MODES, EngineConfig
from pregated_jax.engine.engine import GenerationResult, InferenceEngine
from pregated_jax.engine.stats import RunStats

__all__ = ["MODES", "EngineConfig", "GenerationResult", "InferenceEngine", "RunStats"]
