"""Prefill (PP) and generation (TG) throughput of a loaded Engine, at several batch sizes.

Uses only the public Engine API, so it measures what callers get (scheduling,
streaming and all). Every prompt starts with a unique tag, so a prefix cache can
never serve one run from another and PP always counts computed tokens.

    results = run_bench(engine, prompt_tokens=512, gen_tokens=128, batches=(1, 4, 8))
    print(format_table(results))
"""

from __future__ import annotations

import itertools
import statistics
import time
from dataclasses import dataclass

from .outputs import Completion
from .sampling.params import SamplingParams

_FILLER = "The quick brown fox jumps over the lazy dog while the engine counts every token."
_runs = itertools.count()  # makes prompts unique across calls too


@dataclass
class BenchResult:
    batch: int  # concurrent requests
    prompt_tokens: int  # per request, in the PP run
    gen_tokens: float  # mean tokens generated per request in the TG run (EOS may end one early)
    pp_tps: float  # prompt tokens computed per second, all requests together
    tg_tps: float  # tokens generated per second, all requests together, once all are decoding
    ttft_s: float  # median time to first token in the PP run


def run_bench(engine, prompt_tokens: int = 512, gen_tokens: int = 128,
              batches=(1, 4, 8)) -> list[BenchResult]:
    """Measure each batch size after a warm-up run of the same shape."""
    results = []
    for batch in batches:
        _prefill_run(engine, batch, min(prompt_tokens, 32))  # warm-up: allocations, BLAS threads
        _decode_run(engine, batch, min(gen_tokens, 4))
        pp_tps, ttft_s = _prefill_run(engine, batch, prompt_tokens)
        tg_tps, generated = _decode_run(engine, batch, gen_tokens)
        results.append(BenchResult(batch, prompt_tokens, generated, pp_tps, tg_tps, ttft_s))
    return results


def format_table(results: list[BenchResult]) -> str:
    lines = [f"{'batch':>5} {'prompt':>7} {'gen':>6} {'PP tok/s':>10} {'TG tok/s':>10} {'TTFT':>9}"]
    for r in results:
        lines.append(f"{r.batch:5d} {r.prompt_tokens:7d} {r.gen_tokens:6.0f} {r.pp_tps:10.1f} "
                     f"{r.tg_tps:10.1f} {r.ttft_s * 1000:7.0f}ms")
    return "\n".join(lines)


def _prefill_run(engine, batch: int, prompt_tokens: int) -> tuple[float, float]:
    # One output token each: the run is all prefill (plus one decode step).
    prompts = [_prompt_ids(engine, prompt_tokens) for _ in range(batch)]
    t0 = time.perf_counter()
    done = _run_all(engine, prompts, SamplingParams(max_tokens=1))
    wall = time.perf_counter() - t0
    return batch * prompt_tokens / wall, statistics.median(c.usage.ttft_s for c in done)


def _decode_run(engine, batch: int, gen_tokens: int) -> tuple[float, float]:
    # Short prompts fit one step's token budget, so every row joins the batch at the
    # same step and the span below is pure batch-`batch` decoding.
    prompts = [_prompt_ids(engine, 8) for _ in range(batch)]
    done = _run_all(engine, prompts, SamplingParams(max_tokens=gen_tokens))
    first = max(c.usage.ttft_s for c in done)
    last = max(c.usage.total_s for c in done)
    decoded = sum(c.usage.completion_tokens - 1 for c in done)
    generated = statistics.mean(c.usage.completion_tokens for c in done)
    return (decoded / (last - first) if last > first else 0.0), generated


def _prompt_ids(engine, n: int) -> list[int]:
    text = f"Run {next(_runs)}. "
    ids = engine.encode(text)
    while len(ids) < n:
        text += _FILLER * max(1, (n - len(ids)) // 8)
        ids = engine.encode(text)
    return ids[:n]


def _run_all(engine, prompts: list[list[int]], params: SamplingParams) -> list[Completion]:
    handles = []
    try:
        for prompt in prompts:
            handles.append(engine.submit(prompt, params, source="bench"))
        return [h.result() for h in handles]
    finally:  # on an error or interrupt, leave nothing running
        for h in handles:
            h.cancel()
