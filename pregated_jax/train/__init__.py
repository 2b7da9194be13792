"""Training: configs (`TrainConfig` and its gin / Python front-ends), `train_and_evaluate`, checkpoints."""

from pregated_jax.train.checkpoints import load_params, restore_model
from pregated_jax.train.config import (DataConfig, InitConfig, ModelConfig, OptimizerConfig, TrainConfig,
                                       TrainingConfig, apply_override, config_from_gin, config_from_py)
from pregated_jax.train.loop import TrainState, build_model, loss_and_metrics, train_and_evaluate

__all__ = [
    "DataConfig", "InitConfig", "ModelConfig", "OptimizerConfig", "TrainConfig", "TrainingConfig",
    "TrainState", "apply_override", "build_model", "config_from_gin", "config_from_py",
    "load_params", "loss_and_metrics", "restore_model", "train_and_evaluate",
]
