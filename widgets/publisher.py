"""The one thread that pushes engine state into every open dashboard.

It only sets widget traits. ipykernel >= 7.1 sends comm messages from any
thread, so the updates reach the browser while the kernel's main thread is busy
(a `%%generate` cell). display() and Output widgets stay on the main thread.
"""

from __future__ import annotations

import logging
import threading
from typing import Callable

log = logging.getLogger(__name__)

INTERVAL_S = 0.25  # 4 updates a second


class Publisher:
    """Calls each subscribed refresh function every `interval` seconds on one thread,
    which runs only while something is subscribed."""

    def __init__(self, interval: float = INTERVAL_S):
        self.interval = interval
        # Held through each tick, so a refresh never runs after its unsubscribe() returned.
        self._lock = threading.RLock()
        self._subscribers: list[Callable[[], None]] = []
        self._stop: threading.Event | None = None
        self.thread: threading.Thread | None = None

    def subscribe(self, refresh: Callable[[], None]) -> None:
        with self._lock:
            self._subscribers.append(refresh)
            if self.thread is None:
                # Each thread gets its own stop event, so a quick unsubscribe/subscribe
                # cannot revive a thread that was told to stop.
                self._stop = threading.Event()
                self.thread = threading.Thread(target=self._run, args=(self._stop,), daemon=True,
                                               name="kernelext-widgets")
                self.thread.start()

    def unsubscribe(self, refresh: Callable[[], None]) -> None:
        """Remove `refresh`; the last one out stops the thread and waits for it."""
        with self._lock:
            if refresh in self._subscribers:
                self._subscribers.remove(refresh)
            if self._subscribers or self.thread is None:
                return
            thread, self.thread = self.thread, None
            self._stop.set()
        if thread is not threading.current_thread():
            thread.join()

    def _run(self, stop: threading.Event) -> None:
        failing = set()  # log a failure once, not four times a second
        while not stop.wait(self.interval):
            with self._lock:
                for refresh in list(self._subscribers):
                    try:
                        refresh()
                        failing.discard(refresh)
                    except Exception:
                        if refresh not in failing:
                            log.exception("kernelext: a dashboard update failed")
                            failing.add(refresh)


PUBLISHER = Publisher()
