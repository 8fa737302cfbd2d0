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


@pytest.mark.skipif(not fused_layers._native_row_ops(), reason="native activations not built (make native)")
def test_native_gated_gelu_matches_mlx_and_rows_are_independent():
    from engine.cpu import _row_ops

    mx.random.seed(3)
    gate = mx.random.normal((300, 2048)) * 4  # past the parallel threshold: split across threads
    up = mx.random.normal((300, 2048))
    out = _row_ops.gelu_tanh(gate, up)
    assert mx.allclose(out, nn.gelu_approx(gate) * up, atol=5e-6, rtol=0).item()
    assert mx.allclose(_row_ops.gelu_tanh(gate), nn.gelu_approx(gate), atol=2e-6, rtol=0).item()
    for i in (0, 7, 299):
        assert same(out[i:i + 1], _row_ops.gelu_tanh(gate[i:i + 1], up[i:i + 1]))
    assert same(out[:, 5:9], _row_ops.gelu_tanh(gate[:, 5:9], up[:, 5:9]))  # any offset: same bits
    edge = mx.array([-1e30, -90.0, -9.0, 0.0, 1e-30, 9.0, 90.0, 1e30, float("inf")])
    assert mx.allclose(_row_ops.gelu_tanh(edge), nn.gelu_approx(edge), atol=1e-6).item()
    with pytest.raises(ValueError, match="float32"):
        _row_ops.gelu_tanh(gate.astype(mx.float16))


def test_gemma_mlp_uses_the_native_row_ops():
    model, _ = mlx_lm_load(str(tiny_model("gemma3_text")))
    mlp = model.layers[0].mlp
    x = mx.random.normal((2, 5, mlp.gate_proj.weight.shape[1]))
    want = mlp(x)
    fused_layers.install(model)
    assert (type(mlp).__name__, type(mlp).__module__) == ("MLP", "engine.cpu.fused_layers") or not fused_layers._native_row_ops()
    assert mx.allclose(mlp(x), want, atol=1e-5).item()
    fused_layers.uninstall(model)


@pytest.mark.skipif(not fused_layers._native_row_ops(), reason="native row ops not built (make native)")
@pytest.mark.parametrize("d", [640, 1000, 7])
def test_native_rms_norm_matches_mlx_and_rows_are_independent(d):
    from engine.cpu import _row_ops

    mx.random.seed(4)
    x = mx.random.normal((3, 5, d)) * 3
    w = mx.random.normal((d,))
    for add in (0.0, 1.0):
        out = _row_ops.rms_norm(x, w, add, 1e-6)
        assert mx.allclose(out, mx.fast.rms_norm(x, w + add, 1e-6), atol=2e-5, rtol=1e-5).item()
        for i, j in ((0, 0), (2, 4), (1, 3)):
            assert same(out[i:i + 1, j:j + 1], _row_ops.rms_norm(x[i:i + 1, j:j + 1], w, add, 1e-6))
    with pytest.raises(ValueError, match="float32"):
        _row_ops.rms_norm(x.astype(mx.float16), w, 0.0, 1e-6)


@pytest.mark.skipif(not fused_layers._native_row_ops(), reason="native row ops not built (make native)")
def test_native_row_ops_have_gradients():
    """Training an MTP head differentiates through the swapped norms and MLPs."""
    from engine.cpu import _row_ops

    mx.random.seed(5)
    x, up = mx.random.normal((2, 3, 64)), mx.random.normal((2, 3, 64))
    w = mx.random.normal((64,))
    for add in (0.0, 1.0):
        got = mx.grad(lambda x, w: (_row_ops.rms_norm(x, w, add, 1e-6) * up).sum(), argnums=(0, 1))(x, w)
        want = mx.grad(lambda x, w: (mx.fast.rms_norm(x, w + add, 1e-6) * up).sum(), argnums=(0, 1))(x, w)
        assert all(mx.allclose(a, b, atol=1e-4, rtol=1e-4).item() for a, b in zip(got, want))
    got = mx.grad(lambda x, u: (_row_ops.gelu_tanh(x, u) * w).sum(), argnums=(0, 1))(x, up)
    want = mx.grad(lambda x, u: (nn.gelu_approx(x) * u * w).sum(), argnums=(0, 1))(x, up)
    assert all(mx.allclose(a, b, atol=1e-4, rtol=1e-4).item() for a, b in zip(got, want))
    got = mx.grad(lambda x: (_row_ops.gelu_tanh(x) * w).sum())(x)
    assert mx.allclose(got, mx.grad(lambda x: (nn.gelu_approx(x) * w).sum())(x), atol=1e-4, rtol=1e-4).item()
