"""`kernelext serve --model M [--model [NAME=]M2 ...] [--host H] [--port P] [--api-key K]
[--default-max-tokens N] [--hostfile FILE [--layout tensor|pipeline]]`: the notebook's server app, outside a notebook. Several models
(chat, embedding, reranking) are served side by side, routed by each request's `model`.
Stops cleanly on SIGINT/SIGTERM."""

from __future__ import annotations

import argparse
import os
import signal
import threading

from engine import DEFAULT_MODEL, EngineConfig, EngineError, ModelRegistry
from engine.config import KV_DTYPES
from engine.distributed.hostfile import add_arguments as distributed_arguments

from .app import DEFAULT_MAX_TOKENS
from .runner import check_bind, start_server


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="kernelext")
    commands = parser.add_subparsers(dest="command", required=True)
    serve = commands.add_parser("serve", help="serve a model over HTTP (OpenAI and Anthropic APIs)")
    serve.add_argument("--model", action="append", metavar="[NAME=]MODEL",
                       help="model directory, GGUF file or alias, served as NAME (default: as "
                            f"written); repeat for several models (default: {DEFAULT_MODEL})")
    serve.add_argument("--pin", action="append", default=[], metavar="NAME",
                       help="never evict this model (repeatable)")
    serve.add_argument("--memory-budget", type=float, metavar="GIB",
                       help="weights of resident models (default: system RAM minus 8 GiB)")
    serve.add_argument("--ttl", type=float, metavar="SECONDS",
                       help="unload an unpinned model idle this long (default: never)")
    serve.add_argument("--host", default="127.0.0.1")
    serve.add_argument("--port", type=int, default=8000, help="0 picks a free port")
    serve.add_argument("--api-key", default=os.environ.get("KERNELEXT_API_KEY"),
                       help="required from clients (default: $KERNELEXT_API_KEY, which keeps it out of ps)")
    distributed_arguments(serve, rank0="this process")
    serve.add_argument("--max-batch", type=int, default=EngineConfig.max_batch)
    serve.add_argument("--max-context", type=int, default=None)
    serve.add_argument("--kv-dtype", choices=KV_DTYPES, default=EngineConfig.kv_dtype,
                       help="KV cache type where quantized weights run on the CPU: auto = float16 "
                            "(half the memory), float32 = the activations' (default: %(default)s)")
    serve.add_argument("--default-max-tokens", type=int, default=DEFAULT_MAX_TOKENS, metavar="N",
                       help="output limit of requests that set none (default: %(default)s); a larger "
                            "limit than the context allows is clamped")
    args = parser.parse_args(argv)
    try:
        check_bind(args.host, args.api_key)  # before the slow part
        if args.default_max_tokens < 1:
            raise ValueError(f"--default-max-tokens must be >= 1, got {args.default_max_tokens}")
    except ValueError as e:
        parser.exit(2, f"kernelext: {e}\n")
    specs = [m.partition("=")[::2] if "=" in m else (m, m) for m in args.model or [DEFAULT_MODEL]]
    budget = None if args.memory_budget is None else int(args.memory_budget * 2**30)
    try:
        config = EngineConfig(max_batch=args.max_batch, max_context=args.max_context, kv_dtype=args.kv_dtype,
                              hostfile=args.hostfile, distributed_layout=args.layout)
    except EngineError as e:
        parser.exit(2, f"kernelext: {e}\n")
    models = ModelRegistry(budget, args.ttl, config)
    try:
        for name, model in specs:
            # A split model is pinned: this process cannot form a second group to reload it.
            models.add(name, model, pin=name in args.pin or args.hostfile is not None)
    except EngineError as e:
        models.close()
        parser.exit(1, f"kernelext: {e}\n")
    try:
        srv = start_server(models, args.host, args.port, args.api_key,
                           default_max_tokens=args.default_max_tokens)
    except OSError as e:  # the port is in use
        models.close()
        parser.exit(1, f"kernelext: {e}\n")
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    served = ", ".join(f"{m['name']} ({m['task']})" for m in models.status())
    print(f"kernelext: serving {served} at {srv.url} (Ctrl+C to stop)", flush=True)
    print(srv.snippets(), flush=True)
    stop.wait()
    srv.stop()
    models.close()
    return 0
