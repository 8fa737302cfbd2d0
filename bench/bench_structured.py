"""Structured generation: what a constraint costs, and engine.map vs a loop.

    .venv/bin/python bench/bench_structured.py [--model gemma-3-270m] [--rounds 3] [--prompts 200]

On the default model, side by side in one run:
  1. decode tok/s with a JSON Schema constraint vs the same requests without one,
     at batch 1 and 8 (interleaved rounds, medians; target: at most 10% slower at 8).
     The schema asks for a long array of short strings, so constrained rows run to
     max_tokens like unconstrained ones and both decode the same number of tokens.
     Speculation is off here (drafts differ with and without a grammar).
  2. mask time per token: filling one row's bitmask on the 262k vocabulary (what the
     helper thread does beside the forward), and the part of it the step loop still
     waited for (the mask was not ready when the forward ended).
  3. engine.map over --prompts extraction prompts (a JSON Schema per row) vs a
     sequential loop of engine.generate, same outputs checked equal.
"""

from __future__ import annotations

import argparse
import random
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import engine  # noqa: E402  (fast BLAS before mlx)
from engine import Engine, EngineConfig, SamplingParams  # noqa: E402
from engine.structured import masks as mask_module  # noqa: E402

LONG = {"type": "object", "properties": {"notes": {
    "type": "array", "items": {"type": "string", "maxLength": 24}, "minItems": 40, "maxItems": 40}},
    "required": ["notes"]}
ROW = {"type": "object", "properties": {
    "name": {"type": "string", "maxLength": 24}, "age": {"type": "integer", "minimum": 0, "maximum": 120},
    "city": {"type": "string", "maxLength": 24}}, "required": ["name", "age", "city"]}
NAMES = ["Alice Martin", "Bob Chen", "Chloe Dubois", "Dmitri Ivanov", "Emma Rossi", "Farid Haddad",
         "Grace Kim", "Hugo Silva", "Ines Garcia", "Jonas Berg"]
CITIES = ["Lyon", "Osaka", "Porto", "Quebec", "Riga", "Seville", "Tallinn", "Utrecht", "Valencia", "Warsaw"]


def tok_s(eng, prompts, params) -> float:
    start = time.perf_counter()
    handles = [eng.submit(p, params) for p in prompts]
    tokens = sum(h.result().usage.completion_tokens for h in handles)
    return tokens / (time.perf_counter() - start)


def constrained_vs_free(eng, rounds: int) -> None:
    print("1. decode tok/s, JSON Schema constraint vs none (speculation off, 48 tokens per row)")
    for batch in (1, 8):
        prompts = [f"Meeting notes, part {i}, as JSON:\n" for i in range(batch)]
        free = SamplingParams(max_tokens=48, temperature=0.8, seed=1, depth=0)
        constrained = SamplingParams(max_tokens=48, temperature=0.8, seed=1, depth=0, json_schema=LONG)
        tok_s(eng, prompts, free), tok_s(eng, prompts, constrained)  # warm-up (prefix cache, masks)
        a, b = [], []
        for _ in range(rounds):
            a.append(tok_s(eng, prompts, free))
            b.append(tok_s(eng, prompts, constrained))
        fa, fb = statistics.median(a), statistics.median(b)
        print(f"   batch {batch}: unconstrained {fa:6.1f} tok/s, constrained {fb:6.1f} tok/s, "
              f"ratio {fb / fa:.2f}x{'  (target >= 0.90 at batch 8)' if batch == 8 else ''}")


def mask_times(eng) -> None:
    print("2. mask time per token (one row, Gemma's 262,144-token vocabulary)")
    ids = eng.encode('{"name": "Alice Martin", "age": 34, "city": "Lyon"}')[1:]
    computer = mask_module.MaskComputer(eng._loaded.vocab_size)
    fill = []
    for walk in range(4):  # the first walk warms llguidance's per-tokenizer tables up
        matcher = eng.core.new_matcher(SamplingParams(json_schema=ROW))
        for t in ids:
            start = time.perf_counter()
            computer.start([matcher], [[]]).wait()
            if walk:
                fill.append(time.perf_counter() - start)
            matcher.advance([t])
    computer.close()
    print(f"   fill on the helper thread: median {statistics.median(fill) * 1e6:.0f} us, "
          f"mean {statistics.mean(fill) * 1e6:.0f} us per token ({len(fill)} tokens, 3 walks after a warm-up)")
    waited, steps = [0.0], [0]
    real_wait = mask_module.StepMasks.wait

    def timed_wait(self):
        start = time.perf_counter()
        out = real_wait(self)
        waited[0] += time.perf_counter() - start
        steps[0] += 1
        return out

    mask_module.StepMasks.wait = timed_wait
    try:
        start = time.perf_counter()
        handles = [eng.submit(f"Person {i}:", max_tokens=40, temperature=0.8, seed=i, depth=0,
                              json_schema=ROW) for i in range(8)]
        tokens = sum(h.result().usage.completion_tokens for h in handles)
        total = time.perf_counter() - start
    finally:
        mask_module.StepMasks.wait = real_wait
    print(f"   in the engine (batch 8): the step loop waited {waited[0] / max(tokens, 1) * 1e6:.0f} us per "
          f"token for masks ({waited[0] / total:.1%} of the wall time)")


def map_vs_loop(eng, n: int) -> None:
    print(f"3. engine.map over {n} extraction prompts vs a loop of engine.generate")
    rng = random.Random(0)
    prompts = [f"{rng.choice(NAMES)}, {rng.randint(18, 90)}, lives in {rng.choice(CITIES)}.\n"
               f"As JSON with name, age and city:\n" for _ in range(n)]
    params = SamplingParams(max_tokens=48, temperature=0.0, json_schema=ROW)
    start = time.perf_counter()
    mapped = eng.map(prompts, params, progress=False)
    t_map = time.perf_counter() - start
    start = time.perf_counter()
    looped = [eng.generate(p, params) for p in prompts]
    t_loop = time.perf_counter() - start
    same = sum(a.token_ids == b.token_ids for a, b in zip(mapped, looped))
    parsed = sum(c.parsed is not None for c in mapped)
    print(f"   map {t_map:6.1f} s ({n / t_map:.2f} prompts/s), loop {t_loop:6.1f} s ({n / t_loop:.2f} "
          f"prompts/s): {t_loop / t_map:.2f}x; {same}/{n} outputs identical, {parsed}/{n} parsed")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="gemma-3-270m")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--prompts", type=int, default=200)
    args = ap.parse_args()
    with Engine.load(args.model, EngineConfig(progress=False, max_batch=8)) as eng:
        print(f"{args.model} on {eng.backend}; {engine.__name__} structured generation (llguidance)")
        mask_times(eng)
        constrained_vs_free(eng, args.rounds)
        map_vs_loop(eng, args.prompts)


if __name__ == "__main__":
    main()
