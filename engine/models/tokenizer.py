"""The model's tokenizer: mlx-lm's TokenizerWrapper, with a compact streaming detokenizer.

mlx-lm's SPM streaming detokenizer (Gemma, Llama-style vocabularies) keeps every token's
bytes as its own Python object: 262,144 bytes objects, 18 MB of RAM for Gemma 3's
vocabulary, held for the engine's life. The same bytes as one blob plus an offset array
take 3.6 MB and stream the same text (SPMStreamingDetokenizer's own code runs on them).
"""

from __future__ import annotations

from array import array
from pathlib import Path

from mlx_lm.tokenizer_utils import SPMStreamingDetokenizer, TokenizerWrapper
from mlx_lm.utils import load_tokenizer as mlx_lm_load_tokenizer

from ..errors import ModelLoadError


def load_tokenizer(path: Path, config: dict) -> TokenizerWrapper:
    """mlx-lm's tokenizer of the model directory `path`, its errors as the engine's."""
    try:
        eos = config.get("eos_token_id")
        tokenizer = mlx_lm_load_tokenizer(path, eos_token_ids=[eos] if isinstance(eos, int) else eos)
    except Exception as e:  # transformers raises many kinds here
        raise ModelLoadError(f"cannot load the tokenizer of {path}: {type(e).__name__}: {e}") from e
    _pack_token_map(tokenizer)
    return tokenizer


class PackedTokens:
    """A read-only list of bytes (token id -> the token's bytes) stored as one blob."""

    def __init__(self, pieces: list[bytes]):
        self._offsets = array("I", [0])  # 4 bytes an offset: a vocabulary is far below 4 GB
        total = 0
        for piece in pieces:
            total += len(piece)
            self._offsets.append(total)
        self._blob = b"".join(pieces)

    def __len__(self) -> int:
        return len(self._offsets) - 1

    def __getitem__(self, token: int) -> bytes:
        if not 0 <= token < len(self):
            raise IndexError(f"token id {token} out of range [0, {len(self)})")
        return self._blob[self._offsets[token]:self._offsets[token + 1]]


def _pack_token_map(tokenizer: TokenizerWrapper) -> None:
    """Swap the SPM detokenizer's list of bytes for a PackedTokens (other detokenizers
    keep no per-token map and stay as mlx-lm built them)."""
    detokenizer = getattr(tokenizer, "_detokenizer", None)
    if type(detokenizer) is SPMStreamingDetokenizer and isinstance(detokenizer.tokenmap, list):
        detokenizer.tokenmap = PackedTokens(detokenizer.tokenmap)
