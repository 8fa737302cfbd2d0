"""The llama.cpp side of bench_llama_cpp.py: its own tools, run as a user would, parsed."""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path

import measure
from anchor import LlamaCpp

THREADS = 2  # the machine's 2 cores
# On a machine shared with other jobs, llama.cpp's 2 threads can stall each other at every
# barrier when one is descheduled (measured here at load 17: 0.2 tok/s with -t 2, 9 tok/s
# with -t 1). The bench measures both and compares against llama.cpp's better count.
THREAD_CHOICES = (2, 1)


@dataclass
class BenchRun:
    prefill_tps: float | None
    decode_tps: float | None
    peak_rss_mb: float


def llama_bench(cpp: LlamaCpp, gguf: Path, prompt_tokens: int, gen_tokens: int,
                threads: int = THREADS, timeout: float = 1200) -> BenchRun:
    """One llama-bench pass (-r 1): prefill of prompt_tokens and decode of gen_tokens, each
    from an empty context, as llama-bench always measures."""
    out = measure.run([str(cpp.tool("llama-bench")), "-m", str(gguf), "-p", str(prompt_tokens),
                       "-n", str(gen_tokens), "-r", "1", "-t", str(threads), "-o", "json"],
                      env=cpp.env(), timeout=timeout)
    _check(out, "llama-bench")
    rows = json.loads(out.stdout)
    speed = {("prefill" if r["n_gen"] == 0 else "decode"): r["avg_ts"] for r in rows}
    return BenchRun(speed.get("prefill"), speed.get("decode"), out.peak_rss_mb)


def batched_decode_tps(cpp: LlamaCpp, gguf: Path, streams: int, prompt_tokens: int,
                       gen_tokens: int, threads: int = THREADS) -> float:
    """Aggregate decode tok/s of `streams` sequences decoded together (llama-batched-bench)."""
    ctx = streams * (prompt_tokens + gen_tokens) + 16
    out = measure.run([str(cpp.tool("llama-batched-bench")), "-m", str(gguf), "-c", str(ctx),
                       "-npp", str(prompt_tokens), "-ntg", str(gen_tokens), "-npl", str(streams),
                       "-t", str(threads), "--output-format", "jsonl"], env=cpp.env(), timeout=1200)
    _check(out, "llama-batched-bench")
    rows = [json.loads(line) for line in out.stdout.splitlines() if '"speed_tg"' in line]
    return rows[-1]["speed_tg"]


def start_llama_server(cpp: LlamaCpp, gguf: Path, slots: int, slot_ctx: int,
                       threads: int = THREADS) -> measure.Server:
    port = measure.free_port()
    cmd = [str(cpp.tool("llama-server")), "-m", str(gguf), "--host", "127.0.0.1", "--port", str(port),
           "-np", str(slots), "-c", str(slots * slot_ctx), "-t", str(threads), "-tb", str(threads)]
    return measure.start_server("llama-server", cmd, port, env=cpp.env(), ready_path="/health")


def perplexity(cpp: LlamaCpp, gguf: Path, text_file: Path, n_ctx: int, threads: int = THREADS) -> dict:
    """llama-perplexity's own estimate over text_file (chunks of n_ctx, second halves scored)."""
    out = measure.run([str(cpp.tool("llama-perplexity")), "-m", str(gguf), "-f", str(text_file),
                       "-c", str(n_ctx), "-b", str(n_ctx), "-t", str(threads)], env=cpp.env())
    _check(out, "llama-perplexity")
    log = out.stdout + out.stderr
    found = re.search(r"Final estimate: PPL = ([0-9.]+) \+/- ([0-9.]+)", log)
    if not found:
        raise RuntimeError("llama-perplexity printed no final estimate:\n" + log[-2000:])
    chunks = re.search(r"calculating perplexity over (\d+) chunks", log)
    return {"ppl": float(found.group(1)), "ppl_err": float(found.group(2)),
            "chunks": int(chunks.group(1)) if chunks else None, "seconds": out.wall_s}


def quantize(cpp: LlamaCpp, source: Path, target: Path, kind: str = "Q4_K_M") -> None:
    tmp = target.with_name(target.name + ".tmp")
    out = measure.run([str(cpp.tool("llama-quantize")), str(source), str(tmp), kind, str(THREADS)],
                      env=cpp.env())
    _check(out, "llama-quantize")
    tmp.rename(target)


def _check(out: measure.Finished, what: str) -> None:
    if out.returncode != 0:
        raise RuntimeError(f"{what} exited with {out.returncode}:\n{(out.stderr or out.stdout)[-2000:]}")
