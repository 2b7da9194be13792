"""pregated-jax: Pre-gated Mixture-of-Experts (Switch Transformer) in JAX/Flax with host-offloaded experts.

    import pregated_jax as pj
    model = pj.from_pretrained("path/to/switch-base-8")            # a Hugging Face checkpoint directory
    model = pj.to_pregated(model)                                   # block N's pre-gate routes block N+1
    engine = pj.InferenceEngine(model, mode="pregated")             # experts stay in pinned host memory
    result = engine.generate(input_ids, max_new_tokens=32, num_beams=4)
"""

from pregated_jax.config import PRESETS, SwitchConfig, get_preset
from pregated_jax.convert import to_pregated
from pregated_jax.engine import MODES, EngineConfig, InferenceEngine
from pregated_jax.expert_parallel import shard_model
from pregated_jax.generation import generate
from pregated_jax.hf_checkpoint import CheckpointError, from_pretrained, save_pretrained
from pregated_jax.loading import load_model
from pregated_jax.mesh import MeshConfig, make_mesh, parse_mesh
from pregated_jax.model import ModelAux, SwitchTransformer, router_loss
from pregated_jax.routing import RouterDecision
from pregated_jax.t5x_checkpoint import load_t5x
from pregated_jax.train.checkpoints import load_params

__all__ = [
    "PRESETS", "SwitchConfig", "get_preset", "SwitchTransformer", "ModelAux", "RouterDecision", "router_loss",
    "to_pregated", "generate", "from_pretrained", "save_pretrained", "CheckpointError", "InferenceEngine",
    "EngineConfig", "MODES", "load_model", "load_params", "make_mesh", "parse_mesh", "MeshConfig", "shard_model",
    "load_t5x",
]
__version__ = "0.1.0"
