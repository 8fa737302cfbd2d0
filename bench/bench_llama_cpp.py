"""kernelext against llama.cpp on the CPU, side by side in one run, on the same GGUF.

    .venv/bin/python bench/bench_llama_cpp.py [--rounds 3] [--skip-accuracy] [--skip-qwen] [--cpp-threads 2]
    .venv/bin/python bench/bench_llama_cpp.py --agent-loop-only   # the agent loop's rows alone

llama.cpp is built from the sources inside PyPI's llama-cpp-python sdist into build/llama.cpp
(bench/anchor.py; a finished build is reused). If it cannot be built, the bench says so and
prints kernelext's figures alone. kernelext uses 2 threads; llama.cpp is measured at -t 2 and
-t 1 and compared at its better count (on a shared machine its 2 threads can stall each other
at every barrier). Both decode plainly (no speculation; kernelext's drafter: --drafter). The machine is shared and noisy: the measurements of
the two sides are interleaved round by round, and ratios are what to compare.

Rows, on the default model's GGUF (Gemma 3 270M, Q4_K_M):
  decode tok/s at 1 stream (llama-bench) and at 8 streams (llama-batched-bench), prefill of
  512 tokens (llama-bench), peak RSS of the single-stream run, load time (spawn of a server
  until it answers), 8 HTTP clients x 128 tokens (vs `llama-server -np 8`), and a 10-turn
  agent loop over /v1/completions (a ~2,000-token system prompt, 32-token replies fed back
  verbatim): time, share of prompt tokens reused, and kernelext's replies checked identical
  to a cache-off server's.
Then where one batch-1 decode step's time goes (inside and outside the matrix products),
the accuracy of kernelext's weights against a float32-dequantized reference on >= 20k tokens
of text that ships with Python (with llama-perplexity on the same file), and a random-weight
model of Qwen3-1.7B's shape (Q4_K_M via llama-quantize, and a 4-bit mlx-lm directory).
"""

from __future__ import annotations

import argparse
import atexit
import gc
import json
import os
import shutil
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import engine  # noqa: E402  (sets the BLAS up before mlx loads)
from engine import Engine, EngineConfig, SamplingParams  # noqa: E402

import llama_cpp_runs  # noqa: E402
import measure  # noqa: E402
from anchor import AnchorUnavailable, ensure_llama_cpp  # noqa: E402
from bench_engine import http_concurrent, prompts  # noqa: E402

WORK = Path(__file__).resolve().parent.parent / "build" / "bench"  # git-ignored scratch
def default_gguf() -> Path:
    """The default model's GGUF file, assembled from its PyPI packages (the engine does the same)."""
    from engine.models.store import _default_gguf, default_model_cache_dir

    return _default_gguf(default_model_cache_dir(), progress=False)


# -- a table of rows: kernelext, llama.cpp, ratio ------------------------------------------

class Table:
    def __init__(self, title: str):
        self.rows: list[tuple] = []
        print(f"\n## {title}", flush=True)

    def add(self, name: str, ours, theirs, unit: str, higher_is_better: bool = True,
            target: str = "") -> None:
        """Print one row at once (partial results survive a later failure)."""
        def fmt(v):
            return "n/a" if v is None else (f"{v:,.1f}" if isinstance(v, float) else str(v))
        ratio = ""
        if isinstance(ours, (int, float)) and isinstance(theirs, (int, float)) and theirs:
            r = ours / theirs
            ratio = f"{r:.2f}x" + ("" if higher_is_better else " (lower is better)")
        self.rows.append((name, ours, theirs, ratio))
        print(f"{name:38} {fmt(ours):>12} {fmt(theirs):>12} {unit:8} {ratio:>24}  {target}", flush=True)

    @staticmethod
    def header() -> None:
        print(f"{'':38} {'kernelext':>12} {'llama.cpp':>12} {'':8} {'ratio kernelext/llama.cpp':>24}")


# -- kernelext in this process: single stream, prefill, 8 streams --------------------------

def engine_single(eng: Engine, prompt_ids: list[int], gen_tokens: int) -> tuple[float, float]:
    """(prefill tok/s of prompt_ids alone, decode tok/s of gen_tokens after a short prompt)."""
    prefill = eng.generate(prompt_ids, SamplingParams(max_tokens=1)).usage.prefill_tps
    decode = eng.generate(prompts(1)[0], SamplingParams(max_tokens=gen_tokens)).usage.decode_tps
    return prefill, decode


