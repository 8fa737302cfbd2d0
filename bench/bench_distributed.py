"""One model across 1 vs 2 ranks on this machine (engine/distributed), reported only.

    flock /tmp/kernelext-bench.lock .venv/bin/python bench/bench_distributed.py [--rounds 2]

This machine has 2 cores shared with other jobs, so two ranks on 127.0.0.1 split the
same cores rather than adding any: the figures show the cost of the plan and of the
ring on loopback, not a speed-up. Printed side by side in one run:

1. decode tok/s of a random-weight Llama-shaped model (hidden 2048, 8 layers, 16/8
   heads, MLP 5632, vocab 768: 378M parameters, 1.5 GB in float32), batch 1 and 4,
   in one process and split by tensor parallelism over 2 ranks; the 2-rank outputs
   are checked against the 1-rank ones (greedy).
2. the ring's all_sum latency on loopback for the message sizes one decode step
   sends (2 per layer: batch x hidden x 4 bytes; and a 128-token prefill chunk),
   from 2 processes started by mlx.launch itself (min and median of 200 calls).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))

SHAPE = dict(hidden_size=2048, num_hidden_layers=8, num_attention_heads=16, num_key_value_heads=8,
             head_dim=128, intermediate_size=5632)
PROMPT = "def fibonacci(n):\n    if n < 2:\n        return n\n    return fibonacci(n - 1)\n" * 3
GEN_TOKENS = 32


def decode_child(model: str, hostfile: str | None, batches: list[int], rounds: int) -> dict:
    """In this process: decode tok/s per batch size (best of `rounds`), and the tokens."""
    from engine import Engine, EngineConfig, SamplingParams

    config = EngineConfig(progress=False, hostfile=hostfile, drafter="none", prefix_cache=False,
                          cache_replies=False)
    out = {}
    with Engine.load(model, config) as eng:
        eng.generate(PROMPT, max_tokens=4)  # warm-up
        for batch in batches:
            best = 0.0
            for _ in range(rounds):
                params = SamplingParams(max_tokens=GEN_TOKENS, temperature=0)
                handles = [eng.submit(PROMPT + f"# {i}\n", params) for i in range(batch)]
                first = [next(iter(h)) for h in handles]  # every row is decoding
                start = time.perf_counter()
                done = [h.result() for h in handles]
                elapsed = time.perf_counter() - start
                decoded = sum(len(c.token_ids) - len(f.token_ids) for c, f in zip(done, first))
                best = max(best, decoded / elapsed)
            out[str(batch)] = {"tok_s": best, "tokens": [c.token_ids for c in done]}
    return out


def allreduce_child(sizes: list[int], iters: int) -> None:
    """Run by mlx.launch on 2 local ranks: median all_sum time per message size."""
    import engine  # noqa: F401  (the BLAS first)
    import mlx.core as mx

    group = mx.distributed.init(backend="ring", strict=True)
    result = {}
    for size in sizes:
        x = mx.ones((size // 4,), dtype=mx.float32)
        mx.eval(mx.distributed.all_sum(x, group=group))
        times = []
        for _ in range(iters):
            t = time.perf_counter()
            mx.eval(mx.distributed.all_sum(x, group=group))
            times.append(time.perf_counter() - t)
        times.sort()
        result[str(size)] = [times[0], times[len(times) // 2]]
    if group.rank() == 0:
        print("RESULT " + json.dumps(result), flush=True)


def run_json(command: list[str], env=None) -> dict:
    proc = subprocess.run(command, capture_output=True, text=True, cwd=ROOT,
                          env={**os.environ, "PYTHONPATH": str(ROOT), **(env or {})})
    lines = [line for line in proc.stdout.splitlines() if line.startswith("RESULT ")]
    if proc.returncode != 0 or not lines:
        raise SystemExit(f"{' '.join(command)} failed:\n{proc.stdout}\n{proc.stderr[-3000:]}")
    return json.loads(lines[-1][len("RESULT "):])


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--batches", default="1,4")
    parser.add_argument("--child", choices=("decode", "allreduce"))
    parser.add_argument("--model")
    parser.add_argument("--hostfile")
    args = parser.parse_args()
    batches = [int(b) for b in args.batches.split(",")]
    if args.child == "decode":
        print("RESULT " + json.dumps(decode_child(args.model, args.hostfile, batches, args.rounds)))
        return
    sizes = [4 * 2048 * b for b in (1, 4, 128)]  # decode batch 1, 4; one 128-token prefill chunk
    if args.child == "allreduce":
        allreduce_child(sizes, 200)
        return

    from tiny_models import write_tiny_model

    with tempfile.TemporaryDirectory() as d:
        model = write_tiny_model("llama", Path(d) / "llama-2048x8", seed=0, shape=SHAPE)
        hostfile = Path(d) / "hosts.json"
        hostfile.write_text(json.dumps([{"ssh": "127.0.0.1", "ips": ["127.0.0.1"]}] * 2))
        me = [sys.executable, __file__, "--rounds", str(args.rounds), "--batches", args.batches,
              "--model", str(model)]
        one = run_json([*me, "--child", "decode"])
        two = run_json([*me, "--child", "decode", "--hostfile", str(hostfile)])
        launcher = str(Path(sys.executable).parent / "mlx.launch")  # the mlx wheel's entry point
        ring = run_json([launcher, "--hosts", "127.0.0.1,127.0.0.1", "--backend", "ring",
                         "--python", sys.executable, "--", __file__, "--child", "allreduce"])
    print(f"model: random llama {SHAPE}, float32, greedy, {GEN_TOKENS} tokens per request; "
          f"load average {os.getloadavg()[0]:.1f}")
    print("| batch | 1 rank tok/s | 2 ranks tok/s | 2 / 1 | same tokens |")
    print("|---|---|---|---|---|")
    for b in batches:
        a, c = one[str(b)], two[str(b)]
        print(f"| {b} | {a['tok_s']:.2f} | {c['tok_s']:.2f} | {c['tok_s'] / a['tok_s']:.2f}x | "
              f"{a['tokens'] == c['tokens']} |")
    print("ring all_sum on 127.0.0.1, 2 ranks, 200 calls, min / median:",
          ", ".join(f"{int(s) // 1024} KB {lo * 1e6:.0f} / {mid * 1e6:.0f} us"
                    for s, (lo, mid) in ring.items()))


if __name__ == "__main__":
    main()
