"""GGUF quantized blocks for tests, made locally (numpy only, no MLX import).

Q4_0, Q5_0 and Q8_0 come from gguf-py's own quantizers. gguf-py cannot quantize the
K-quants, so Q4_K, Q5_K and Q6_K are made here by plain rounding (not llama.cpp's
search for the best scales: a little less accurate, the same block format), and
checked against gguf-py's dequantization in tests/test_quant_kernels.py.
"""

from __future__ import annotations

import gguf
import numpy as np

GGUF_TYPES = ("Q4_0", "Q5_0", "Q8_0", "Q4_K", "Q5_K", "Q6_K")


def _f16(a: np.ndarray) -> np.ndarray:
    return a.astype(np.float16).view(np.uint8).reshape(*a.shape[:-1], -1)


def _div(a, b):
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.where(b != 0, a / np.where(b != 0, b, 1), 0)


def _k_affine(x: np.ndarray, levels: int):
    """Q4_K/Q5_K: per 256, 8 sub-blocks of 32 with w = d*sc*q - dmin*m (sc, m 6-bit)."""
    sub = x.reshape(x.shape[0], 8, 32)
    lo = np.minimum(sub.min(axis=-1), 0)
    scale, mins = (sub.max(axis=-1) - lo) / levels, -lo
    d, dmin = (scale.max(axis=-1) / 63).astype(np.float16), (mins.max(axis=-1) / 63).astype(np.float16)
    sc = np.clip(np.rint(_div(scale, d.astype(np.float32)[:, None])), 0, 63).astype(np.uint8)
    m = np.clip(np.rint(_div(mins, dmin.astype(np.float32)[:, None])), 0, 63).astype(np.uint8)
    step = (d.astype(np.float32)[:, None] * sc)[..., None]
    offset = (dmin.astype(np.float32)[:, None] * m)[..., None]
    q = np.clip(np.rint(_div(sub + offset, step)), 0, levels).astype(np.uint8)
    packed = np.empty((x.shape[0], 12), np.uint8)
    packed[:, 0:4] = sc[:, :4] | ((sc[:, 4:] >> 4) << 6)
    packed[:, 4:8] = m[:, :4] | ((m[:, 4:] >> 4) << 6)
    packed[:, 8:12] = (sc[:, 4:] & 0x0F) | ((m[:, 4:] & 0x0F) << 4)
    head = np.concatenate([_f16(d[:, None]), _f16(dmin[:, None]), packed], axis=1)
    low = (q & 0x0F).reshape(x.shape[0], 4, 2, 32)
    qs = (low[:, :, 0] | (low[:, :, 1] << 4)).reshape(x.shape[0], 128)
    return head, q, qs


def _q4_k(x):
    head, _, qs = _k_affine(x, 15)
    return np.concatenate([head, qs], axis=1)


def _q5_k(x):
    head, q, qs = _k_affine(x, 31)
    qh = ((q >> 4) << np.arange(8, dtype=np.uint8)[None, :, None]).sum(axis=1, dtype=np.uint8)
    return np.concatenate([head, qh, qs], axis=1)


def _q6_k(x):
    """Per 256: 16 sub-blocks of 16 with w = d*sc*(q - 32) (sc int8, q 6-bit)."""
    n = x.shape[0]
    sub = x.reshape(n, 16, 16)
    scale = np.abs(sub).max(axis=-1) / 31
    d = (scale.max(axis=-1) / 127).astype(np.float16)
    sc = np.clip(np.rint(_div(scale, d.astype(np.float32)[:, None])), -128, 127).astype(np.int8)
    step = (d.astype(np.float32)[:, None] * sc)[..., None]
    q = (np.clip(np.rint(_div(sub, step)), -32, 31) + 32).astype(np.uint8).reshape(n, 2, 128)
    ql = np.empty((n, 2, 64), np.uint8)
    ql[:] = (q[:, :, :64] & 0x0F) | ((q[:, :, 64:] & 0x0F) << 4)
    high = (q >> 4).reshape(n, 2, 4, 32)
    qh = high[:, :, 0] | (high[:, :, 1] << 2) | (high[:, :, 2] << 4) | (high[:, :, 3] << 6)
    return np.concatenate([ql.reshape(n, 128), qh.reshape(n, 64), sc.view(np.uint8), _f16(d[:, None])], axis=1)


_K_QUANTS = {"Q4_K": _q4_k, "Q5_K": _q5_k, "Q6_K": _q6_k}


def quantize(w: np.ndarray, qtype: str) -> np.ndarray:
    """float32 [rows, k] -> GGUF blocks uint8 [rows, bytes per row]."""
    w = np.ascontiguousarray(w, dtype=np.float32)
    if qtype not in _K_QUANTS:
        return gguf.quants.quantize(w, gguf.GGMLQuantizationType[qtype])
    rows, k = w.shape
    blocks = _K_QUANTS[qtype](w.reshape(-1, 256))
    return blocks.reshape(rows, -1)


def random_blocks(qtype: str, rows: int, k: int, rng: np.random.Generator) -> np.ndarray:
    """Blocks of a random normal matrix."""
    return quantize(rng.standard_normal((rows, k)).astype(np.float32), qtype)


def random_bytes(qtype: str, rows: int, k: int, rng: np.random.Generator) -> np.ndarray:
    """Blocks of random bits (every bit pattern of the values and sub-scales), with small
    finite fp16 super-block scales."""
    per, size = {"Q4_K": (256, 144), "Q5_K": (256, 176), "Q6_K": (256, 210)}[qtype]
    b = rng.integers(0, 256, (rows, k // per, size), dtype=np.uint8)
    offsets = {"Q4_K": (0, 2), "Q5_K": (0, 2), "Q6_K": (208,)}[qtype]
    for off in offsets:
        b[..., off:off + 2] = _f16((rng.random((rows, k // per, 1)) * 0.01).astype(np.float32))
    return b.reshape(rows, -1)
