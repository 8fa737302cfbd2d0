"""The compiled norms and RoPE (engine/cpu/fused_layers.py): a row's bits depend only on the
row, whatever the batch, window or offset; values match MLX's own kernels to rounding."""

import engine  # noqa: F401  (BLAS before mlx)
import mlx.core as mx
import numpy as np
import pytest
from mlx_lm import load as mlx_lm_load
from mlx_lm.models.cache import make_prompt_cache

from engine.cpu import fused_layers
from engine.cpu.fused_layers import _rms_norm, _CompiledRoPE
from tiny_models import tiny_model

import mlx.nn as nn


def same(a, b) -> bool:
    return np.array_equal(np.array(a), np.array(b))


def test_rms_norm_rows_are_independent_and_match_mlx():
    mx.random.seed(0)
    w = mx.random.normal((256,))
    x = mx.random.normal((3, 4, 8, 256))
    out = _rms_norm(x, w, 1e-6)
    for i in range(3):
        for j in range(8):
            assert same(out[i:i + 1, :, j:j + 1], _rms_norm(x[i:i + 1, :, j:j + 1], w, 1e-6))
    assert mx.allclose(out, mx.fast.rms_norm(x, w, 1e-6), atol=1e-5).item()


@pytest.mark.parametrize("dims,base", [(64, 10000.0), (128, 1000000.0)])
def test_rope_window_equals_one_position_at_a_time(dims, base):
    mx.random.seed(1)
    rope = nn.RoPE(dims, traditional=False, base=base)
    reference = nn.RoPE(dims, traditional=False, base=base)
    fused_layers.install(rope)
    assert type(rope) is _CompiledRoPE
    x = mx.random.normal((1, 4, 8, dims))
    window = rope(x, offset=37)
    for p in range(8):
        assert same(window[:, :, p:p + 1], rope(x[:, :, p:p + 1], offset=37 + p))
    assert mx.allclose(window, reference(x, offset=37), atol=1e-4).item()


def test_rope_batch_rows_with_their_own_offsets():
    mx.random.seed(2)
    rope = nn.RoPE(64, traditional=False, base=10000.0)
    fused_layers.install(rope)
    x = mx.random.normal((3, 2, 1, 64))
    offsets = mx.array([5, 70, 300])
    batch = rope(x, offset=offsets)
    for i, off in enumerate((5, 70, 300)):
        assert same(batch[i:i + 1], rope(x[i:i + 1], offset=off))
    assert mx.allclose(batch, mx.fast.rope(x, 64, traditional=False, base=10000.0, scale=1.0,
                                           offset=offsets), atol=1e-4).item()


@pytest.mark.parametrize("family", ["llama", "qwen3", "gemma3_text"])
def test_install_keeps_greedy_tokens_and_uninstall_restores(family):
    model, tok = mlx_lm_load(str(tiny_model(family)))
    ids = mx.array(tok.encode("def fibonacci(n): a long story about bees " * 3)[:32])[None]
    want = model(ids)
    swapped = fused_layers.install(model)
    assert swapped > 0
    got = model(ids)
    assert mx.allclose(got, want, atol=1e-3).item()
    assert same(got.argmax(-1), want.argmax(-1))
    # through a cache, token by token, as the engine decodes
    cache = make_prompt_cache(model)
    model(ids[:, :16], cache=cache)
    step = model(ids[:, 16:17], cache=cache)
    assert mx.allclose(step[:, 0], want[:, 16], atol=1e-3).item()
    assert fused_layers.uninstall(model) == swapped
    assert same(model(ids), want)
