"""Quantized checkpoints in the engine: loaded without float32 matrices, close to their
dequantized reference, and exact under batching, prefix-cache hits and speculation
(every row through the same batch-invariant kernels)."""

import mlx.core as mx
import numpy as np
import pytest
from mlx.utils import tree_flatten

from engine import Engine, EngineConfig, SamplingParams
from engine.models import loader
from engine.cpu import quant_linear
from test_speculative import ScriptedDrafter, use_drafter
from tiny_quant_models import GGUF_FAMILIES, tiny_gguf_model, tiny_mlx_model

needs_kernels = pytest.mark.skipif(not quant_linear.available(),
                                   reason="quantized kernels not built (make native) or no AVX2/VNNI")

PROMPTS = ["def fibonacci(n):", "Hello", "The quick brown fox jumps over the lazy dog, and then",
           "import os\nimport sys\n\n", "class Config:\n    def __init__(self, path):\n",
           "one two three four five six", "for i in range(10):", "x = [1, 2, 3]"]
TEXT = ("The prefix cache keeps blocks of the prompt so that a repeated system prompt is "
        "computed once. def fibonacci(n): return n if n < 2 else fibonacci(n - 1) + "
        "fibonacci(n - 2). Hello, world! The quick brown fox jumps over the lazy dog. ")
# mlx-lm 4-bit directories: float32 scales at group size 32, and bfloat16 ones at mlx-lm's
# default group size 64 (kept at 16 bits, once per pair of groups of 32: quant_layout.py)
MODELS = [("gguf", f) for f in GGUF_FAMILIES] + [("mlx4", "llama"), ("mlx4-bf16-g64", "gemma3_text"),
                                                 ("mlx4", "qwen3_5")]


def model_path(kind, family):
    if kind == "gguf":
        return tiny_gguf_model(family)
    if kind == "mlx4-bf16-g64":
        return tiny_mlx_model(family, bits=4, group_size=64, dtype="bfloat16")
    return tiny_mlx_model(family, bits=4)


@pytest.fixture(scope="module", params=MODELS, ids=lambda m: f"{m[0]}-{m[1]}")
def quant_model(request):
    return request.param


def make_engine(path, **kw):
    cfg = dict(progress=False, max_batch=8, block_size=16, step_token_budget=48, drafter="none")
    cfg.update(kw)
    return Engine.load(path, EngineConfig(**cfg))


@needs_kernels
def test_loaded_packed_without_float_matrices(quant_model, monkeypatch):
    path = model_path(*quant_model)
    loaded = loader.load(path)
    floats = [name for name, p in tree_flatten(loaded.model.parameters())
              if mx.issubdtype(p.dtype, mx.floating) and p.ndim == 2]
    assert floats == []  # only norms, biases (and convolutions) stay float
    assert loaded.quantized and loaded.quantized_weight_bytes > 0 and loaded.row_kernel_bytes == 0
    # Two activation levels in the trunk, one in the output projection (quant_linear.output_levels).
    from engine.cpu.quant_linear import quant_weight
    head = quant_weight(loader.output_projection(loaded.model))
    levels = {q.levels for _, m in loaded.model.named_modules()
              if (q := quant_weight(m)) is not None and q is not head}
    assert head is not None and head.levels == 1 and levels == {2}
    ids = mx.array([loaded.tokenizer.encode(TEXT)[:40]])
    got = np.array(loaded.model(ids)[0])
    # The same checkpoint dequantized to float32 at load (the path without the kernels):
    # only the int8 activations differ.
    monkeypatch.setenv("KERNELEXT_QUANT_KERNELS", "0")
    reference = loader.load(path)
    assert reference.quantized_weight_bytes == 0
    # What the registry's memory budget counts: the packed weights plus the float parameters left.
    assert loaded.weight_bytes == loaded.parameter_bytes + loaded.quantized_weight_bytes
    assert loaded.quantized_weight_bytes < reference.weight_bytes / 2.5
    want = np.array(reference.model(ids)[0])
    # Tiny random models amplify small differences along the sequence (peaked attention,
    # large gains): measured here mean 4-5% of the logits' spread, 4-8% at the first token.
    # A wrong layout or scale would be off by the spread itself.
    spread = want.std()
    assert np.abs(got - want).mean() < 0.1 * spread
    assert np.abs(got[0] - want[0]).max() < 0.15 * spread
    assert (got.argmax(-1) == want.argmax(-1)).mean() >= 0.8


@needs_kernels
def test_batch_invariance(quant_model):
    with make_engine(model_path(*quant_model)) as eng:
        params = lambda i: SamplingParams(max_tokens=10 + 2 * i)  # noqa: E731
        alone = [eng.generate(p, params(i)).token_ids for i, p in enumerate(PROMPTS)]
        handles = [eng.submit(p, params(i)) for i, p in enumerate(PROMPTS)]
        assert [h.result().token_ids for h in handles] == alone
        sampled = lambda i: SamplingParams(max_tokens=12, temperature=1.0, seed=5 + i)  # noqa: E731
        alone = [eng.generate(p, sampled(i)).token_ids for i, p in enumerate(PROMPTS)]
        handles = [eng.submit(p, sampled(i)) for i, p in enumerate(PROMPTS)]
        assert [h.result().token_ids for h in handles] == alone


