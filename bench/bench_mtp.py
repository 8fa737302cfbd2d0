"""Speculative decoding with the trained MTP head vs the n-gram drafter vs plain decoding.

    .venv/bin/python bench/bench_mtp.py [--model gemma-3-270m] [--gen-tokens 96] [--head PATH]

Batch 1, on a mix of code-editing prompts (engine/spec/tuning.py's) and prose prompts, at
temperature 0 and 0.6. For each drafter and depth it prints decode tok/s, the speedup
over plain decoding, the mean tokens accepted per verify step, and the acceptance rate
at each draft position (position j counts the windows that reached it). The machine is
shared and noisy: runs are interleaved (every variant once per prompt, in a rotating
order) so drift hits all variants alike, and ratios from one run are what to compare.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import engine  # noqa: E402,F401  (loads the fast BLAS before mlx)
from engine import Engine, EngineConfig, SamplingParams  # noqa: E402
from engine.spec.tuning import TUNING_PROMPTS  # noqa: E402

PROSE = [
    [{"role": "user", "content": "Write a short essay about why the sky is blue."}],
    [{"role": "user", "content": "Explain how a compiler turns source code into a program."}],
]
PROMPTS = {"code-1": TUNING_PROMPTS[0], "code-2": TUNING_PROMPTS[1], "prose-1": PROSE[0], "prose-2": PROSE[1]}
# (label, engine, depth): depth None = the engine's adaptive depth ("auto").
VARIANTS = [("plain", "base", 0), ("ngram d3", "base", 3), ("ngram auto", "base", None),
            ("mtp d1", "mtp", 1), ("mtp d2", "mtp", 2), ("mtp d3", "mtp", 3), ("mtp auto", "mtp", None)]


class Tally:
    """Decode tokens and seconds, and per-position draft attempts/accepts, of one variant."""

    def __init__(self):
        self.tokens = self.seconds = self.verifies = self.accepted = 0
        self.attempts, self.accepts = [0] * 4, [0] * 4

    def add(self, usage, before, after) -> None:
        self.tokens += usage.completion_tokens - 1  # decode: the tokens after the first
        self.seconds += usage.total_s - usage.ttft_s
        self.verifies += usage.verify_calls
        self.accepted += usage.accepted_tokens
        for j in range(4):
            self.attempts[j] += after[0][j] - before[0][j]
            self.accepts[j] += after[1][j] - before[1][j]

    @property
    def tps(self) -> float:
        return self.tokens / self.seconds if self.seconds else 0.0


def counters(eng: Engine):
    return eng.call(lambda: (list(eng.speculation.attempts), list(eng.speculation.accepts)))


def run(engines: dict, temperature: float, gen_tokens: int) -> dict[str, Tally]:
    tallies = {label: Tally() for label, _, _ in VARIANTS}
    for i, (name, prompt) in enumerate(PROMPTS.items()):
        order = VARIANTS[i % len(VARIANTS):] + VARIANTS[:i % len(VARIANTS)]  # rotate: no fixed slot
        for label, which, depth in order:
            eng = engines[which]
            params = SamplingParams(max_tokens=gen_tokens, temperature=temperature, seed=i, depth=depth)
            before = counters(eng)
            usage = eng.generate(prompt, params).usage
            tallies[label].add(usage, before, counters(eng))
            print(f"  T={temperature} {name:8} {label:11} {usage.completion_tokens:3d} tok "
                  f"{usage.decode_tps:5.1f} tok/s", file=sys.stderr, flush=True)
    return tallies


def table(results: dict[float, dict[str, Tally]]) -> str:
    lines = [f"{'variant':11} {'T':>4} {'tok/s':>6} {'speedup':>7} {'acc/step':>8}  acceptance at position 1..3"]
    for temperature, tallies in results.items():
        plain = tallies["plain"].tps
        for label, t in tallies.items():
            acc = "  ".join(f"{a / n:4.0%}" if n else "   -" for a, n in zip(t.accepts[:3], t.attempts[:3]))
            per_step = f"{t.accepted / t.verifies:8.2f}" if t.verifies else f"{'-':>8}"
            lines.append(f"{label:11} {temperature:4.1f} {t.tps:6.2f} {t.tps / plain:6.2f}x {per_step}  {acc}")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="gemma-3-270m")
    ap.add_argument("--gen-tokens", type=int, default=96)
    ap.add_argument("--head", help="a trained head file (default: the bundled one / next to the model)")
    args = ap.parse_args()
    config = dict(progress=False, max_batch=1)
    engines = {"base": Engine.load(args.model, EngineConfig(drafter="ngram", **config)),
               "mtp": Engine.load(args.model, EngineConfig(drafter="mtp", mtp_head=args.head, **config))}
    head = engines["mtp"].runner.head
    print(f"model {args.model}; MTP head draft vocabulary "
          f"{head.draft_vocab.size if head.draft_vocab is not None else 'full'}; {args.gen_tokens} tokens per run")
    for eng in engines.values():  # warm-up: compile paths and prefill every prompt once
        for prompt in PROMPTS.values():
            eng.generate(prompt, SamplingParams(max_tokens=8, temperature=0.0, depth=2))
    results = {t: run(engines, t, args.gen_tokens) for t in (0.0, 0.6)}
    print(table(results))
    for eng in engines.values():
        eng.close()


if __name__ == "__main__":
    main()
