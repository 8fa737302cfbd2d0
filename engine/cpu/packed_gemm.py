"""MKL's pre-packed GEMM for the vocabulary projection of a few rows.

A decode step or a verify window multiplies a few hidden rows by the output
projection (640 x 262144 floats on Gemma 3 270M, 671 MB). With MLX's call into
`cblas_sgemm`, MKL re-packs that whole operand on every call, so 8 rows cost
~2x one row (52 ms vs 26 ms here); with the operand packed once at load time
(`cblas_sgemm_pack`) 8 rows cost ~35 ms (the "projection" row of
bench/bench_engine.py's step breakdown). Packed results are bit-identical to
`cblas_sgemm` on the same rows. Beyond 8 rows the packed kernel is slower than
MLX's own matmul, so those go to MLX. The packed copy costs ~1.8x the projection's size in RAM.

Only on the CPU with MKL loaded (engine/cpu/backend.py); elsewhere `build` returns None.
KERNELEXT_PACKED_GEMM=0 turns it off (saving the RAM).
"""

from __future__ import annotations

import ctypes
import math
import os

import mlx.core as mx
import numpy as np

from . import backend

MAX_ROWS = 8
_ROW_MAJOR, _NO_TRANS, _PACKED, _B_MATRIX = 101, 111, 151, 162
_float_p = ctypes.POINTER(ctypes.c_float)


def _mkl():
    path = backend._state["blas"]
    if os.environ.get("KERNELEXT_PACKED_GEMM", "1") == "0":
        return None
    if mx.default_device() != mx.cpu or not path or "mkl" not in path.lower():
        return None
    lib = ctypes.CDLL(path)
    if not hasattr(lib, "cblas_sgemm_pack"):
        return None
    lib.cblas_sgemm_pack_get_size.restype = ctypes.c_size_t
    return lib


class PackedMatrix:
    """x @ w for a fixed float32 w [k, n], with w packed once for MKL."""

    def __init__(self, lib, w: mx.array):
        self.lib = lib
        self.k, self.n = w.shape
        host = np.ascontiguousarray(np.asarray(memoryview(w)), dtype=np.float32)
        size = lib.cblas_sgemm_pack_get_size(_B_MATRIX, MAX_ROWS, self.n, self.k)
        self.buffer = np.empty(size // 4 + 1, np.float32)
        lib.cblas_sgemm_pack(_ROW_MAJOR, _B_MATRIX, _NO_TRANS, MAX_ROWS, self.n, self.k,
                             ctypes.c_float(1.0), host.ctypes.data_as(_float_p), self.n,
                             self.buffer.ctypes.data_as(_float_p))

    @classmethod
    def build(cls, w: mx.array) -> PackedMatrix | None:
        lib = _mkl()
        if lib is None or w.dtype != mx.float32 or w.ndim != 2:
            return None
        mx.eval(w)
        return cls(lib, w)

    def matmul(self, x: mx.array) -> mx.array:
        """x [..., k] @ w, evaluated now (x is evaluated first); at most MAX_ROWS rows."""
        lead = x.shape[:-1]
        rows = math.prod(lead)
        x = mx.contiguous(x.reshape(rows, self.k).astype(mx.float32))
        mx.eval(x)
        a = np.asarray(memoryview(x))
        out = np.empty((rows, self.n), np.float32)
        self.lib.cblas_sgemm_compute(
            _ROW_MAJOR, _NO_TRANS, _PACKED, rows, self.n, self.k,
            a.ctypes.data_as(_float_p), self.k, self.buffer.ctypes.data_as(_float_p), self.n,
            ctypes.c_float(0.0), out.ctypes.data_as(_float_p), self.n)
        return mx.array(out).reshape(*lead, self.n)
