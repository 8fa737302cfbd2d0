"""What the three API dialects share: errors, typed body fields, sampling
parameters, chat messages/tools in one canonical form, and the prompt.

Every dialect turns its request into OpenAI-chat-style messages
({"role", "content": str, "tool_calls"?, "tool_call_id"?}) and function tools
({"type": "function", "function": {...}}), the form Hugging Face chat templates
expect, so prompt building and sampling are written once.
"""

from __future__ import annotations

import json
import logging
import math
import threading
import uuid
from pathlib import Path

from engine import InvalidRequestError, SamplingParams

from .messages import TemplateRejected, normalize, render

log = logging.getLogger("kernelext.server")

# Accepted besides the engine's model name: its last path component (the name
# of a local directory) and "default", for clients that insist on some name.
DEFAULT_MODEL_NAME = "default"

_ERROR_TYPES = {400: "invalid_request_error", 401: "authentication_error", 404: "not_found_error",
                405: "invalid_request_error", 413: "request_too_large", 429: "rate_limit_error",
                500: "api_error", 503: "api_error"}


class ApiError(Exception):
    """A request that fails with an HTTP status and a message for the client."""

    def __init__(self, status: int, message: str, *, param: str | None = None,
                 code: str | None = None, headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code
        self.headers = headers or {}

    @property
    def type(self) -> str:
        return _ERROR_TYPES.get(self.status, "api_error")


def openai_error(e: ApiError) -> dict:
    return {"error": {"message": e.message, "type": e.type, "param": e.param, "code": e.code}}


def anthropic_error(e: ApiError) -> dict:
    return {"type": "error", "error": {"type": e.type, "message": e.message}}


def new_id(prefix: str) -> str:
    return f"{prefix}{uuid.uuid4().hex[:24]}"


def sse(data: dict | str, event: str | None = None) -> bytes:
    payload = data if isinstance(data, str) else json.dumps(data, ensure_ascii=False)
    return (f"event: {event}\n" if event else "").encode() + f"data: {payload}\n\n".encode()


class SSE:
    """A handler's streamed answer: an async iterator of server-sent-event bytes, and
    what to send while none comes (an SSE comment, which every client skips, unless the
    API documents an event for it)."""

    def __init__(self, events, keepalive: bytes = b": keepalive\n\n"):
        self.events, self.keepalive = events, keepalive


class Text:
    def __init__(self, text: str, content_type: str = "text/plain; charset=utf-8"):
        self.text, self.content_type = text, content_type


# -- typed body fields ---------------------------------------------------------
_TYPE_NAMES = {bool: "a boolean", int: "an integer", float: "a number", str: "a string",
               list: "an array", dict: "an object"}


def get(body: dict, name: str, types, default=None, *, required: bool = False):
    """body[name] checked against `types` (float admits ints, int never admits bools).

    JSON null counts as absent, as clients send null for "not set"."""
    value = body.get(name)
    if value is None:
        if required:
            raise ApiError(400, f"'{name}' is required", param=name)
        return default
    types = types if isinstance(types, tuple) else (types,)
    allowed = types + ((int,) if float in types else ())
    if not isinstance(value, allowed) or (isinstance(value, bool) and bool not in types):
        expected = " or ".join(_TYPE_NAMES[t] for t in types)
        raise ApiError(400, f"'{name}' must be {expected}", param=name)
    return value


# Sampling fields every dialect reads (sampling_params); the rest is per endpoint.
SAMPLING_FIELDS = frozenset({"temperature", "top_p", "top_k", "min_p", "repetition_penalty", "presence_penalty",
                             "frequency_penalty", "seed", "depth", "generation_mode"})
_noted: set[str] = set()
_noted_lock = threading.Lock()


def ignored(what: str) -> None:
    """Log once per process, at debug level, something a client sent that this server
    accepts but does not act on (prompt-cache hints, thinking budgets, built-in tools...).
    Real agents send many such fields; refusing them would refuse the agent."""
    log_once(logging.DEBUG, f"ignored: {what}")


def log_once(level: int, message: str) -> None:
    """Log a message once per process (requests repeat; the log should not)."""
    with _noted_lock:
        if message in _noted:
            return
        _noted.add(message)
    log.log(level, message)


def ignore_unused(body: dict, used: frozenset[str], endpoint: str) -> None:
    """Accept and log (once) every top-level field `endpoint` does not read."""
    for name in sorted(body.keys() - used - SAMPLING_FIELDS):
        ignored(f"{endpoint} field '{name}'")


def check_model(engine, body: dict) -> str:
    """The model name to echo back; unknown names are a 404 like OpenAI's."""
    model = get(body, "model", str)
    if model is None:
        return engine.model_name
    if model not in (engine.model_name, Path(engine.model_name).name, DEFAULT_MODEL_NAME):
        raise ApiError(404, f"model '{model}' not found; this server serves '{engine.model_name}'",
                       param="model", code="model_not_found")
    return model


def check_n(body: dict) -> None:
    if get(body, "n", int, 1) != 1:
        raise ApiError(400, "only n=1 is supported", param="n")


def sampling_params(body: dict, default_max_tokens: int, *, max_tokens: tuple[str, ...], stop: str,
                    logprobs: int | None = None, constraint: dict | None = None) -> SamplingParams:
    """SamplingParams from a request body; `max_tokens` lists the dialect's names for
    the output limit (first present wins), `stop` its name for stop strings.

    Omitted temperature/top_p take the APIs' documented defaults (1.0), not the
    engine's greedy default; an omitted output limit is the server's default (a client
    that sends none must not hold a batch row until the context is full). A limit beyond
    the context is clamped when the request is submitted (Call.submit).
    top_k, min_p, repetition_penalty, depth and generation_mode are accepted everywhere."""
    limit = next((v for k in max_tokens if (v := get(body, k, int)) is not None), default_max_tokens)
    stops = get(body, stop, (str, list), [])
    try:
        return SamplingParams(
            max_tokens=limit,
            temperature=get(body, "temperature", float, 1.0),
            top_p=get(body, "top_p", float, 1.0),
            top_k=get(body, "top_k", int, 0),
            min_p=get(body, "min_p", float, 0.0),
            repetition_penalty=get(body, "repetition_penalty", float, 1.0),
            presence_penalty=get(body, "presence_penalty", float, 0.0),
            frequency_penalty=get(body, "frequency_penalty", float, 0.0),
            seed=get(body, "seed", int),
            stop=[stops] if isinstance(stops, str) else stops,
            logprobs=logprobs,
            depth=get(body, "depth", int),
            generation_mode=get(body, "generation_mode", str, "auto"),
            **(constraint or {}))  # structured output (server/structured.py)
    except InvalidRequestError as e:
        raise ApiError(400, str(e)) from None


def finite(x: float) -> float:
    """JSON has no -inf; a token the model rules out gets a very small log-probability."""
    return x if math.isfinite(x) else -9999.0


def token_logprobs(lps) -> list[dict]:
    """Per-token log-probabilities as Chat Completions and Responses both show them."""
    def entry(token: str, logprob: float) -> dict:
        return {"token": token, "logprob": finite(logprob), "bytes": list(token.encode())}
    return [{**entry(t.token, t.logprob), "top_logprobs": [entry(s, l) for _, s, l in t.top]} for t in lps]


# -- canonical chat messages and tools ------------------------------------------
_TEXT_PARTS = ("text", "input_text", "output_text")


def text_of(content, param: str) -> str:
    """A message's content as text: a string or a list of text parts (any dialect's)."""
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    if isinstance(content, list) and all(isinstance(p, dict) for p in content):
        for p in content:
            if p.get("type") not in _TEXT_PARTS or not isinstance(p.get("text"), str):
                raise ApiError(400, f"only text content is supported; '{param}' has a "
                               f"{p.get('type')!r} part", param=param)
        return "".join(p["text"] for p in content)
    raise ApiError(400, f"'{param}' must be a string or a list of content parts", param=param)


def tool_call(call_id, name, arguments, param: str) -> dict:
    """A previous assistant tool call; chat templates expect the arguments as an object."""
    if not isinstance(name, str):
        raise ApiError(400, f"'{param}' needs a function name", param=param)
    if isinstance(arguments, str):
        try:
            arguments = json.loads(arguments) if arguments.strip() else {}
        except json.JSONDecodeError:
            pass  # shown to the template as the model wrote it
    return {"id": call_id or new_id("call_"), "type": "function",
            "function": {"name": name, "arguments": arguments if arguments is not None else {}}}


def function_tool(name, description, parameters, param: str) -> dict:
    if not isinstance(name, str):
        raise ApiError(400, f"'{param}' needs a name", param=param)
    return {"type": "function", "function": {"name": name, "description": description or "",
                                             "parameters": parameters or {"type": "object"}}}


def items(body: dict, name: str) -> list[dict]:
    """body[name] as a list of objects (absent = empty)."""
    value = get(body, name, list, [])
    if not all(isinstance(v, dict) for v in value):
        raise ApiError(400, f"'{name}' must be an array of objects", param=name)
    return value


def chat_prompt(engine, messages: list[dict], tools: list[dict] | None = None) -> list[int]:
    """Token ids of a chat through the model's template, with the tools shown to it.

    Messages are normalized first (messages.py: the same rules for every dialect). The
    engine's own chat encoding takes no tools, hence the template is applied here (the
    same way: rendered to text, then encoded without extra special tokens)."""
    tok = engine.tokenizer
    if not tok.has_chat_template:
        return encode(engine, normalize(messages))  # the engine's plain "role: content" fallback
    try:
        text = render(messages, lambda ms: tok.apply_chat_template(ms, tools=tools or None,
                                                                   add_generation_prompt=True, tokenize=False))
    except TemplateRejected as e:
        raise ApiError(400, str(e), param="messages") from None
    return tok.encode(text, add_special_tokens=False)


def encode(engine, prompt) -> list[int]:
    try:
        return engine.encode(prompt)
    except InvalidRequestError as e:
        raise ApiError(400, str(e), param="prompt") from None
