"""Memory the CPU path gives back: glibc's freed heap, and MLX's buffer cache.

Peak RSS on the CPU is the model's weights plus whatever the process keeps of its
transients. Two keepers hold them without need:
- glibc keeps freed heap pages as the process's RSS (a load frees a few hundred MB of
  JSON and repacking chunks in small blocks): `release_freed_memory` hands them back.
- MLX keeps freed buffers in its own cache for reuse, up to its limit (by default most
  of the RAM). On a GPU that saves costly allocations; on the CPU a buffer is a malloc,
  and glibc already reuses freed blocks, so MLX's cache only adds RSS: 32 MB after a
  512-token prefill of Gemma 3 270M (the 4 MB MLP and attention intermediates of every
  size that was freed), and 44 MB of peak RSS in bench/bench_llama_cpp.py's 512+128 run
  (603 -> 559 MB, prefill and decode tok/s unchanged within noise, interleaved runs).
"""

from __future__ import annotations

import functools


def release_freed_memory() -> None:
    """Hand the heap's freed pages back to the OS (glibc keeps them by default)."""
    libc = _glibc()
    if libc is not None:
        libc.malloc_trim(0)


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


def keep_no_buffer_cache() -> None:
    """Freed MLX buffers go straight back to malloc (CPU only: on a GPU the cache is
    what makes allocation cheap, and MLX's default stays)."""
    import mlx.core as mx

    if mx.default_device() == mx.cpu:
        mx.set_cache_limit(0)
