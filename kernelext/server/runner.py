"""hypercorn on a thread of its own with its own asyncio loop, so requests are
answered while the notebook's loop (or a busy cell) is blocked."""

from __future__ import annotations

import asyncio
import ipaddress
import json
import logging
import shlex
import socket
import threading

from hypercorn.asyncio import serve
from hypercorn.config import Config

from .app import DEFAULT_MAX_TOKENS, KEEPALIVE_S, App

log = logging.getLogger("kernelext.server")

STOP_TIMEOUT_S = 10.0


def check_bind(host: str, api_key: str | None) -> None:
    """Refuse to expose the model beyond this machine without a key."""
    try:
        loopback = host == "localhost" or ipaddress.ip_address(host).is_loopback
    except ValueError:  # a host name: it may resolve to anything
        loopback = False
    if not loopback and not api_key:
        raise ValueError(f"refusing to serve on {host!r} without an API key: anyone who can reach "
                         "it could use the model. Pass an API key, or bind 127.0.0.1.")


class ServerHandle:
    """A running server; `stop()` ends it (idempotent)."""

    def __init__(self, models, host: str, port: int, api_key: str | None, **app_options):
        self.host, self.port, self.api_key = host, port, api_key
        self._started = threading.Event()
        self._app = App(models, api_key, on_started=self._started.set, **app_options)
        self.registry = self._app.registry
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stop_event: asyncio.Event | None = None
        self._error: BaseException | None = None
        self._stopped = False
        self._lock = threading.Lock()
        self._thread: threading.Thread | None = None

    @property
    def engine(self):
        """The default chat model's engine: the first generation model served."""
        name = self.registry.default("generate")
        return self.registry.get(name) if name is not None else None

    @property
    def url(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"http://{host}:{self.port}"

    def stats(self) -> dict:
        return self._app.stats()

    def stop(self) -> None:
        """Cancel active requests (their streams end), close the port, join the thread."""
        with self._lock:
            if self._stopped:
                return
            self._stopped = True
        try:
            self._loop.call_soon_threadsafe(self._begin_stop)
        except RuntimeError:  # its loop is closed: the server thread already ended
            pass
        self._thread.join(STOP_TIMEOUT_S)

    def _begin_stop(self) -> None:
        self._app.shutdown()
        self._stop_event.set()

    def _start(self, sock: socket.socket) -> None:
        config = Config()
        # hypercorn adopts our already-listening socket, so the port is known (and any
        # bind error raised) in the caller's thread.
        config.bind = [f"fd://{sock.detach()}"]
        config.accesslog = None
        config.errorlog = log  # hypercorn's INFO banner stays quiet; warnings still show
        config.graceful_timeout = 5.0
        self._thread = threading.Thread(target=self._run, args=(config,), daemon=True,
                                        name=f"kernelext-server-{self.port}")
        self._thread.start()
        while not self._started.wait(0.05):
            if not self._thread.is_alive():
                raise RuntimeError(f"the server failed to start: {self._error!r}") from self._error

    def _run(self, config: Config) -> None:
        try:
            with asyncio.Runner() as runner:
                self._loop = runner.get_loop()
                self._stop_event = asyncio.Event()
                runner.run(serve(self._app, config, shutdown_trigger=self._stop_event.wait))
        except Exception as e:  # reported by _start, or logged if it happens later
            self._error = e
            if self._started.is_set():
                log.exception("the server stopped with an error")

    def snippets(self) -> str:
        """Copy-paste configuration for the OpenAI and Anthropic clients, Codex CLI and
        Claude Code (the test suite runs both CLIs with exactly this text)."""
        key = self.api_key or "none"
        if self.engine is None:  # embedding and reranking models only
            name = json.dumps(self.registry.names()[0])
            return ("# OpenAI Python client\nfrom openai import OpenAI\n"
                    f'client = OpenAI(base_url="{self.url}/v1", api_key="{key}")\n'
                    f'client.embeddings.create(model={name}, input=["Hi"])\n')
        model = json.dumps(self.engine.model_name)
        hi = '[{"role": "user", "content": "Hi"}]'
        env_key = f'env_key = "KERNELEXT_API_KEY"  # export KERNELEXT_API_KEY={key}\n' if self.api_key else ""
        claude_env = {"ANTHROPIC_BASE_URL": self.url, "ANTHROPIC_AUTH_TOKEN": key,
                      # Claude Code asks for its own model names unless told otherwise.
                      "ANTHROPIC_MODEL": self.engine.model_name,
                      "ANTHROPIC_DEFAULT_HAIKU_MODEL": self.engine.model_name,
                      "CLAUDE_CODE_SUBAGENT_MODEL": self.engine.model_name,
                      "CLAUDE_CODE_DISABLE_NONESSENTIAL_TRAFFIC": "1"}
        return (
            "# OpenAI Python client (chat, completions, responses)\n"
            "from openai import OpenAI\n"
            f'client = OpenAI(base_url="{self.url}/v1", api_key="{key}")\n'
            f"client.chat.completions.create(model={model}, messages={hi})\n\n"
            "# Anthropic Python client (or ANTHROPIC_BASE_URL / ANTHROPIC_API_KEY for other tools)\n"
            "from anthropic import Anthropic\n"
            f'client = Anthropic(base_url="{self.url}", api_key="{key}")\n'
            f"client.messages.create(model={model}, max_tokens=256, messages={hi})\n\n"
            f"{CODEX_HEADER}\n"
            f"model = {model}\n"
            'model_provider = "kernelext"\n'
            f"model_context_window = {self.engine.max_context}\n\n"
            "[model_providers.kernelext]\n"
            'name = "kernelext"\n'
            f'base_url = "{self.url}/v1"\n'
            'wire_api = "responses"\n'
            f"{env_key}\n"
            f"{CLAUDE_HEADER}\n"
            + "".join(f"export {k}={shlex.quote(v)}\n" for k, v in claude_env.items())
        )


# Section headers of snippets(); tests find each CLI's configuration by them.
CODEX_HEADER = "# Codex CLI: ~/.codex/config.toml"
CLAUDE_HEADER = "# Claude Code: in the shell that runs `claude`"


def start_server(models, host: str = "127.0.0.1", port: int = 8000, api_key: str | None = None, *,
                 default_max_tokens: int = DEFAULT_MAX_TOKENS, keepalive_s: float = KEEPALIVE_S) -> ServerHandle:
    """Serve `models` (a ModelRegistry, or one engine) over HTTP; returns once listening
    (port 0 = a free port).

    `default_max_tokens`: the output limit of requests that set none; `keepalive_s`: how
    often a stream waiting on a long prefill sends an SSE comment."""
    check_bind(host, api_key)
    if default_max_tokens < 1:
        raise ValueError(f"the default output limit must be >= 1, got {default_max_tokens}")
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.create_server((host, port), family=family, backlog=128)
    handle = ServerHandle(models, host, sock.getsockname()[1], api_key,
                          default_max_tokens=default_max_tokens, keepalive_s=keepalive_s)
    handle._start(sock)
    return handle
