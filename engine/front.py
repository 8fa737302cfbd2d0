"""What every engine front shares (Engine for generation, PoolingEngine for embedding
and reranking): attaching its core to the one MLX thread, running a function there,
closing. Fronts never import MLX."""

from __future__ import annotations

from concurrent.futures import Future
from typing import Any, Callable

from .core.worker import MLXWorker
from .errors import EngineClosedError


class CoreFront:
    core: Any

    def _attach(self, build: Callable[[], Any]) -> None:
        """Build the core on the MLX thread (`build` loads the model) and wait for it;
        a load error is raised here, in the caller."""
        self._worker = MLXWorker.get()
        self._closed = False
        ready = self._worker.attach(build)
        try:
            self.core = ready.result()
        except BaseException:
            self._closed = True
            # Interrupted (Ctrl-C in a cell) while the model loads: it is freed once loaded.
            ready.add_done_callback(
                lambda f: f.exception() is None and self._worker.post(f.result(), ("stop", Future())))
            raise

    def call(self, fn: Callable[[], Any]) -> Any:
        """Run fn on the engine thread between steps (for anything that touches MLX)."""
        self._check_open()
        if self._worker.on_thread():
            return fn()
        future: Future = Future()
        self._worker.post(self.core, ("call", fn, future))
        return future.result()

    def close(self) -> None:
        """Cancel everything and free the model. The shared MLX thread keeps running."""
        if self._closed:
            return
        self._closed = True
        done: Future = Future()
        self._worker.post(self.core, ("stop", done))
        if not self._worker.on_thread():
            done.result()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    @property
    def closed(self) -> bool:
        return self._closed

    def _check_open(self) -> None:
        if self._closed:
            raise EngineClosedError("the engine is closed")
