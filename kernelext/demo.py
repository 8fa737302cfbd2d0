"""`make demo`: load the default model and print a completion with its statistics."""

from __future__ import annotations

import sys

import engine
from engine import Engine, EngineConfig, SamplingParams


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    model = argv[0] if argv else engine.DEFAULT_MODEL
    print(f"kernelext demo: loading {model} (first run converts the GGUF once, then it is cached)")
    with Engine.load(model, EngineConfig()) as eng:
        m = eng.metrics()
        print(f"backend {m['backend']}, BLAS {m['blas']}, dtype {m['dtype']}, max batch {m['max_batch']}")
        prompt = [{"role": "user", "content": "What is the capital of France? Answer in one sentence."}]
        print("\n>>> " + prompt[0]["content"])
        for delta in eng.stream(prompt, SamplingParams(max_tokens=48)):
            print(delta.text, end="", flush=True)
            if delta.finish_reason:
                u = delta.usage
                print(f"\n\nfinish: {delta.finish_reason}")
                print(f"prompt tokens {u.prompt_tokens}, cached {u.cached_tokens}, generated "
                      f"{u.completion_tokens}, TTFT {u.ttft_s * 1000:.0f} ms, "
                      f"prefill {u.prefill_tps:.0f} tok/s, decode {u.decode_tps:.1f} tok/s")
        raw = eng.generate("The capital of France is", SamplingParams(max_tokens=12))
        print(f"\n>>> The capital of France is{raw.text}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
