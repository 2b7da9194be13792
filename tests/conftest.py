"""Shared test setup: float32 matmuls everywhere, so comparisons against references are exact enough; tests
marked `gpu` are skipped where JAX's default device is not a CUDA GPU (scripts/test_gpu.sh runs them)."""

import jax
import pytest
from flax import nnx

from pregated_jax.config import get_preset
from pregated_jax.model import SwitchTransformer

jax.config.update("jax_default_matmul_precision", "highest")



@pytest.fixture(scope="module")
def tiny_pregated():
    """A tiny pre-gated model with 8 experts (capacity 6) in eval mode, built once per test module."""
    cfg = get_preset("tiny", routing="pregated", num_experts=8, expert_capacity=6)
    m = SwitchTransformer(cfg, rngs=nnx.Rngs(0))
    m.eval()
    return m


def pytest_collection_modifyitems(config, items):
    gpu_tests = [item for item in items if item.get_closest_marker("gpu")]
    if not gpu_tests:
        return
    platform = jax.devices()[0].platform
    if platform == "gpu":
        return
    skip = pytest.mark.skip(reason=f"needs a CUDA GPU (JAX's default device is {platform!r}); "
                                   "run scripts/test_gpu.sh on the GPU machine")
    for item in gpu_tests:
        item.add_marker(skip)
