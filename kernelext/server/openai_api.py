"""OpenAI Chat Completions, legacy Completions and the model list."""

from __future__ import annotations

import time

from . import common, structured
from .common import SSE, ApiError, get, sse

_STARTED = int(time.time())
_CHAT_FIELDS = frozenset({"model", "messages", "tools", "tool_choice", "logprobs", "top_logprobs",
                          "max_completion_tokens", "max_tokens", "stop", "stream", "stream_options", "n",
                          "response_format", *structured.BODY_FIELDS})
_COMPLETION_FIELDS = frozenset({"model", "prompt", "echo", "logprobs", "max_tokens", "stop", "stream",
                                "stream_options", "n", "response_format", *structured.BODY_FIELDS})


async def models(call, body: dict) -> dict:
    """Every model the server knows, with its task and state (loaded, loading, unloaded)."""
    return {"object": "list", "data": [
        {"id": m["name"], "object": "model", "created": _STARTED, "owned_by": "kernelext",
         "task": m["task"], "state": m["state"], "pinned": m["pinned"]}
        for m in call.app.registry.status()]}


async def chat_completions(call, body: dict):
    engine = call.engine
    model = common.check_model(engine, body)
    common.ignore_unused(body, _CHAT_FIELDS, "/v1/chat/completions")
    common.check_n(body)
    messages = [_message(m, i) for i, m in enumerate(common.items(body, "messages"))]
    if not messages:
        raise ApiError(400, "'messages' must not be empty", param="messages")
    tools = None
    choice = get(body, "tool_choice", (str, dict))
    if choice != "none":
        tools = [_function_tool(t, i) for i, t in enumerate(common.items(body, "tools")) if _is_function(t)]
    fmt = structured.response_format(get(body, "response_format", dict), "response_format", "json_schema")
    messages, constraint, json_calls = structured.prepare(engine, body, messages, tools, choice, fmt,
                                                                structured.strict_names(common.items(body, "tools")))
    prompt = common.chat_prompt(engine, messages, tools)
    logprobs = None
    if get(body, "logprobs", bool, False):
        logprobs = get(body, "top_logprobs", int, 0)
    elif get(body, "top_logprobs", int) is not None:
        raise ApiError(400, "'top_logprobs' needs 'logprobs': true", param="top_logprobs")
    params = common.sampling_params(body, call.app.default_max_tokens,
                                    max_tokens=("max_completion_tokens", "max_tokens"),
                                    stop="stop", logprobs=logprobs, constraint=constraint)
    stream, include_usage = _stream_options(body)
    gen = call.submit(prompt, params, tools=tools, chat=True)
    gen.json_calls = json_calls
    head = {"id": common.new_id("chatcmpl-"), "object": "chat.completion", "created": int(time.time()),
            "model": model}
    if stream:
        return SSE(_stream(gen, {**head, "object": "chat.completion.chunk"}, include_usage, _chat_delta,
                           first={"delta": {"role": "assistant", "content": ""}}, last={"delta": {}}))
    await gen.collect()
    calls = [_tool_call(b) for b in gen.blocks if b.kind == "tool_call"]
    message = {"role": "assistant", "content": gen.joined() or None,
               **({"reasoning": r} if (r := gen.joined("reasoning")) else {}),
               **({"tool_calls": calls} if calls else {})}
    choice = {"index": 0, "message": message, "finish_reason": gen.finish_reason,
              "logprobs": _chat_logprobs(gen.logprobs) if logprobs is not None else None}
    return {**head, "choices": [choice], "usage": _usage(gen)}


async def completions(call, body: dict):
    engine = call.engine
    model = common.check_model(engine, body)
    common.ignore_unused(body, _COMPLETION_FIELDS, "/v1/completions")
    common.check_n(body)
    if get(body, "echo", bool, False):
        raise ApiError(400, "'echo' is not supported", param="echo")
    prompt = body.get("prompt")
    if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], (str, list)):
        prompt = prompt[0]  # a batch of one
    if not (isinstance(prompt, str) or (isinstance(prompt, list) and prompt
                                        and all(type(t) is int for t in prompt))):
        raise ApiError(400, "'prompt' must be a string or a list of token ids (one prompt per request)",
                       param="prompt")
    logprobs = get(body, "logprobs", int)
    constraint = structured.merge(
        structured.response_format(get(body, "response_format", dict), "response_format", "json_schema"),
        structured.body_constraint(body))
    params = common.sampling_params(body, call.app.default_max_tokens, max_tokens=("max_tokens",), stop="stop",
                                    logprobs=logprobs, constraint=constraint)
    stream, include_usage = _stream_options(body)
    gen = call.submit(common.encode(engine, prompt), params, tools=None, chat=False)
    head = {"id": common.new_id("cmpl-"), "object": "text_completion", "created": int(time.time()),
            "model": model}
    if stream:
        return SSE(_stream(gen, head, include_usage, _text_delta, first=None, last={"text": ""}))
    await gen.collect()
    choice = {"index": 0, "text": gen.joined(), "finish_reason": gen.finish_reason,
              "logprobs": _text_logprobs(gen.logprobs) if logprobs is not None else None}
    return {**head, "choices": [choice], "usage": _usage(gen)}


