"""SSD tier of the prefix cache: one checksummed safetensors file per block.

Files survive kernel restarts. Each is published atomically (temp file, fsync,
rename), carries its format version, model fingerprint, key and a checksum of
its payload. Start-up rebuilds the index from the directory (file headers are
read, temp leftovers removed), and every block is validated again before use: a
truncated, corrupted, foreign or old-format file is never served, it is deleted
and the block recomputed. The byte budget covers every file in the directory
(other models' blocks and temp files included) and is enforced before each write
by LRU eviction.

Writes happen on a background thread so prefill never waits for the disk; a
write error (disk full, read-only) disables writing with one warning and
generation goes on. Only numpy arrays cross into this module, never MLX ones.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import queue
import struct
import threading
import warnings
from collections import OrderedDict
from concurrent.futures import Future
from pathlib import Path

import numpy as np
from safetensors.numpy import load_file, save

from .block_keys import CACHE_FORMAT_VERSION

SUFFIX = ".safetensors"
TMP_PREFIX = ".tmp-"


def payload_checksum(arrays: dict[str, np.ndarray]) -> str:
    h = hashlib.sha256()
    for name in sorted(arrays):
        a = np.ascontiguousarray(arrays[name])
        h.update(f"{name}|{a.dtype.str}|{a.shape}|".encode())
        h.update(a.tobytes())
    return h.hexdigest()


def read_metadata(path: Path) -> dict:
    """The safetensors header's metadata, read without loading the payload."""
    with open(path, "rb") as f:
        (n,) = struct.unpack("<Q", f.read(8))
        if n > 1 << 24:
            raise ValueError("implausible header size")
        return json.loads(f.read(n)).get("__metadata__", {})


def _header_readable(path: Path) -> bool:
    try:
        read_metadata(path)
        return True
    except (OSError, ValueError, struct.error):
        return False


def _write_durably(path: Path, data: bytes) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
    try:
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view):]
        os.fsync(fd)
    finally:
        os.close(fd)