def engine_streams(eng: Engine, n: int, gen_tokens: int) -> float:
    """Aggregate decode tok/s while n requests decode together (after all have prefilled)."""
    params = SamplingParams(max_tokens=gen_tokens)
    results = [h.result() for h in [eng.submit(p, params) for p in prompts(n)]]
    firsts = [r.usage.ttft_s for r in results]
    ends = [r.usage.total_s for r in results]
    span = max(ends) - max(firsts)
    tokens = sum(r.usage.completion_tokens - 1 for r in results)
    return tokens / span if span > 0 else 0.0


def long_prompt_ids(eng: Engine, n: int) -> list[int]:
    text = " ".join(f"Paragraph {i}: the quick brown fox jumps over the lazy dog." for i in range(n))
    return eng.encode(text)[:n]


# -- kernelext server in its own process (load time and peak RSS measured from outside) --------

def start_kernelext_server(cache_dir: str, prefix_cache: bool, drafter: str) -> measure.Server:
    port = measure.free_port()
    cmd = [sys.executable, __file__, "--serve-worker", str(port), cache_dir,
           "1" if prefix_cache else "0", drafter]
    return measure.start_server("kernelext" + ("" if prefix_cache else " (cache off)"), cmd, port)


def serve_worker(port: int, cache_dir: str, prefix_cache: bool, drafter: str) -> None:
    from kernelext.server.runner import start_server

    eng = Engine.load(engine.DEFAULT_MODEL, EngineConfig(
        max_batch=16, prefix_cache=prefix_cache, cache_dir=cache_dir, drafter=drafter, progress=False))
    start_server(eng, port=port)
    threading.Event().wait()  # until SIGTERM


def agent_system_prompt(count_tokens, target: int = 2000) -> str:
    """A coding agent's system prompt of about `target` tokens: instructions and a tool list."""
    lines = ["You are a careful coding agent working in a repository. Use the tools below; think "
             "before acting; keep answers short.", "", "Tools:"]
    kinds = (("read_file", "Read a file from the workspace and return its lines."),
             ("search", "Search the workspace for a regular expression."),
             ("run_tests", "Run the test suite and report failures."))
    i = 0
    while count_tokens("\n".join(lines)) < target:
        name, desc = kinds[i % 3]
        lines.append(f"- tool `{name}_{i}`: {desc} Arguments: path (string), limit (integer, "
                     f"optional), recursive (boolean, default false). Returns a JSON object with "
                     f"the fields status, items and next_cursor.")
        i += 1
    return "\n".join(lines)


def agent_loop(base: str, system: str, turns: int, reply_tokens: int) -> dict:
    """A 10-turn agent: each prompt is the previous one plus the model's reply, verbatim, and
    the next user message, over /v1/completions."""
    prompt, replies = system, []
    prompt_tokens = cached = first_prompt_tokens = first_cached = 0
    t0 = time.perf_counter()
    for turn in range(turns):
        if turn == 1:  # turn 1 has nothing to reuse: the later turns are reported apart too
            first_prompt_tokens, first_cached = prompt_tokens, cached
        prompt += f"\n\nUser: Step {turn}: look at module_{turn}.py and tell me what to change next.\nAssistant:"
        r = measure.post(base, "/v1/completions", {"prompt": prompt, "max_tokens": reply_tokens,
                                                   "temperature": 0.0})
        reply = r["choices"][0]["text"]
        replies.append(reply)
        prompt += reply
        prompt_tokens += r["usage"]["prompt_tokens"]
        cached += (r["usage"].get("prompt_tokens_details") or {}).get("cached_tokens") or 0
    later = prompt_tokens - first_prompt_tokens
    return {"seconds": time.perf_counter() - t0, "prompt_tokens": prompt_tokens,
            "reused": cached / prompt_tokens if prompt_tokens else 0.0,
            "reused_later": (cached - first_cached) / later if later else 0.0, "replies": replies}


# -- the run ---------------------------------------------------------------------------------

def choose_threads(cpp, gguf: Path, forced: int | None = None) -> int:
    """llama.cpp's faster thread count right now: a short decode at each (bounded in time);
    `forced` (--cpp-threads): that count, as the probe can tie on a busy machine."""
    if forced:
        print(f"llama.cpp compared at -t {forced} (--cpp-threads)")
        return forced
    speed = {}
    for threads in llama_cpp_runs.THREAD_CHOICES:
        run = anchor_call(llama_cpp_runs.llama_bench, cpp, gguf, 0, 16, threads, 180)
        speed[threads] = run.decode_tps if run is not None else 0.0
    best = max(speed, key=speed.get)
    print("llama.cpp probe, 16 tokens: " + ", ".join(f"-t {t}: {v:.1f} tok/s" for t, v in speed.items())
          + f"; compared at -t {best}")
    return best


