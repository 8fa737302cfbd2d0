"""Linear layers and embeddings whose weights stay quantized on the CPU.

A float32 copy of a quantized model costs 4 bytes per weight and turns every product
into a stream of 4 bytes per weight, where the file had 0.5 to 1: on a small model the
vocabulary projection alone was 671 MB, and a 4B model would not fit. Here the weights
stay in their integer blocks (quant_layout.py: 4.5-8.5 bits per weight for GGUF types), and
`native/quant_matmul.cpp` multiplies them directly: activations quantized per row per 32
inputs to two int8 levels (~16-bit; one in the output projection, `output_levels`),
integer dot products (AVX-512 VNNI, or AVX2), one float step per scale block and level in
a fixed order. Every row's result is independent of the rows beside it, of the thread
split and of the path, so decode, verify windows and prefill (all through the same
kernel) agree bit for bit on a row: batching, prefix-cache hits and speculation stay exact.

The embedding lookup reads rows of the same buffer (`QuantEmbedding`), so a tied output
projection is held once.

KERNELEXT_QUANT_KERNELS: `auto` (default: VNNI if the CPU has it, else AVX2), `avx2`,
or `0` (off: quantized weights are dequantized at load, as before).
"""

from __future__ import annotations

import functools
import os
import warnings

import mlx.core as mx
import mlx.nn as nn
import numpy as np

from .quant_layout import QuantFormat

try:
    from . import _quant_matmul as _native
except ImportError:  # not built (`make native`), or built for another mlx
    _native = None


def _choice() -> str:
    return os.environ.get("KERNELEXT_QUANT_KERNELS", "auto")


def available() -> bool:
    """Whether quantized weights can run natively here (else they are dequantized)."""
    if _native is None or _choice() == "0" or mx.default_device() != mx.cpu:
        return False
    return path() is not None and _binds()


def path() -> str | None:
    """The instruction set the kernels use: "vnni", "avx2" or None."""
    if _native is None:
        return None
    if _choice() != "avx2" and _native.has_vnni():
        return "vnni"
    return "avx2" if _native.has_avx2() else None


@functools.cache
def _binds() -> bool:
    try:
        fmt = QuantFormat(1, False, 0, False)
        mx.eval(_native.quant_matmul(mx.zeros((1, 32)), mx.zeros((1, 1, fmt.group_bytes), mx.uint8),
                                     1, 1, False, 0, False, fmt.bits, 2, False, False, False, 1, path() == "avx2"))
        return True
    except TypeError:
        warnings.warn("kernelext: engine/cpu/_quant_matmul was built for another mlx; run `make native` "
                      "(quantized weights are dequantized instead)", RuntimeWarning, stacklevel=3)
        return False


class QuantWeight:
    """A [n, k] matrix in the packed layout (uint8 [ceil(n/16), k/32, group_bytes]; quant_layout.py)."""

    def __init__(self, packed: mx.array, n: int, k: int, fmt: QuantFormat):
        self.packed, self.n, self.k, self.format = packed, n, k, fmt
        # Activation levels the products multiply (native/quant_matmul.cpp, Acts): 2 (~16-bit)
        # in the trunk, where rounding compounds over the layers; the output projection
        # sets 1 (int8, half the integer work of the largest matrix: see output_levels).
        self.levels = 2

    @classmethod
    def allocate(cls, n: int, k: int, fmt: QuantFormat) -> tuple[QuantWeight, np.ndarray]:
        """An uninitialised matrix and a writable numpy view of its buffer (filled in
        place, so a load holds no second copy)."""
        from .quant_layout import packed_shape

        packed = mx.zeros(packed_shape(n, k, fmt), mx.uint8)
        mx.eval(packed)
        return cls(packed, n, k, fmt), np.asarray(memoryview(packed))

    @classmethod
    def repacked(cls, n: int, k: int, unpack) -> QuantWeight:
        """A matrix repacked chunk by chunk from unpack(r0, r1) -> quant_layout.Unpacked."""
        from .quant_layout import repack

        made = {}

        def out_for(fmt):
            made["weight"], view = cls.allocate(n, k, fmt)
            return view

        repack(n, unpack, out_for)
        return made["weight"]

    @property
    def nbytes(self) -> int:
        return self.packed.nbytes

    def matmul(self, x: mx.array) -> mx.array:
        """x [..., k] @ W.T, float32."""
        f = self.format
        return _native.quant_matmul(x.astype(mx.float32), self.packed, self.n, f.subs, f.offsets,
                                    f.zero, f.wide, f.bits, self.levels, f.half, f.scales16 == "bf16", f.ints,
                                    f.share, path() == "avx2")

    def rows(self, ids: mx.array) -> mx.array:
        """W[ids], float32 [..., k]."""
        f = self.format
        return _native.quant_rows(ids, self.packed, self.n, f.subs, f.offsets, f.zero, f.bits, f.half,
                                  f.scales16 == "bf16", f.ints, f.share)


class QuantLinear(nn.Module):
    """nn.Linear with a QuantWeight (kept outside the parameters: never cast or saved)."""

    def __init__(self, weight: QuantWeight, bias: mx.array | None = None):
        super().__init__()
        self._q = weight
        if bias is not None:
            self.bias = bias

    def __call__(self, x):
        y = self._q.matmul(x)
        return y + self["bias"] if "bias" in self else y


class QuantEmbedding(nn.Module):
    """nn.Embedding with a QuantWeight; as_linear() is the tied output projection."""

    def __init__(self, weight: QuantWeight):
        super().__init__()
        self._q = weight

    def __call__(self, ids):
        return self._q.rows(ids)

    def as_linear(self, x):
        return self._q.matmul(x)


def quant_weight(module) -> QuantWeight | None:
    """The packed matrix a module multiplies by (for a sibling stacked with others,
    stacked_products.py: the whole stack)."""
    if isinstance(module, (QuantLinear, QuantEmbedding)):
        return module._q
    return getattr(module, "weight_stack", None)


def held_bytes(model: nn.Module) -> int:
    """RAM of the model's packed quantized weights (a stack counted once)."""
    held = {id(q): q for _, m in model.named_modules() if (q := quant_weight(m)) is not None}
    return sum(q.nbytes for q in held.values())


def output_levels(head) -> None:
    """Let the output projection multiply int8 activations (one level). Its rounding adds
    to the logits once, where a trunk's compounds over every layer: on the default model,
    one level here and two in the trunk agree with the float32 model's top-1 token on
    98.7% of 20k tokens (99.98% with two levels here too, at 12-15% lower decode speed),
    and the largest matrix (the 262k-row vocabulary, which bounds batched decode) does
    half the integer work."""
    weight = quant_weight(head)
    if weight is not None:
        weight.levels = 1
