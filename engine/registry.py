"""Several models resident in one process: chat, embedding and reranking models
side by side, all stepped by the one MLX thread (core/worker.py round-robins
their cores).

    models = ModelRegistry()                        # budget: system RAM - 8 GiB
    models.add("chat", "gemma-3-270m", pin=True)
    models.add("embed", "all-minilm-l6-v2", ttl_s=600)
    models.add("rerank", "/models/bge-reranker", load=False)   # known, loaded on first use
    with models.lease("embed") as emb:               # not evicted while leased
        vectors = emb.embed(texts)

The memory budget counts each model's weights (estimated from its safetensors
headers at the dtype it will run in). Loading a model evicts least-recently used
models that are unpinned and idle (no lease, no work in their core) until it
fits; if it cannot fit, the load fails with a clear error. An idle unpinned model
past its TTL is unloaded. A request for a known model that is not resident loads
it; requests that arrive during that load wait for the same load.
"""

from __future__ import annotations

import json
import os
import struct
import threading
import time
from concurrent.futures import Future
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

from .config import EngineConfig
from .errors import InvalidRequestError, ModelLoadError
from .models.store import resolve_model

GiB = 1 << 30
RESERVED_BYTES = 8 * GiB  # left to the system and the notebook, as oMLX does
TTL_SWEEP_S = 1.0


