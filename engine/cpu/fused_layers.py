"""Norms, RoPE and the gated GELU as fast CPU kernels, so a CPU step runs few small kernels.

Outside its matrix products, a decode step of a small model is hundreds of tiny ops. On the
CPU, MLX runs `mx.fast.rms_norm` and `mx.fast.rope` as general kernels that cost far more than
their arithmetic: measured on Gemma 3 270M's shapes (one row, 2 cores), ~20-50 us per norm
and ~90-130 us per RoPE, against ~7 us for an `mx.compile`d norm and ~8 us for a compiled
RoPE. Gemma 3 270M runs 109 norms and 36 RoPEs per step: that was most of the step's time
outside the products (bench/step_cost.py prints the breakdown).

`install(model)` swaps the `__call__` of mlx-lm's RMSNorm modules (the plain and Gemma's
`1 + weight` forms) and of plain `nn.RoPE` modules for compiled equivalents. They compute
every row and position on its own, with the same code whatever the batch size, window
length or offset, so a row's bits depend on nothing but its own inputs: prefill, decode
and verify windows agree, and batches stay invariant. Values differ from MLX's fused
kernels by float rounding (~1e-5 for RoPE), the same size as the row kernels' products.
Modules of other kinds (scaled RoPE variants, Qwen3.5's gated norms) keep mlx-lm's code.
On a GPU nothing is swapped: MLX's own kernels are fast there.

With the native build (`native/row_ops.cpp`) a float32 norm is one native kernel instead:
the compiled function still dispatched three (the reduction, the elementwise part and
Gemma's `1 + weight`). Its sum of squares runs in 16 lanes added in a fixed order, so a
row's bits again depend only on the row.

The Gemma family's MLP, `down(gelu_approx(gate(x)) * up(x))`, gets its activation from
`native/row_ops.cpp`: MLX computes tanh and x ** 3 one element at a time in libm on
the CPU (~38 ms per layer for a 512-token prefill of Gemma 3 270M, a third of the
prefill; ~1 ms in the native loop). It is the same function written with exp
(0.5 x (1 + tanh z) = x - x / (exp(2z) + 1)), within ~1e-6 of MLX's, and elementwise,
so rows stay independent.
"""

from __future__ import annotations

import os

import functools

import mlx.core as mx
import mlx.nn as nn

try:
    from . import _row_ops
except ImportError:  # not built (`make native`): the compiled norms and mlx-lm's GELU stay
    _row_ops = None


@mx.compile
def _rms_norm(x: mx.array, weight: mx.array, eps: float) -> mx.array:
    x32 = x.astype(mx.float32)
    scale = mx.rsqrt(mx.mean(mx.square(x32), axis=-1, keepdims=True) + eps)
    return (x32 * scale).astype(x.dtype) * weight


@mx.compile
def _rope(x: mx.array, offset: mx.array, inv_freq: mx.array, scale: float) -> mx.array:
    """Rotate-half RoPE (`traditional=False`): x [B, H, L, dims] at positions offset + 0..L-1
    times scale; offset an int32 scalar or one per batch row [B]. The positions are built
    inside the compiled function: outside it they were six more graph ops a call, 36 calls
    a decode step on Gemma 3 270M, for the same float32 values."""
    length = x.shape[-2]
    steps = mx.arange(length, dtype=mx.float32)
    if offset.ndim == 1:  # one offset per batch row
        positions = offset.astype(mx.float32).reshape(-1, 1, 1, 1) + steps.reshape(1, 1, length, 1)
    else:
        positions = (steps + offset.astype(mx.float32)).reshape(length, 1)
    positions = positions * scale
    half = inv_freq.shape[-1]
    angles = positions * inv_freq
    cos, sin = mx.cos(angles), mx.sin(angles)
    x1, x2 = x[..., :half], x[..., half:2 * half]
    rotated = [x1 * cos - x2 * sin, x2 * cos + x1 * sin]
    if x.shape[-1] > 2 * half:  # partial rotary dims: the rest passes through
        rotated.append(x[..., 2 * half:])
    return mx.concatenate(rotated, axis=-1).astype(x.dtype)


def _norm(x, weight, add: float, eps: float):
    # The native kernel: one dispatch where the compiled function ran three (reduce,
    # elementwise, and Gemma's `1 + weight`), ~20 us a norm on one row, 109 a step.
    if x.dtype == mx.float32 and weight.dtype == mx.float32 and _native_row_ops():
        return _row_ops.rms_norm(x, weight, add, eps)
    return _rms_norm(x, weight + add if add else weight, eps)


