"""Attention of short packed sequences in one native call (encoder forwards on the CPU).

MLX's path for a BERT batch is three graph nodes per layer (scores, softmax, weighted sum),
each a batch of 12 x B tiny per-head GEMMs (128 x 32 by 32 x 128 on MiniLM) that MKL
threads badly, and the scores of every padded key: ~80 ms a layer for 32 x 128 tokens
here. `native/short_attention.cpp` takes the fused QKV projection of packed tokens
(no padding) and, per sequence and head, keeps scores, softmax and the weighted sum in
cache. A token's result depends only on its own sequence's tokens (fixed-order sums over
its own length), so packing stays batch-invariant.
"""

from __future__ import annotations

import functools

import mlx.core as mx

from . import bf16_linear

try:
    from . import _short_attention as _native
except ImportError:  # not built (`make native`), or built for another mlx
    _native = None


def available() -> bool:
    return _native is not None and bf16_linear.wanted() and _native.supported() and _binds()


@functools.cache
def _binds() -> bool:
    """Whether the module takes mx.array (built against the installed mlx's ABI)."""
    try:
        mx.eval(_native.short_attention(mx.zeros((1, 48)), mx.array([0, 1], mx.int32), 1, 1.0))
        return True
    except TypeError:
        return False


def fits(hidden: int, heads: int) -> bool:
    return hidden % heads == 0 and hidden // heads <= 128


def short_attention(qkv: mx.array, starts: mx.array, heads: int, scale: float) -> mx.array:
    """qkv [T, 3H] (queries, keys, values of packed tokens), starts int32 [S + 1] (sequence
    s is tokens starts[s]..starts[s+1]) -> [T, H], heads side by side."""
    return _native.short_attention(qkv, starts, heads, scale)
