"""Attention computed row by row, as a lone decode step computes it.

With quantized kernels (engine/cpu/quant_linear.py) every product is exactly the same for
a row whatever rows run beside it, but MLX's fused attention is not: a batch pads the
rows' keys to one length and a verify window asks for L queries at once, and both change
the kernel's summation order (1e-6 differences here). With float32 weights those bits
never change a token; with int8 activations a last-bit difference can move a value
across a rounding boundary, and a row then differs visibly: batching and speculation
would change outputs. So, inside `row_by_row()`, attention is one fused call per batch
row and query, over exactly the keys its mask allows, when those are one contiguous run
(a lone decode step of that row at that position sees the same keys, in the same order,
and the same all-true mask). Rotating (sliding-window) caches can hand a row its keys
wrapped around their ring; such rows keep the batched call and may differ in the last
bits. Prefill is unaffected: its chunks are block-aligned, so cold and cached prompts
already compute alike.
"""

from __future__ import annotations

import contextlib

import mlx.core as mx
import numpy as np

_fused = mx.fast.scaled_dot_product_attention
_active = [0]
_spans: dict = {}  # id(mask) -> (mask, spans): one host read per mask, shared by the layers
# (kept until row_by_row() exits: Gemma's sliding and global layers alternate two masks,
# and each read on the host waits for the MLX stream)


def _row_spans(mask, batch: int, rows: int, keys: int):
    """[(b, i, first, end)] for each batch row b and query i, or None if some row's keys
    are not one contiguous run."""
    if mask is None or isinstance(mask, str):  # no mask, or causal: keys up to the row
        return [(b, i, 0, keys - rows + 1 + i) for b in range(batch) for i in range(rows)]
    hit = _spans.get(id(mask))
    if hit is not None and hit[0] is mask:
        return hit[1]
    allowed = np.broadcast_to(np.array(mask), (batch, 1, rows, keys))[:, 0]
    spans = []
    for b in range(batch):
        for i in range(rows):
            idx = np.flatnonzero(allowed[b, i])
            if len(idx) == 0 or idx[-1] - idx[0] + 1 != len(idx):
                spans = None
                break
            spans.append((b, i, int(idx[0]), int(idx[-1]) + 1))
        if spans is None:
            break
    _spans[id(mask)] = (mask, spans)
    return spans


def _attention(queries, keys, values, *, scale, mask=None, **kwargs):
    batch, _, rows, _ = queries.shape
    if not _active[0] or (batch == 1 and rows == 1 and (mask is None or isinstance(mask, str))):
        return _fused(queries, keys, values, scale=scale, mask=mask, **kwargs)
    spans = _row_spans(mask, batch, rows, keys.shape[2])
    if spans is None:
        return _fused(queries, keys, values, scale=scale, mask=mask, **kwargs)
    out = [_fused(queries[b:b + 1, :, i:i + 1], keys[b:b + 1, :, first:end],
                  values[b:b + 1, :, first:end], scale=scale, mask=None, **kwargs)
           for b, i, first, end in spans]
    return mx.concatenate([mx.concatenate(out[b * rows:(b + 1) * rows], axis=2) for b in range(batch)])


mx.fast.scaled_dot_product_attention = _attention  # mlx-lm's models call it through mx.fast


@contextlib.contextmanager
def row_by_row(enabled: bool = True):
    _active[0] += int(enabled)
    try:
        yield
    finally:
        _active[0] -= int(enabled)
        if not _active[0]:
            _spans.clear()
