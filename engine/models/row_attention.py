"""Attention whose result for a query does not depend on the call it is part of.

With quantized kernels (engine/cpu/quant_linear.py) every product, norm and activation
gives a row the same bits whatever rows run beside it, but MLX's fused attention does not:
a batch pads the rows' keys to one length, a verify window or a prefill chunk asks for L
queries at once, and a sliding-window cache that decodes in place hands over its keys as
a ring; each changes the kernel's summation order (1e-6 differences here). With float32
weights those bits never change a token; with int8 activations a last-bit difference can
move a value across a rounding boundary, and a row then differs visibly. So inside
`exact(model)`, the attention layers of a model set up by `install()` run
engine/cpu/causal_attention.py's kernel: each query over its visible keys in time order,
in one fixed order of operations. Then a query gets the same bits in a decode step, a
batch, a verify window and a prefill chunk of any size: prefill is chunk-invariant, and a
prompt's KV is the same however it was split (the engine then prefills in large forwards
while the prefix cache keeps small blocks: core/engine_core.py).

The kernel needs to know where a rotating cache's ring starts, which only the cache
knows, so the hook replaces mlx-lm's `scaled_dot_product_attention` (which receives the
cache) in the modules of the model's classes, not `mx.fast`'s.

Without the native kernel (no AVX-512), decode and verify rows fall back to one fused call
per query over its contiguous keys, which a lone decode step matches; prefill then stays
in prefix-cache blocks (not chunk-invariant).

Inside `storing_kv(mx.float16)` (core/model_runner.py, for chunk-invariant models) the
caches store keys and values as float16: half the memory of float32, as llama.cpp keeps
its KV. mlx-lm's attention layers hand their keys to `cache.update_and_fetch` themselves,
so that method of mlx-lm's KV cache classes converts them first, on this thread, inside
the context only (outside it, and for anyone else's mlx-lm caches, it is mlx-lm's). The
kernel widens float16 exactly, so the bits stay independent of batching and chunking.
"""

from __future__ import annotations

import contextlib
import functools
import sys
import threading

import mlx.core as mx
import mlx.nn as nn
import numpy as np
from mlx_lm.models import base
from mlx_lm.models.cache import (BatchKVCache, BatchRotatingKVCache, ChunkedKVCache, ConcatenateKVCache,
                                 KVCache, RotatingKVCache)

from ..cpu import causal_attention

_mlx_lm_attention = base.scaled_dot_product_attention
_fused = mx.fast.scaled_dot_product_attention
_local = threading.local()  # .model: the model whose forward is running exactly; .masks; .kv_dtype


def install(model: nn.Module) -> bool:
    """Route the attention of the model's layers through `_attention`; returns whether the
    native kernel serves them (else the per-query fallback does, for decode and verify)."""
    patched = 0
    for _, module in model.named_modules():
        namespace = sys.modules.get(type(module).__module__)
        if getattr(namespace, "scaled_dot_product_attention", None) in (_mlx_lm_attention, _attention):
            namespace.scaled_dot_product_attention = _attention
            patched += 1
    model._kernelext_exact_attention = True  # plain attribute: not a parameter
    return patched > 0 and causal_attention.available()


@contextlib.contextmanager
def exact(model: nn.Module):
    """Within: the forward of `model` (if install()ed; None: no model) attends per query."""
    outer = getattr(_local, "model", None)
    _local.model = model if getattr(model, "_kernelext_exact_attention", False) else None
    _local.masks = {}
    try:
        yield
    finally:
        _local.model, _local.masks = outer, {}


@contextlib.contextmanager
def storing_kv(dtype):
    """Within: mlx-lm's KV caches store new keys and values as `dtype` (None: as given)."""
    outer = getattr(_local, "kv_dtype", None)
    _local.kv_dtype = dtype
    if dtype is not None:
        _convert_on_store()
    try:
        yield
    finally:
        _local.kv_dtype = outer


@functools.cache
def _convert_on_store() -> None:
    """Give mlx-lm's KV cache classes' update_and_fetch the conversion (once)."""
    for cls in (KVCache, RotatingKVCache, BatchKVCache, BatchRotatingKVCache, ChunkedKVCache, ConcatenateKVCache):
        store = cls.update_and_fetch

        def update_and_fetch(self, keys, values, _store=store):
            dtype = getattr(_local, "kv_dtype", None)
            if dtype is not None and keys.dtype != dtype:
                keys, values = keys.astype(dtype), values.astype(dtype)
            return _store(self, keys, values)

        cls.update_and_fetch = update_and_fetch


