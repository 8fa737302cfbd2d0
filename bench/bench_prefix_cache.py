"""Prefix KV cache: TTFT cold / hot / SSD-after-restart, and an agent-style session.

    .venv/bin/python bench/bench_prefix_cache.py [--model gemma-3-270m]

1. TTFT of a 2,000-token prompt: cold (empty cache), hot (RAM hit), and SSD hit
   in a new process after the first exited (targets: hot <= 1/10, SSD <= 1/5 of cold).
2. A 10-turn agent session behind a shared ~1,900-token system prompt, where each
   turn sends the model's own previous replies (32 tokens) back, as agents do: cache
   reuse (cached prompt tokens / prompt tokens, over all turns and over turns 2-10, the
   ones that can reuse anything; target >= 97% there) and total time against the
   same run with the cache off (whose replies must be identical), and against
   mlx_lm.server (which keeps an in-memory prompt cache) on 127.0.0.1 with the same
   weights, the same BLAS and the same conversation.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import engine  # noqa: E402
from engine import Engine, EngineConfig, SamplingParams  # noqa: E402
from engine.cpu import backend  # noqa: E402
from mlx_lm_baseline import mlx_lm_server, post  # noqa: E402

TOOLS = "\n".join(
    f"- tool `{name}_{i}`: {desc} Arguments: path (string), limit (integer, optional), "
    f"recursive (boolean, default false). Returns a JSON object with the fields status, items "
    f"and next_cursor." for i in range(12)
    for name, desc in (("read_file", "Read a file from the workspace and return its lines."),
                       ("search", "Search the workspace for a regular expression."),
                       ("run_tests", "Run the test suite and report failures.")))
SYSTEM = ("You are a careful coding agent working in a repository. Use the tools below; think "
          "before acting; keep answers short.\n\nTools:\n" + TOOLS)
TURNS = [f"Step {i}: look at module_{i}.py and tell me what to change next." for i in range(10)]


def conversation(replies: list[str]) -> list[dict]:
    """The next turn's messages, after the model's `replies` to the earlier turns."""
    messages = [{"role": "system", "content": SYSTEM}]
    for i in range(len(replies) + 1):
        messages.append({"role": "user", "content": TURNS[i]})
        if i < len(replies):
            messages.append({"role": "assistant", "content": replies[i]})
    return messages


def ttft_worker(model: str, cache_dir: str, prompt_tokens: int) -> dict:
    """In this process: TTFT of the long prompt, twice (the second is a RAM hit)."""
    with Engine.load(model, EngineConfig(cache_dir=cache_dir, progress=False)) as eng:
        ids = eng.encode(SYSTEM * 4)[:prompt_tokens]
        first = eng.generate(ids, SamplingParams(max_tokens=1)).usage
        second = eng.generate(ids, SamplingParams(max_tokens=1)).usage
        eng.prefix_cache.ssd.flush()
    return {"first_ttft": first.ttft_s, "first_cached": first.cached_tokens,
            "second_ttft": second.ttft_s, "second_cached": second.cached_tokens,
            "prompt_tokens": first.prompt_tokens}


def run_ttft_worker(model, cache_dir, prompt_tokens) -> dict:
    out = subprocess.run([sys.executable, __file__, "--ttft-worker", model, cache_dir,
                          str(prompt_tokens)], capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def agent_session(eng: Engine, max_tokens: int) -> dict:
    t0 = time.perf_counter()
    replies, usages = [], []
    for _ in TURNS:
        c = eng.generate(conversation(replies), SamplingParams(max_tokens=max_tokens))
        replies.append(c.text)
        usages.append(c.usage)
    later = usages[1:]
    return {"seconds": time.perf_counter() - t0, "replies": replies,
            "prompt_tokens": sum(u.prompt_tokens for u in usages),
            "cached": sum(u.cached_tokens for u in usages),
            "later_prompt_tokens": sum(u.prompt_tokens for u in later),
            "later_cached": sum(u.cached_tokens for u in later)}


def server_session(model_dir: Path, max_tokens: int, replies: list[str]) -> float:
    """The same conversation (the engine's replies) against mlx_lm.server."""
    with mlx_lm_server(model_dir, backend._state["blas"]) as base:  # the engine's BLAS too
        t0 = time.perf_counter()
        for turn in range(len(TURNS)):
            post(base, "/v1/chat/completions", {"model": str(model_dir),
                                                "messages": conversation(replies[:turn]),
                                                "max_tokens": max_tokens, "temperature": 0.0})
        return time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default=engine.DEFAULT_MODEL)
    ap.add_argument("--prompt-tokens", type=int, default=2000)
    ap.add_argument("--max-tokens", type=int, default=32)
    ap.add_argument("--block-size", type=int, default=EngineConfig.block_size)
    ap.add_argument("--ttft-worker", nargs=3)
    ap.add_argument("--skip-ttft", action="store_true", help="only the agent session")
    args = ap.parse_args()
    if args.ttft_worker:
        print(json.dumps(ttft_worker(args.ttft_worker[0], args.ttft_worker[1],
                                     int(args.ttft_worker[2]))))
        return

    if not args.skip_ttft:
        ttft(args)
    agent(args)


