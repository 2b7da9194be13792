"""One entry point for every kind of checkpoint the project reads, and the built-in default model."""

from __future__ import annotations

from pathlib import Path

from pregated_jax.model import SwitchTransformer

DEFAULT_MODEL_DIR = Path(__file__).parent / "assets" / "default_model"


def load_model(path: str | Path = "default", dtype: str | None = None) -> SwitchTransformer:
    """Loads a model from:
    - "default": the small pre-gated model bundled with the package (Debian descriptions -> synopsis);
    - a Hugging Face checkpoint directory (config.json + safetensors / .bin weights);
    - an Orbax checkpoint of ours (a training workdir, its checkpoints/ folder, or one step folder).
    """
    if str(path) == "default":
        path = DEFAULT_MODEL_DIR
        if not (path / "config.json").exists():
            raise FileNotFoundError(f"the built-in default model is missing from {path}; reinstall the package")
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"checkpoint path {path} does not exist")
    from pregated_jax.hf_checkpoint import WEIGHT_FILES, from_pretrained

    if any((path / name).exists() for name in WEIGHT_FILES):
        return from_pretrained(path, dtype=dtype)
    from pregated_jax.train.checkpoints import restore_model

    return restore_model(path, dtype=dtype)


def vocabulary_for(path: str | Path = "default") -> str:
    """The SentencePiece model that goes with a checkpoint: its own spiece.model, else the T5 vocabulary."""
    from pregated_jax.data.tokenizer import default_vocab_path

    directory = DEFAULT_MODEL_DIR if str(path) == "default" else Path(path)
    own = directory / "spiece.model"
    return str(own) if own.exists() else default_vocab_path()
