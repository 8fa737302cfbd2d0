"""Rank 0's side of the plan: the model runner and the prefix cache, broadcasting.

The step loop (core/engine_core.py) keeps driving a ModelRunner and a PrefixCache;
with a hostfile it drives these wrappers instead. Each call that changes a model
cache is first sent to the followers (its name and small arguments: token ids, row
lists, block keys), then run here; the followers replay the same calls in the same
order on their own shards (follower.py), so the collectives inside each forward
pair up across ranks. The scheduler, the sampler and the drafters stay on rank 0
and never learn that the model is split.

Objects the step loop holds between calls (a request's cache, a block payload) are
named by an integer id shared with the followers, which keep their own shard's
object under that id until rank 0's object is garbage collected ("drop").
"""

from __future__ import annotations

import itertools
import weakref
from collections import deque

import mlx.core as mx

from .group import DistributedGroup


class RankCache(list):
    """A request's per-layer cache on rank 0, named for the followers."""
    id: int


class KeyedPayload(dict):
    """A prefix-cache block on rank 0 (its arrays shared with the hot tier), named for the followers."""
    id: int


class SharedObjects:
    """Ids for objects that exist on every rank; a collected one is dropped everywhere."""

    def __init__(self, group: DistributedGroup):
        self.group = group
        self._ids = itertools.count(1)
        self._dropped: deque[int] = deque()  # appended by finalizers (any thread), sent with the next call

    def name(self, obj, obj_id: int | None = None):
        obj.id = next(self._ids) if obj_id is None else obj_id
        weakref.finalize(obj, self._dropped.append, obj.id)
        return obj

    def reserve(self, n: int) -> int:
        first = next(self._ids)
        for _ in range(n - 1):
            next(self._ids)
        return first

    def send(self, op: str, *args) -> None:
        dropped = []
        while self._dropped:  # popleft and append are atomic: no id is lost to a finalizer
            dropped.append(self._dropped.popleft())
        if dropped:
            self.group.send("drop", dropped)
        self.group.send(op, *args)

    def send_if_up(self, op: str, *args) -> None:
        """For calls that only discard state: never raise (the step loop calls them
        while recovering from an error, perhaps the group's own)."""
        if self.group.error is None:
            try:
                self.send(op, *args)
            except Exception:
                pass


class PlanRunner:
    """core/model_runner.ModelRunner's interface; every call also runs on the followers."""

    def __init__(self, runner, group: DistributedGroup, objects: SharedObjects):
        self.runner, self.group, self.objects = runner, group, objects

    def __getattr__(self, name):  # head, hidden, n_trunk, capture, batch_cache: rank 0's own
        return getattr(self.runner, name)

    def new_cache(self) -> RankCache:
        cache = self.objects.name(RankCache(self.runner.new_cache()))
        self.objects.send("new_cache", cache.id)
        return cache

    def prefill(self, cache: RankCache, tokens: list[int], next_tokens: list[int]) -> None:
        self.objects.send("prefill", cache.id, tokens, next_tokens)
        with self.group.step():
            self.runner.prefill(cache, tokens, next_tokens)

    def add_rows(self, caches: list[RankCache]) -> None:
        self.objects.send("add_rows", [c.id for c in caches])
        self.runner.add_rows(caches)

    def keep_rows(self, rows: list[int]) -> None:
        self.objects.send_if_up("keep_rows", rows)
        self.runner.keep_rows(rows)

    def reset(self) -> None:
        self.objects.send_if_up("reset")
        self.runner.reset()

    def decode(self, tokens: list[int]) -> mx.array:
        self.objects.send("decode", tokens)
        with self.group.step():
            logits = self.runner.decode(tokens)
            mx.eval(logits)  # here, so a lost peer surfaces inside the deadline
        return logits

    def verify(self, windows: list[list[int]]) -> mx.array:
        self.objects.send("verify", windows)
        with self.group.step():
            return self.runner.verify(windows)

    def commit(self, keep: list[int], window: int) -> None:
        self.objects.send("commit", keep, window)
        self.runner.commit(keep, window)

    def abort(self) -> None:
        self.objects.send_if_up("abort")
        self.runner.abort()


class PlanPrefixCache:
    """cache/prefix_cache.PrefixCache's interface on rank 0. Rank 0 computes the block
    keys; every rank stores its own shard of each block under the same key (RAM tier
    and its own SSD directory)."""

    def __init__(self, cache, group: DistributedGroup, objects: SharedObjects):
        self.cache, self.group, self.objects = cache, group, objects

    def __getattr__(self, name):  # keys, record, info, stats, hot, ssd, block_size: rank 0's own
        return getattr(self.cache, name)

    def lookup(self, keys: list[str], *, count: bool = True) -> list[KeyedPayload]:
        """The blocks every rank holds: a follower may have lost a file rank 0 still has."""
        first = self.objects.reserve(len(keys))
        self.objects.send("lookup", keys, count, first)
        found = self.cache.lookup(keys, count=count)
        n = self.group.agree_min(len(found))
        return [self.objects.name(KeyedPayload(p), first + i) for i, p in enumerate(found[:n])]

    def restore(self, payloads: list[KeyedPayload]) -> RankCache:
        cache = self.objects.name(RankCache(self.cache.restore(payloads)))
        self.objects.send("restore", cache.id, [p.id for p in payloads])
        return cache

    def publish(self, key: str, cache: RankCache, back: int = 0) -> KeyedPayload:
        payload = self.objects.name(KeyedPayload(self.cache.publish(key, cache, back)))
        self.objects.send("publish", payload.id, key, cache.id, back)
        return payload

    def set_budgets(self, hot_bytes: int | None = None, ssd_bytes: int | None = None) -> None:
        """Any thread (the dashboard's controls): sent on its own, without the pending
        drops, which belong to the MLX thread's stream of calls. Where it lands among
        those calls does not matter: lookups take what every rank still holds."""
        if self.group.error is None:
            try:
                self.group.send("set_budgets", hot_bytes, ssd_bytes)
            except Exception:
                pass
        self.cache.set_budgets(hot_bytes, ssd_bytes)

    def clear(self) -> None:
        self.objects.send_if_up("clear")
        self.cache.clear()

    def close(self) -> None:
        self.cache.close()  # the followers flush theirs when the group closes
