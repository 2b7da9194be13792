"""Shared test setup: float32 matmuls everywhere, so comparisons against references are exact enough."""

import jax

jax.config.update("jax_default_matmul_precision", "highest")