class SSDTier:
    def __init__(self, directory: Path, budget_bytes: int, fingerprint: str, kinds: str):
        self.directory = Path(directory)
        self.budget_bytes = budget_bytes
        self.fingerprint = fingerprint
        self.kinds = kinds
        self.evictions = 0
        self.rejected = 0  # invalid files found and removed
        self.write_errors = 0
        self.writing_disabled = False
        self._lock = threading.Lock()
        self._files: OrderedDict[str, int] = OrderedDict()  # file name -> size, LRU first
        self._queue: queue.Queue = queue.Queue()
        self._pending = 0
        self._scan()
        self._thread = threading.Thread(target=self._writer, daemon=True, name="kernelext-kv-writer")
        self._thread.start()

    # -- index -----------------------------------------------------------------
    def _scan(self) -> None:
        try:
            self.directory.mkdir(parents=True, exist_ok=True)
            entries = list(os.scandir(self.directory))
        except OSError as e:
            self._disable(e)
            return
        found = []
        for entry in entries:
            if not entry.is_file():
                continue
            if entry.name.startswith(TMP_PREFIX):  # left by a crash mid-write
                self._unlink(entry.name)
                continue
            if entry.name.endswith(SUFFIX) and not _header_readable(Path(entry.path)):
                self.rejected += 1  # damaged beyond reading its header: never servable
                self._unlink(entry.name)
                continue
            st = entry.stat()
            found.append((st.st_mtime_ns, entry.name, st.st_size))
        for _, name, size in sorted(found):
            self._files[name] = size

    @property
    def bytes(self) -> int:
        with self._lock:
            return sum(self._files.values())

    def __len__(self) -> int:
        with self._lock:
            return len(self._files)

    def contains(self, key: str) -> bool:
        with self._lock:
            return key + SUFFIX in self._files

    # -- reading (MLX thread) -----------------------------------------------------
    def load(self, key: str, n_tokens: int) -> tuple[dict[str, np.ndarray], dict] | None:
        """The validated payload of block `key` and its dtypes, or None (a bad file is deleted)."""
        name = key + SUFFIX
        path = self.directory / name
        if not self.contains(key):
            return None
        try:
            meta = read_metadata(path)
            expected = {"format": "kernelext-kv", "version": str(CACHE_FORMAT_VERSION),
                        "fingerprint": self.fingerprint, "key": key,
                        "tokens": str(n_tokens), "kinds": self.kinds}
            wrong = [k for k, v in expected.items() if meta.get(k) != v]
            if wrong:
                raise ValueError(f"metadata mismatch: {', '.join(wrong)}")
            arrays = load_file(path)
            if payload_checksum(arrays) != meta.get("checksum"):
                raise ValueError("checksum mismatch")
        except FileNotFoundError:
            with self._lock:
                self._files.pop(name, None)
            return None
        except Exception as e:  # any damage: never serve it
            self.rejected += 1
            warnings.warn(f"kernelext: ignoring invalid KV block {path.name}: {e}", stacklevel=2)
            self._remove(name)
            return None
        with self._lock:
            if name in self._files:
                self._files.move_to_end(name)
        try:
            os.utime(path)  # LRU order survives restarts
        except OSError:
            pass
        return arrays, json.loads(meta.get("dtypes", "{}"))

    # -- writing (background thread) -------------------------------------------------
    def write_async(self, key: str, arrays: dict[str, np.ndarray], n_tokens: int,
                    dtypes: dict[str, str]) -> None:
        if self.writing_disabled or self.contains(key):
            return
        with self._lock:
            self._pending += 1
        self._queue.put(("write", key, arrays, n_tokens, dtypes))

    @property
    def writes_pending(self) -> int:
        with self._lock:
            return self._pending

    def _writer(self) -> None:
        while True:
            item = self._queue.get()
            kind = item[0]
            try:
                if kind == "write":
                    self._write(*item[1:])
                elif kind == "shrink":
                    with self._lock:
                        self._evict_until(0)
                elif kind == "clear":
                    with self._lock:
                        names = list(self._files)
                    for name in names:
                        self._remove(name)
                elif kind == "stop":
                    item[1].set_result(None)
                    return
                if kind in ("barrier", "clear", "shrink"):
                    item[1].set_result(None)
            finally:
                if kind == "write":
                    with self._lock:
                        self._pending -= 1

    def _write(self, key: str, arrays: dict, n_tokens: int, dtypes: dict) -> None:
        if self.writing_disabled or self.contains(key):
            return
        metadata = {"format": "kernelext-kv", "version": str(CACHE_FORMAT_VERSION),
                    "fingerprint": self.fingerprint, "key": key, "tokens": str(n_tokens),
                    "kinds": self.kinds, "checksum": payload_checksum(arrays),
                    "dtypes": json.dumps(dtypes)}
        data = save(arrays, metadata=metadata)
        with self._lock:
            if len(data) > self.budget_bytes or not self._evict_until(len(data)):
                return
            tmp = f"{TMP_PREFIX}{os.getpid()}-{key[:16]}{SUFFIX}"
            self._files[tmp] = len(data)  # the temp file counts against the budget too
        try:
            _write_durably(self.directory / tmp, data)
            os.replace(self.directory / tmp, self.directory / (key + SUFFIX))
            self._fsync_dir()
        except OSError as e:
            self._unlink(tmp)
            with self._lock:
                self._files.pop(tmp, None)
            self._disable(e)
            return
        with self._lock:
            self._files.pop(tmp, None)
            self._files[key + SUFFIX] = len(data)

    def _evict_until(self, incoming: int) -> bool:
        """With the lock held: drop LRU files until `incoming` more bytes fit the budget."""
        used = sum(self._files.values())
        while used + incoming > self.budget_bytes:
            victim = next((n for n in self._files if not n.startswith(TMP_PREFIX)), None)
            if victim is None:
                return False
            used -= self._files.pop(victim)
            self._unlink(victim)
            self.evictions += 1
        return True

    def _remove(self, name: str) -> None:
        with self._lock:
            self._files.pop(name, None)
        self._unlink(name)

    def _unlink(self, name: str) -> None:
        try:
            os.unlink(self.directory / name)
        except FileNotFoundError:
            pass
        except OSError as e:
            self._disable(e)

    def _fsync_dir(self) -> None:
        fd = os.open(self.directory, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)

    def _disable(self, error: OSError) -> None:
        self.write_errors += 1
        if not self.writing_disabled:
            self.writing_disabled = True
            reason = errno.errorcode.get(error.errno, "") if error.errno else ""
            warnings.warn(f"kernelext: SSD KV cache writing disabled ({reason} {error}); "
                          "generation continues without it", RuntimeWarning, stacklevel=2)

    # -- control (any thread) ---------------------------------------------------------
    def _command(self, kind: str) -> None:
        done: Future = Future()
        self._queue.put((kind, done))
        done.result()

    def set_budget(self, budget_bytes: int) -> None:
        self.budget_bytes = budget_bytes
        self._command("shrink")

    def flush(self) -> None:
        """Wait until every queued block is on disk (or dropped)."""
        self._command("barrier")

    def clear(self) -> None:
        self._command("clear")

    def close(self) -> None:
        if self._thread.is_alive():
            self._command("stop")
