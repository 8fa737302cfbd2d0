"""OpenAI Responses API (what Codex CLI and the Agents SDK speak).

Every request may carry its whole conversation as `input`; with `store` (the API's
default) the response is also kept, bounded, so a later request can continue it with
`previous_response_id` (response_store.py)."""

from __future__ import annotations

import itertools
import time

from . import common, structured
from .common import SSE, ApiError, get, sse

_ITEM_PREFIX = {"text": "msg", "reasoning": "rs", "tool_call": "fc"}
_USED = frozenset({"model", "input", "instructions", "tools", "tool_choice", "previous_response_id", "store",
                   "max_output_tokens", "stop", "top_logprobs", "stream", "parallel_tool_calls", "metadata",
                   "text", *structured.BODY_FIELDS})
# Input items from built-in tools this server does not run; a client replaying its
# history sends them back, and they carry nothing a chat template could show.
_SKIPPED_ITEMS = ("reasoning", "web_search_call", "file_search_call", "image_generation_call",
                  "computer_call", "computer_call_output", "code_interpreter_call", "mcp_list_tools",
                  "compaction", "item_reference")


async def create(call, body: dict):
    engine = call.engine
    model = common.check_model(engine, body)
    common.ignore_unused(body, _USED, "/v1/responses")
    store = get(body, "store", bool, True)
    previous = get(body, "previous_response_id", str)
    history: list[dict] = []
    if previous:
        stored = call.app.responses.get(previous)
        if stored is None:
            raise ApiError(404, f"previous response '{previous}' not found (this server keeps the last "
                           f"{call.app.responses.capacity} responses created with store: true, in memory)",
                           param="previous_response_id", code="previous_response_not_found")
        history = list(stored.messages)
    conversation = history + _messages(body)
    if not conversation:
        raise ApiError(400, "'input' has no message to answer", param="input")
    instructions = get(body, "instructions", str)
    messages = ([{"role": "system", "content": instructions}] if instructions else []) + conversation
    tools, namespaces = None, {}
    choice = get(body, "tool_choice", (str, dict))
    if choice != "none":
        tools, namespaces = _tools(body)
    text_format = get(get(body, "text", dict, {}), "format", dict)
    fmt = structured.response_format(text_format, "text.format", None)
    messages, constraint, json_calls = structured.prepare(engine, body, messages, tools, choice, fmt,
                                                                structured.strict_names(common.items(body, "tools")))
    prompt = common.chat_prompt(engine, messages, tools)
    params = common.sampling_params(body, call.app.default_max_tokens, max_tokens=("max_output_tokens",),
                                    stop="stop", logprobs=get(body, "top_logprobs", int), constraint=constraint)
    stream = get(body, "stream", bool, False)
    gen = call.submit(prompt, params, tools=tools, chat=True)
    gen.json_calls = json_calls
    rid = common.new_id("resp_")
    head = {"id": rid, "object": "response", "created_at": int(time.time()), "model": model,
            "instructions": instructions, "tools": body.get("tools") or [],
            "tool_choice": body.get("tool_choice", "auto"),
            "parallel_tool_calls": get(body, "parallel_tool_calls", bool, True),
            "previous_response_id": previous, "store": store,
            "text": {"format": text_format or {"type": "text"}}, "metadata": get(body, "metadata", dict, {}), "error": None,
            "incomplete_details": None, "output": [], "usage": None}
    keep = (lambda: call.app.responses.put(rid, conversation + _as_messages(gen))) if store else (lambda: None)
    if stream:
        return SSE(_stream(gen, head, namespaces, keep))
    await gen.collect()
    keep()
    return _final(gen, head, namespaces)


def _tools(body: dict) -> tuple[list[dict], dict[str, str]]:
    """Function tools for the template, and the namespace of each namespaced one.

    Only function tools can be shown to a chat template: built-in tools (web_search,
    custom, ...) are left out; Codex's `namespace` tools nest function tools, which are
    shown flat (their calls are tagged with the namespace again on the way out)."""
    tools, namespaces = [], {}
    for i, t in enumerate(common.items(body, "tools")):
        kind = t.get("type")
        if kind == "function":
            tools.append(common.function_tool(t.get("name"), t.get("description"), t.get("parameters"),
                                              f"tools[{i}]"))
        elif kind == "namespace" and isinstance(t.get("tools"), list):
            for j, inner in enumerate(t["tools"]):
                if isinstance(inner, dict) and inner.get("type", "function") == "function":
                    tools.append(common.function_tool(inner.get("name"), inner.get("description"),
                                                      inner.get("parameters"), f"tools[{i}].tools[{j}]"))
                    namespaces[inner.get("name")] = t.get("name")
        else:
            common.ignored(f"/v1/responses tool type {kind!r}")
    return tools, namespaces


def _as_messages(gen) -> list[dict]:
    """A finished response's output as chat messages, for the response store."""
    calls = [common.tool_call(b.call_id, b.name, b.text, "output") for b in gen.blocks if b.kind == "tool_call"]
    return [{"role": "assistant", "content": gen.joined(), **({"tool_calls": calls} if calls else {})}]


