"""The native row kernels (engine/cpu/row_kernels.py): right products, batch-invariant rows,
used for decode and verify forwards only, and switchable off."""

import mlx.core as mx
import numpy as np
import pytest

from engine import Engine, EngineConfig
from engine.cpu import row_kernels
from engine.models import loader
from tiny_models import tiny_model

needs_kernels = pytest.mark.skipif(not row_kernels.available(),
                                   reason="row kernels not built (make native) or no AVX-512")


@needs_kernels
# (448, 256): below 35 rows the calling thread alone, from 35 rows on all threads.
@pytest.mark.parametrize("n,k", [(64, 16), (100, 48), (1000, 96), (448, 256), (4096, 640)])
def test_product_matches_float64_and_rows_are_independent(n, k):
    w = mx.random.normal((n, k), key=mx.random.key(0))
    blocked = row_kernels.BlockedWeight(w)
    x = mx.random.normal((40, k), key=mx.random.key(1))
    got = np.array(blocked.matmul(x))
    want = np.array(x, dtype=np.float64) @ np.array(w, dtype=np.float64).T
    assert got.shape == (40, n)
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4 * np.abs(want).max())
    # Any row count, any position in the batch: the very same bits for a row.
    for rows in (1, 2, 7, 8, 9, 16, 21, 34, 35):
        part = np.array(blocked.matmul(x[:rows]))
        assert np.array_equal(part, got[:rows]), rows
    single = np.stack([np.array(blocked.matmul(x[i:i + 1]))[0] for i in range(40)])
    assert np.array_equal(single, got)


@needs_kernels
def test_leading_dims_and_views():
    w = mx.random.normal((200, 32), key=mx.random.key(2))
    blocked = row_kernels.BlockedWeight(w)
    x = mx.random.normal((3, 4, 64), key=mx.random.key(3))[..., ::2]  # a strided view
    got = blocked.matmul(x)
    assert got.shape == (3, 4, 200)
    np.testing.assert_allclose(np.array(got), np.array(x @ w.T), rtol=1e-5, atol=1e-5)


@needs_kernels
def test_bad_operands_raise():
    blocked = row_kernels.BlockedWeight(mx.zeros((64, 8)))
    with pytest.raises(ValueError):
        blocked.matmul(mx.zeros((2, 9)))  # wrong k
    with pytest.raises(ValueError):
        blocked.matmul(mx.zeros((2, 8), dtype=mx.float16))


@needs_kernels
def test_engine_uses_them_for_decode_only():
    with Engine.load(tiny_model("gemma3_text"), EngineConfig(progress=False, drafter="none")) as eng:
        model = eng._loaded.model
        linears = [m for _, m in model.named_modules() if isinstance(m, row_kernels._RowLinear)]
        assert linears and eng.metrics()["row_kernel_bytes"] > 0
        assert eng.metrics()["packed_output_bytes"] == 0  # not needed beside them
        calls = []
        real = row_kernels.BlockedWeight.matmul

        def spy(self, x):
            calls.append(x.shape)
            return real(self, x)

        row_kernels.BlockedWeight.matmul = spy
        try:
            eng.call(lambda: mx.eval(model(mx.array([[1, 2, 3]]))))
            assert calls == []  # outside a decode forward: MLX's matmul
            eng.generate("def f(x):", max_tokens=4)
            assert calls  # the decode steps
            assert not row_kernels.active()
        finally:
            row_kernels.BlockedWeight.matmul = real


def test_env_switch_turns_them_off(monkeypatch):
    monkeypatch.setenv("KERNELEXT_ROW_KERNELS", "0")
    assert not row_kernels.available()
    with Engine.load(tiny_model("llama"), EngineConfig(progress=False)) as eng:
        assert eng.metrics()["row_kernel_bytes"] == 0
        assert not any(isinstance(m, row_kernels._RowLinear) for _, m in eng._loaded.model.named_modules())
        assert loader.output_projection(eng._loaded.model)._wt.rows is None
