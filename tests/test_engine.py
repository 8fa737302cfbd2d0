"""Engine core on every tiny model family: exactness, batching, streaming, errors."""

import asyncio
import subprocess
import sys
import threading
import time

import mlx.core as mx
import pytest
from mlx_lm.generate import generate_step
from mlx_lm.utils import load as mlx_lm_load

from engine import (Engine, EngineClosedError, EngineConfig, InvalidRequestError,
                    QueueFullError, SamplingParams)
from tiny_models import FAMILIES, tiny_model

PROMPTS = [
    "def fibonacci(n):",
    "Hello",
    "The quick brown fox jumps over the lazy dog, and then",
    "import os\nimport sys\n\n",
    "x",
    "class Config:\n    def __init__(self, path):\n        self.path = path\n",
    "one two three four five six seven eight nine ten eleven twelve thirteen fourteen",
    "for i in range(10):",
]


@pytest.fixture(scope="module", params=FAMILIES)
def family(request):
    return request.param


@pytest.fixture(scope="module")
def eng(family):
    e = Engine.load(tiny_model(family), EngineConfig(progress=False, max_batch=8,
                                                     step_token_budget=48, block_size=16))
    yield e
    e.close()


def mlx_lm_greedy(path, prompt_ids, n, prefill_step_size=2048):
    model, _ = mlx_lm_load(str(path))
    out = []
    for tok, _ in generate_step(mx.array(prompt_ids), model, max_tokens=n,
                                prefill_step_size=prefill_step_size):
        out.append(int(tok))
    return out


def test_greedy_matches_mlx_lm(eng, family):
    for prompt in PROMPTS[:4]:
        ids = eng.encode(prompt)
        got = eng.generate(ids, max_tokens=24)
        # Same prefill chunking as the engine: one block per forward pass.
        want = mlx_lm_greedy(tiny_model(family), ids, 24,
                             prefill_step_size=eng.config.block_size)
        assert got.token_ids == want, prompt
        assert got.finish_reason == "length"
        assert len(got.token_ids) == 24


def test_long_prompt_chunked_prefill_matches_mlx_lm(eng, family):
    # Longer than the step budget (48) and than gemma's sliding window: prefill in chunks.
    ids = eng.encode(" ".join(PROMPTS) * 2)
    assert len(ids) > 3 * eng.config.step_token_budget
    got = eng.generate(ids, max_tokens=16)
    want = mlx_lm_greedy(tiny_model(family), ids, 16,
                         prefill_step_size=eng.config.block_size)
    assert got.token_ids == want


def _staggered(eng, prompts, params_for):
    """Submit each request only after the previous one has produced tokens, so
    requests join the running batch at different steps."""
    handles = []
    for i, prompt in enumerate(prompts):
        h = eng.submit(prompt, params_for(i))
        handles.append(h)
        if i < len(prompts) - 1:
            it = iter(h)
            next(it)  # wait for this request's first delta before the next joins
    return [h.result() for h in handles]


def test_batch_invariance_greedy(eng):
    params = lambda i: SamplingParams(max_tokens=12 + 3 * i)  # noqa: E731
    alone = [eng.generate(p, params(i)).token_ids for i, p in enumerate(PROMPTS)]
    batched = [c.token_ids for c in _staggered(eng, PROMPTS, params)]
    assert batched == alone
    # All at once too (joins in the same step, mixed prompt lengths).
    handles = [eng.submit(p, params(i)) for i, p in enumerate(PROMPTS)]
    assert [h.result().token_ids for h in handles] == alone


def test_seeded_sampling_ignores_neighbours(eng):
    params = lambda i: SamplingParams(max_tokens=16, temperature=1.0, top_p=0.95, seed=100 + i)  # noqa: E731
    alone = [eng.generate(p, params(i)).token_ids for i, p in enumerate(PROMPTS)]
    batched = [c.token_ids for c in _staggered(eng, PROMPTS, params)]
    assert batched == alone
    # The seed matters: other seeds give other samples.
    other = [eng.generate(p, SamplingParams(max_tokens=16, temperature=1.0, seed=7 + i)).token_ids
             for i, p in enumerate(PROMPTS)]
    assert other != alone


