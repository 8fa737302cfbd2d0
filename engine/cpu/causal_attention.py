"""Decoder attention with one fixed summation per query (`native/causal_attention.cpp`).

MLX's fused attention sums a query's keys in an order that depends on the call: how many
queries it holds (prefill chunk, verify window), how far the batch pads the rows, where a
sliding-window ring starts. With the quantized kernels every other part of a forward is
exact per row (quant_linear.py, fused_layers.py), so these last-bit differences were what
made a prompt's KV depend on how it was chunked. This kernel computes each query alone, over
its visible keys in time order, in a fixed order of operations: a query gets the same bits
in any chunk, batch or window, and so does a lone decode step of it.
"""

from __future__ import annotations

import functools

import mlx.core as mx

try:
    from . import _causal_attention as _native
except ImportError:  # not built (`make native`), or built for another mlx
    _native = None


def available() -> bool:
    return _native is not None and mx.default_device() == mx.cpu and _native.supported() and _binds()


@functools.cache
def _binds() -> bool:
    """Whether the module takes mx.array (built against the installed mlx's ABI)."""
    try:
        x = mx.zeros((1, 1, 1, 16))
        mx.eval(_native.causal_attention(x, x, x))
        return True
    except TypeError:
        return False


def visible(mask: mx.array, batch: int, rows: int, keys: int) -> mx.array:
    """A boolean attention mask (broadcastable to [batch, 1, rows, keys]) in the kernel's
    form: uint8 [batch, rows, keys]."""
    return mx.broadcast_to(mask, (batch, 1, rows, keys)).reshape(batch, rows, keys).astype(mx.uint8)


def causal_attention(queries: mx.array, keys: mx.array, values: mx.array, *, scale: float,
                     mask: mx.array | None = None, causal: bool = False, ring: int = 0) -> mx.array:
    """queries [B, Hq, L, D], keys/values [B, Hkv, N, D] (float32) -> [B, Hq, L, Dv].

    Which keys a query sees: `mask` (`visible()`'s form), else `causal` (query i: keys up
    to N - L + i), else all. `ring`: the buffer index of the oldest key (a rotating cache
    that decoded in place), so keys are taken in time order.
    """
    return _native.causal_attention(queries, keys, values, mask, causal, ring, scale)
