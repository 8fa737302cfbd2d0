"""The one thread per process that runs every MLX call, for every engine.

MLX aborts the process at exit ("terminate called without an active
exception") if a thread that ran MLX work has ended, so this thread is started
once and lives until the interpreter exits. Engine fronts attach a core to it;
it drains their commands and steps every core that has work, round-robin. When no core
has had work for IDLE_RELEASE_S, it hands MLX's cached buffers and the heap's freed pages
back to the OS (cpu/memory.py): a notebook's kernel left idle shrinks to its model.

At exit the thread is parked: once the interpreter finalizes, a daemon thread that
comes back from native code (an MLX eval in a step) and asks for the GIL is ended,
and MLX's thread-local destructors then abort the process. So a program that exits
while an engine is still working (a request streaming, a cache fill after the last
reply) first lets the current step finish and leaves the thread blocked for good.
"""

from __future__ import annotations

import atexit
import queue
import threading
import time
from concurrent.futures import Future

from ..cpu.memory import release_idle_memory

# Seconds without work after which the thread hands cached memory back to the OS. Long
# enough that an agent's next turn or a notebook's next cell, sent at once, finds the
# buffers of the last one still there; short enough that a kernel left idle shrinks.
IDLE_RELEASE_S = 2.0


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
        self._cores: list = []
        self.thread = threading.Thread(target=self._loop, daemon=True, name="kernelext-mlx")
        self.thread.start()
        atexit.register(self._park)

    def _park(self, timeout: float = 30.0) -> None:
        """Let the step in progress finish, then block the thread until the process ends."""
        if self.on_thread() or not self.thread.is_alive():
            return
        parked = threading.Event()
        self._inbox.put((None, ("park", parked)))
        parked.wait(timeout)

    def attach(self, build) -> Future:
        """Run `build()` on this thread (it loads a model into a new core: an EngineCore,
        an EmbedCore) and step the core from then on; the future gets the core (or the
        load error)."""
        ready: Future = Future()
        self._inbox.put((None, ("attach", ready, build)))
        return ready

    def post(self, core, item: tuple) -> None:
        """Queue a command for `core` (thread-safe); wakes the worker."""
        self._inbox.put((core, item))

    def on_thread(self) -> bool:
        return threading.current_thread() is self.thread

    def _loop(self) -> None:
        last_step = None  # when a core last stepped, until the memory is released after it
        while True:
            busy = any(c.has_work() for c in self._cores)
            timeout = None
            if not busy and last_step is not None:
                timeout = max(0.0, last_step + IDLE_RELEASE_S - time.monotonic())
            try:
                core, item = self._inbox.get(block=not busy, timeout=timeout)
            except queue.Empty:
                if not busy and last_step is not None:  # idle for IDLE_RELEASE_S since the last step
                    release_idle_memory()
                    last_step = None
            else:
                self._drain(core, item)
            working = [c for c in self._cores if c.has_work()]
            for core in working:
                # An embedding core holds its batches to one step's budget while others wait.
                core.sharing_thread = len(working) > 1
                if core.has_work():
                    try:
                        core.step()
                    except Exception as e:  # a bug must not kill the thread every engine needs
                        core.recover(e)
            if working:
                last_step = time.monotonic()

    def _drain(self, core, item: tuple) -> None:
        """Dispatch this command and every one queued behind it."""
        while True:
            try:
                self._dispatch(core, item)
            except Exception as e:  # never let one command kill the shared thread
                core.recover(e)
            try:
                core, item = self._inbox.get_nowait()
            except queue.Empty:
                return

    def _dispatch(self, core, item: tuple) -> None:
        kind = item[0]
        if kind == "attach":
            _, ready, build = item
            try:
                core = build()
            except BaseException as e:
                ready.set_exception(e)
                return
            self._cores.append(core)
            ready.set_result(core)
        elif kind == "park":
            item[1].set()
            threading.Event().wait()  # never set: no more MLX work on this thread
        elif kind == "stop":
            if core in self._cores:
                self._cores.remove(core)
                core.shutdown()
            item[1].set_result(None)
        else:
            core.handle_command(item)


def run_call(item: tuple) -> None:
    """A core's ("call", fn, future) command: fn's result or exception into the future."""
    _, fn, future = item
    try:
        future.set_result(fn())
    except BaseException as e:
        future.set_exception(e)
