"""Responses kept for `previous_response_id` (Responses API, `store: true`).

A client continuing a conversation sends only the new input and the id of the last
response; the server adds the stored conversation in front. Kept in memory and
bounded (least recently used go first), as oMLX does: a notebook server is not a
database, and a client that needs more sends the whole conversation each time.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from dataclasses import dataclass

MAX_STORED = 256


@dataclass(frozen=True)
class StoredResponse:
    # The conversation up to and including this response's output, as canonical chat
    # messages, without the request's `instructions` (OpenAI does not carry them over).
    messages: tuple[dict, ...]


class ResponseStore:
    def __init__(self, capacity: int = MAX_STORED):
        self.capacity = capacity
        self._items: OrderedDict[str, StoredResponse] = OrderedDict()
        self._lock = threading.Lock()

    def put(self, response_id: str, messages: list[dict]) -> None:
        with self._lock:
            self._items[response_id] = StoredResponse(tuple(messages))
            self._items.move_to_end(response_id)
            while len(self._items) > self.capacity:
                self._items.popitem(last=False)

    def get(self, response_id: str) -> StoredResponse | None:
        with self._lock:
            item = self._items.get(response_id)
            if item is not None:
                self._items.move_to_end(response_id)
            return item

    def __len__(self) -> int:
        return len(self._items)
