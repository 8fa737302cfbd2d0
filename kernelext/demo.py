"""`make demo`, first part: load the default model and print completions with their statistics.

The default model (Gemma 3 270M from the GGUF package) is a base model, not a chat
model, so the demo prompts it the way a base model is prompted: with text to continue.
"""

from __future__ import annotations

import sys

import engine
from engine import Engine, EngineConfig, SamplingParams

PROMPTS = [
    "The capital of France is the city of",
    "def fibonacci(n):\n    \"\"\"Return the n-th Fibonacci number.\"\"\"\n",
]


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    model = argv[0] if argv else engine.DEFAULT_MODEL
    print(f"kernelext demo: loading {model} (the first run converts the GGUF once, then it is cached)")
    with Engine.load(model, EngineConfig()) as eng:
        m = eng.metrics()
        print(f"backend {m['backend']}, BLAS {m['blas']}, dtype {m['dtype']}, max batch "
              f"{m['max_batch']}, drafter {m['spec_drafter']}")
        for prompt in PROMPTS:
            print(f"\n>>> {prompt}", end="", flush=True)
            for delta in eng.stream(prompt, SamplingParams(max_tokens=48)):
                print(delta.text, end="", flush=True)
                if delta.finish_reason:
                    u = delta.usage
                    print(f"\n[finish {delta.finish_reason} · prompt {u.prompt_tokens} tokens, "
                          f"cached {u.cached_tokens} · generated {u.completion_tokens} · TTFT "
                          f"{u.ttft_s * 1000:.0f} ms · decode {u.decode_tps:.1f} tok/s"
                          + (f" · draft acceptance {u.acceptance_rate:.0%}"
                             if u.acceptance_rate is not None else "") + "]")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
