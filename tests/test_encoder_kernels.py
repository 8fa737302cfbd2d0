"""The encoder kernels (engine/cpu/bf16_linear.py, engine/cpu/encoder_attention.py): right
results against float64 references, and a row's (a text's) bits independent of the rest
of the call."""

import math

import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest

from engine.cpu import bf16_linear, encoder_attention

needs_bf16 = pytest.mark.skipif(not bf16_linear.available(),
                                reason="bf16 kernels not built (make native) or no AVX-512 BF16")
needs_attention = pytest.mark.skipif(not encoder_attention.available(),
                                     reason="attention kernel not built (make native) or no AVX-512")


def bf16(a: mx.array) -> np.ndarray:
    return np.array(a.astype(mx.bfloat16).astype(mx.float32), dtype=np.float64)


def erf_gelu(y: np.ndarray) -> np.ndarray:
    return 0.5 * y * (1 + np.vectorize(math.erf)(y / math.sqrt(2)))


@needs_bf16
# (300, 128, 100): above the size the calling thread does alone; 100 outputs end mid-panel.
@pytest.mark.parametrize("m,k,n", [(7, 32, 96), (40, 64, 64), (300, 128, 100), (130, 384, 1152)])
def test_bf16_product_matches_float64_and_rows_are_independent(m, k, n):
    w = mx.random.normal((n, k), key=mx.random.key(0)) / math.sqrt(k)
    b = mx.random.normal((n,), key=mx.random.key(1))
    x = mx.random.normal((m, k), key=mx.random.key(2))
    layer = bf16_linear.Bf16Linear(w, b)
    got = np.array(layer(x))
    want = bf16(x) @ bf16(w).T + np.array(b, np.float64)  # operands rounded as the kernel does
    assert got.shape == (m, n)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(np.array(layer(x, gelu=True)), erf_gelu(want), atol=2e-5)
    for rows in (1, 5, 6, 7, 49):
        assert np.array_equal(np.array(layer(x[:rows])), got[:rows]), rows
    assert np.array_equal(np.array(layer(x[m - 1:])), got[m - 1:])


@needs_bf16
@pytest.mark.parametrize("m,k,n", [(9, 64, 32), (200, 256, 384)])
def test_bf16_product_with_residual_and_layer_norm(m, k, n):
    w = mx.random.normal((n, k), key=mx.random.key(3)) / math.sqrt(k)
    layer = bf16_linear.Bf16Linear(w, mx.random.normal((n,), key=mx.random.key(4)))
    norm = nn.LayerNorm(n, eps=1e-12)
    norm.weight = 1 + 0.1 * mx.random.normal((n,), key=mx.random.key(5))
    norm.bias = 0.1 * mx.random.normal((n,), key=mx.random.key(6))
    x = mx.random.normal((m, k), key=mx.random.key(7))
    residual = mx.random.normal((m, n), key=mx.random.key(8))
    got = np.array(layer.add_norm(x, residual, norm))
    np.testing.assert_allclose(got, np.array(norm(layer(x) + residual)), atol=1e-4)
    for i in (0, m // 2, m - 1):
        assert np.array_equal(np.array(layer.add_norm(x[i:i + 1], residual[i:i + 1], norm))[0], got[i])


def attention_reference(qkv: np.ndarray, starts: list[int], heads: int) -> np.ndarray:
    h = qkv.shape[1] // 3
    d = h // heads
    out = np.zeros((qkv.shape[0], h))
    for a, b in zip(starts, starts[1:]):
        q, k, v = (qkv[a:b, i * h:(i + 1) * h].astype(np.float64).reshape(b - a, heads, d).transpose(1, 0, 2)
                   for i in range(3))
        s = q @ k.transpose(0, 2, 1) / math.sqrt(d)
        p = np.exp(s - s.max(-1, keepdims=True))
        out[a:b] = (p / p.sum(-1, keepdims=True) @ v).transpose(1, 0, 2).reshape(b - a, h)
    return out


@needs_attention
@pytest.mark.parametrize("hidden,heads", [(32, 4), (384, 12), (160, 2)])
def test_attention_of_packed_sequences(hidden, heads):
    lengths = [3, 17, 128, 1, 40, 16]
    starts = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int32)
    qkv = np.random.default_rng(0).standard_normal((starts[-1], 3 * hidden)).astype(np.float32)
    scale = 1 / math.sqrt(hidden // heads)
    got = np.array(encoder_attention.short_attention(mx.array(qkv), mx.array(starts), heads, scale))
    np.testing.assert_allclose(got, attention_reference(qkv, list(starts), heads), atol=2e-6)
    # a sequence alone: the very same bits as beside the others
    for s, n in enumerate(lengths):
        a = starts[s]
        alone = encoder_attention.short_attention(mx.array(qkv[a:a + n]), mx.array([0, n], mx.int32), heads, scale)
        assert np.array_equal(np.array(alone), got[a:a + n]), n
