"""Decode and verify products on the CPU: x @ W.T for a few rows, by a native kernel.

A decode step multiplies a handful of rows (one per request) by every weight matrix
of the model. One row is a stream over the weights and runs at memory speed; MKL's
small-M SGEMM, which MLX calls, makes 8 rows cost ~2x one row on Gemma 3 270M here
(trunk 33 vs 16 ms, output projection 52 vs 26 ms), so batching paid far less than
it should. `native/row_matmul.cpp` is an MLX primitive that streams each weight
matrix once, stored in 64-column blocks, through 8 rows at a time held in AVX-512
registers, on up to 8 cores; a tiny product stays on one (bench/bench_engine.py
prints the step breakdown).

Exactness: every output element is one fused multiply-add chain over k in order, for
any number of rows, so a row's result never depends on the rows beside it: decode
and verify steps stay batch-invariant. Prefill (many rows, where MKL is fast) keeps
MLX's matmul; prefill and decode already differed in rounding (block vs token KV).

Used only inside `decode_products(model)` (the model runner's decode and verify),
on the CPU, for float32 Linear layers and the output projection, when the module
was built (`make native`) and the CPU has AVX-512. KERNELEXT_ROW_KERNELS=0 turns it
off. The blocked copies cost the weights' size again in RAM (`row_kernel_bytes`).
"""

from __future__ import annotations

import contextlib
import functools
import os
import warnings

import mlx.core as mx
import mlx.nn as nn
from mlx.nn.layers.distributed import AllToShardedLinear, ShardedToAllLinear

BLOCK = 64  # weight columns per block (native/row_matmul.cpp)

try:
    from . import _row_matmul as _native
except ImportError:  # not built (`make native`), or built for another mlx
    _native = None


def available() -> bool:
    if _native is None or os.environ.get("KERNELEXT_ROW_KERNELS", "1") == "0":
        return False
    return mx.default_device() == mx.cpu and _native.supported() and _binds()


@functools.cache
def _binds() -> bool:
    """Whether the module takes mx.array: it must be built with the nanobind ABI of the
    installed mlx (rebuild with `make native` after upgrading mlx)."""
    try:
        mx.eval(_native.row_matmul(mx.zeros((1, 1)), mx.zeros((1, 1, BLOCK)), 1))
        return True
    except TypeError:
        warnings.warn("kernelext: engine/_row_matmul was built for another mlx; run `make native` "
                      "(decoding without the row kernels)", RuntimeWarning, stacklevel=3)
        return False


class BlockedWeight:
    """W [n, k] (a Linear's layout) stored as [ceil(n/64), k, 64], outside the module's
    parameters (so it is never saved, cast or trained)."""

    def __init__(self, weight: mx.array):
        self.n, k = weight.shape
        blocks = -(-self.n // BLOCK)
        padded = mx.pad(weight.T, [(0, 0), (0, blocks * BLOCK - self.n)])
        self.array = mx.contiguous(padded.reshape(k, blocks, BLOCK).transpose(1, 0, 2))
        mx.eval(self.array)

    def matmul(self, x: mx.array) -> mx.array:
        """x [..., k] @ W.T."""
        return _native.row_matmul(x, self.array, self.n)


_active = [0]  # > 0 inside decode_products()


def active() -> bool:
    return _active[0] > 0


def _row_product(module, x: mx.array) -> mx.array:
    y = module._rows.matmul(x)
    return y + module["bias"] if "bias" in module else y


class _RowLinear(nn.Linear):
    def __call__(self, x):
        return _row_product(self, x) if _active[0] else super().__call__(x)


class _RowAllToSharded(AllToShardedLinear):
    """A tensor-parallel shard of a Linear (engine/distributed): the same product on
    this rank's rows of W (the forward of sum_gradients is the identity)."""

    def __call__(self, x):
        return _row_product(self, x) if _active[0] else super().__call__(x)


class _RowShardedToAll(ShardedToAllLinear):
    """The shard that ends a block: this rank's partial product, summed over the ranks."""

    def __call__(self, x):
        if not _active[0]:
            return super().__call__(x)
        y = mx.distributed.all_sum(self._rows.matmul(x), group=self.group)
        return y + self["bias"] if "bias" in self else y


_ROW_CLASSES = {nn.Linear: _RowLinear, AllToShardedLinear: _RowAllToSharded,
                ShardedToAllLinear: _RowShardedToAll}


def install(model: nn.Module) -> int:
    """Give every float32 Linear of `model` (and every shard of one, when the model is
    split across ranks) a blocked copy; returns the bytes it holds."""
    if not available():
        return 0
    held = 0
    for _, module in model.named_modules():
        row_class = _ROW_CLASSES.get(type(module))
        if row_class is not None and module.weight.dtype == mx.float32:
            module._rows = BlockedWeight(module.weight)
            module.__class__ = row_class
            held += module._rows.array.nbytes
    return held


@contextlib.contextmanager
def decode_products():
    """Within: installed layers multiply by the row kernel."""
    _active[0] += 1
    try:
        yield
    finally:
        _active[0] -= 1
