"""The native causal attention (engine/cpu/causal_attention.py): close to a float64
reference, and a query's bits independent of the call around it (other queries, batch
rows and their padding, where a ring buffer starts)."""

import mlx.core as mx
import numpy as np
import pytest

from engine.cpu import causal_attention as ca

pytestmark = pytest.mark.skipif(not ca.available(), reason="attention kernel not built (make native) or no AVX-512")


def reference(q, k, v, scale, visible):
    """float64: q [B, Hq, L, D], k/v [B, Hkv, N, D], visible bool [B, L, N]."""
    q, k, v = (np.array(x, dtype=np.float64) for x in (q, k, v))
    group = q.shape[1] // k.shape[1]
    k, v = np.repeat(k, group, axis=1), np.repeat(v, group, axis=1)
    scores = np.einsum("bhld,bhnd->bhln", q, k) * scale
    scores = np.where(visible[:, None], scores, -np.inf)
    weights = np.exp(scores - scores.max(-1, keepdims=True))
    return np.einsum("bhln,bhnd->bhld", weights / weights.sum(-1, keepdims=True), v)


def tensors(batch, heads, kv_heads, rows, keys, dims, seed=0):
    rng = np.random.default_rng(seed)
    return [mx.array(rng.standard_normal(shape).astype(np.float32))
            for shape in ((batch, heads, rows, dims), (batch, kv_heads, keys, dims), (batch, kv_heads, keys, dims))]


@pytest.mark.parametrize("dims", [16, 80, 256])
def test_matches_a_float64_reference(dims):
    batch, rows, keys = 3, 9, 70
    q, k, v = tensors(batch, 8, 2, rows, keys, dims)
    causal = np.arange(keys)[None] <= np.arange(keys - rows, keys)[:, None]
    got = ca.causal_attention(q, k, v, scale=dims ** -0.5, causal=True)
    assert np.abs(np.array(got) - reference(q, k, v, dims ** -0.5, np.broadcast_to(causal, (batch, rows, keys)))).max() < 2e-5
    # a sliding window of 20 keys and per-row left padding, as a mask
    pad = np.array([0, 5, 30])
    allowed = causal & (np.arange(keys)[None] > np.arange(keys - rows, keys)[:, None] - 20)
    allowed = allowed[None] & (np.arange(keys)[None, None] >= pad[:, None, None])
    got = ca.causal_attention(q, k, v, scale=0.1, mask=ca.visible(mx.array(allowed[:, None]), batch, rows, keys))
    assert np.abs(np.array(got) - reference(q, k, v, 0.1, allowed)).max() < 2e-5
    # holes inside a query's run (no mask mlx-lm makes has them): those keys weigh nothing
    holes = allowed & (np.random.default_rng(3).random(allowed.shape) < 0.7)
    holes[:, :, -1] = True
    got = ca.causal_attention(q, k, v, scale=0.1, mask=ca.visible(mx.array(holes[:, None]), batch, rows, keys))
    assert np.abs(np.array(got) - reference(q, k, v, 0.1, holes)).max() < 2e-5


def test_a_query_gets_the_same_bits_in_any_call():
    dims, keys, rows = 256, 300, 40
    q, k, v = tensors(1, 4, 1, rows, keys, dims, seed=1)
    chunk = np.array(ca.causal_attention(q, k, v, scale=0.06, causal=True))
    for i in (0, 17, rows - 1):  # alone, as a decode step: the keys up to it, no mask
        end = keys - rows + i + 1
        alone = ca.causal_attention(q[:, :, i:i + 1], k[:, :, :end], v[:, :, :end], scale=0.06)
        assert np.array_equal(np.array(alone)[:, :, 0], chunk[:, :, i])
        # a padded batch row: 13 keys of left padding, masked
        pad = 13
        padded_k = mx.concatenate([mx.zeros((1, 1, pad, dims)), k[:, :, :end]], axis=2)
        padded_v = mx.concatenate([mx.ones((1, 1, pad, dims)), v[:, :, :end]], axis=2)
        mask = mx.array((np.arange(pad + end) >= pad)[None, None, None])
        batched = ca.causal_attention(mx.concatenate([q[:, :, i:i + 1]] * 2), mx.concatenate([padded_k] * 2),
                                      mx.concatenate([padded_v] * 2), scale=0.06,
                                      mask=ca.visible(mask, 2, 1, pad + end))
        assert np.array_equal(np.array(batched)[1, :, 0], chunk[0, :, i])
        # a ring buffer of the last 64 keys, its oldest at index 23 (a sliding window decoding in place)
        window = 64
        held_k, held_v = k[:, :, end - window:end], v[:, :, end - window:end]
        ring = ca.causal_attention(q[:, :, i:i + 1], mx.roll(held_k, 23, axis=2), mx.roll(held_v, 23, axis=2),
                                   scale=0.06, ring=23)
        straight = ca.causal_attention(q[:, :, i:i + 1], held_k, held_v, scale=0.06)
        assert np.array_equal(np.array(ring), np.array(straight))


def test_a_long_decode_step_matches_the_reference_and_its_prefill():
    """A decode step over 1,100 keys is split over the threads (scores by key ranges, values
    by dimension halves, each walking its keys in blocks): the same bits as the query in a
    prefill chunk, where one thread runs the whole tile."""
    dims, keys, rows = 256, 1100, 5
    q, k, v = tensors(1, 4, 1, rows, keys, dims, seed=4)
    chunk = np.array(ca.causal_attention(q, k, v, scale=0.06, causal=True))
    causal = np.arange(keys)[None] <= np.arange(keys - rows, keys)[:, None]
    assert np.abs(chunk - reference(q, k, v, 0.06, causal[None])).max() < 2e-5
    step = ca.causal_attention(q[:, :, -1:], k, v, scale=0.06)
    assert np.array_equal(np.array(step)[:, :, 0], chunk[:, :, -1])


@pytest.mark.parametrize("keys,rows", [(70, 9), (1100, 1)])  # tiles on one thread; a decode step split
def test_a_float16_cache_gives_the_bits_of_its_values_as_float32(keys, rows):
    """A float16 KV cache is read as it is: each element widens exactly to float32, so the
    result is bit for bit the one of the same values held as float32, with a causal mask, a
    mask, a ring and keys that are not dense."""
    dims = 256
    q, k, v = tensors(2, 4, 1, rows, keys, dims, seed=5)
    k16, v16 = k.astype(mx.float16), v.astype(mx.float16)
    k32, v32 = k16.astype(mx.float32), v16.astype(mx.float32)
    allowed = mx.array((np.arange(keys)[None] <= np.arange(keys - rows, keys)[:, None])[None, None])
    mask = ca.visible(allowed, 2, rows, keys)
    for kw in (dict(causal=True), dict(mask=mask), dict(ring=7)):
        half = ca.causal_attention(q, k16, v16, scale=0.06, **kw)
        assert np.array_equal(np.array(half), np.array(ca.causal_attention(q, k32, v32, scale=0.06, **kw))), kw
    # every other dimension of a wider buffer: a last dimension that is not dense
    wide_k = mx.repeat(k16, 2, axis=3)[..., ::2]
    wide_v = mx.repeat(v16, 2, axis=3)[..., ::2]
    got = ca.causal_attention(q, wide_k, wide_v, scale=0.06, causal=True)
    assert np.array_equal(np.array(got), np.array(ca.causal_attention(q, k32, v32, scale=0.06, causal=True)))
    with pytest.raises(ValueError, match="both float32 or both float16"):
        ca.causal_attention(q, k16, v32, scale=0.06)
