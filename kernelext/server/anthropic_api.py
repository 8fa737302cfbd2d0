"""Anthropic Messages API: /v1/messages and /v1/messages/count_tokens."""

from __future__ import annotations

import json

from . import common, structured
from .common import SSE, ApiError, get, sse

_USED = frozenset({"model", "max_tokens", "system", "messages", "tools", "tool_choice", "stop_sequences",
                   "stream", "output_format"})
_STOP_REASONS = {"length": "max_tokens", "tool_calls": "tool_use"}
_BLOCK_TYPES = {"text": "text", "reasoning": "thinking", "tool_call": "tool_use"}


async def messages(call, body: dict):
    engine = call.engine
    model = common.check_model(engine, body)
    common.ignore_unused(body, _USED, "/v1/messages")
    get(body, "max_tokens", int, required=True)  # required by this API, unlike OpenAI's
    chat, tools = _chat(body)
    fmt = structured.response_format(get(body, "output_format", dict), "output_format", None)
    chat, constraint, json_calls = structured.prepare(engine, {}, chat, tools,
                                                     get(body, "tool_choice", dict), fmt,
                                                      structured.strict_names(common.items(body, "tools")))
    prompt = common.chat_prompt(engine, chat, tools)
    params = common.sampling_params(body, call.app.default_max_tokens, max_tokens=("max_tokens",),
                                    stop="stop_sequences", constraint=constraint)
    stream = get(body, "stream", bool, False)
    gen = call.submit(prompt, params, tools=tools, chat=True)
    gen.json_calls = json_calls
    head = {"id": common.new_id("msg_"), "type": "message", "role": "assistant", "model": model}
    if stream:
        # Anthropic's streams carry `ping` events, which its clients expect and skip.
        return SSE(_stream(gen, head), keepalive=sse({"type": "ping"}, event="ping"))
    await gen.collect()
    return {**head, "content": [_block(b, done=True) for b in gen.blocks], **_stop(gen),
            "usage": _usage(gen.usage.prompt_tokens, gen.usage.cached_tokens, gen.usage.completion_tokens)}


async def count_tokens(call, body: dict) -> dict:
    common.check_model(call.engine, body)
    common.ignore_unused(body, _USED, "/v1/messages/count_tokens")
    chat, tools = _chat(body)
    return {"input_tokens": len(common.chat_prompt(call.engine, chat, tools))}


async def _stream(gen, head: dict):
    def event(kind: str, **fields) -> bytes:
        return sse({"type": kind, **fields}, event=kind)

    # Prompt-cache hits are only known at the end; message_delta's usage overrides these.
    yield event("message_start", message={**head, "content": [], "stop_reason": None,
                                          "stop_sequence": None,
                                          "usage": _usage(gen.prompt_tokens, 0, 0)})
    current = None
    async for piece in gen.pieces():
        b = piece.block
        if piece.new:
            if current is not None:
                yield event("content_block_stop", index=current.index)
            current = b
            yield event("content_block_start", index=b.index, content_block=_block(b, done=False))
        if b.kind == "text":
            delta = {"type": "text_delta", "text": piece.text}
        elif b.kind == "reasoning":
            delta = {"type": "thinking_delta", "thinking": piece.text}
        else:
            delta = {"type": "input_json_delta", "partial_json": piece.text}
        yield event("content_block_delta", index=b.index, delta=delta)
    if current is not None:
        yield event("content_block_stop", index=current.index)
    if gen.error:
        yield event("error", error=common.anthropic_error(gen.error)["error"])
        return
    u = gen.usage
    yield event("message_delta", delta=_stop(gen),
                usage=_usage(u.prompt_tokens, u.cached_tokens, u.completion_tokens))
    yield event("message_stop")


def _usage(prompt_tokens: int, cached: int, output_tokens: int) -> dict:
    # Anthropic counts cache reads apart from input_tokens (total = input + cache reads).
    return {"input_tokens": prompt_tokens - cached, "output_tokens": output_tokens,
            "cache_read_input_tokens": cached, "cache_creation_input_tokens": 0}


def _stop(gen) -> dict:
    reason = _STOP_REASONS.get(gen.finish_reason) or ("stop_sequence" if gen.stop_sequence else "end_turn")
    return {"stop_reason": reason, "stop_sequence": gen.stop_sequence}


def _block(b, done: bool) -> dict:
    kind = _BLOCK_TYPES[b.kind]
    if kind == "tool_use":
        return {"type": kind, "id": b.call_id, "name": b.name, "input": _arguments(b.text) if done else {}}
    if kind == "thinking":
        return {"type": kind, "thinking": b.text if done else "", "signature": ""}
    return {"type": kind, "text": b.text if done else ""}


def _arguments(text: str):
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        return {}


def _chat(body: dict) -> tuple[list[dict], list[dict] | None]:
    """`system` and `messages` as chat messages; the function tools (None if disabled).

    A `system` role inside `messages` (Claude Code sends one) is taken as it is: the
    normalization (messages.py) moves it into the leading system message."""
    chat = []
    system = common.text_of(get(body, "system", (str, list)), "system")
    if system:
        chat.append({"role": "system", "content": system})
    for i, m in enumerate(common.items(body, "messages")):
        role, content, param = m.get("role"), m.get("content"), f"messages[{i}]"
        if role not in ("user", "assistant", "system"):
            raise ApiError(400, f"'{param}.role' must be 'user', 'assistant' or 'system'", param=param)
        if not isinstance(content, list):
            chat.append({"role": role, "content": common.text_of(content, f"{param}.content")})
            continue
        texts, calls = [], []
        for j, block in enumerate(content):
            kind, where = block.get("type") if isinstance(block, dict) else None, f"{param}.content[{j}]"
            if kind is not None and "cache_control" in block:  # prompt caching here is automatic
                common.ignored("/v1/messages cache_control")
            if kind == "text":
                texts.append(common.text_of([block], where))
            elif kind == "tool_use":
                calls.append(common.tool_call(block.get("id"), block.get("name"), block.get("input"), where))
            elif kind == "tool_result":  # each result is a tool message of its own
                chat.append({"role": "tool", "tool_call_id": block.get("tool_use_id"),
                             "content": common.text_of(block.get("content"), f"{where}.content")})
            elif kind not in ("thinking", "redacted_thinking"):  # earlier thinking is not shown again
                raise ApiError(400, f"unsupported content block type {kind!r}", param=where)
        if texts or calls:
            chat.append({"role": role, "content": "".join(texts), **({"tool_calls": calls} if calls else {})})
    if all(m["role"] == "system" for m in chat):
        raise ApiError(400, "'messages' must not be empty", param="messages")
    choice = get(body, "tool_choice", dict, {})
    tools = []
    for i, t in enumerate(common.items(body, "tools")):
        if "input_schema" in t:  # server tools (web_search_20250305, ...) have none and are left out
            tools.append(common.function_tool(t.get("name"), t.get("description"), t.get("input_schema"),
                                              f"tools[{i}]"))
        else:
            common.ignored(f"/v1/messages tool type {t.get('type')!r}")
    return chat, (tools if choice.get("type") != "none" else None)