def _plain_norm(self, x):
    return _norm(x, self.weight, 0.0, self.eps)


def _gemma_norm(self, x):
    return _norm(x, self.weight, 1.0, self.eps)


class _CompiledRoPE(nn.RoPE):
    def __call__(self, x, offset=0):
        if not isinstance(offset, mx.array):  # an int would be a constant: one compile per offset
            offset = mx.array(offset, dtype=mx.int32)
        return _rope(x, offset, self._inv_freq, float(self.scale))


def _rope_table(dims: int, base: float) -> mx.array:
    inv = mx.power(mx.array(base, mx.float32), -mx.arange(0, dims, 2, dtype=mx.float32) / dims)
    mx.eval(inv)
    return inv


class _GeluMLP(nn.Module):
    """mlx-lm's Gemma MLP with the native gated GELU (float32 activations, as on the CPU)."""

    def __call__(self, x):
        gate, up = self.gate_proj(x), self.up_proj(x)
        if gate.dtype != mx.float32 or up.dtype != mx.float32:
            return self.down_proj(nn.gelu_approx(gate) * up)
        return self.down_proj(_row_ops.gelu_tanh(gate, up))


# mlx-lm's MLP classes computing down(gelu_approx(gate(x)) * up(x)).
_GELU_MLP_MODULES = ("mlx_lm.models.gemma2", "mlx_lm.models.gemma3_text")


@functools.cache
def _native_row_ops() -> bool:
    if _row_ops is None:
        return False
    try:  # built for another mlx: its functions take no mx.array
        mx.eval(_row_ops.gelu_tanh(mx.zeros((1,)), mx.zeros((1,))))
        return True
    except TypeError:
        return False


def _is_gelu_mlp(module) -> bool:
    cls = type(module)
    return cls.__name__ == "MLP" and cls.__module__ in _GELU_MLP_MODULES and _native_row_ops()


# mlx-lm's RMSNorm classes whose weight enters as (1 + weight); nn.RMSNorm uses it as is.
_GEMMA_NORM_MODULES = ("mlx_lm.models.gemma", "mlx_lm.models.gemma2", "mlx_lm.models.gemma3_text")


def _norm_kind(module) -> str | None:
    """'plain', 'gemma' or None (a norm of another kind, left alone)."""
    cls = type(module)
    if cls is nn.RMSNorm:
        return "plain"
    if cls.__name__ == "RMSNorm" and cls.__module__ in _GEMMA_NORM_MODULES:
        return "gemma"
    return None


_SUBCLASSES = {}


def _norm_class(cls, kind: str):
    key = (cls, kind)
    if key not in _SUBCLASSES:
        _SUBCLASSES[key] = type(cls.__name__, (cls,), {
            "__call__": _gemma_norm if kind == "gemma" else _plain_norm,
            "__module__": __name__})
    return _SUBCLASSES[key]


def _mlp_class(cls):
    key = (cls, "gelu")
    if key not in _SUBCLASSES:
        _SUBCLASSES[key] = type(cls.__name__, (cls,), {"__call__": _GeluMLP.__call__, "__module__": __name__})
    return _SUBCLASSES[key]


def enabled() -> bool:
    """On by default on the CPU; KERNELEXT_FUSED_LAYERS=0 keeps mlx-lm's modules (to compare)."""
    return os.environ.get("KERNELEXT_FUSED_LAYERS", "1") != "0" and mx.default_device() == mx.cpu


def install(model: nn.Module) -> int:
    """Swap norms, RoPEs and Gemma MLPs for the fast ones (in place); returns how many."""
    swapped = 0
    for _, module in model.named_modules():
        kind = _norm_kind(module)
        if kind is not None:
            module._plain_class = type(module)
            module.__class__ = _norm_class(type(module), kind)
            swapped += 1
        elif _is_gelu_mlp(module):
            module._plain_class = type(module)
            module.__class__ = _mlp_class(type(module))
            swapped += 1
        elif type(module) is nn.RoPE and not module.traditional:
            module._plain_class = nn.RoPE
            module.__class__ = _CompiledRoPE
            module._inv_freq = _rope_table(module.dims, module.base)  # "_": not a parameter
            swapped += 1
    return swapped


def uninstall(model: nn.Module) -> int:
    """Put mlx-lm's modules back (the bench measures both)."""
    restored = 0
    for _, module in model.named_modules():
        plain = getattr(module, "_plain_class", None)
        if plain is not None:
            module.__class__ = plain
            del module._plain_class
            restored += 1
    return restored
