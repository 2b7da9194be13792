"""Tiny CPU smoke run on the bundled Debian task: `python scripts/train.py --config configs/tiny.py
--workdir /tmp/tiny`. Must resolve to the same TrainConfig as configs/tiny.gin (tests check this)."""

from pregated_jax.train.config import (DataConfig, ModelConfig, OptimizerConfig, TrainConfig,
                                       TrainingConfig)


def get_config() -> TrainConfig:
    return TrainConfig(
        # The tiny shapes with the T5 vocabulary's embedding size, so the Debian task's ids fit.
        model=ModelConfig(preset="tiny", overrides={"vocab_size": 32128}),
        optimizer=OptimizerConfig(name="adafactor", learning_rate=1e-2, schedule="constant"),
        training=TrainingConfig(batch_size=4, max_input_len=16, max_target_len=8, num_steps=20,
                                eval_every=10, eval_steps=2, checkpoint_every=10, keep_checkpoints=2,
                                log_every=5, seed=0),
        data=DataConfig(task="debian", pack=False),  # pack=True: several examples per train row
    )