def default_memory_budget() -> int:
    total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    return max(total - RESERVED_BYTES, total // 4)


def open_model(model: str | os.PathLike, config: EngineConfig | None = None, *, task: str | None = None,
               name: str | None = None):
    """An Engine for a generation model, a PoolingEngine for an embedding or reranking
    model (the task is read from the model's files unless given)."""
    from .embed.model_kinds import TASKS, detect_task
    from .embed.pooling_engine import PoolingEngine
    from .llm_engine import Engine

    if task is not None and task not in TASKS:
        raise InvalidRequestError(f"task must be one of {', '.join(TASKS)}; got {task!r}")
    config = config or EngineConfig()
    name = name or str(model)
    path = resolve_model(model, cache_dir=config.model_cache_dir, progress=config.progress)
    task = task or detect_task(path, str(model))
    if task == "generate":
        return Engine.load(model, config, name=name)
    return PoolingEngine(path, config, name=name, task=task)


def estimate_bytes(path: Path, config: EngineConfig) -> int:
    """Weight bytes once loaded: float tensors at float32 on the CPU (dtype "auto"),
    quantized ones dequantized, from the safetensors headers (no weights are read)."""
    try:
        model_config = json.loads((path / "config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        model_config = {}
    bits = (model_config.get("quantization") or {}).get("bits", 4)
    upcast = config.dtype in ("auto", "float32")  # on a GPU "auto" keeps 16-bit: an overestimate
    total = 0
    for file in path.glob("*.safetensors"):
        try:
            with open(file, "rb") as f:
                header = json.loads(f.read(struct.unpack("<Q", f.read(8))[0]))
        except (OSError, ValueError, struct.error):
            total += file.stat().st_size
            continue
        for name, t in header.items():
            if name == "__metadata__":
                continue
            numel = 1
            for d in t["shape"]:
                numel *= d
            nbytes = t["data_offsets"][1] - t["data_offsets"][0]
            if t["dtype"] == "U32" and name.endswith("weight"):  # packed quantized weights
                total += numel * (32 // bits) * (4 if upcast else 2)
            elif t["dtype"] in ("F16", "BF16", "F32") and upcast:
                total += numel * 4
            elif not name.endswith(("scales", "biases")) or not upcast:
                total += nbytes
    return total


@dataclass(eq=False)
class ModelEntry:
    name: str
    model: str  # what to load: an alias, a directory or a GGUF file
    task: str | None
    pinned: bool
    ttl_s: float | None
    config: EngineConfig
    engine: object | None = None  # an Engine or a PoolingEngine while loaded
    loading: Future | None = None
    owned: bool = True  # False: adopted from the caller, who closes it
    bytes: int = 0
    leases: int = 0
    last_used: float = field(default_factory=time.monotonic)
    error: str | None = None

    @property
    def state(self) -> str:
        if self.loading is not None:
            return "loading"
        return "loaded" if self.engine is not None else ("failed" if self.error else "unloaded")

    def idle(self) -> bool:
        return self.leases == 0 and self.engine is not None and not self.engine.core.has_work()


class ModelRegistry:
    def __init__(self, memory_budget: int | None = None, ttl_s: float | None = None,
                 config: EngineConfig | None = None):
        self.memory_budget = default_memory_budget() if memory_budget is None else memory_budget
        self.ttl_s = ttl_s  # the default per-model idle TTL (None: never)
        self.config = config or EngineConfig()
        self._entries: dict[str, ModelEntry] = {}
        self._lock = threading.RLock()
        self._sweeper: threading.Thread | None = None
        self._closed = threading.Event()

    # -- what is known ---------------------------------------------------------------
    def add(self, name: str, model: str | os.PathLike | None = None, *, task: str | None = None,
            pin: bool = False, ttl_s: float | None = None, config: EngineConfig | None = None,
            load: bool = True):
        """Make `model` known as `name` (replacing what had that name) and, with load=True,
        load it now; returns the engine (or None)."""
        if not isinstance(name, str) or not name:
            raise InvalidRequestError("a model needs a non-empty name")
        self.remove(name)
        if task is None and not load and Path(model or name).is_dir():  # cheap to tell now
            from .embed.model_kinds import detect_task
            task = detect_task(Path(model or name), name)
        entry = ModelEntry(name, str(model or name), task, pin, ttl_s if ttl_s is not None else self.ttl_s,
                           config or self.config)
        with self._lock:
            self._entries[name] = entry
        self._start_sweeper(entry)
        return self.get(name) if load else None

    def adopt(self, name: str, engine, *, pin: bool = True, task: str | None = None) -> None:
        """Serve an engine loaded elsewhere under `name`; the caller keeps closing it."""
        path = getattr(engine, "model_path", None)
        config = getattr(engine, "config", self.config)
        entry = ModelEntry(name, str(path or name), task or getattr(engine, "task", "generate"), pin,
                           None, config, engine=engine, owned=False,
                           bytes=getattr(engine, "memory_bytes", None)
                           or (estimate_bytes(Path(path), config) if path and Path(path).is_dir() else 0))
        with self._lock:
            self._entries[name] = entry

    def __contains__(self, name: str) -> bool:
        return name in self._entries

    def names(self, task: str | None = None) -> list[str]:
        with self._lock:
            return [n for n, e in self._entries.items() if task is None or self._task(e) == task]

    def default(self, task: str) -> str | None:
        """The first model added for `task` (None if there is none)."""
        names = self.names(task)
        return names[0] if names else None

    @staticmethod
    def _task(entry: ModelEntry) -> str | None:
        if entry.engine is not None:
            return getattr(entry.engine, "task", "generate")
        return entry.task

    def resident(self, name: str):
        """The model's engine if it is loaded now (never loads it)."""
        entry = self._entries.get(name)
        return entry.engine if entry is not None else None

    def task_of(self, name: str) -> str | None:
        with self._lock:
            entry = self._entries.get(name)
        return self._task(entry) if entry else None

    # -- using a model ---------------------------------------------------------------
    def get(self, name: str):
        """The model's engine, loading it first if it is known but not resident (a call
        that arrives during a load waits for that load)."""
        with self._lock:
            entry = self._entry(name)
            entry.last_used = time.monotonic()
            if entry.engine is not None:
                return entry.engine
            if entry.loading is None:
                entry.loading, mine = Future(), True
            else:
                mine = False
            loading = entry.loading
        if mine:
            self._load(entry)
        return loading.result()

    @contextmanager
    def lease(self, name: str):
        """The engine, protected from eviction and TTL until the block ends."""
        with self._lock:
            entry = self._entry(name)
            entry.leases += 1
        try:
            yield self.get(name)
        finally:
            with self._lock:
                entry.leases -= 1
                entry.last_used = time.monotonic()

    def _entry(self, name: str) -> ModelEntry:
        entry = self._entries.get(name)
        if entry is None:
            known = ", ".join(self._entries) or "none"
            raise ModelLoadError(f"unknown model {name!r} (known: {known})")
        return entry

    def _load(self, entry: ModelEntry) -> None:
        future = entry.loading
        try:
            path = resolve_model(entry.model, cache_dir=entry.config.model_cache_dir,
                                 progress=entry.config.progress)
            need = estimate_bytes(path, entry.config)
            self._make_room(need, entry)
            engine = open_model(entry.model, entry.config, task=entry.task, name=entry.name)
            # A loaded model knows what it holds (quantized weights stay quantized on the CPU;
            # a pooling model on a chat model's weights holds 0): the estimate was the upper bound.
            need = getattr(engine, "memory_bytes", need)
        except BaseException as e:
            with self._lock:
                entry.loading, entry.error = None, f"{type(e).__name__}: {e}"
            future.set_exception(e)
            if not isinstance(e, Exception):
                raise
            return
        with self._lock:
            entry.engine, entry.bytes, entry.loading, entry.error = engine, need, None, None
            entry.task = getattr(engine, "task", "generate")
            entry.last_used = time.monotonic()
        future.set_result(engine)

    def used_bytes(self) -> int:
        with self._lock:
            return sum(e.bytes for e in self._entries.values() if e.engine is not None or e.loading)

    def _make_room(self, need: int, loading: ModelEntry) -> None:
        """Evict LRU unpinned idle models until `need` more bytes fit the budget."""
        with self._lock:
            loading.bytes = need  # counted from now on, so concurrent loads see it
            while self.used_bytes() > self.memory_budget:
                idle = [e for e in self._entries.values()
                        if e is not loading and not e.pinned and e.owned and e.idle()]
                if not idle:
                    loading.bytes = 0
                    held = ", ".join(f"{e.name} ({e.bytes / GiB:.2f} GiB, "
                                     f"{'pinned' if e.pinned else 'in use'})"
                                     for e in self._entries.values() if e.engine is not None) or "none"
                    raise ModelLoadError(
                        f"{loading.name} needs {need / GiB:.2f} GiB; the memory budget is "
                        f"{self.memory_budget / GiB:.2f} GiB and the resident models cannot be evicted "
                        f"(resident: {held})")
                self._unload(min(idle, key=lambda e: e.last_used))

    def _unload(self, entry: ModelEntry) -> None:
        engine, entry.engine = entry.engine, None
        if engine is not None and entry.owned:
            engine.close()

    def unload(self, name: str) -> None:
        """Free a model's memory; it stays known, and loads again on its next use."""
        with self._lock:
            self._unload(self._entry(name))

    def remove(self, name: str) -> None:
        with self._lock:
            entry = self._entries.pop(name, None)
            if entry is not None:
                self._unload(entry)

    def sweep(self, now: float | None = None) -> list[str]:
        """Unload unpinned idle models past their TTL; returns their names."""
        now = time.monotonic() if now is None else now
        with self._lock:
            expired = [e for e in self._entries.values()
                       if e.ttl_s is not None and not e.pinned and e.owned and e.idle()
                       and now - e.last_used >= e.ttl_s]
            for entry in expired:
                self._unload(entry)
        return [e.name for e in expired]

    def _start_sweeper(self, entry: ModelEntry) -> None:
        if entry.ttl_s is None or self._sweeper is not None:
            return

        def run():
            while not self._closed.wait(TTL_SWEEP_S):
                self.sweep()

        self._sweeper = threading.Thread(target=run, daemon=True, name="kernelext-model-ttl")
        self._sweeper.start()

    def status(self) -> list[dict]:
        """One row per known model: name, task, state, pinned, bytes, idle seconds, TTL."""
        now = time.monotonic()
        with self._lock:
            return [dict(name=e.name, model=e.model, task=self._task(e), state=e.state, pinned=e.pinned,
                         bytes=e.bytes, idle_s=now - e.last_used if e.leases == 0 else 0.0,
                         ttl_s=e.ttl_s, error=e.error or _group_error(e.engine))
                    for e in self._entries.values()]

    def close(self) -> None:
        self._closed.set()
        with self._lock:
            for entry in list(self._entries.values()):
                self._unload(entry)


def _group_error(engine) -> str | None:
    """Why a model split across ranks (engine/distributed) can no longer serve, if it cannot."""
    group = getattr(getattr(engine, "core", None), "group", None)
    return None if group is None or group.error is None else str(group.error)
