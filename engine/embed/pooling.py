"""Pooling token states into one vector per text, as sentence-transformers does.

Padding never reaches a pooled vector: mean and max pooling mask padded positions,
CLS takes position 0 (encoders pad on the right), last-token takes the last
position (decoders are padded on the left).
"""

from __future__ import annotations

import mlx.core as mx

MODES = ("mean", "cls", "max", "lasttoken")


def pool(hidden: mx.array, mask: mx.array, mode: str) -> mx.array:
    """hidden [B, L, H], mask [B, L] (1 = token) -> [B, H]."""
    if mode == "cls":
        return hidden[:, 0]
    if mode == "lasttoken":
        return hidden[:, -1]
    m = mask[..., None].astype(hidden.dtype)
    if mode == "mean":
        return (hidden * m).sum(axis=1) / mx.maximum(m.sum(axis=1), 1e-9)
    if mode == "max":
        return mx.where(m > 0, hidden, -mx.inf).max(axis=1)
    raise ValueError(f"unknown pooling mode {mode!r}; expected one of {MODES}")


def normalize(x: mx.array) -> mx.array:
    """Unit L2 norm per row (sentence-transformers' Normalize: divide by max(norm, 1e-12))."""
    return x / mx.maximum(mx.linalg.norm(x, axis=-1, keepdims=True), 1e-12)