def test_streaming_deltas_add_up(eng):
    handle = eng.submit(PROMPTS[0], max_tokens=20)
    deltas = list(handle)
    completion = handle.result()
    assert "".join(d.text for d in deltas) == completion.text
    assert [t for d in deltas for t in d.token_ids] == completion.token_ids
    assert deltas[-1].finish_reason == "length" and deltas[-1].usage is not None
    assert completion.usage.prompt_tokens == len(eng.encode(PROMPTS[0]))
    assert completion.usage.completion_tokens == 20
    assert completion.usage.cached_tokens == 0
    assert completion.usage.ttft_s > 0


def test_stop_string_split_across_tokens_never_leaks(eng):
    full = eng.generate(PROMPTS[2], max_tokens=30)
    tok = eng.tokenizer
    # A stop string that starts inside one token and ends inside a later one.
    pieces = [tok.decode(full.token_ids[:k]) for k in range(len(full.token_ids) + 1)]
    k = next(k for k in range(4, len(pieces) - 1)
             if len(pieces[k]) - len(pieces[k - 1]) >= 2 and len(pieces[k + 1]) > len(pieces[k]))
    start = len(pieces[k]) - 1
    stop = full.text[start:start + 2]
    expected = full.text[:full.text.find(stop)]
    handle = eng.submit(PROMPTS[2], max_tokens=30, stop=[stop, "\u2603never"])
    streamed = "".join(d.text for d in handle)
    completion = handle.result()
    assert completion.finish_reason == "stop"
    assert completion.text == expected == streamed
    assert stop not in streamed


def test_cancel_mid_stream_leaves_others_running(eng):
    long_a = eng.submit(PROMPTS[0], max_tokens=400)
    other = eng.submit(PROMPTS[1], max_tokens=40)
    it = iter(long_a)
    next(it)
    long_a.cancel()
    result = long_a.result(timeout=30)
    assert result.finish_reason == "cancelled"
    assert len(result.token_ids) < 400
    assert other.result(timeout=60).token_ids == eng.generate(PROMPTS[1], max_tokens=40).token_ids


def test_async_iteration(eng):
    async def main():
        async def one(p):
            return "".join([d.text async for d in eng.astream(p, max_tokens=10)])
        return await asyncio.gather(*(one(p) for p in PROMPTS[:3]))

    texts = asyncio.run(main())
    assert texts == [eng.generate(p, max_tokens=10).text for p in PROMPTS[:3]]


def test_chat_messages_use_template(eng):
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}]
    ids = eng.encode(messages)
    rendered = eng.tokenizer.apply_chat_template(messages, add_generation_prompt=True,
                                                 tokenize=False)
    assert eng.tokenizer.decode(ids) == rendered
    assert eng.generate(messages, max_tokens=5).usage.prompt_tokens == len(ids)


def test_logprobs(eng):
    c = eng.generate(PROMPTS[0], max_tokens=6, logprobs=3)
    assert len(c.logprobs) == 6
    for entry, token in zip(c.logprobs, c.token_ids):
        assert entry.token_id == token
        assert len(entry.top) == 3
        assert entry.top[0][0] == token  # greedy picks the most likely token
        assert entry.logprob == pytest.approx(entry.top[0][2])
        assert entry.top[0][2] >= entry.top[1][2] >= entry.top[2][2]
        assert entry.logprob <= 0


def test_top_k_one_is_greedy_and_seed_reproducible(eng):
    greedy = eng.generate(PROMPTS[3], max_tokens=12).token_ids
    assert eng.generate(PROMPTS[3], max_tokens=12, temperature=1.5, top_k=1, seed=3).token_ids == greedy
    a = eng.generate(PROMPTS[3], max_tokens=12, temperature=1.0, seed=5).token_ids
    assert eng.generate(PROMPTS[3], max_tokens=12, temperature=1.0, seed=5).token_ids == a


@pytest.mark.parametrize("bad", [
    dict(max_tokens=0), dict(temperature=-1), dict(top_p=0), dict(top_p=1.5), dict(top_k=-1),
    dict(min_p=1.0), dict(repetition_penalty=0), dict(presence_penalty=3),
    dict(frequency_penalty=float("nan")), dict(stop=[""]), dict(logprobs=99), dict(seed="x"),
])
def test_invalid_sampling_params(bad):
    with pytest.raises(InvalidRequestError):
        SamplingParams(**bad)


def test_invalid_prompts(eng):
    for prompt in ([], [{"content": "no role"}], 42, [10**9]):
        with pytest.raises(InvalidRequestError):
            eng.submit(prompt)
    with pytest.raises(InvalidRequestError, match="context limit"):
        eng.submit(list(range(1, 50)) * 1000)


