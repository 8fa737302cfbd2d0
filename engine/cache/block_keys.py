"""Identity of cached KV blocks: a model fingerprint and chained block keys.

A block's key hashes the model fingerprint, its parent block's key and its own
token ids, so a key names one exact prefix of one exact model: equal keys mean
equal cache contents, and nothing from another model (or another cache format)
can ever be looked up by mistake.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import numpy as np

CACHE_FORMAT_VERSION = 1

_TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "tokenizer_config.json",
                    "vocab.json", "merges.txt")


def _file_digest(path: Path, memo: dict) -> str:
    st = path.stat()
    memo_key = f"{path.resolve()}:{st.st_size}:{st.st_mtime_ns}"
    if memo_key not in memo:
        h = hashlib.sha256()
        with open(path, "rb") as f:
            for chunk in iter(lambda: f.read(1 << 22), b""):
                h.update(chunk)
        memo[memo_key] = h.hexdigest()
    return memo[memo_key]


def file_digest(path: Path) -> str:
    """sha256 of a file (not memoized: for small files such as draft heads)."""
    return _file_digest(Path(path), {})


def model_fingerprint(model_dir: Path, dtype: str, memo_file: Path | None = None) -> str:
    """Hash of everything that determines KV contents: config, weights, tokenizer, dtype, format.

    Weight digests are memoized in `memo_file` by (path, size, mtime) so a 1 GB
    checkpoint is hashed once, not at every load.
    """
    model_dir = Path(model_dir)
    memo: dict = {}
    if memo_file is not None and memo_file.exists():
        try:
            memo = json.loads(memo_file.read_text())
        except (OSError, ValueError):
            memo = {}
    h = hashlib.sha256()
    h.update(f"kernelext-kv-v{CACHE_FORMAT_VERSION}|dtype={dtype}|".encode())
    h.update((model_dir / "config.json").read_bytes())
    # The weights mlx-lm loads: not other files there, such as a trained draft head.
    for path in sorted(model_dir.glob("model*.safetensors")):
        h.update(f"{path.name}={_file_digest(path, memo)}|".encode())
    for name in _TOKENIZER_FILES:
        if (model_dir / name).exists():
            h.update(f"{name}={_file_digest(model_dir / name, memo)}|".encode())
    if memo_file is not None:
        try:
            memo_file.parent.mkdir(parents=True, exist_ok=True)
            tmp = memo_file.with_name(f".{memo_file.name}.{os.getpid()}.tmp")
            tmp.write_text(json.dumps(memo))
            os.replace(tmp, memo_file)
        except OSError:
            pass  # a read-only cache dir only costs re-hashing next time
    return h.hexdigest()


def block_keys(fingerprint: str, token_ids: list[int], block_size: int) -> list[str]:
    """Chained keys of the full blocks of `token_ids` (a trailing partial block has none)."""
    keys, parent = [], fingerprint
    tokens = np.asarray(token_ids, dtype=np.int64)
    for start in range(0, len(tokens) - block_size + 1, block_size):
        h = hashlib.sha256(parent.encode())
        h.update(tokens[start:start + block_size].tobytes())
        parent = h.hexdigest()
        keys.append(parent)
    return keys
