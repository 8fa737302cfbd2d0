"""Sibling products stacked into one matrix (engine/cpu/stacked_products.py): same bits."""

import mlx.core as mx
import numpy as np
import pytest

from engine.cpu import quant_linear, stacked_products
from engine.cpu.stacked_products import StackedLinear
from engine.models import loader
from tiny_quant_models import tiny_gguf_model, tiny_mlx_model

needs_kernels = pytest.mark.skipif(not quant_linear.available(),
                                   reason="quantized kernels not built (make native) or no AVX2/VNNI")


def stacked_count(model) -> int:
    return sum(isinstance(m, StackedLinear) for _, m in model.named_modules())


MODELS = [("gguf", f) for f in ("llama", "qwen3", "gemma3_text")] + [("mlx4", f) for f in ("llama", "gemma3_text", "qwen3_5")]


@needs_kernels
@pytest.mark.parametrize("kind,family", MODELS)
def test_stacked_siblings_give_the_same_bits(kind, family, monkeypatch):
    """mlx-lm's 4-bit checkpoints quantize q, k, v (gate, up) alike: they stack. The tiny
    GGUFs give matrices of one layer different types: only those that match stack."""
    path = tiny_gguf_model(family) if kind == "gguf" else tiny_mlx_model(family, bits=4)
    stacked = loader.load(path)
    for _, m in stacked.model.named_modules():
        for names in stacked_products.SIBLINGS:
            members = [m[n] for n in names if isinstance(m.get(n), StackedLinear)]
            assert len({id(s.weight_stack) for s in members}) <= 1 or kind == "gguf"
    assert kind == "gguf" or stacked_count(stacked.model) > 0
    assert stacked.quantized_weight_bytes == quant_linear.held_bytes(stacked.model)
    monkeypatch.setattr(stacked_products, "stack_siblings", lambda model: 0)
    plain = loader.load(path)
    assert stacked_count(plain.model) == 0
    assert plain.quantized_weight_bytes == stacked.quantized_weight_bytes  # a stack counted once
    ids = mx.array([[5, 17, 9, 2, 31, 8, 8, 40], [3, 3, 12, 7, 1, 19, 22, 6]])
    long = mx.concatenate([ids, ids[:, ::-1], ids], axis=1)  # 2 x 24 rows: each member alone
    for rows in (ids, ids[:1], ids[1:, :3], long):  # a batch, one row, a short one, a prefill
        assert np.array_equal(np.array(stacked.model(rows)), np.array(plain.model(rows)))


@needs_kernels
def test_a_sibling_called_on_another_input_computes_it():
    path = tiny_mlx_model("llama", bits=4)
    attn = loader.load(path).model.model.layers[0].self_attn
    x = mx.random.normal((2, 3, attn.q_proj.weight_stack.k), key=mx.random.key(1))  # 6 rows: shared
    q, k, v = attn.q_proj(x), attn.k_proj(x), attn.v_proj(x)
    other = x + 1
    k2 = attn.k_proj(other)  # a new input: the whole stack for it, this member's columns
    q2, v2 = attn.q_proj(other), attn.v_proj(other)
    whole = attn.q_proj.weight_stack.matmul(other)
    assert np.array_equal(np.array(mx.concatenate([q2, k2, v2], axis=-1)), np.array(whole))
    assert np.array_equal(np.array(mx.concatenate([q, k, v], axis=-1)),
                          np.array(attn.q_proj.weight_stack.matmul(x)))


@needs_kernels
def test_a_prefill_multiplies_by_each_members_own_tiles():
    """Past SHARED_ROWS rows each member multiplies by its view of the stack (no copy of
    its columns out of a shared product): the same bits as its columns of the stack."""
    mlp = loader.load(tiny_mlx_model("gemma3_text", bits=4)).model.model.layers[0].mlp
    stack = mlp.gate_proj.weight_stack
    x = mx.random.normal((3, stacked_products.SHARED_ROWS, stack.k), key=mx.random.key(2))
    gate, up = mlp.gate_proj(x), mlp.up_proj(x)
    assert mlp.gate_proj._stack._x is None  # nothing shared, nothing held
    whole = np.array(stack.matmul(x))
    assert np.array_equal(np.array(mx.concatenate([gate, up], axis=-1)), whole)
    assert [p.n for p in mlp.gate_proj._stack.parts] == [gate.shape[-1], up.shape[-1]]