def test_metrics_snapshot(eng):
    eng.generate(PROMPTS[1], max_tokens=4)
    m = eng.metrics()
    for key in ("requests_completed", "generated_tokens", "decode_tps", "prefill_tps",
                "ttft_p50_s", "running", "waiting", "model", "backend", "dtype"):
        assert key in m
    assert m["requests_completed"] >= 1 and m["generated_tokens"] >= 4
    assert m["backend"] in ("cpu", "gpu")


def test_queue_full_rejects_clearly(family):
    with Engine.load(tiny_model(family), EngineConfig(progress=False, max_batch=1,
                                                      max_waiting=1)) as e:
        first = e.submit(PROMPTS[0], max_tokens=2000)
        next(iter(first))  # running, the batch is full
        second = e.submit(PROMPTS[1], max_tokens=2)  # waits
        with pytest.raises(QueueFullError, match="full"):
            e.submit(PROMPTS[2], max_tokens=2)
        first.cancel()
        assert second.result(timeout=60).finish_reason == "length"
        assert e.metrics()["requests_rejected"] == 1


def test_close_fails_pending_and_refuses_new(family):
    e = Engine.load(tiny_model(family), EngineConfig(progress=False))
    h = e.submit(PROMPTS[0], max_tokens=5000)
    next(iter(h))
    e.close()
    with pytest.raises(EngineClosedError):
        h.result(timeout=30)
    with pytest.raises(EngineClosedError):
        e.submit("x")


def test_submit_from_many_threads(eng):
    results = {}

    def worker(i):
        results[i] = eng.generate(PROMPTS[i], max_tokens=8).token_ids

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(len(PROMPTS))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert [results[i] for i in range(len(PROMPTS))] == \
        [eng.generate(p, max_tokens=8).token_ids for p in PROMPTS]


def test_quantized_model_directory_loads(tmp_path):
    from mlx_lm import convert

    qdir = tmp_path / "q4"
    convert(str(tiny_model("qwen3")), mlx_path=str(qdir), quantize=True, q_bits=4, q_group_size=32)
    assert "quantization" in (qdir / "config.json").read_text()
    with Engine.load(qdir, EngineConfig(progress=False)) as e:  # dequantized to float32 on the CPU
        assert e.metrics()["dtype"] == "float32"
        fast = e.generate(PROMPTS[0], max_tokens=8)
    with Engine.load(qdir, EngineConfig(progress=False, dtype="model")) as e:  # kept quantized
        kept = e.generate(PROMPTS[0], max_tokens=8)
    assert len(fast.token_ids) == len(kept.token_ids) == 8


def test_the_front_imports_no_mlx():
    """`import engine` (the Engine front, its config, params and handles) loads no MLX:
    the core is imported on the MLX thread when a model loads. Old module paths from
    before the engine was grouped into folders still import."""
    code = ("import sys, engine; from engine import Engine, EngineConfig, SamplingParams; "
            "assert not [m for m in sys.modules if m.split('.')[0] in ('mlx', 'mlx_lm')], 'mlx'; "
            "from engine.tuning import CODE; import engine.sampler, engine.spec.tuning as t; "
            "assert engine.sampler is sys.modules['engine.sampling.sampler']; "
            "assert t.__spec__.name == 'engine.spec.tuning'")
    subprocess.run([sys.executable, "-c", code], check=True)


def test_an_idle_engine_hands_its_cached_memory_back(monkeypatch):
    """MLX keeps the buffers a forward frees for the process's life; once the engine thread
    has had no work for IDLE_RELEASE_S it hands them back, and what runs next is unchanged."""
    from engine.core import worker

    monkeypatch.setattr(worker, "IDLE_RELEASE_S", 60.0)
    with Engine.load(tiny_model("llama"), EngineConfig(progress=False)) as e:
        ids = e.encode(PROMPTS[6])
        first = e.generate(ids, max_tokens=16).token_ids
        assert mx.get_cache_memory() > 0  # the forwards' freed buffers, kept by MLX
        monkeypatch.setattr(worker, "IDLE_RELEASE_S", 0.2)
        e._worker.post(e.core, ("wake",))  # the thread's wait then takes the new value
        deadline = time.monotonic() + 30
        while mx.get_cache_memory() and time.monotonic() < deadline:
            time.sleep(0.05)
        assert mx.get_cache_memory() == 0
        assert e.generate(ids, max_tokens=16).token_ids == first
