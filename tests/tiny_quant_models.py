"""Tiny quantized checkpoints (tests/tiny_models.py's models, quantized), written locally.

    path = tiny_gguf_model("gemma3_text")   # GGUF blocks, as models/gguf_convert.py writes them
    path = tiny_mlx_model("qwen3", bits=4)  # an mlx-lm affine checkpoint (mlx_lm.convert)

GGUF: each matrix (embeddings and every Linear) is quantized with one of Q4_0, Q5_0 and
Q8_0 in turn (the tiny models' 64-wide rows hold no 256-weight K-quant block; the K-quants
are covered by tests/test_quant_kernels.py), and stored the way the GGUF converter stores
blocks: uint8 [rows, bytes per row] in model.safetensors, their types in config.json.
Only the families the GGUF converter maps (llama, qwen3, gemma3_text).

Imports no MLX at module level.
"""

from __future__ import annotations

import functools
import json
import shutil
from pathlib import Path

import numpy as np
from safetensors.numpy import load_file, save_file

from quant_blocks import quantize
from tiny_models import _cache_dir, tiny_model

GGUF_FAMILIES = ("llama", "qwen3", "gemma3_text")
_CYCLE = ("Q4_0", "Q5_0", "Q8_0")
QUANTIZATION_KEY = "kernelext_gguf_quantization"  # engine/gguf_convert.py


def _is_matrix(name: str, value: np.ndarray) -> bool:
    return value.ndim == 2 and name.endswith(".weight") and value.shape[1] % 32 == 0


def write_tiny_gguf_model(family: str, path: Path, seed: int = 0) -> Path:
    if family not in GGUF_FAMILIES:
        raise ValueError(f"no GGUF conversion for {family!r}")
    src = tiny_model(family, seed=seed)
    shutil.copytree(src, path)
    weights = load_file(str(src / "model.safetensors"))
    types = {}
    for i, name in enumerate(sorted(n for n, v in weights.items() if _is_matrix(n, v))):
        qtype = _CYCLE[i % len(_CYCLE)]
        types[name] = [qtype, *map(int, weights[name].shape)]
        weights[name] = quantize(weights[name], qtype)
    save_file(weights, str(path / "model.safetensors"), metadata={"format": "mlx"})
    config = json.loads((path / "config.json").read_text())
    config[QUANTIZATION_KEY] = types
    (path / "config.json").write_text(json.dumps(config, indent=2))
    return path


@functools.cache
def tiny_gguf_model(family: str, seed: int = 0) -> Path:
    return write_tiny_gguf_model(family, _cache_dir() / f"{family}-s{seed}-gguf", seed)


@functools.cache
def tiny_mlx_model(family: str, bits: int = 4, group_size: int = 32, dtype: str | None = None) -> Path:
    """mlx-lm's own quantization of the tiny model (`mlx_lm.convert`); `dtype` "float16" or
    "bfloat16" gives 16-bit scales and biases, as published checkpoints have."""
    from mlx_lm import convert

    path = _cache_dir() / f"{family}-mlx{bits}-g{group_size}{'-' + dtype if dtype else ''}"
    convert(str(tiny_model(family)), mlx_path=str(path), quantize=True, q_bits=bits, q_group_size=group_size,
            dtype=dtype)
    return path
