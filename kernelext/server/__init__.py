"""Serve an Engine over HTTP: OpenAI (chat, completions, responses) and Anthropic
(messages) APIs, from a notebook (`start_server`) or the command line
(`kernelext serve`)."""

import engine as _engine  # noqa: F401  (picks the BLAS before anything below imports mlx)

from .app import App  # noqa: E402
from .runner import ServerHandle, start_server  # noqa: E402

__all__ = ["App", "ServerHandle", "start_server"]
