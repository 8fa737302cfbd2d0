"""The ASGI app (plain ASGI, no framework): routing, auth, JSON bodies, error
bodies, server-sent events, client disconnects and the server's own stats.

It runs on the server's event loop and only submits to and reads from the
engine; all MLX work stays on the engine's thread.
"""

from __future__ import annotations

import asyncio
import dataclasses
import hmac
import json
import logging
import re

from engine import EngineClosedError, EngineError, InvalidRequestError, ModelRegistry, QueueFullError

from . import anthropic_api, openai_api, pooling_api, responses_api
from .common import SSE, ApiError, Text, anthropic_error, openai_error
from .generation import Generation
from .response_store import ResponseStore

log = logging.getLogger("kernelext.server")

MAX_BODY = 32 << 20
RETRY_AFTER_S = "1"  # a batch slot frees up as soon as any running request finishes
# The output limit of a request that sets none. A base model rarely ends a turn, and a
# client that sends no limit (aider, the `llm` CLI) would otherwise hold a batch row
# until the context is full.
DEFAULT_MAX_TOKENS = 2048
# While a long prompt prefills (an agent's first request: 10-15k tokens, a minute on a
# laptop CPU) a stream sends an SSE comment this often, so no client or proxy idle
# timeout fires on a healthy server.
KEEPALIVE_S = 5.0


async def _health(call, body: dict) -> dict:
    models = call.app.registry.status()
    out = {"status": "ok", "model": call.app.default_model("generate"),
           "models": {m["name"]: m["state"] for m in models}}
    # A loaded model that cannot serve (its distributed group lost a rank) says why.
    if errors := {m["name"]: m["error"] for m in models if m["state"] == "loaded" and m["error"]}:
        out.update(status="degraded", errors=errors)
    return out


async def _metrics(call, body: dict) -> Text:
    return Text(prometheus(call.engine.metrics() if call.engine else {}, call.app.stats()),
                "text/plain; version=0.0.4; charset=utf-8")


# path -> (method, handler, needs the API key); /health stays open for liveness probes.
ROUTES = {
    "/health": ("GET", _health, False),
    "/metrics": ("GET", _metrics, True),
    "/v1/models": ("GET", openai_api.models, True),
    "/v1/chat/completions": ("POST", openai_api.chat_completions, True),
    "/v1/completions": ("POST", openai_api.completions, True),
    "/v1/responses": ("POST", responses_api.create, True),
    "/v1/messages": ("POST", anthropic_api.messages, True),
    "/v1/messages/count_tokens": ("POST", anthropic_api.count_tokens, True),
    "/v1/embeddings": ("POST", pooling_api.embeddings, True),
    "/v1/rerank": ("POST", pooling_api.rerank, True),
}
# The kind of model a path is served by; the body's `model` picks one of that kind
# (absent, "default" or an unknown name: the first of that kind, and the handler
# answers an unknown name with a 404). Paths not listed take no model.
ROUTE_TASKS = {path: "generate" for path in ROUTES if path.startswith("/v1/")} | {
    "/metrics": "generate", "/v1/models": None, "/v1/embeddings": "embed", "/v1/rerank": "rerank"}


class Call:
    """One HTTP request's engine work, cancelled together on disconnect or server stop."""

    def __init__(self, app: "App"):
        self.app, self.engine = app, None  # the engine is picked by the body's `model`
        self.generations: list[Generation] = []
        self.leases: list = []  # the models this call uses, kept from eviction until it ends

    def submit(self, prompt_ids: list[int], params, *, tools, chat: bool) -> Generation:
        if self.app.closing:
            raise ApiError(503, "the server is stopping")
        limit = self.engine.max_context
        if len(prompt_ids) >= limit:
            raise ApiError(400, f"the prompt has {len(prompt_ids)} tokens; the context limit is {limit}",
                           param="messages" if chat else "prompt", code="context_length_exceeded")
        if params.max_tokens > limit - len(prompt_ids):
            # Clients ask for more than fits (Claude Code: 32,000 or more); the output ends
            # at the context limit either way, so clamp rather than refuse.
            params = dataclasses.replace(params, max_tokens=limit - len(prompt_ids))
        try:
            handle = self.engine.submit(prompt_ids, params, source="http")
        except QueueFullError as e:
            raise ApiError(429, str(e), headers={"retry-after": RETRY_AFTER_S}) from None
        except InvalidRequestError as e:
            raise ApiError(400, str(e)) from None
        except EngineClosedError as e:
            raise ApiError(503, str(e)) from None
        gen = Generation(self.engine, handle, prompt_ids, params, tools, chat)
        self.generations.append(gen)
        return gen

    def cancel(self) -> None:
        for gen in self.generations:
            gen.handle.cancel()  # a no-op once finished