def _final(gen, head: dict, namespaces: dict[str, str]) -> dict:
    """The finished response: "completed", or "incomplete" at the output limit."""
    u = gen.usage
    out = {**head, "status": "completed",
           "output": [_item(b, head["id"], True, namespaces) for b in gen.blocks],
           "usage": {"input_tokens": u.prompt_tokens,
                     "input_tokens_details": {"cached_tokens": u.cached_tokens},
                     "output_tokens": u.completion_tokens, "output_tokens_details": {"reasoning_tokens": 0},
                     "total_tokens": u.total_tokens}}
    if gen.finish_reason == "length":
        out.update(status="incomplete", incomplete_details={"reason": "max_output_tokens"})
    return out


async def _stream(gen, head: dict, namespaces: dict[str, str], keep):
    seq = itertools.count()
    rid = head["id"]

    def event(kind: str, **fields) -> bytes:
        return sse({"type": kind, "sequence_number": next(seq), **fields}, event=kind)

    def close(b) -> list[bytes]:
        where = {"item_id": _item_id(b, rid), "output_index": b.index}
        if b.kind == "text":
            part = _part(b)
            out = [event("response.output_text.done", **where, content_index=0, text=b.text,
                         logprobs=part["logprobs"]),
                   event("response.content_part.done", **where, content_index=0, part=part)]
        elif b.kind == "reasoning":
            out = [event("response.reasoning_text.done", **where, content_index=0, text=b.text)]
        else:
            out = [event("response.function_call_arguments.done", **where, name=b.name, arguments=b.text)]
        return out + [event("response.output_item.done", output_index=b.index, item=_item(b, rid, True, namespaces))]

    running = {**head, "status": "in_progress"}
    yield event("response.created", response=running)
    yield event("response.in_progress", response=running)
    current = None
    async for piece in gen.pieces():
        b = piece.block
        where = {"item_id": _item_id(b, rid), "output_index": b.index}
        if piece.new:
            if current is not None:
                for e in close(current):
                    yield e
            current = b
            yield event("response.output_item.added", output_index=b.index, item=_item(b, rid, False, namespaces))
            if b.kind == "text":
                yield event("response.content_part.added", **where, content_index=0,
                            part={"type": "output_text", "text": "", "annotations": [], "logprobs": []})
        if b.kind == "text":
            yield event("response.output_text.delta", **where, content_index=0, delta=piece.text,
                        logprobs=common.token_logprobs(piece.logprobs))
        elif b.kind == "reasoning":
            yield event("response.reasoning_text.delta", **where, content_index=0, delta=piece.text)
        else:
            yield event("response.function_call_arguments.delta", **where, delta=piece.text)
    if current is not None:
        for e in close(current):
            yield e
    if gen.error:
        e = gen.error
        yield event("response.failed", response={**head, "status": "failed",
                                                 "error": {"code": e.type, "message": e.message}})
        return
    # Always "response.completed", also for a response cut off at max_output_tokens
    # (status "incomplete" inside): clients such as the openai SDK's stream helper
    # and Codex take the output from this event only.
    keep()
    yield event("response.completed", response=_final(gen, head, namespaces))


def _item_id(b, rid: str) -> str:
    return f"{_ITEM_PREFIX[b.kind]}_{rid.removeprefix('resp_')}_{b.index}"


def _item(b, rid: str, done: bool, namespaces: dict[str, str]) -> dict:
    status = "completed" if done else "in_progress"
    item_id = _item_id(b, rid)
    if b.kind == "text":
        return {"type": "message", "id": item_id, "status": status, "role": "assistant",
                "content": [_part(b)] if done else []}
    if b.kind == "reasoning":
        return {"type": "reasoning", "id": item_id, "status": status, "summary": [],
                "content": [{"type": "reasoning_text", "text": b.text}] if done else []}
    namespace = {"namespace": namespaces[b.name]} if b.name in namespaces else {}
    return {"type": "function_call", "id": item_id, "status": status, "call_id": b.call_id,
            "name": b.name, **namespace, "arguments": b.text if done else ""}


def _part(b) -> dict:
    return {"type": "output_text", "text": b.text, "annotations": [],
            "logprobs": common.token_logprobs(b.logprobs)}


def _messages(body: dict) -> list[dict]:
    """`input` (a string or a list of items, with or without ids) as chat messages."""
    messages = []
    source = get(body, "input", (str, list), required=True)
    if isinstance(source, str):
        return messages + [{"role": "user", "content": source}]
    for i, item in enumerate(common.items(body, "input")):
        kind, param = item.get("type", "message"), f"input[{i}]"
        if kind == "message":
            role = item.get("role")
            if not isinstance(role, str):
                raise ApiError(400, f"'{param}.role' must be a string", param=param)
            messages.append({"role": role, "content": common.text_of(item.get("content"), f"{param}.content")})
        elif kind == "function_call":
            call = common.tool_call(item.get("call_id"), item.get("name"), item.get("arguments"), param)
            last = messages[-1] if messages else None
            if last is None or last["role"] != "assistant":  # calls join the assistant turn before them
                last = {"role": "assistant", "content": ""}
                messages.append(last)
            last.setdefault("tool_calls", []).append(call)
        elif kind == "function_call_output":
            messages.append({"role": "tool", "tool_call_id": item.get("call_id"),
                             "content": common.text_of(item.get("output"), f"{param}.output")})
        elif kind in _SKIPPED_ITEMS:  # earlier reasoning is not shown to the model again
            common.ignored(f"/v1/responses input item type {kind!r}")
        else:
            raise ApiError(400, f"unsupported input item type {kind!r}", param=param)
    return messages
