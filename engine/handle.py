"""The caller's side of a request: a thread-safe channel of deltas.

The engine thread pushes; any thread reads with a blocking iterator, and any
asyncio loop reads with `async for` (woken through call_soon_threadsafe, so the
engine never touches a loop it does not own).
"""

from __future__ import annotations

import asyncio
import threading
from collections import deque

from .errors import EngineError
from .outputs import Completion, Delta


class RequestHandle:
    def __init__(self, request_id: str, on_cancel):
        self.request_id = request_id
        self._on_cancel = on_cancel
        self._cond = threading.Condition()
        self._deltas: deque[Delta] = deque()
        self._waiters: list[tuple[asyncio.AbstractEventLoop, asyncio.Event]] = []
        self._completion: Completion | None = None
        self._error: BaseException | None = None
        self._closed = False
        self._done_callbacks: list = []
        self.cancel_requested = False

    # -- caller side -------------------------------------------------------
    def cancel(self) -> None:
        """Ask the engine to stop this request; it finishes with reason 'cancelled' within one step."""
        if not self.cancel_requested and not self._closed:
            self.cancel_requested = True
            self._on_cancel(self)

    @property
    def done(self) -> bool:
        return self._closed

    def add_done_callback(self, fn) -> None:
        """Call fn(handle) once the request has finished (at once if it has); on the
        engine thread, so fn must be quick and must not block."""
        with self._cond:
            if not self._closed:
                self._done_callbacks.append(fn)
                return
        fn(self)

    def result(self, timeout: float | None = None) -> Completion:
        """Block until the request finishes; returns the Completion (raises the engine's error)."""
        with self._cond:
            if not self._cond.wait_for(lambda: self._closed, timeout):
                raise TimeoutError(f"request {self.request_id} did not finish in {timeout}s")
        if self._error is not None:
            raise self._error
        return self._completion

    async def aresult(self) -> Completion:
        async for _ in self:
            pass
        return self.result()

    def __iter__(self):
        while True:
            with self._cond:
                self._cond.wait_for(lambda: self._deltas or self._closed)
                if not self._deltas:
                    break
                delta = self._deltas.popleft()
            yield delta
        if self._error is not None:
            raise self._error

    def __aiter__(self):
        return self._aiter()

    async def _aiter(self):
        while True:
            with self._cond:
                if self._deltas:
                    delta = self._deltas.popleft()
                elif self._closed:
                    break
                else:
                    delta = None
                    event = asyncio.Event()
                    self._waiters.append((asyncio.get_running_loop(), event))
            if delta is None:
                await event.wait()
                continue
            yield delta
        if self._error is not None:
            raise self._error

    # -- engine side -------------------------------------------------------
    def _push(self, delta: Delta | None, completion: Completion | None = None,
              error: BaseException | None = None) -> None:
        with self._cond:
            if self._closed:
                return
            if delta is not None:
                self._deltas.append(delta)
            callbacks = []
            if completion is not None or error is not None:
                self._completion, self._error, self._closed = completion, error, True
                callbacks, self._done_callbacks = self._done_callbacks, []
            self._cond.notify_all()
            waiters, self._waiters = self._waiters, []
        for fn in callbacks:
            fn(self)
        for loop, event in waiters:
            try:
                loop.call_soon_threadsafe(event.set)
            except RuntimeError:  # that loop is closed: its reader is gone
                pass

    def _fail(self, error: BaseException) -> None:
        if not isinstance(error, EngineError):
            wrapped = EngineError(f"generation failed: {type(error).__name__}: {error}")
            wrapped.__cause__ = error
            error = wrapped
        self._push(None, error=error)
