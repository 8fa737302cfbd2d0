"""Rank 0 of a distributed test, run as its own process by tests/test_distributed.py.

MLX keeps one ring group per process, so every group a test forms needs a fresh
rank-0 process; this script is that process. It prints one JSON line (after
"RESULT ") with what the test checks.

    python tests/distributed_driver.py ACTION MODEL_DIR HOSTFILE CACHE_DIR [LAYOUT]
"""

from __future__ import annotations

import json
import os
import signal
import sys
import time

import psutil  # installed with ipykernel

from engine import Engine, EngineConfig, SamplingParams
from engine.errors import DistributedGroupError, InvalidRequestError

PROMPTS = [
    "def fibonacci(n):\n    if n < 2:\n        return n\n" * 5,
    "The quick brown fox jumps over the lazy dog. " * 12,
    "Hello",
]
LONG_PROMPT = "class Stack:\n    def push(self, item):\n        self.items.append(item)\n" * 8


LAYOUT = "auto"


def config(hostfile=None, cache_dir=None, **kw) -> EngineConfig:
    kw.setdefault("drafter", "none")
    kw.setdefault("distributed_layout", LAYOUT)
    return EngineConfig(progress=False, hostfile=hostfile, cache_dir=cache_dir, block_size=32,
                        step_token_budget=64, max_batch=8, distributed_timeout=3.0, **kw)


def run_batch(engine, params_list) -> list[dict]:
    """Every request submitted at once (they share batches), then collected."""
    handles = [engine.submit(p, params) for p, params in params_list]
    out = []
    for h in handles:
        c = h.result(timeout=300)
        out.append({"tokens": c.token_ids, "logprobs": [lp.logprob for lp in c.logprobs or []]})
    return out


def requests() -> list:
    reqs = []
    for p in PROMPTS:
        reqs.append((p, SamplingParams(max_tokens=24, temperature=0, logprobs=0)))
        reqs.append((p, SamplingParams(max_tokens=24, temperature=0.9, top_p=0.95, seed=7, logprobs=0)))
    return reqs


def compare(model, hostfile, cache_dir) -> dict:
    """The same requests in one process, then across the group: plainly, and with
    n-gram speculation (verify, commit and rollback on every rank)."""
    result = {}
    with Engine.load(model, config(cache_dir=f"{cache_dir}/single")) as engine:
        result["single"] = run_batch(engine, requests())
    with Engine.load(model, config(hostfile=hostfile, cache_dir=f"{cache_dir}/dist")) as engine:
        result["dist-none"] = run_batch(engine, requests())
        reqs = [(p, SamplingParams(**{**params.__dict__, "drafter": "ngram", "depth": 4}))
                for p, params in requests()]
        result["dist-ngram"] = run_batch(engine, reqs)
        m = engine.metrics()
        result.update(dist_verify_calls=m["spec_verify_calls"], layout=m["layout"], ranks=m["ranks"])
        try:  # its forwards would run on rank 0 alone: refused
            engine.train_mtp_head(tokens=64)
            result["train_refused"] = None
        except InvalidRequestError as e:
            result["train_refused"] = str(e)
    return result


def prefix(model, hostfile, cache_dir) -> dict:
    engine = Engine.load(model, config(hostfile=hostfile, cache_dir=cache_dir))
    try:
        out = run_batch(engine, [(LONG_PROMPT, SamplingParams(max_tokens=8, temperature=0))])[0]
        m = engine.metrics()
        out.update(cached_tokens=m["cached_tokens"], ssd_hits=m["cache_ssd_hit_blocks"],
                   prompt_tokens=m["prompt_tokens"])
    finally:
        engine.close()
    return out


def fault(model, hostfile, cache_dir, sig) -> dict:
    engine = Engine.load(model, config(hostfile=hostfile, cache_dir=cache_dir))
    follower = engine.core.group.processes[1]
    handle = engine.submit(PROMPTS[0], max_tokens=200)
    next(iter(handle))  # the request is decoding
    os.kill(follower.pid, sig)
    start = time.monotonic()
    error = None
    try:
        handle.result(timeout=120)
    except Exception as e:
        error = f"{type(e).__name__}: {e}"
    elapsed = time.monotonic() - start
    try:
        engine.submit("Hello", max_tokens=4)
        refused = None
    except DistributedGroupError as e:
        refused = str(e)
    engine.close()
    return dict(error=error, elapsed=elapsed, refused=refused,
                follower_exit=follower.poll())


def orphan(model, hostfile, cache_dir) -> None:
    """Rank 0 dies without closing anything: its followers must not outlive it."""
    engine = Engine.load(model, config(hostfile=hostfile, cache_dir=cache_dir))
    engine.generate("Hello", max_tokens=2)
    print("RESULT " + json.dumps({"follower_pid": engine.core.group.processes[1].pid}), flush=True)
    os._exit(0)


def load_error(model, hostfile, cache_dir) -> dict:
    """A load that fails once the group has formed: its error, and no rank left behind."""
    try:
        Engine.load(model, config(hostfile=hostfile, cache_dir=cache_dir)).close()
        error = None
    except Exception as e:
        error = f"{type(e).__name__}: {e}"
    children = [c.pid for c in psutil.Process().children() if c.status() != psutil.STATUS_ZOMBIE]
    return dict(error=error, children=children)


def main() -> None:
    global LAYOUT
    action, model, hostfile, cache_dir = sys.argv[1:5]
    LAYOUT = sys.argv[5] if len(sys.argv) > 5 else "auto"
    if action == "compare":
        out = compare(model, hostfile, cache_dir)
    elif action == "prefix":
        out = prefix(model, hostfile, cache_dir)
    elif action == "kill":
        out = fault(model, hostfile, cache_dir, signal.SIGKILL)
    elif action == "load_error":
        out = load_error(model, hostfile, cache_dir)
    elif action == "orphan":
        orphan(model, hostfile, cache_dir)
    elif action == "hang":
        out = fault(model, hostfile, cache_dir, signal.SIGSTOP)
    else:
        raise SystemExit(f"unknown action {action}")
    print("RESULT " + json.dumps(out), flush=True)


if __name__ == "__main__":
    main()
