"""One small handler per kind of per-layer cache, for saving and restoring blocks.

A block payload holds, per layer, what is needed to rebuild that layer's cache
exactly as block-by-block prefill leaves it:
  full       the block's own keys/values; a prefix is their concatenation;
  sliding    the block's own keys/values too; a prefix keeps the trailing
             tokens a RotatingKVCache holds after a block-sized chunk;
  recurrent  a checkpoint of the whole state (conv + recurrent) after the block.
"""

from __future__ import annotations

import mlx.core as mx
from mlx_lm.models.cache import ArraysCache, KVCache, RotatingKVCache

from .errors import UnsupportedModelError


class FullAttentionHandler:
    kind = "full"

    def extract(self, cache: KVCache, n: int) -> dict:
        end = cache.offset
        return {"k": mx.contiguous(cache.keys[..., end - n:end, :]),
                "v": mx.contiguous(cache.values[..., end - n:end, :])}

    def restore(self, template, payloads: list[dict], block_size: int) -> KVCache:
        cache = KVCache()
        cache.keys = mx.concatenate([p["k"] for p in payloads], axis=2)
        cache.values = mx.concatenate([p["v"] for p in payloads], axis=2)
        cache.offset = cache.keys.shape[2]
        return cache


class SlidingWindowHandler:
    kind = "sliding"

    def extract(self, cache: RotatingKVCache, n: int) -> dict:
        # A multi-token update leaves the buffer in temporal order, newest last.
        return {"k": mx.contiguous(cache.keys[..., -n:, :]),
                "v": mx.contiguous(cache.values[..., -n:, :])}

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


class RecurrentStateHandler:
    kind = "recurrent"

    def extract(self, cache: ArraysCache, n: int) -> dict:
        return {f"s{i}": state for i, state in enumerate(cache.cache)}

    def restore(self, template: ArraysCache, payloads: list[dict], block_size: int) -> ArraysCache:
        cache = ArraysCache(len(template.cache))
        cache.cache = [payloads[-1][f"s{i}"] for i in range(len(template.cache))]
        return cache


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
