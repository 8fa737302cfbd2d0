"""Pick the fastest MLX configuration for this machine, before MLX is imported.

The `mlx[cpu]` wheel on Linux links a reference BLAS: float32 GEMM runs at a
few GFLOP/s. Loading an optimized CBLAS (MKL from the `mkl` wheel, or the
system OpenBLAS) with RTLD_GLOBAL *before* `import mlx.core` makes MLX bind
to it, which is ~60-80x faster here. Loading it after the import does nothing,
so `engine/__init__.py` calls `configure()` first thing.

Set KERNELEXT_BLAS=none to keep the stock BLAS, or to a library path to force one.
"""

from __future__ import annotations

import ctypes
import glob
import os
import sys
import warnings

_state: dict = {"blas": None, "configured": False}


def _candidates() -> list[str]:
    found: list[str] = []
    # The `mkl` wheel installs libmkl_rt into <prefix>/lib.
    for prefix in dict.fromkeys([sys.prefix, sys.base_prefix]):
        found += sorted(glob.glob(os.path.join(prefix, "lib", "libmkl_rt.so*")))
    found += sorted(glob.glob("/usr/lib/x86_64-linux-gnu/libopenblas*.so*"))
    found += sorted(glob.glob("/usr/lib/aarch64-linux-gnu/libopenblas*.so*"))
    return found


def configure() -> str | None:
    """Load the fastest BLAS available (Linux only). Returns its path, or None."""
    if _state["configured"]:
        return _state["blas"]
    _state["configured"] = True
    choice = os.environ.get("KERNELEXT_BLAS", "auto")
    if not sys.platform.startswith("linux") or choice == "none":
        return None  # macOS: MLX's Metal/Accelerate defaults are already the fast path
    if "mlx.core" in sys.modules:
        warnings.warn(
            "mlx.core was imported before kernelext's engine: the fast BLAS cannot be "
            "loaded any more and CPU matmuls will be slow. Import engine/kernelext first.",
            RuntimeWarning,
            stacklevel=3,
        )
        return None
    # MKL's OpenMP threads spin 200 ms after each parallel region by default. Here MKL only
    # runs the attention products between the engine's own kernels, whose workers then
    # found one of the two cores taken by a spinning thread: a quarter of a prefill's CPU
    # samples (perf, 2 cores). Sleeping at once costs a wake-up per MKL call instead.
    os.environ.setdefault("KMP_BLOCKTIME", "0")
    paths = [choice] if choice != "auto" else _candidates()
    for path in paths:
        try:
            ctypes.CDLL(path, mode=ctypes.RTLD_GLOBAL)
        except OSError:
            continue
        _state["blas"] = path
        return path
    return None


def blas() -> str:
    """A short name of the BLAS in use, for status lines."""
    path = _state["blas"]
    if path is None:
        return "default"
    return os.path.basename(path)
