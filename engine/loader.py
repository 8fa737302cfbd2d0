"""Load an mlx-lm model directory into memory, in the engine's fast dtype."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_flatten, tree_map
from mlx_lm.utils import dequantize_model, load_model, load_tokenizer

from .errors import ModelLoadError, UnsupportedModelError


@dataclass
class LoadedModel:
    model: nn.Module
    tokenizer: object  # mlx_lm TokenizerWrapper
    config: dict
    path: Path
    dtype: str
    quantized: bool  # the checkpoint was quantized (it may have been dequantized for speed)
    max_context: int
    vocab_size: int


def on_cpu() -> bool:
    return mx.default_device() == mx.cpu


def _target_dtype(requested: str) -> mx.Dtype | None:
    if requested == "auto":
        return mx.float32 if on_cpu() else None
    if requested == "model":
        return None
    return getattr(mx, requested)


def load(path: Path, dtype: str = "auto", progress=None) -> LoadedModel:
    try:
        model, config = load_model(path, lazy=True)
    except ValueError as e:
        if "not supported" in str(e):
            raise UnsupportedModelError(f"{path}: {e}") from e
        raise ModelLoadError(f"cannot load model from {path}: {e}") from e
    except (FileNotFoundError, KeyError, OSError) as e:
        raise ModelLoadError(f"cannot load model from {path}: {type(e).__name__}: {e}") from e
    quantized = "quantization" in config or "quantization_config" in config
    target = _target_dtype(dtype)
    if target is not None:
        if quantized:
            # Quantized CPU kernels are ~10x slower than float32 GEMM with a fast BLAS.
            model = dequantize_model(model)
        model.update(tree_map(
            lambda p: p.astype(target) if mx.issubdtype(p.dtype, mx.floating) else p,
            model.parameters()))
    mx.eval(model.parameters())
    if progress:
        progress("weights")
    try:
        eos = config.get("eos_token_id")
        tokenizer = load_tokenizer(path, eos_token_ids=[eos] if isinstance(eos, int) else eos)
    except Exception as e:  # transformers raises many kinds here
        raise ModelLoadError(f"cannot load the tokenizer of {path}: {type(e).__name__}: {e}") from e
    if progress:
        progress("tokenizer")
    dtypes = {str(p.dtype).removeprefix("mlx.core.") for _, p in tree_flatten(model.parameters())
              if mx.issubdtype(p.dtype, mx.floating)}
    text_config = config.get("text_config", config)
    return LoadedModel(
        model=model, tokenizer=tokenizer, config=config, path=Path(path),
        dtype=",".join(sorted(dtypes)), quantized=quantized,
        max_context=int(text_config.get("max_position_embeddings") or 32768),
        vocab_size=int(text_config.get("vocab_size") or len(tokenizer.vocab)),
    )
