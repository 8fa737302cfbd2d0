"""OpenAI Responses API (what Codex CLI speaks), stateless: every request carries
its whole conversation (`store`/`previous_response_id` are not kept/served)."""

from __future__ import annotations

import itertools
import time

from . import common, structured
from .common import SSE, ApiError, get, sse

_ITEM_PREFIX = {"text": "msg", "reasoning": "rs", "tool_call": "fc"}


async def create(call, body: dict):
    engine = call.engine
    model = common.check_model(engine, body)
    if get(body, "previous_response_id", str):
        raise ApiError(400, "this server keeps no responses; send the whole conversation as 'input'",
                       param="previous_response_id")
    messages = _messages(body)
    tools = None
    choice = get(body, "tool_choice", (str, dict))
    if choice != "none":
        # Only function tools can be shown to a chat template; built-in tools are left out.
        tools = [common.function_tool(t.get("name"), t.get("description"), t.get("parameters"), f"tools[{i}]")
                 for i, t in enumerate(common.items(body, "tools")) if t.get("type") == "function"]
    text_format = get(get(body, "text", dict, {}), "format", dict)
    fmt = structured.response_format(text_format, "text.format", None)
    messages, constraint, json_call = structured.prepare(engine, body, messages, tools, choice, fmt)
    prompt = common.chat_prompt(engine, messages, tools)
    params = common.sampling_params(body, engine, max_tokens=("max_output_tokens",), stop="stop",
                                    logprobs=get(body, "top_logprobs", int), constraint=constraint)
    stream = get(body, "stream", bool, False)
    gen = call.submit(prompt, params, tools=tools, chat=True)
    gen.forced_json_call = json_call
    rid = common.new_id("resp_")
    head = {"id": rid, "object": "response", "created_at": int(time.time()), "model": model,
            "instructions": body.get("instructions"), "tools": body.get("tools") or [],
            "tool_choice": body.get("tool_choice", "auto"), "parallel_tool_calls": True,
            "text": {"format": text_format or {"type": "text"}}, "metadata": {}, "error": None,
            "incomplete_details": None, "output": [], "usage": None}
    if stream:
        return SSE(_stream(gen, head))
    await gen.collect()
    return _final(gen, head)


def _final(gen, head: dict) -> dict:
    """The finished response: "completed", or "incomplete" at the output limit."""
    u = gen.usage
    out = {**head, "status": "completed",
           "output": [_item(b, head["id"], done=True) for b in gen.blocks],
           "usage": {"input_tokens": u.prompt_tokens,
                     "input_tokens_details": {"cached_tokens": u.cached_tokens},
                     "output_tokens": u.completion_tokens, "output_tokens_details": {"reasoning_tokens": 0},
                     "total_tokens": u.total_tokens}}
    if gen.finish_reason == "length":
        out.update(status="incomplete", incomplete_details={"reason": "max_output_tokens"})
    return out


async def _stream(gen, head: dict):
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
        return out + [event("response.output_item.done", output_index=b.index, item=_item(b, rid, True))]

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
            yield event("response.output_item.added", output_index=b.index, item=_item(b, rid, False))
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
    yield event("response.completed", response=_final(gen, head))


def _item_id(b, rid: str) -> str:
    return f"{_ITEM_PREFIX[b.kind]}_{rid.removeprefix('resp_')}_{b.index}"


def _item(b, rid: str, done: bool) -> dict:
    status = "completed" if done else "in_progress"
    item_id = _item_id(b, rid)
    if b.kind == "text":
        return {"type": "message", "id": item_id, "status": status, "role": "assistant",
                "content": [_part(b)] if done else []}
    if b.kind == "reasoning":
        return {"type": "reasoning", "id": item_id, "status": status, "summary": [],
                "content": [{"type": "reasoning_text", "text": b.text}] if done else []}
    return {"type": "function_call", "id": item_id, "status": status, "call_id": b.call_id,
            "name": b.name, "arguments": b.text if done else ""}


def _part(b) -> dict:
    return {"type": "output_text", "text": b.text, "annotations": [],
            "logprobs": common.token_logprobs(b.logprobs)}


def _messages(body: dict) -> list[dict]:
    """`instructions` and `input` (a string or a list of items) as chat messages."""
    messages = []
    instructions = get(body, "instructions", str)
    if instructions:
        messages.append({"role": "system", "content": instructions})
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
        elif kind != "reasoning":  # earlier reasoning is not shown to the model again
            raise ApiError(400, f"unsupported input item type {kind!r}", param=param)
    return messages
