"""Encoder products in bfloat16 on the CPU (AVX-512 BF16), for embedding and reranking models.

An encoder forward multiplies every token of a batch by every weight matrix: 32 texts of
128 tokens are 4096 rows, a compute-bound product that torch already runs well in float32;
vdpbf16ps does two multiply-adds per float32 lane per instruction, twice the float32 rate
(~350 GMAC/s on this machine's 2 cores). Rounding the
weights and activations to bfloat16 (float32 accumulation) keeps all-MiniLM-L6-v2's
vectors within 3e-5 cosine of the float32 ones (tests/test_embeddings.py checks 1e-3
against sentence-transformers); int8 activations per 32 (native/quant_matmul.cpp) fell to
0.9990 there, so the encoder does not use them.

`native/bf16_matmul.cpp` adds the bias (and the GELU of the intermediate layer, or the
residual add and LayerNorm of an output layer) in the same pass, while the rows are in
cache: as separate MLX ops those cost as much as the products. Every output is one chain
over k in order, so a row's bits do not depend on its batch. Used by engine/embed/packed_encoder.py when `available()`; elsewhere (Metal,
other CPUs, not built) encoders run MLX's float32 path. KERNELEXT_ENCODER_KERNELS=0
turns it off.
"""

from __future__ import annotations

import functools
import os
import warnings

import mlx.core as mx
import mlx.nn as nn

PANEL = 64  # outputs per weight panel (native/bf16_matmul.cpp)

try:
    from . import _bf16_matmul as _native
except ImportError:  # not built (`make native`), or built for another mlx
    _native = None


def wanted() -> bool:
    """The encoder kernels' switch (also encoder_attention's): on the CPU backend, unless
    KERNELEXT_ENCODER_KERNELS=0."""
    return os.environ.get("KERNELEXT_ENCODER_KERNELS", "1") != "0" and mx.default_device() == mx.cpu


def available() -> bool:
    return _native is not None and wanted() and _native.supported() and _binds()


@functools.cache
def _binds() -> bool:
    try:
        mx.eval(_native.bf16_matmul(mx.zeros((1, 2)), mx.zeros((1, 1, 2 * PANEL), mx.uint16),
                                    mx.zeros((PANEL,)), PANEL, False))
        return True
    except TypeError:
        warnings.warn("kernelext: engine/cpu/_bf16_matmul was built for another mlx; run `make native` "
                      "(encoders run in float32)", RuntimeWarning, stacklevel=3)
        return False


def fits(k: int) -> bool:
    """Whether a weight of k inputs fits the layout (k pairs)."""
    return k % 2 == 0


class Bf16Linear:
    """x @ W.T + b, W [n, k] rounded to bfloat16 once and packed as [ceil(n/64), k/2, 64 x 2]
    (outputs past n are zero and never stored)."""

    def __init__(self, weight: mx.array, bias: mx.array | None):
        self.n, k = weight.shape
        panels = -(-self.n // PANEL)
        w = mx.pad(weight.astype(mx.bfloat16), [(0, panels * PANEL - self.n), (0, 0)]).view(mx.uint16)
        self.packed = mx.contiguous(w.reshape(panels, PANEL, k // 2, 2).transpose(0, 2, 1, 3)
                                    .reshape(panels, k // 2, 2 * PANEL))
        bias = bias if bias is not None else mx.zeros((self.n,))
        self.bias = mx.pad(bias.astype(mx.float32), [(0, panels * PANEL - self.n)])
        mx.eval(self.packed, self.bias)

    @property
    def nbytes(self) -> int:
        return self.packed.nbytes + self.bias.nbytes

    def __call__(self, x: mx.array, gelu: bool = False) -> mx.array:
        return _native.bf16_matmul(x, self.packed, self.bias, self.n, gelu)

    def add_norm(self, x: mx.array, residual: mx.array, norm: nn.LayerNorm) -> mx.array:
        """norm(x @ W.T + b + residual), the add and LayerNorm in the product's pass."""
        return _native.bf16_matmul_norm(x, self.packed, self.bias, self.n, residual,
                                        norm.weight.astype(mx.float32), norm.bias.astype(mx.float32),
                                        float(norm.eps))
