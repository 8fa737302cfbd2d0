"""Persisted speculation tuning, per model, machine and drafter."""

from __future__ import annotations

import json
import os
import platform
import time
from pathlib import Path


def tune_file() -> Path:
    return Path(os.environ.get("KERNELEXT_TUNE_FILE")
                or Path.home() / ".cache" / "kernelext" / "tune.json")


def key(fingerprint: str, backend: str, blas: str, drafter: str) -> str:
    machine = f"{platform.machine()}-{os.cpu_count()}cpu-{backend}-{blas}"
    return f"{fingerprint[:16]}|{machine}|{drafter}"


def _read() -> dict:
    try:
        return json.loads(tune_file().read_text())
    except (OSError, ValueError):
        return {}


def load_tuned_depth(tune_key: str) -> int | None:
    entry = _read().get(tune_key)
    return entry["depth"] if entry else None


def save(tune_key: str, depth: int, results: dict) -> None:
    data = _read()
    data[tune_key] = {"depth": depth, "results": results, "when": time.strftime("%Y-%m-%d %H:%M:%S")}
    path = tune_file()
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(data, indent=1))
    os.replace(tmp, path)


# A code-editing workload: the kind of repetition speculation is for (agents
# rewriting files, notebooks iterating on a function), so tuning sees it.
CODE = '''def moving_average(values, window):
    """Return the moving averages of `values` over `window` items."""
    if window <= 0:
        raise ValueError("window must be positive")
    out = []
    total = 0.0
    for i, value in enumerate(values):
        total += value
        if i >= window:
            total -= values[i - window]
        if i >= window - 1:
            out.append(total / window)
    return out
'''
TUNING_PROMPTS = [
    [{"role": "user", "content": "Rewrite this function with type hints, keeping everything "
                                 "else the same:\n\n" + CODE}],
    [{"role": "user", "content": "Repeat this code exactly, then explain it in one line:\n\n" + CODE}],
]
