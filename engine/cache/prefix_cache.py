"""The two-tier prefix KV cache: hot blocks in RAM, cold blocks on SSD.

Prompts are cut into fixed-size blocks, and the state after block k is the same
whether it was computed or restored: prefill computes whole blocks per forward
pass, or, on a chunk-invariant model, any chunk (core/engine_core.py). A request restores its longest cached prefix (RAM first,
then SSD) and computes only the rest; each block it computes is published to
RAM at once and queued for the SSD writer.
All methods run on the MLX thread except the budget setters and info().
"""

from __future__ import annotations

import time
from pathlib import Path

import mlx.core as mx
import numpy as np

from .handlers import handler_for
from .hot_tier import HotTier
from .block_keys import block_keys
from .ssd_tier import SSDTier


def _to_numpy(payload: dict) -> tuple[dict[str, np.ndarray], dict[str, str]]:
    arrays, dtypes = {}, {}
    for name, a in payload.items():
        if a.dtype == mx.bfloat16:  # numpy has no bfloat16: store the raw bits
            dtypes[name] = "bfloat16"
            a = a.view(mx.uint16)
        arrays[name] = np.array(a)
    return arrays, dtypes


def _from_numpy(arrays: dict[str, np.ndarray], dtypes: dict) -> dict:
    payload = {}
    for name, a in arrays.items():
        x = mx.array(a)
        payload[name] = x.view(mx.bfloat16) if dtypes.get(name) == "bfloat16" else x
    return payload


class PrefixCache:
    def __init__(self, template_cache: list, fingerprint: str, block_size: int,
                 hot_bytes: int, ssd_dir: Path | None, ssd_bytes: int):
        self.handlers = [handler_for(c) for c in template_cache]  # raises if a kind is unknown
        self.template = template_cache
        self.fingerprint = fingerprint
        self.block_size = block_size
        self.hot = HotTier(hot_bytes)
        kinds = ",".join(h.kind for h in self.handlers)
        self.ssd = SSDTier(ssd_dir, ssd_bytes, fingerprint, kinds) if ssd_dir else None
        self.stats = dict.fromkeys(("hit_blocks", "miss_blocks", "hit_tokens", "hot_hit_blocks",
                                    "ssd_hit_blocks", "published_blocks"), 0)
        self.restore_s = 0.0

    def keys(self, token_ids: list[int]) -> list[str]:
        return block_keys(self.fingerprint, token_ids, self.block_size)

    # -- lookup and restore -------------------------------------------------------
    def lookup(self, keys: list[str], *, count: bool = True) -> list[dict]:
        """Payloads of the longest run of cached blocks at the start of `keys`
        (`count`: in the hit statistics, which describe requests, not cache fills)."""
        found = []
        for key in keys:
            payload = self.hot.get(key)
            tier = "hot_hit_blocks"
            if payload is None and self.ssd is not None:
                loaded = self.ssd.load(key, self.block_size)
                if loaded is None:
                    break
                payload = _from_numpy(*loaded)
                self.hot.put(key, payload)
                tier = "ssd_hit_blocks"
            elif payload is None:
                break
            self.stats[tier] += count
            found.append(payload)
        return found

    def restore(self, payloads: list[dict]) -> list:
        """A fresh single-row cache holding exactly the prefix these block payloads cover."""
        start = time.perf_counter()
        cache = []
        for i, (handler, template) in enumerate(zip(self.handlers, self.template)):
            layer = [{name.split(".", 1)[1]: a for name, a in p.items()
                      if name.split(".", 1)[0] == str(i)} for p in payloads]
            cache.append(handler.restore(template, layer, self.block_size))
        mx.eval([c.state for c in cache])
        self.restore_s += time.perf_counter() - start
        return cache

    def record(self, hit_blocks: int, miss_blocks: int) -> None:
        self.stats["hit_blocks"] += hit_blocks
        self.stats["miss_blocks"] += miss_blocks
        self.stats["hit_tokens"] += hit_blocks * self.block_size

    # -- publish --------------------------------------------------------------------
    def publish(self, key: str, cache: list, back: int = 0) -> dict:
        """Snapshot the block that ends `back` tokens before the end of `cache` (a
        chunk-invariant prefill computes several blocks per forward); returns its payload."""
        payload = self.extract(cache, back)
        self.put(key, payload)
        return payload

    def extract(self, cache: list, back: int = 0) -> dict:
        """The payload of the block that ends `back` tokens before the end of `cache`
        (ValueError if a layer no longer holds it)."""
        payload = {}
        for i, (handler, layer) in enumerate(zip(self.handlers, cache)):
            for name, a in handler.extract(layer, self.block_size, back).items():
                payload[f"{i}.{name}"] = a
        mx.eval(payload)
        return payload

    def put(self, key: str, payload: dict) -> None:
        """Store a block's payload: in RAM at once, queued for the SSD writer."""
        self.hot.put(key, payload)
        if self.ssd is not None and not self.ssd.writing_disabled:
            arrays, dtypes = _to_numpy(payload)
            self.ssd.write_async(key, arrays, self.block_size, dtypes)
        self.stats["published_blocks"] += 1

    # -- control -----------------------------------------------------------------------
    def set_budgets(self, hot_bytes: int | None = None, ssd_bytes: int | None = None) -> None:
        if hot_bytes is not None:
            self.hot.budget_bytes = hot_bytes
            self.hot.shrink()
        if ssd_bytes is not None and self.ssd is not None:
            self.ssd.set_budget(ssd_bytes)

    def clear(self) -> None:
        self.hot.clear()
        if self.ssd is not None:
            self.ssd.clear()

    def close(self) -> None:
        if self.ssd is not None:
            self.ssd.flush()
            self.ssd.close()

    def info(self) -> dict:
        s = self.stats
        looked = s["hit_blocks"] + s["miss_blocks"]
        out = {
            "block_size": self.block_size,
            "hit_blocks": s["hit_blocks"], "miss_blocks": s["miss_blocks"],
            "hit_tokens": s["hit_tokens"], "miss_tokens": s["miss_blocks"] * self.block_size,
            "hot_hit_blocks": s["hot_hit_blocks"],
            "ssd_hit_blocks": s["ssd_hit_blocks"], "published_blocks": s["published_blocks"],
            "block_hit_rate": s["hit_blocks"] / looked if looked else 0.0,
            "hot_bytes": self.hot.bytes, "hot_blocks": len(self.hot),
            "hot_budget_bytes": self.hot.budget_bytes, "hot_evictions": self.hot.evictions,
            "restore_s": self.restore_s,
        }
        if self.ssd is not None:
            out.update(ssd_bytes=self.ssd.bytes, ssd_blocks=len(self.ssd),
                       ssd_budget_bytes=self.ssd.budget_bytes, ssd_evictions=self.ssd.evictions,
                       ssd_writes_pending=self.ssd.writes_pending,
                       ssd_rejected_blocks=self.ssd.rejected,
                       ssd_writing_disabled=self.ssd.writing_disabled,
                       ssd_dir=str(self.ssd.directory))
        return out

