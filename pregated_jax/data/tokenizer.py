"""The T5 SentencePiece tokenizer, as the public Switch Transformer checkpoints use it.

Ids: pad 0, eos 1, unk 2; the SentencePiece model holds 32,000 pieces and T5 appends 100 "extra ids"
(the span-corruption sentinels) on top, counting down from the end: `<extra_id_k>` = 32099 - k. The
model's embedding table is larger still (32,128 rows); ids at or above `vocab_size` have no text.
"""

from __future__ import annotations

import os
from importlib import resources
from typing import Iterable, Sequence

PAD_ID = 0
EOS_ID = 1
UNK_ID = 2
NUM_EXTRA_IDS = 100


def default_vocab_path() -> str:
    """Path of the bundled T5 vocabulary (`pregated_jax/assets/t5_vocab/spiece.model`)."""
    return str(resources.files("pregated_jax").joinpath("assets", "t5_vocab", "spiece.model"))


class Tokenizer:
    """Text <-> token ids with T5's conventions (EOS appended, sentinels above the SentencePiece pieces)."""

    pad_id = PAD_ID
    eos_id = EOS_ID

    def __init__(self, model_path: str | os.PathLike, extra_ids: int = NUM_EXTRA_IDS):
        try:
            import sentencepiece as spm
        except ImportError as e:  # pragma: no cover - sentencepiece is a hard dependency
            raise ImportError("Tokenizer needs the `sentencepiece` package: pip install sentencepiece") from e
        model_path = os.fspath(model_path)
        if not os.path.isfile(model_path):
            raise FileNotFoundError(f"SentencePiece model file not found: {model_path}")
        self._sp = spm.SentencePieceProcessor()
        try:
            with open(model_path, "rb") as f:
                self._sp.LoadFromSerializedProto(f.read())
        except Exception as e:  # sentencepiece raises RuntimeError/OSError with a terse message
            raise ValueError(f"Could not load SentencePiece model {model_path}: "
                             f"not a valid model file ({e})") from e
        if self._sp.pad_id() != PAD_ID or self._sp.eos_id() != EOS_ID:
            raise ValueError(
                f"SentencePiece model {model_path} has pad id {self._sp.pad_id()} and "
                f"eos id {self._sp.eos_id()}; "
                f"the Switch/T5 models expect pad {PAD_ID} and eos {EOS_ID}")
        self.model_path = model_path
        self.extra_ids = extra_ids
        self.piece_count = self._sp.get_piece_size()  # 32,000 for T5

    @property
    def vocab_size(self) -> int:
        """Pieces plus extra ids (32,100 for T5); the model's embedding table may be padded beyond this."""
        return self.piece_count + self.extra_ids

    def sentinel_id(self, k: int) -> int:
        """Id of `<extra_id_k>`: vocab_size - 1 - k (32099 for k = 0)."""
        if not 0 <= k < self.extra_ids:
            raise ValueError(f"sentinel index {k} out of range [0, {self.extra_ids})")
        return self.vocab_size - 1 - k

    def encode(self, text: str, add_eos: bool = True) -> list[int]:
        """Token ids of `text`, EOS (1) appended when `add_eos` (T5's convention for inputs and targets)."""
        if not isinstance(text, str):
            raise TypeError(f"Tokenizer.encode expects a str, got {type(text).__name__}")
        ids = self._sp.encode(text)
        if add_eos:
            ids.append(EOS_ID)
        return ids

    def decode(self, ids: Iterable[int]) -> str:
        """Text of `ids`: stops at the first EOS, skips pad; sentinels print as `<extra_id_k>`; ids at or
        above `vocab_size` (embedding-table padding) are skipped."""
        out: list[str] = []
        run: list[int] = []  # consecutive ordinary pieces, decoded together so spacing is right
        for i in ids:
            i = int(i)
            if i == EOS_ID:
                break
            if i == PAD_ID or i >= self.vocab_size or i < 0:
                continue
            if i >= self.piece_count:
                if run:
                    out.append(self._sp.decode(run))
                    run = []
                out.append(f"<extra_id_{self.vocab_size - 1 - i}>")
            else:
                run.append(i)
        if run:
            out.append(self._sp.decode(run))
        return " ".join(s for s in out if s) if len(out) > 1 else (out[0] if out else "")

    def decode_batch(self, ids: Sequence[Iterable[int]]) -> list[str]:
        """`decode` of each row of a [B, L] array or list of lists."""
        return [self.decode(row) for row in ids]


_DEFAULT: Tokenizer | None = None


def default_tokenizer() -> Tokenizer:
    """The bundled T5 tokenizer (loaded once, then cached)."""
    global _DEFAULT
    if _DEFAULT is None:
        _DEFAULT = Tokenizer(default_vocab_path())
    return _DEFAULT