def _usage(gen) -> dict:
    u = gen.usage
    return {"prompt_tokens": u.prompt_tokens, "completion_tokens": u.completion_tokens,
            "total_tokens": u.total_tokens, "prompt_tokens_details": {"cached_tokens": u.cached_tokens}}


def _stream_options(body: dict) -> tuple[bool, bool]:
    include_usage = get(get(body, "stream_options", dict, {}), "include_usage", bool, False)
    return get(body, "stream", bool, False), include_usage


async def _stream(gen, head: dict, include_usage: bool, delta, first: dict | None, last: dict):
    """Chunks of either endpoint: `delta(piece, tool_index)` makes a piece's choice fields."""
    if include_usage:
        head = {**head, "usage": None}  # the spec's null on every chunk but the last
    if first:
        yield sse({**head, "choices": [{"index": 0, **first, "logprobs": None, "finish_reason": None}]})
    tool_index = 0
    async for piece in gen.pieces():
        yield sse({**head, "choices": [{"index": 0, **delta(piece, tool_index), "finish_reason": None}]})
        tool_index += piece.block.kind == "tool_call"
    if gen.error:
        yield sse(common.openai_error(gen.error))
        return
    yield sse({**head, "choices": [{"index": 0, **last, "logprobs": None,
                                    "finish_reason": gen.finish_reason}]})
    if include_usage:
        yield sse({**head, "choices": [], "usage": _usage(gen)})
    yield sse("[DONE]")


def _chat_delta(piece, tool_index: int) -> dict:
    b = piece.block
    if b.kind == "tool_call":
        return {"delta": {"tool_calls": [{"index": tool_index, **_tool_call(b)}]}, "logprobs": None}
    key = "content" if b.kind == "text" else "reasoning"
    return {"delta": {key: piece.text},
            "logprobs": _chat_logprobs(piece.logprobs) if piece.logprobs else None}


def _text_delta(piece, tool_index: int) -> dict:
    return {"text": piece.text,
            "logprobs": _text_logprobs(piece.logprobs) if piece.logprobs else None}


def _message(m: dict, i: int) -> dict:
    role = m.get("role")
    if not isinstance(role, str):
        raise ApiError(400, f"'messages[{i}].role' must be a string", param=f"messages[{i}].role")
    out = {"role": role, "content": common.text_of(m.get("content"), f"messages[{i}].content")}
    calls = common.items(m, "tool_calls")
    if calls:
        fns = [c["function"] if isinstance(c.get("function"), dict) else {} for c in calls]
        out["tool_calls"] = [common.tool_call(c.get("id"), fn.get("name"), fn.get("arguments"),
                                              f"messages[{i}].tool_calls[{j}]")
                             for j, (c, fn) in enumerate(zip(calls, fns))]
    for key in ("tool_call_id", "name"):
        if isinstance(m.get(key), str):
            out[key] = m[key]
    return out


def _is_function(t: dict) -> bool:
    """Only function tools can be shown to a chat template; others (custom, built-in) are left out."""
    if t.get("type", "function") == "function":
        return True
    common.ignored(f"/v1/chat/completions tool type {t.get('type')!r}")
    return False


def _function_tool(t: dict, i: int) -> dict:
    fn = t.get("function")
    if not isinstance(fn, dict):
        raise ApiError(400, f"'tools[{i}]' must be a function tool", param=f"tools[{i}]")
    return common.function_tool(fn.get("name"), fn.get("description"), fn.get("parameters"), f"tools[{i}]")


def _tool_call(block) -> dict:
    return {"id": block.call_id, "type": "function",
            "function": {"name": block.name, "arguments": block.text}}


def _chat_logprobs(lps) -> dict:
    return {"content": common.token_logprobs(lps)}


def _text_logprobs(lps) -> dict:
    return {"tokens": [t.token for t in lps],
            "token_logprobs": [common.finite(t.logprob) for t in lps],
            "top_logprobs": [{s: common.finite(l) for _, s, l in t.top} for t in lps]}