class App:
    def __init__(self, models, api_key: str | None = None, on_started=None, *,
                 default_max_tokens: int = DEFAULT_MAX_TOKENS, keepalive_s: float = KEEPALIVE_S):
        """models: a ModelRegistry, or one engine (served under its model name)."""
        if not isinstance(models, ModelRegistry):
            engine, models = models, ModelRegistry()
            models.adopt(engine.model_name, engine)
        self.registry = models
        self.default_max_tokens = default_max_tokens
        self.keepalive_s = keepalive_s
        self.responses = ResponseStore()
        self._key = api_key.encode() if api_key else None
        self._on_started = on_started
        self._calls: set[Call] = set()
        self._streams = 0
        self._counts = dict.fromkeys(("requests", "errors", "rejected", "cancelled"), 0)
        # Answered (status < 400) per endpoint, e.g. "answered_v1_messages_count_tokens":
        # shows which parts of the APIs a client really uses.
        self._answered = {_answered_key(path): 0 for path in ROUTES}
        self.closing = False

    def default_model(self, task: str) -> str | None:
        return self.registry.default(task)

    async def _route(self, call: Call, path: str, body: dict) -> None:
        """Give the call the engine of the model it names (loading it if it is known but
        not resident: off the loop, so other requests go on meanwhile)."""
        task = ROUTE_TASKS.get(path)
        if task is None:
            return
        requested = body.get("model")
        if isinstance(requested, str) and requested in self.registry:
            name = requested
            kind = self.registry.task_of(name)
            if kind is not None and kind != task:
                raise ApiError(400, f"model '{name}' is a {kind} model; {path} needs a {task} model",
                               param="model", code="model_not_supported")
        else:
            name = self.default_model(task)
        if name is None:
            if path == "/metrics":
                return
            raise ApiError(404, f"this server has no {task} model for {path} (it serves: "
                           f"{', '.join(self.registry.names()) or 'none'})", param="model",
                           code="model_not_found")
        lease = self.registry.lease(name)
        try:
            call.engine = await asyncio.to_thread(lease.__enter__)
        except EngineError as e:
            raise ApiError(503, f"model '{name}' could not be loaded: {e}", param="model") from None
        call.leases.append(lease)

    def stats(self) -> dict:
        return {**self._counts, "active_requests": len(self._calls), "active_streams": self._streams,
                **self._answered}

    def shutdown(self) -> None:
        """On the server's loop: refuse new work and cancel what runs (streams then end)."""
        self.closing = True
        for call in list(self._calls):
            call.cancel()

    async def __call__(self, scope, receive, send):
        if scope["type"] == "lifespan":
            await self._lifespan(receive, send)
        elif scope["type"] == "http":
            await self._http(scope, receive, send)

    async def _lifespan(self, receive, send):
        while True:
            message = await receive()
            if message["type"] == "lifespan.startup":
                await send({"type": "lifespan.startup.complete"})
                if self._on_started:
                    self._on_started()
            elif message["type"] == "lifespan.shutdown":
                await send({"type": "lifespan.shutdown.complete"})
                return

    async def _http(self, scope, receive, send):
        path = scope["path"]
        error_body = anthropic_error if path.startswith("/v1/messages") else openai_error
        self._counts["requests"] += 1
        call, watcher, status = Call(self), None, 200
        self._calls.add(call)
        try:
            route = ROUTES.get(path)
            if route is None:
                raise ApiError(404, f"no such endpoint: {path}")
            method, handler, needs_key = route
            if scope["method"] != method:
                raise ApiError(405, f"{path} takes {method}", headers={"allow": method})
            if needs_key and not self._authorized(scope["headers"]):
                raise ApiError(401, "invalid or missing API key (send 'Authorization: Bearer KEY' "
                               "or 'x-api-key: KEY')", code="invalid_api_key")
            body = await _read_json(receive) if method == "POST" else {}
            await self._route(call, path, body)
            watcher = asyncio.create_task(self._watch(receive, call))
            await self._respond(send, await handler(call, body))
        except ApiError as e:
            status = e.status
            await _send(send, e.status, json.dumps(error_body(e)).encode(), "application/json", e.headers)
        except Exception:  # a bug: answer it rather than leave the client hanging
            log.exception("error handling %s", path)
            status = 500
            await _send(send, 500, json.dumps(error_body(ApiError(500, "internal server error"))).encode(),
                        "application/json")
        finally:
            if watcher:
                watcher.cancel()
            call.cancel()  # nothing outlives its request, whatever ended it
            for lease in call.leases:
                lease.__exit__(None, None, None)
            self._calls.discard(call)
            status = max([status] + [g.error.status for g in call.generations if g.error])
            if any(g.cancelled for g in call.generations):
                self._counts["cancelled"] += 1
            elif status >= 400:
                self._counts["errors"] += 1
                self._counts["rejected"] += status == 429
            elif path in ROUTES:
                self._answered[_answered_key(path)] += 1

    def _authorized(self, headers) -> bool:
        if self._key is None:
            return True
        given = [v for k, v in headers if k == b"x-api-key"]
        given += [v[7:].strip() for k, v in headers if k == b"authorization" and v[:7].lower() == b"bearer "]
        return any(hmac.compare_digest(v, self._key) for v in given)

    async def _watch(self, receive, call: Call) -> None:
        """Cancel the call's requests when the client disconnects (hypercorn reports it
        as soon as the connection closes; sends to a closed connection are dropped)."""
        while (await receive())["type"] != "http.disconnect":
            pass
        call.cancel()

    async def _respond(self, send, result) -> None:
        if isinstance(result, SSE):
            self._streams += 1
            try:
                await send({"type": "http.response.start", "status": 200, "headers": [
                    (b"content-type", b"text/event-stream; charset=utf-8"), (b"cache-control", b"no-cache")]})
                try:
                    async for chunk in _with_keepalive(result.events, self.keepalive_s, result.keepalive):
                        await send({"type": "http.response.body", "body": chunk, "more_body": True})
                except Exception:  # a bug mid-stream: the 200 is sent, so just end the stream
                    log.exception("error in an event stream")
                    self._counts["errors"] += 1
                await send({"type": "http.response.body", "body": b""})
            finally:
                self._streams -= 1
        elif isinstance(result, Text):
            await _send(send, 200, result.text.encode(), result.content_type)
        else:
            await _send(send, 200, json.dumps(result, ensure_ascii=False).encode(), "application/json")