def _attention(queries, keys, values, cache, scale, mask, sinks=None):
    if (getattr(_local, "model", None) is None or sinks is not None or hasattr(cache, "bits")
            or queries.dtype != mx.float32 or keys.dtype not in (mx.float32, mx.float16)
            or (isinstance(mask, mx.array) and mask.dtype != mx.bool_)):
        return _mlx_lm_attention(queries, *_widened(queries, keys, values), cache, scale, mask, sinks)
    if not causal_attention.available():
        return _per_query_fused(queries, *_widened(queries, keys, values), scale, mask)
    if getattr(cache, "keep", 0):  # a ring after `keep` pinned tokens: not one rotation
        return _mlx_lm_attention(queries, *_widened(queries, keys, values), cache, scale, mask, sinks)
    causal = isinstance(mask, str)
    return causal_attention.causal_attention(
        queries, keys, values, scale=scale, causal=causal, ring=_ring_start(cache, keys.shape[2]),
        mask=None if causal or mask is None else _visible(mask, queries.shape[0], queries.shape[2], keys.shape[2]))


def _widened(queries, keys, values):
    """Keys and values of a float16 cache as the queries' type, for MLX's attention."""
    if keys.dtype == mx.float16 and queries.dtype != mx.float16:
        return keys.astype(queries.dtype), values.astype(queries.dtype)
    return keys, values


def _ring_start(cache, n: int) -> int:
    """Buffer index of the oldest of the n keys a cache just returned. A rotating cache
    that decoded in place (one token) holds a ring and writes at `_idx` next; after a
    multi-token update it holds them in time order (`_idx` == n), as other caches do."""
    if isinstance(cache, RotatingKVCache) or (isinstance(cache, BatchRotatingKVCache) and cache.rotated):
        return cache._idx if cache._idx < n else 0
    return 0


def _visible(mask, batch: int, rows: int, keys: int):
    """One conversion per mask per forward (Gemma's layers share two masks)."""
    key = (id(mask), batch, rows, keys)
    hit = _local.masks.get(key)
    if hit is None or hit[0] is not mask:
        hit = _local.masks[key] = (mask, causal_attention.visible(mask, batch, rows, keys))
    return hit[1]


# -- without the native kernel ---------------------------------------------------------------
def _per_query_fused(queries, keys, values, scale, mask):
    """One fused call per batch row and query over exactly the keys its mask allows, when
    those are one contiguous run of the buffer (a lone decode step of that row at that
    position sees the same keys, in the same order, with no mask); else the batched call."""
    batch, _, rows, _ = queries.shape
    if batch == 1 and rows == 1 and (mask is None or isinstance(mask, str)):
        return _fused(queries, keys, values, scale=scale, mask=mask)
    spans = _row_spans(mask, batch, rows, keys.shape[2])
    if spans is None:
        return _fused(queries, keys, values, scale=scale, mask=mask)
    out = [_fused(queries[b:b + 1, :, i:i + 1], keys[b:b + 1, :, first:end],
                  values[b:b + 1, :, first:end], scale=scale, mask=None)
           for b, i, first, end in spans]
    return mx.concatenate([mx.concatenate(out[b * rows:(b + 1) * rows], axis=2) for b in range(batch)])


def _row_spans(mask, batch: int, rows: int, keys: int):
    """[(b, i, first, end)] for each batch row b and query i, or None if some row's keys
    are not one contiguous run (one host read per mask and forward)."""
    if mask is None or isinstance(mask, str):  # no mask, or causal: keys up to the row
        return [(b, i, 0, keys - rows + 1 + i) for b in range(batch) for i in range(rows)]
    hit = _local.masks.get(id(mask))
    if hit is not None and hit[0] is mask:
        return hit[1]
    allowed = np.broadcast_to(np.array(mask), (batch, 1, rows, keys))[:, 0]
    spans = []
    for b in range(batch):
        for i in range(rows):
            idx = np.flatnonzero(allowed[b, i])
            if len(idx) == 0 or idx[-1] - idx[0] + 1 != len(idx):
                _local.masks[id(mask)] = (mask, None)
                return None
            spans.append((b, i, int(idx[0]), int(idx[-1]) + 1))
    _local.masks[id(mask)] = (mask, spans)
    return spans
