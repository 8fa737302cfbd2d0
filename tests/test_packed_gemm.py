"""The packed output projection (MKL, CPU) computes what MLX's matmul computes.

It is the fallback when the row kernels (tests/test_row_kernels.py) are off or unbuilt."""

import mlx.core as mx
import numpy as np
import pytest

from engine import Engine, EngineConfig
from engine.cpu import backend
from engine.models import loader
from engine.cpu.packed_gemm import MAX_ROWS, PackedMatrix
from tiny_models import tiny_model

needs_mkl = pytest.mark.skipif("mkl" not in backend.blas().lower() or mx.default_device() != mx.cpu,
                               reason="the packed projection is for the CPU with MKL")


@needs_mkl
@pytest.mark.parametrize("shape", [(2, 1), (8, 1), (1, 5), (2, 4), (1, 8)])
def test_packed_product_matches_mlx(shape):
    w = mx.random.normal((96, 5000), key=mx.random.key(0))
    x = mx.random.normal((*shape, 96), key=mx.random.key(1))
    packed = PackedMatrix.build(w)
    got, want = packed.matmul(x), x @ w
    assert got.shape == want.shape == (*shape, 5000)
    np.testing.assert_allclose(np.array(got), np.array(want), rtol=1e-5, atol=1e-5)
    assert np.array_equal(np.array(got).argmax(-1), np.array(want).argmax(-1))


@needs_mkl
def test_engine_uses_it_for_small_steps_only(monkeypatch):
    monkeypatch.setenv("KERNELEXT_ROW_KERNELS", "0")
    with Engine.load(tiny_model("llama"), EngineConfig(progress=False, drafter="none")) as eng:
        frozen = loader.output_projection(eng._loaded.model)._wt
        assert frozen.packed is not None
        assert eng.metrics()["packed_output_bytes"] == frozen.packed.buffer.nbytes > 0
        rows = []
        real = frozen.packed.matmul
        monkeypatch.setattr(frozen.packed, "matmul", lambda x: rows.append(x.shape) or real(x))
        prompts = ["def f(x):", "Hello there", "one two three"]
        alone = [eng.generate(p, max_tokens=6).token_ids for p in prompts]
        assert rows == []  # one row: MLX's own product; prefill never evaluates logits
        handles = [eng.submit(p, max_tokens=6) for p in prompts]
        assert [h.result().token_ids for h in handles] == alone
        assert rows and all(1 < np.prod(s[:-1]) <= MAX_ROWS for s in rows)


@needs_mkl
def test_env_switch_turns_it_off(monkeypatch):
    monkeypatch.setenv("KERNELEXT_PACKED_GEMM", "0")
    assert PackedMatrix.build(mx.zeros((4, 4))) is None
    monkeypatch.setenv("KERNELEXT_PACKED_GEMM", "1")
    assert PackedMatrix.build(mx.zeros((4, 4))) is not None
