"""One small handler per kind of per-layer cache: prefix-cache blocks and spec rollback.

A block payload holds, per layer, what is needed to rebuild that layer's cache
exactly as block-by-block prefill leaves it (a chunk-invariant prefill leaves more
sliding-window keys, but its later queries see the same window, in the same order):
  full       the block's own keys/values; a prefix is their concatenation;
  sliding    the block's own keys/values too; a prefix keeps the trailing
             tokens a RotatingKVCache holds after a block-sized chunk;
  recurrent  a checkpoint of the whole state (conv + recurrent) after the block.

After a speculative verify window of W tokens, row i keeps only its first
keep[i] positions (`rollback`): attention rows are shifted right by the number
of rejected positions, which become left padding (masked), exactly as mlx-lm
finalizes right-padded prompts; recurrent rows take the state captured after
their last kept position.
"""

from __future__ import annotations

import mlx.core as mx
from mlx_lm.models.cache import (ArraysCache, BatchKVCache, BatchRotatingKVCache, KVCache,
                                 RotatingKVCache)

from ..errors import UnsupportedModelError


class FullAttentionHandler:
    kind = "full"

    def extract(self, cache: KVCache, n: int, back: int = 0) -> dict:
        end = cache.offset - back
        return {"k": mx.contiguous(cache.keys[..., end - n:end, :]),
                "v": mx.contiguous(cache.values[..., end - n:end, :])}

    def restore(self, template, payloads: list[dict], block_size: int) -> KVCache:
        cache = KVCache()
        cache.keys = mx.concatenate([p["k"] for p in payloads], axis=2)
        cache.values = mx.concatenate([p["v"] for p in payloads], axis=2)
        cache.offset = cache.keys.shape[2]
        return cache

    def rollback(self, cache: BatchKVCache, rejected: list[int], keep: mx.array, record) -> None:
        _drop_last(cache, rejected)


class SlidingWindowHandler:
    kind = "sliding"

    def extract(self, cache: RotatingKVCache, n: int, back: int = 0) -> dict:
        # In temporal order, newest last (a multi-token update leaves the buffer so; a
        # one-token one leaves a ring). A chunk of L tokens leaves all L held.
        keys, values = cache._temporal_order(cache.keys), cache._temporal_order(cache.values)
        if n + back > keys.shape[2]:
            raise ValueError(f"the sliding-window cache no longer holds the block ending {back} tokens back")
        end = keys.shape[2] - back
        return {"k": mx.contiguous(keys[..., end - n:end, :]),
                "v": mx.contiguous(values[..., end - n:end, :])}

    def restore(self, template: RotatingKVCache, payloads: list[dict],
                block_size: int) -> RotatingKVCache:
        window = template.max_size
        total = len(payloads) * block_size
        # After a chunk of L tokens a RotatingKVCache holds the window-1 tokens
        # before it plus the chunk (so each chunk token saw a full window).
        held = min(window - 1, total - block_size) + block_size
        need = -(-held // block_size)
        keys = mx.concatenate([p["k"] for p in payloads[-need:]], axis=2)[..., -held:, :]
        values = mx.concatenate([p["v"] for p in payloads[-need:]], axis=2)[..., -held:, :]
        cache = RotatingKVCache(max_size=window, keep=0)
        cache.keys, cache.values = keys, values
        cache.offset, cache._idx = total, held
        return cache

    def rollback(self, cache: BatchRotatingKVCache, rejected: list[int], keep: mx.array,
                 record) -> None:
        # A verify window (2+ tokens) leaves this cache in temporal order, newest last,
        # so the rejected positions are each row's last ones, as in the full cache.
        _drop_last(cache, rejected)


class RecurrentStateHandler:
    kind = "recurrent"

    def extract(self, cache: ArraysCache, n: int, back: int = 0) -> dict:
        if back:
            raise ValueError("a recurrent state is held only after the last token")
        return {f"s{i}": state for i, state in enumerate(cache.cache)}

    def restore(self, template: ArraysCache, payloads: list[dict], block_size: int) -> ArraysCache:
        cache = ArraysCache(len(template.cache))
        cache.cache = [payloads[-1][f"s{i}"] for i in range(len(template.cache))]
        return cache

    def rollback(self, cache: ArraysCache, rejected: list[int], keep: mx.array, record) -> None:
        conv_input, states = record["conv_input"], record["states"]
        n_keep = cache[0].shape[1]
        positions = (keep[:, None] + mx.arange(n_keep))[..., None]
        cache[0] = mx.take_along_axis(conv_input, positions, axis=1)
        stacked = mx.stack(states, axis=1)  # [rows, window, ...]
        index = (keep - 1).reshape((-1,) + (1,) * (stacked.ndim - 1))
        cache[1] = mx.take_along_axis(stacked, index, axis=1).squeeze(1)


def _drop_last(cache, rejected: list[int]) -> None:
    """Turn each row's last rejected[i] positions into left padding (masked).

    This is what mlx-lm's finalize() does with right padding, rolling each row right
    by its count; but finalize rolls with a gather over the whole cache, which costs
    ~140 ms per commit on an 8-row Gemma 3 batch on the CPU. Slice copies of each
    row (rolled only where something was rejected) cost ~55 ms there.
    """
    shift = mx.array(rejected)
    cache.keys = _roll_rows(cache.keys, rejected)
    cache.values = _roll_rows(cache.values, rejected)
    cache.offset = cache.offset - shift
    cache.left_padding = cache.left_padding + shift


def _roll_rows(x: mx.array, shifts: list[int]) -> mx.array:
    """Row i of x [rows, heads, positions, dim] rolled right by shifts[i] along positions."""
    n = x.shape[2]
    rows = []
    for i, s in enumerate(shifts):
        row = x[i:i + 1]
        s %= n
        rows.append(mx.concatenate([row[:, :, n - s:], row[:, :, :n - s]], axis=2) if s else row)
    return mx.concatenate(rows, axis=0)


def handler_for(layer_cache):
    # Exact types: subclasses (quantized or chunked KV) store differently.
    if type(layer_cache) is KVCache:
        return FullAttentionHandler()
    if type(layer_cache) is RotatingKVCache and layer_cache.keep == 0:
        return SlidingWindowHandler()
    if type(layer_cache) is ArraysCache:
        return RecurrentStateHandler()
    raise UnsupportedModelError(
        f"the prefix cache has no handler for {type(layer_cache).__name__} layers")


_BATCH_HANDLERS = {BatchKVCache: FullAttentionHandler(), BatchRotatingKVCache: SlidingWindowHandler(),
                   ArraysCache: RecurrentStateHandler()}


def rollback(batch_cache: list, keep: list[int], window: int, records: list[dict]) -> None:
    """Keep the first keep[i] of the `window` positions just written for each batch row."""
    if min(keep) == window:
        return
    keep_arr = mx.array(keep)
    rejected = [window - k for k in keep]
    recurrent = iter(records)
    for layer in batch_cache:
        handler = _BATCH_HANDLERS.get(type(layer))
        if handler is None:
            raise UnsupportedModelError(f"speculation cannot roll back {type(layer).__name__} layers")
        record = next(recurrent) if isinstance(handler, RecurrentStateHandler) else None
        handler.rollback(layer, rejected, keep_arr, record)
