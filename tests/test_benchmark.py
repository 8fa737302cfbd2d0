"""engine.benchmark on a tiny model: one result per batch size, sane numbers, nothing left running."""

import pytest

from engine import Engine, EngineConfig, InvalidRequestError
from engine.benchmark import BenchResult, format_table, run_bench
from tiny_models import tiny_model


@pytest.fixture(scope="module")
def eng(tmp_path_factory):
    e = Engine.load(tiny_model("llama"), EngineConfig(
        progress=False, max_batch=4, block_size=16, cache_dir=str(tmp_path_factory.mktemp("kv"))))
    yield e
    e.close()


def test_run_bench_measures_each_batch(eng):
    results = run_bench(eng, prompt_tokens=40, gen_tokens=6, batches=(1, 3))
    assert [r.batch for r in results] == [1, 3]
    for r in results:
        assert isinstance(r, BenchResult) and r.prompt_tokens == 40
        assert r.pp_tps > 0 and r.tg_tps > 0 and r.ttft_s > 0
        assert 1 <= r.gen_tokens <= 6
    m = eng.metrics()
    assert m["running"] == m["prefilling"] == m["waiting"] == 0
    # Every prompt is unique (40 tokens = 2 cache blocks): none was served from the prefix cache.
    assert m["cached_tokens"] == 0
    table = format_table(results).splitlines()
    assert len(table) == 3 and "PP tok/s" in table[0] and "TG tok/s" in table[0]


def test_run_bench_rejects_prompts_over_the_context(eng):
    with pytest.raises(InvalidRequestError):
        run_bench(eng, prompt_tokens=eng.max_context + 1, gen_tokens=2, batches=(1,))