@needs_kernels
def test_prefix_cache_hits_are_exact(quant_model, tmp_path):
    path = model_path(*quant_model)
    with make_engine(path, prefix_cache=False) as plain:
        ids = plain.encode(TEXT * 3)[:70]
        want = plain.generate(ids, max_tokens=16).token_ids
    with make_engine(path, cache_dir=str(tmp_path / "kv")) as eng:
        cold = eng.generate(ids, max_tokens=16)
        hot = eng.generate(ids, max_tokens=16)
    with make_engine(path, cache_dir=str(tmp_path / "kv")) as eng:  # from the SSD tier
        ssd = eng.generate(ids, max_tokens=16)
    assert cold.token_ids == hot.token_ids == ssd.token_ids == want
    assert hot.usage.cached_tokens == ssd.usage.cached_tokens == 64


@needs_kernels
@pytest.mark.parametrize("good", [0, 2])
def test_speculation_is_exact(quant_model, good):
    with make_engine(model_path(*quant_model)) as eng:
        ref = {tuple(eng.encode(p)): eng.generate(p, max_tokens=19).token_ids for p in PROMPTS}
        use_drafter(eng, ScriptedDrafter(ref, good, eng._loaded.vocab_size))
        handles = [eng.submit(p, max_tokens=19, depth=3) for p in PROMPTS]
        results = [h.result() for h in handles]
        assert [r.token_ids for r in results] == list(ref.values())
        assert all(r.usage.verify_calls > 0 for r in results)


@needs_kernels
def test_avx2_path_generates_the_same_tokens(monkeypatch):
    if not quant_linear._native.has_avx2():
        pytest.skip("no AVX2")
    path = tiny_gguf_model("gemma3_text")
    with make_engine(path) as eng:
        want = [eng.generate(p, max_tokens=12).token_ids for p in PROMPTS[:3]]
    monkeypatch.setenv("KERNELEXT_QUANT_KERNELS", "avx2")
    with make_engine(path) as eng:
        assert [eng.generate(p, max_tokens=12).token_ids for p in PROMPTS[:3]] == want


def test_without_the_kernels_on_a_gpu_blocks_become_mlx_quantized_modules(monkeypatch):
    """The GPU path (macOS), run here on the CPU: no native kernels, mlx-lm's quantized
    modules holding the blocks exactly; close to the float32 dequantization."""
    import mlx.nn as nn

    path = tiny_gguf_model("llama")
    monkeypatch.setenv("KERNELEXT_QUANT_KERNELS", "0")
    dense = loader.load(path)
    monkeypatch.setattr(loader, "on_cpu", lambda: False)
    mapped = loader.load(path, dtype="model")
    kinds = {type(m).__name__ for _, m in mapped.model.named_modules()}
    assert "QuantizedLinear" in kinds and "Linear" not in kinds
    assert mapped.quantized and mapped.quantized_weight_bytes == 0
    assert not any(isinstance(m, nn.Linear) for _, m in mapped.model.named_modules())
    ids = mx.array([dense.tokenizer.encode(TEXT)[:24]])
    np.testing.assert_allclose(np.array(mapped.model(ids)), np.array(dense.model(ids)), rtol=1e-3, atol=1e-3)


@needs_kernels
def test_the_kv_cache_is_float16_unless_asked_float32(tmp_path):
    """Where the quantized kernels run, caches hold float16 keys and values (half of
    float32's memory; the exactness tests above run so) in prefill and in the decode batch;
    kv_dtype="float32" keeps float32. The prefix cache keeps the two apart: blocks of one
    are never restored into the other."""
    from engine.errors import InvalidRequestError

    path = tiny_gguf_model("gemma3_text")
    ids_text = TEXT * 3
    seen = {}
    for kv in ("auto", "float32"):
        with make_engine(path, kv_dtype=kv, cache_dir=str(tmp_path / "kv")) as eng:
            runner = eng.core.runner
            assert eng.metrics()["kv_dtype"] == ("float16" if kv == "auto" else "activations")
            ids = eng.encode(ids_text)[:70]
            first = eng.generate(ids, max_tokens=8)
            handle = eng.submit(ids, max_tokens=400)
            stream = iter(handle)
            next(stream)  # decoding in the batch now
            dtypes = eng.call(lambda: {c.state[0].dtype for c in runner.batch_cache or []})
            handle.cancel()
            handle.result()
            seen[kv] = (dtypes, first.usage.cached_tokens)
    assert seen["auto"][0] == {mx.float16} and seen["float32"][0] == {mx.float32}
    assert seen["auto"][1] == seen["float32"][1] == 0  # float32 found none of float16's blocks
    with pytest.raises(InvalidRequestError, match="kv_dtype"):
        EngineConfig(kv_dtype="int8")
