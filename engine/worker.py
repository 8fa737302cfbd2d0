"""The one thread per process that runs every MLX call, for every Engine.

MLX aborts the process at exit ("terminate called without an active
exception") if a thread that ran MLX work has ended, so this thread is started
once and lives until the interpreter exits. Engines attach to it; it drains
their commands and steps every engine that has work, round-robin.
"""

from __future__ import annotations

import queue
import threading


class MLXWorker:
    _instance: "MLXWorker | None" = None
    _instance_lock = threading.Lock()

    @classmethod
    def get(cls) -> "MLXWorker":
        with cls._instance_lock:
            if cls._instance is None:
                cls._instance = cls()
            return cls._instance

    def __init__(self):
        self._inbox: queue.SimpleQueue = queue.SimpleQueue()
        self._engines: list = []
        self.thread = threading.Thread(target=self._loop, daemon=True, name="kernelext-mlx")
        self.thread.start()

    def post(self, engine, item: tuple) -> None:
        """Queue a command for `engine` (thread-safe); wakes the worker."""
        self._inbox.put((engine, item))

    def on_thread(self) -> bool:
        return threading.current_thread() is self.thread

    def _loop(self) -> None:
        while True:
            busy = any(e.has_work() for e in self._engines)
            try:
                engine, item = self._inbox.get(block=not busy)
                while True:
                    try:
                        self._dispatch(engine, item)
                    except Exception as e:  # never let one command kill the shared thread
                        engine._recover(e)
                    engine, item = self._inbox.get_nowait()
            except queue.Empty:
                pass
            for engine in list(self._engines):
                if engine.has_work():
                    try:
                        engine._step()
                    except Exception as e:  # a bug must not kill the thread every engine needs
                        engine._recover(e)

    def _dispatch(self, engine, item: tuple) -> None:
        kind = item[0]
        if kind == "attach":
            if engine._start(item[1]):
                self._engines.append(engine)
        elif kind == "stop":
            if engine in self._engines:  # not there if its load failed
                self._engines.remove(engine)
                engine._shutdown()
            item[1].set_result(None)
        else:
            engine._handle(item)
