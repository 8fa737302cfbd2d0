"""`kernelext serve --model M [--host H] [--port P] [--api-key K] [--default-max-tokens N]`: the notebook's
server app, outside a notebook. Stops cleanly on SIGINT/SIGTERM."""

from __future__ import annotations

import argparse
import os
import signal
import threading

from engine import DEFAULT_MODEL, Engine, EngineConfig, EngineError

from .app import DEFAULT_MAX_TOKENS
from .runner import check_bind, start_server


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="kernelext")
    commands = parser.add_subparsers(dest="command", required=True)
    serve = commands.add_parser("serve", help="serve a model over HTTP (OpenAI and Anthropic APIs)")
    serve.add_argument("--model", default=DEFAULT_MODEL, help="model directory, GGUF file or alias")
    serve.add_argument("--host", default="127.0.0.1")
    serve.add_argument("--port", type=int, default=8000, help="0 picks a free port")
    serve.add_argument("--api-key", default=os.environ.get("KERNELEXT_API_KEY"),
                       help="required from clients (default: $KERNELEXT_API_KEY, which keeps it out of ps)")
    serve.add_argument("--max-batch", type=int, default=EngineConfig.max_batch)
    serve.add_argument("--max-context", type=int, default=None)
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
    try:
        engine = Engine.load(args.model, EngineConfig(max_batch=args.max_batch,
                                                      max_context=args.max_context))
    except EngineError as e:
        parser.exit(1, f"kernelext: {e}\n")
    try:
        srv = start_server(engine, args.host, args.port, args.api_key,
                           default_max_tokens=args.default_max_tokens)
    except OSError as e:  # the port is in use
        engine.close()
        parser.exit(1, f"kernelext: {e}\n")
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    print(f"kernelext: serving {engine.model_name} at {srv.url} (Ctrl+C to stop)", flush=True)
    print(srv.snippets(), flush=True)
    stop.wait()
    srv.stop()
    engine.close()
    return 0
