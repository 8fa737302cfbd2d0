"""Memory the process gives back: glibc's freed heap, and MLX's cached buffers when idle.

glibc keeps freed heap pages as the process's RSS: a model load frees a few hundred MB of
JSON and repacking chunks in small blocks, a GGUF conversion more. `release_freed_memory`
hands them back to the OS. `release_idle_memory` also empties MLX's cache; the engine
thread calls it once it has been idle a while (core/worker.py).

While the engine works, MLX's own cache of freed buffers is left at MLX's default on
purpose. Without it (`mx.set_cache_limit(0)`) glibc reuses the freed blocks without page
faults, and while the prompt was prefilled in 32-token forwards the 512 + 128 run of
bench/bench_llama_cpp.py peaked 44 MB lower (603 -> 559 MB: the cache held 32 MB of buffers of every size the
forwards freed). Since a chunk-invariant prefill runs the 512 tokens as one forward, its
own activations set the peak (567 vs 570 MB), while 8 HTTP clients x 128 tokens ran ~8%
slower without the cache (298-327 vs 329-337 tok/s, interleaved) for 13 MB less.
"""

from __future__ import annotations

import functools


def release_freed_memory() -> None:
    """Hand the heap's freed pages back to the OS (glibc keeps them by default)."""
    libc = _glibc()
    if libc is not None:
        libc.malloc_trim(0)


def release_idle_memory() -> None:
    """What an engine that has gone idle gives back (on the MLX thread): MLX's cache of
    freed buffers, which a prefill fills with its largest activations and MLX keeps for
    the process's life, and then the heap's freed pages. After the bench's 512-token
    prompt and 128 tokens the default model's process went from 520 to 441 MB this way
    (the cache held 31 MB; freeing it let glibc return the space around it too)."""
    import mlx.core as mx

    mx.clear_cache()
    release_freed_memory()


@functools.cache
def _glibc():
    import ctypes
    import ctypes.util
    import platform

    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        return None
    try:
        return ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
    except OSError:
        return None
