"""The bounded waiting queue: how many requests are submitted and not yet given
a batch slot. The front admits on the caller's thread; the core releases as the
scheduler gives slots or requests leave."""

from __future__ import annotations

import threading


class Admission:
    def __init__(self):
        self._lock = threading.Lock()
        self.queued = 0

    def admit(self, free_slots: int, max_waiting: int) -> bool:
        """Count one more waiting request, unless the queue beyond the free slots is full."""
        with self._lock:
            if self.queued - max(free_slots, 0) >= max_waiting:
                return False
            self.queued += 1
            return True

    def release(self, n: int) -> None:
        if n:
            with self._lock:
                self.queued -= n
