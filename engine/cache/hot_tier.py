"""RAM tier of the prefix cache: immutable block payloads, LRU within a byte budget.

Payload arrays are never modified after they are stored, so requests share
them by reference; a request that extends a prefix builds its own cache from
copies (the concatenation in the restore handlers), never writing to a block.
Used only on the MLX thread.
"""

from __future__ import annotations

from collections import OrderedDict


def payload_nbytes(payload: dict) -> int:
    return sum(a.nbytes for a in payload.values())


class HotTier:
    def __init__(self, budget_bytes: int):
        self.budget_bytes = budget_bytes
        self._blocks: OrderedDict[str, dict] = OrderedDict()
        self.bytes = 0
        self.evictions = 0

    def __len__(self) -> int:
        return len(self._blocks)

    def get(self, key: str) -> dict | None:
        payload = self._blocks.get(key)
        if payload is not None:
            self._blocks.move_to_end(key)
        return payload

    def put(self, key: str, payload: dict) -> None:
        if key in self._blocks:
            self._blocks.move_to_end(key)
            return
        size = payload_nbytes(payload)
        if size > self.budget_bytes:
            return
        self._blocks[key] = payload
        self.bytes += size
        self.shrink()

    def shrink(self) -> None:
        """Evict least recently used blocks until the budget holds (after a budget change too)."""
        while self.bytes > self.budget_bytes and self._blocks:
            _, payload = self._blocks.popitem(last=False)
            self.bytes -= payload_nbytes(payload)
            self.evictions += 1

    def clear(self) -> None:
        self._blocks.clear()
        self.bytes = 0