def _answered_key(path: str) -> str:
    return "answered" + path.replace("/", "_")


async def _with_keepalive(events, every_s: float, keepalive: bytes):
    """`events`, with `keepalive` whenever none came for `every_s` seconds. The pending
    event is awaited, never cancelled: cancelling an async generator mid-step would end it."""
    events, step = aiter(events), None
    try:
        while True:
            step = asyncio.ensure_future(anext(events))
            while not (await asyncio.wait({step}, timeout=every_s))[0]:
                yield keepalive
            try:
                chunk = step.result()
            except StopAsyncIteration:
                return
            yield chunk
    finally:  # the client went away mid-wait
        if step is not None and not step.done():
            step.cancel()


async def _read_json(receive) -> dict:
    chunks, size = [], 0
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            raise ApiError(400, "the client disconnected")  # nobody reads this answer
        chunks.append(message.get("body", b""))
        size += len(chunks[-1])
        if size > MAX_BODY:
            raise ApiError(413, f"the request body is over {MAX_BODY >> 20} MiB")
        if not message.get("more_body"):
            break
    try:
        body = json.loads(b"".join(chunks))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ApiError(400, f"malformed JSON body: {e}") from None
    if not isinstance(body, dict):
        raise ApiError(400, "the JSON body must be an object")
    return body


async def _send(send, status: int, body: bytes, content_type: str, headers: dict | None = None) -> None:
    extra = [(k.encode(), v.encode()) for k, v in (headers or {}).items()]
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", content_type.encode()), *extra]})
    await send({"type": "http.response.body", "body": body})


def prometheus(engine_metrics: dict, server_stats: dict) -> str:
    """Prometheus text exposition: engine numbers, server stats (http_*), strings as info labels."""
    def name(key: str) -> str:
        return "kernelext_" + re.sub(r"[^a-zA-Z0-9_]", "_", key)

    def quote(value: str) -> str:
        return value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")

    numbers = {k: v for k, v in engine_metrics.items()
               if isinstance(v, (int, float)) and not isinstance(v, bool)}
    numbers.update({f"http_{k}": v for k, v in server_stats.items()})
    labels = ",".join(f'{k}="{quote(v)}"' for k, v in engine_metrics.items() if isinstance(v, str))
    lines = ["# TYPE kernelext_info gauge", f"kernelext_info{{{labels}}} 1"]
    for key, value in numbers.items():
        lines += [f"# TYPE {name(key)} gauge", f"{name(key)} {value}"]
    return "\n".join(lines) + "\n"