def ttft(args) -> None:
    with tempfile.TemporaryDirectory() as cache_dir:
        first = run_ttft_worker(args.model, cache_dir, args.prompt_tokens)
        restarted = run_ttft_worker(args.model, cache_dir, args.prompt_tokens)
    cold, hot, ssd = first["first_ttft"], first["second_ttft"], restarted["first_ttft"]
    print(f"## TTFT of a {first['prompt_tokens']}-token prompt")
    print(f"cold (nothing cached)      {cold * 1000:8.0f} ms")
    print(f"hot (RAM hit, {first['second_cached']} cached)  {hot * 1000:8.0f} ms   "
          f"{hot / cold:.3f} of cold (target <= 0.10)")
    print(f"SSD hit after restart      {ssd * 1000:8.0f} ms   {ssd / cold:.3f} of cold "
          f"(target <= 0.20; {restarted['first_cached']} tokens read from SSD)")


def agent(args) -> None:
    print(f"\n## Agent session: {len(TURNS)} turns behind a shared system prompt, "
          f"the model's own replies fed back ({args.max_tokens} tokens per reply, "
          f"block size {args.block_size})")
    with tempfile.TemporaryDirectory() as cache_dir:
        with Engine.load(args.model, EngineConfig(cache_dir=cache_dir, progress=False,
                                                  block_size=args.block_size)) as eng:
            model_dir = eng.model_path
            system_tokens = len(eng.encode(SYSTEM))
            on = agent_session(eng, args.max_tokens)
        with Engine.load(args.model, EngineConfig(prefix_cache=False, progress=False,
                                                  block_size=args.block_size)) as eng:
            off = agent_session(eng, args.max_tokens)
    assert on["replies"] == off["replies"], "cache on changed the replies"
    print(f"system prompt ~{system_tokens} tokens; {on['prompt_tokens']} prompt tokens in all")
    print(f"cache reuse, all turns     {on['cached'] / on['prompt_tokens']:8.1%}")
    print(f"cache reuse, turns 2-{len(TURNS)}     {on['later_cached'] / on['later_prompt_tokens']:8.1%}"
          f"   (target >= 97%; replies identical to cache off)")
    print(f"engine, cache on           {on['seconds']:8.1f} s")
    print(f"engine, cache off          {off['seconds']:8.1f} s   on/off speedup {off['seconds'] / on['seconds']:.2f}x",
          flush=True)
    try:
        server = server_session(model_dir, args.max_tokens, on["replies"])
    except OSError as e:  # e.g. a converted GGUF that keeps its quantized blocks: not mlx-lm's format
        print(f"mlx_lm.server              could not serve {model_dir.name}: {e}")
        return
    print(f"mlx_lm.server (same BLAS)  {server:8.1f} s   engine speedup {server / on['seconds']:.2f}x")


if __name__ == "__main__":
    main()