def anchor_call(fn, *args):
    """A llama.cpp measurement, or None (said why) if it failed or timed out."""
    try:
        return fn(*args)
    except Exception as e:
        print(f"llama.cpp: {fn.__name__} failed: {str(e).strip().splitlines()[-1][:200]}")
        return None


def median(xs):
    xs = [x for x in xs if x is not None]
    return statistics.median(xs) if xs else None


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--prompt-tokens", type=int, default=512)
    ap.add_argument("--gen-tokens", type=int, default=128)
    ap.add_argument("--streams", type=int, default=8)
    ap.add_argument("--drafter", default="none", help="kernelext's drafter (none = plain decoding)")
    ap.add_argument("--skip-http", action="store_true")
    ap.add_argument("--skip-steps", action="store_true")
    ap.add_argument("--skip-accuracy", action="store_true")
    ap.add_argument("--skip-qwen", action="store_true")
    ap.add_argument("--accuracy-chunks", type=int, default=40, help="chunks of 512 tokens (40: 20,480)")
    ap.add_argument("--identity-turns", type=int, default=10,
                    help="agent-loop turns replayed on a cache-off server to check identical output")
    ap.add_argument("--agent-loop-only", action="store_true",
                    help="only the 10-turn agent loop against llama-server (and its cache-off replay)")
    ap.add_argument("--cpp-threads", type=int, choices=llama_cpp_runs.THREAD_CHOICES,
                    help="compare llama.cpp at this thread count (default: its faster one in a short probe)")
    ap.add_argument("--serve-worker", nargs=4, help=argparse.SUPPRESS)
    ap.add_argument("--rss-worker", nargs=3, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.serve_worker:
        port, cache_dir, on, drafter = args.serve_worker
        serve_worker(int(port), cache_dir, on == "1", drafter)
        return
    if args.rss_worker:
        print(json.dumps(rss_worker(*args.rss_worker)))
        return

    gguf = default_gguf()
    try:
        cpp = ensure_llama_cpp()
        print(f"llama.cpp: built from llama-cpp-python {cpp.version} ({cpp.bin_dir})")
    except AnchorUnavailable as e:
        cpp = None
        print(f"llama.cpp: NOT AVAILABLE, the build failed: {e}\n(kernelext's figures alone follow)")
    print(f"load average at start (other jobs on this machine): {os.getloadavg()[0]:.1f} "
          f"on {os.cpu_count()} cores")
    print(f"model: {gguf.name}; kernelext on {llama_cpp_runs.THREADS} threads, llama.cpp at -t "
          f"{' and -t '.join(map(str, llama_cpp_runs.THREAD_CHOICES))} (compared at its best); "
          f"kernelext drafter {args.drafter!r}; {args.rounds} interleaved rounds, medians")

    if args.agent_loop_only:
        agent_loop_only(cpp, gguf, args)
        return
    eng = Engine.load(engine.DEFAULT_MODEL, EngineConfig(
        max_batch=16, prefix_cache=False, drafter=args.drafter, progress=False))
    m = eng.metrics()
    packed = m.get("quantized_weight_bytes") or 0
    print(f"kernelext: backend {eng.backend}, "
          + (f"weights kept quantized for the CPU kernels ({packed / 1e6:,.0f} MB)" if packed
             else f"weights {m.get('dtype')} (not quantized)"))
    Table.header()

    # 1. single stream and prefill: kernelext in this process vs llama-bench, round by round,
    # llama.cpp at its better thread count (see llama_cpp_runs.THREAD_CHOICES).
    cpp_threads = choose_threads(cpp, gguf, args.cpp_threads) if cpp else llama_cpp_runs.THREADS
    ids = long_prompt_ids(eng, args.prompt_tokens)
    engine_single(eng, ids[:64], 8)  # warm-up
    ours, best = [], []
    for _ in range(args.rounds):
        ours.append(engine_single(eng, ids, args.gen_tokens))
        if cpp:
            run = anchor_call(llama_cpp_runs.llama_bench, cpp, gguf, args.prompt_tokens,
                              args.gen_tokens, cpp_threads)
            if run is not None:
                best.append(run)
    t = Table(f"Single stream (llama-bench -p {args.prompt_tokens} -n {args.gen_tokens} -t {cpp_threads})")
    t.add("decode, 1 stream", median(o[1] for o in ours),
          median(r.decode_tps for r in best), "tok/s", target="target >= 1.0x (1.3x)")
    t.add(f"prefill, {args.prompt_tokens} tokens", median(o[0] for o in ours),
          median(r.prefill_tps for r in best), "tok/s", target="target >= 1.0x")

    # 2. n streams decoding together.
    n = args.streams
    engine_streams(eng, n, 4)  # warm the shapes
    ours8, theirs8 = [], []
    for _ in range(args.rounds):
        ours8.append(engine_streams(eng, n, args.gen_tokens))
        if cpp:
            theirs8.append(anchor_call(llama_cpp_runs.batched_decode_tps, cpp, gguf, n, 16,
                                       args.gen_tokens, cpp_threads))
    t.add(f"decode, {n} streams (aggregate)", median(ours8), median(theirs8), "tok/s")

    # 3. peak RSS of one stream (prefill + decode), each in its own process.
    rss = run_rss_worker(args.prompt_tokens, args.gen_tokens, args.drafter)
    t.add("peak RSS, 1 stream", rss["peak_rss_mb"], median(r.peak_rss_mb for r in best) if cpp else None,
          "MB", higher_is_better=False, target="target <= 1.3x")
    t.add("Engine.load() in a fresh process", rss["load_s"], None, "s")

    if not args.skip_steps:
        step_cost(eng)
    if not args.skip_accuracy:
        import accuracy

        accuracy.report(eng, gguf, cpp, WORK, args.accuracy_chunks, cpp_threads)
    system = agent_system_prompt(lambda text: len(eng.encode(text)))
    system_tokens = len(eng.encode(system))
    eng.close()
    del eng  # the servers below run in their own processes: free this one's memory first
    gc.collect()
    import mlx.core as mx

    mx.clear_cache()

    args.cpp_threads = cpp_threads
    loop = http_section(cpp, gguf, args, system, system_tokens) if not args.skip_http else None
    if not args.skip_qwen:
        import qwen_shape

        qwen_shape.report(cpp, WORK / "qwen3-1.7b-shape", args.gen_tokens // 2, cpp_threads)
    if loop is not None and args.identity_turns:
        cache_off_identity(loop, args)
    print(f"\nload average at the end: {os.getloadavg()[0]:.1f}")


def run_rss_worker(prompt_tokens: int, gen_tokens: int, drafter: str) -> dict:
    out = measure.run([sys.executable, __file__, "--rss-worker", str(prompt_tokens), str(gen_tokens),
                       drafter])
    if out.returncode != 0:
        raise RuntimeError(f"kernelext RSS worker failed:\n{out.stderr[-2000:]}")
    result = json.loads(out.stdout.strip().splitlines()[-1])
    result["peak_rss_mb"] = out.peak_rss_mb
    return result


def rss_worker(prompt_tokens: str, gen_tokens: str, drafter: str) -> dict:
    """In a fresh process: load, prefill a prompt, decode (the llama-bench workload)."""
    t0 = time.perf_counter()
    with Engine.load(engine.DEFAULT_MODEL, EngineConfig(prefix_cache=False, drafter=drafter,
                                                        progress=False)) as eng:
        load_s = time.perf_counter() - t0
        eng.generate(long_prompt_ids(eng, int(prompt_tokens)), SamplingParams(max_tokens=int(gen_tokens)))
    return {"load_s": load_s}


def scratch_kv_dir() -> str:
    """A KV cache directory for the bench's servers, removed when the bench exits
    (~110 MB a run)."""
    path = tempfile.mkdtemp(prefix="kernelext-bench-kv-")
    atexit.register(shutil.rmtree, path, ignore_errors=True)
    return path


def http_section(cpp, gguf: Path, args, system: str, system_tokens: int) -> dict:
    """Servers in their own processes, as users start them; interleaved workloads."""
    cache_dir = scratch_kv_dir()
    ours = start_kernelext_server(cache_dir, True, args.drafter)
    theirs = (llama_cpp_runs.start_llama_server(cpp, gguf, args.streams, 4096, args.cpp_threads)
              if cpp else None)
    t = Table(f"HTTP servers on 127.0.0.1 (llama-server -np {args.streams} -t {args.cpp_threads})")
    t.add("load: spawn until serving", ours.ready_s, theirs.ready_s if theirs else None, "s",
          higher_is_better=False)
    try:
        a, b = [], []
        for _ in range(args.rounds):
            a.append(http_concurrent(ours.base, "default", args.streams, args.gen_tokens)["end_to_end_tps"])
            if theirs:
                b.append(http_concurrent(theirs.base, "default", args.streams, args.gen_tokens)["end_to_end_tps"])
        t.add(f"{args.streams} clients x {args.gen_tokens} tokens", median(a), median(b), "tok/s",
              target="target >= 2x")

        loop_a = agent_loop_rows(t, ours, theirs, system, system_tokens)
    finally:
        ours_rss = ours.stop()
        theirs_rss = theirs.stop() if theirs else None
    t.add("peak RSS of the server", ours_rss, theirs_rss, "MB", higher_is_better=False)
    return {"system": system, "replies": loop_a["replies"], "cache_dir": cache_dir}


def agent_loop_rows(t: Table, ours, theirs, system: str, system_tokens: int) -> dict:
    """The 10-turn agent loop on both servers: time and prompt tokens reused."""
    loop_a = agent_loop(ours.base, system, 10, 32)
    loop_b = agent_loop(theirs.base, system, 10, 32) if theirs else None
    print(f"agent loop: 10 turns over /v1/completions, a ~{system_tokens}-token system prompt, "
          f"32-token replies fed back verbatim")
    t.add("agent loop, 10 turns", loop_a["seconds"], loop_b["seconds"] if loop_b else None, "s",
          higher_is_better=False, target="target: faster than llama-server")
    t.add("  prompt tokens reused, all turns", f"{loop_a['reused']:.1%}",
          f"{loop_b['reused']:.1%}" if loop_b else None, "", target="turn 1 is cold")
    t.add("  prompt tokens reused, turns 2-10", f"{loop_a['reused_later']:.1%}",
          f"{loop_b['reused_later']:.1%}" if loop_b else None, "", target="target >= 97%")
    return loop_a


def agent_loop_only(cpp, gguf: Path, args) -> None:
    """`--agent-loop-only`: the agent loop against llama-server, then the cache-off replay."""
    with Engine.load(engine.DEFAULT_MODEL, EngineConfig(prefix_cache=False, progress=False)) as eng:
        system = agent_system_prompt(lambda text: len(eng.encode(text)))
        system_tokens = len(eng.encode(system))
    args.cpp_threads = choose_threads(cpp, gguf, args.cpp_threads) if cpp else llama_cpp_runs.THREADS
    cache_dir = scratch_kv_dir()
    ours = start_kernelext_server(cache_dir, True, args.drafter)
    theirs = (llama_cpp_runs.start_llama_server(cpp, gguf, args.streams, 4096, args.cpp_threads)
              if cpp else None)
    Table.header()
    t = Table(f"Agent loop over HTTP on 127.0.0.1 (llama-server -np {args.streams} -t {args.cpp_threads})")
    try:
        loop = agent_loop_rows(t, ours, theirs, system, system_tokens)
    finally:
        ours.stop()
        if theirs:
            theirs.stop()
    if args.identity_turns:
        cache_off_identity({"system": system, "replies": loop["replies"], "cache_dir": cache_dir}, args)


def cache_off_identity(loop: dict, args) -> None:
    """The agent loop's prompts replayed on a cache-off kernelext server: same replies?"""
    turns = min(args.identity_turns, len(loop["replies"]))
    off = start_kernelext_server(loop["cache_dir"], False, args.drafter)
    try:
        replay = agent_loop(off.base, loop["system"], turns, 32)
    finally:
        off.stop()
    same = replay["replies"] == loop["replies"][:turns]
    print(f"\nagent loop on a cache-off kernelext server, {turns} turns: {replay['seconds']:.1f} s; "
          f"replies identical to the cached run: {'yes' if same else 'NO'}")
    for i, (x, y) in enumerate(zip(loop["replies"], replay["replies"])):
        if x != y:
            print(f"  first difference at turn {i}: cached {x!r} / cache off {y!r}")
            break


def step_cost(eng: Engine) -> None:
    """Where a batch-1 decode step's time goes (filled in by step_cost.py when present)."""
    try:
        import step_cost as sc
    except ImportError:
        return
    sc.report(eng)


if __name__ == "__main__":
    main()
