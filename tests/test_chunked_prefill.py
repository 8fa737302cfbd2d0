"""Chunk-invariant prefill on the quantized CPU path: a prompt leaves the same KV and logits,
bit for bit, however it is split into forwards (1 token at a time as decode steps, 7, 32,
512, all at once), past the sliding window; the engine then prefills in large forwards
while the prefix cache keeps small blocks, and hits stay exact."""

import mlx.core as mx
import numpy as np
import pytest
from mlx_lm.models.cache import RotatingKVCache

from engine import Engine, EngineConfig
from engine.core.model_runner import ModelRunner
from engine.cpu import causal_attention, quant_linear
from engine.models import loader, row_attention
from tiny_quant_models import GGUF_FAMILIES, tiny_gguf_model, tiny_mlx_model

pytestmark = pytest.mark.skipif(not (quant_linear.available() and causal_attention.available()),
                                reason="quantized or attention kernels not built (make native) or no AVX-512")

# Every family the kernels serve; tiny gemma3_text has a sliding window of 8 tokens.
INVARIANT = [("gguf", f) for f in GGUF_FAMILIES] + [("mlx4", f) for f in ("llama", "gemma3_text")]
TEXT = ("The prefix cache keeps blocks of the prompt so that a repeated system prompt is "
        "computed once. def fibonacci(n): return n if n < 2 else fibonacci(n - 1) + "
        "fibonacci(n - 2). Hello, world! The quick brown fox jumps over the lazy dog. ")


def model_path(kind, family):
    return tiny_gguf_model(family) if kind == "gguf" else tiny_mlx_model(family, bits=4)


@pytest.fixture(scope="module", params=INVARIANT, ids=lambda m: f"{m[0]}-{m[1]}")
def loaded(request):
    return loader.load(model_path(*request.param))


