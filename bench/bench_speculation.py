"""Speculative decoding with the n-gram drafter: speedup over plain decoding.

    .venv/bin/python bench/bench_speculation.py [--model gemma-3-270m] [--rounds 2]

On the default model, side by side in one run (interleaved, so machine noise
hits both alike):
  1. a code-editing task (rewrite a ~60-line function with a small change) at
     temperature 0 and 0.6: decode tok/s with speculation vs AR (target >= 2x);
  2. prose at temperature 0.6: adaptive depth must not lose (target >= 0.95x);
  3. batch 1, 4 and 8 of the code task: speculation on vs off.
AR runs use generation_mode="ar" on the same engine; exactness is checked too
(with the same seed, outputs must be identical at every temperature).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import engine  # noqa: E402  (fast BLAS before mlx)
from engine import Engine, EngineConfig, SamplingParams  # noqa: E402

FUNCTION = '''def summarize_orders(orders, currency="EUR", include_refunds=False):
    """Summarize a list of order dicts into totals per customer and per day."""
    per_customer = {}
    per_day = {}
    refunds = 0.0
    skipped = 0
    for order in orders:
        if order.get("currency") != currency:
            skipped += 1
            continue
        customer = order["customer"]
        day = order["date"][:10]
        amount = float(order["amount"])
        if amount < 0:
            refunds += -amount
            if not include_refunds:
                continue
        per_customer.setdefault(customer, 0.0)
        per_customer[customer] += amount
        per_day.setdefault(day, 0.0)
        per_day[day] += amount
    top_customers = sorted(per_customer.items(), key=lambda kv: kv[1], reverse=True)
    busiest_days = sorted(per_day.items(), key=lambda kv: kv[1], reverse=True)
    total = sum(per_customer.values())
    average = total / len(per_customer) if per_customer else 0.0
    report = {
        "currency": currency,
        "total": round(total, 2),
        "average_per_customer": round(average, 2),
        "refunds": round(refunds, 2),
        "skipped": skipped,
        "top_customers": top_customers[:5],
        "busiest_days": busiest_days[:5],
    }
    return report


def format_report(report):
    """Render a report produced by summarize_orders as plain text."""
    lines = []
    lines.append(f"Total: {report['total']} {report['currency']}")
    lines.append(f"Average per customer: {report['average_per_customer']}")
    lines.append(f"Refunds: {report['refunds']}")
    lines.append(f"Skipped orders: {report['skipped']}")
    lines.append("Top customers:")
    for name, amount in report["top_customers"]:
        lines.append(f"  {name}: {amount}")
    lines.append("Busiest days:")
    for day, amount in report["busiest_days"]:
        lines.append(f"  {day}: {amount}")
    return "\\n".join(lines)
'''

CODE_TASK = [{"role": "user", "content": "Here is some Python code:\n\n```python\n" + FUNCTION
              + "```\n\nRewrite the code above, renaming the parameter `currency` to `unit`. "
                "Output the complete code."}]
PROSE_TASK = [{"role": "user", "content": "Write a short story about a lighthouse keeper "
                                           "who finds a message in a bottle."}]


def decode_tps(eng: Engine, prompt, n: int, params: SamplingParams) -> tuple[float, list]:
    handles = [eng.submit(prompt, params) for _ in range(n)]
    results = [h.result() for h in handles]
    tokens = sum(r.usage.completion_tokens - 1 for r in results)
    span = max(r.usage.total_s - r.usage.ttft_s for r in results)
    return tokens / span, results


def compare(eng, prompt, n, temperature, max_tokens, rounds, seed=0):
    spec_p = SamplingParams(max_tokens=max_tokens, temperature=temperature, seed=seed)
    ar_p = SamplingParams(max_tokens=max_tokens, temperature=temperature, seed=seed,
                          generation_mode="ar")
    spec, ar, acc = [], [], []
    for _ in range(rounds):
        a, ar_res = decode_tps(eng, prompt, n, ar_p)
        s, spec_res = decode_tps(eng, prompt, n, spec_p)
        ar.append(a)
        spec.append(s)
        acc += [r.usage.acceptance_rate or 0.0 for r in spec_res]
        # n-gram drafts are verified by coupling: same seed, same tokens, at any temperature.
        assert [r.token_ids for r in spec_res] == [r.token_ids for r in ar_res], \
            "speculation changed the output"
    return statistics.median(ar), statistics.median(spec), statistics.mean(acc)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default=engine.DEFAULT_MODEL)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--max-tokens", type=int, default=160)
    args = ap.parse_args()
    eng = Engine.load(args.model, EngineConfig(drafter="ngram", depth="auto"))
    print(f"model {args.model}, drafter ngram, depth auto (max {eng.config.max_depth})")
    # Warm up: prefill both prompts into the prefix cache, compile shapes.
    decode_tps(eng, CODE_TASK, 1, SamplingParams(max_tokens=8))
    decode_tps(eng, PROSE_TASK, 1, SamplingParams(max_tokens=8))
    print(f"\n{'task':28} {'AR tok/s':>9} {'spec tok/s':>11} {'speedup':>8} {'accept':>7}  target")
    rows = [("code edit, T=0, batch 1", CODE_TASK, 1, 0.0, ">= 2x"),
            ("code edit, T=0.6, batch 1", CODE_TASK, 1, 0.6, ">= 2x"),
            ("prose, T=0.6, batch 1", PROSE_TASK, 1, 0.6, ">= 0.95x"),
            ("code edit, T=0, batch 4", CODE_TASK, 4, 0.0, ""),
            ("code edit, T=0, batch 8", CODE_TASK, 8, 0.0, "")]
    for label, prompt, n, temp, target in rows:
        t0 = time.perf_counter()
        ar, spec, acc = compare(eng, prompt, n, temp, args.max_tokens, args.rounds)
        print(f"{label:28} {ar:9.2f} {spec:11.2f} {spec / ar:7.2f}x {acc:7.0%}  {target}"
              f"   ({time.perf_counter() - t0:.0f}s)", flush=True)
    m = eng.metrics()
    print("\nacceptance per draft position:",
          ", ".join(f"{a:.0%}" for a in m["spec_acceptance_per_position"]))
    eng.close()


if __name__ == "__main__":
    main()