def prompt(loaded, n):
    ids = loaded.tokenizer.encode(TEXT * (1 + n // 30))[:n]
    assert len(ids) == n
    return ids


def prefill_in_chunks(loaded, ids, size):
    """Logits [len(ids), vocab] and the cache after feeding ids `size` tokens per forward;
    size 1 runs them as decode steps do."""
    model = loaded.model
    cache = ModelRunner(model).new_cache()
    logits = []
    for start in range(0, len(ids), size):
        chunk = mx.array(ids[start:start + size])[None]
        context = loader.decode_products(model) if size == 1 else row_attention.exact(model)
        with context:
            out = model(chunk, cache=cache)
        mx.eval(out, [c.state for c in cache])
        logits.append(np.array(out[0]))
    return np.concatenate(logits), cache


def held_keys(cache):
    """Per layer, the keys and values the next query can see, in time order."""
    out = []
    for c in cache:
        if isinstance(c, RotatingKVCache):
            keys, values = c._temporal_order(c.keys), c._temporal_order(c.values)
            n = min(c.offset, c.max_size - 1)  # what the next token's window holds besides itself
        else:
            keys, values, n = c.keys[..., :c.offset, :], c.values[..., :c.offset, :], c.offset
        out.append((np.array(keys[..., keys.shape[2] - n:, :]), np.array(values[..., values.shape[2] - n:, :])))
    return out


def test_prompt_split_any_way_leaves_the_same_bits(loaded):
    assert loaded.chunk_invariant
    ids = prompt(loaded, 600)
    want_logits, want_cache = prefill_in_chunks(loaded, ids, len(ids))
    want_keys = held_keys(want_cache)
    for size in (1, 7, 32, 512):
        logits, cache = prefill_in_chunks(loaded, ids, size)
        assert np.array_equal(logits, want_logits), size
        for layer, ((k, v), (wk, wv)) in enumerate(zip(held_keys(cache), want_keys)):
            assert np.array_equal(k, wk) and np.array_equal(v, wv), (size, layer)


def test_recurrent_layers_stay_per_block():
    assert not loader.load(tiny_mlx_model("qwen3_5", bits=4)).chunk_invariant


def test_float_weights_stay_per_block():
    from tiny_models import tiny_model

    assert not loader.load(tiny_model("gemma3_text")).chunk_invariant


def make_engine(path, **kw):
    cfg = dict(progress=False, max_batch=4, block_size=16, step_token_budget=160, drafter="none")
    cfg.update(kw)
    return Engine.load(path, EngineConfig(**cfg))


@pytest.mark.parametrize("family", ["gemma3_text", "llama"])
def test_large_prefill_forwards_publish_exact_blocks(family, tmp_path, monkeypatch):
    """Prefill in 160-token forwards publishes the same block bits as one forward per block
    (the path of models that are not chunk-invariant), and hits, cold and plain runs agree."""
    path = tiny_gguf_model(family)
    with make_engine(path, prefix_cache=False) as plain:
        ids = plain.encode(TEXT * 5)[:300]
        follow = ids[:200] + plain.encode(" and then something else entirely")
        want = [plain.generate(p, max_tokens=12).token_ids for p in (ids, follow)]
    with make_engine(path, cache_dir=str(tmp_path / "large")) as eng:
        assert eng.core.chunk_invariant
        cold = eng.generate(ids, max_tokens=12)
        hot = eng.generate(ids, max_tokens=12)
        branch = eng.generate(follow, max_tokens=12)
        keys = eng.prefix_cache.keys(ids[:-1])
        large = [eng.prefix_cache.hot.get(k) for k in keys]
    assert [cold.token_ids, branch.token_ids] == want and hot.token_ids == want[0]
    assert hot.usage.cached_tokens == 288 and branch.usage.cached_tokens == 192
    with make_engine(path, cache_dir=str(tmp_path / "blocks")) as eng:
        monkeypatch.setattr(eng.core, "chunk_invariant", False)
        assert eng.generate(ids, max_tokens=12).token_ids == want[0]
        small = [eng.prefix_cache.hot.get(k) for k in keys]
    assert len(large) == len(small) == 18 and None not in large and None not in small
    for a, b in zip(large, small):
        assert a.keys() == b.keys()
        assert all(np.array_equal(np.array(a[name]), np.array(b[name])) for name in a)


def reply_blocks_published(path, cache_dir, from_decode, monkeypatch):
    """The reply's block payloads a finished request (decoded beside a longer one, so
    left-padded) leaves in the cache, and the cache-fill tokens spent on them."""
    with make_engine(path, cache_dir=str(cache_dir)) as eng:
        if not from_decode:
            monkeypatch.setattr(eng.core, "_publish_reply", lambda *a: False)
        ids = eng.encode(TEXT * 2)[:40]
        handles = [eng.submit(ids, max_tokens=40), eng.submit(eng.encode(TEXT * 3)[:90], max_tokens=50)]
        reply = handles[0].result().token_ids
        handles[1].result()
        keys = eng.prefix_cache.keys((ids + reply)[:(len(ids) + len(reply) - 1) // 16 * 16])
        eng.call(lambda: None)  # the fill jobs (if any) have run
        return [eng.prefix_cache.hot.get(k) for k in keys[(len(ids) - 1) // 16:]], eng.metrics()["cache_fill_tokens"]


def test_reply_blocks_from_decode_equal_a_fill(tmp_path, monkeypatch):
    path = tiny_gguf_model("llama")
    decoded, filled_a = reply_blocks_published(path, tmp_path / "a", True, monkeypatch)
    prefilled, filled_b = reply_blocks_published(path, tmp_path / "b", False, monkeypatch)
    assert filled_a == 0 < filled_b and len(decoded) == len(prefilled) >= 2 and None not in decoded + prefilled
    for a, b in zip(decoded, prefilled):
        assert all(np.array_equal(np.array(a[name]), np.array(b[name])) for name in b)


@pytest.mark.parametrize("family", ["llama", "gemma3_text"])
def test_a_reply_is_published_from_its_own_decode_kv(family, tmp_path):
    """Decode gives a token the bits prefill gives, so a finished reply's blocks are cut
    from the row's own cache, with no cache fill, and the next turn that sends the reply
    back hits them and returns what the cache-off engine returns. Tiny gemma3_text's
    8-token window no longer holds the reply's first blocks: it falls back to a fill."""
    path = tiny_gguf_model(family)
    with make_engine(path, cache_dir=str(tmp_path / "kv")) as eng:
        ids = eng.encode(TEXT * 2)[:40]
        # beside a longer request: the reply's row is left-padded in the decode batch
        handles = [eng.submit(ids, max_tokens=40), eng.submit(eng.encode(TEXT * 3)[:90], max_tokens=50)]
        first = handles[0].result()
        follow_up = ids + first.token_ids + eng.encode("next turn, please")
        second = eng.generate(follow_up, max_tokens=12)
        handles[1].result()
        filled = eng.metrics()["cache_fill_tokens"]
    with make_engine(path, prefix_cache=False) as plain:
        assert plain.generate(follow_up, max_tokens=12).token_ids == second.token_ids
    reply_blocks = (len(ids) + len(first.token_ids) - 1) // 16
    assert second.usage.cached_tokens == reply_blocks * 16 > (len(ids) - 1) // 16 * 16
    assert (filled == 0) == (family == "llama")


def test_without_the_attention_kernel_decode_rows_stay_exact(monkeypatch):
    """No AVX-512 (the kernel unavailable): prefill stays in blocks, and decode rows attend
    one query at a time through MLX (models/row_attention.py's fallback), so a row's
    logits in a padded batch are the bits it gets alone."""
    monkeypatch.setattr(causal_attention, "available", lambda: False)
    loaded = loader.load(tiny_gguf_model("llama"))
    assert not loaded.chunk_invariant
    runner = ModelRunner(loaded.model)
    caches, last = [], []
    for n in (13, 40):
        ids = prompt(loaded, n)
        caches.append(runner.new_cache())
        runner.prefill(caches[-1], ids[:-1], ids[1:])
        last.append(ids[-1])
    alone = []
    for cache, token in zip(caches, last):
        runner.add_rows([cache])
        alone.append(np.array(runner.decode([token])[0]))
        runner.reset()
    runner.add_rows(caches)
    batched = np.array(runner.decode(last))
    assert all(np.array_equal(batched[i], alone[i]) for i in range(2))
    # a verify window of 4 positions per row against the same tokens decoded one by one
    runner.reset()
    window = [[5, 9, 11, 3], [7, 2, 8, 4]]
    runner.add_rows(caches)
    verified = np.array(runner.verify(window))
    runner.commit([4, 4], 4)
    runner.reset()
    runner.add_rows(caches)
    for j in range(4):
        stepped = np.array(runner.decode([w[j] for w in window]))
        assert all(np.array_equal(verified[i, j], stepped[i]) for i in range(2)), j
