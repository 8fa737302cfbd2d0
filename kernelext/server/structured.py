"""Structured output over the three APIs: response formats, forced tool calls.

Every dialect's fields become SamplingParams constraint fields (engine/structured
compiles them; a schema or grammar that cannot compile is InvalidRequestError,
which the server answers with a 400 before anything is submitted):

  OpenAI chat `response_format`, Responses `text.format`:
      {"type": "json_object"}                       -> json_schema=True
      {"type": "json_schema", "json_schema"|...: {"schema": S, "strict": ...}} -> json_schema=S
  /v1/completions (and chat): `regex`, `choice`, `grammar` (Lark or GBNF), `json_schema`
  `tool_choice` "required" / a named function (OpenAI), "any" / {"type": "tool"} (Anthropic):
      the output is forced to be one call of an offered function, its arguments
      constrained to the function's parameter schema.

A forced call is written in the model's own tool-call syntax when its tokenizer has
one that carries JSON (mlx-lm's `json_tools` parser: <tool_call>{"name", "arguments"}
</tool_call>, Qwen and Hermes style); the server's usual parser then reads it. Models
without tool-call markers, like the default Gemma 3 270M, follow this JSON convention:
the whole output is one object {"name": "<function>", "arguments": {...}}, which the
server turns into the call (Generation.forced_json_call). The same object is how
issue-15's message normalization shows earlier calls to such models, so the model
sees its own calls in the form it is asked to write them.
"""

from __future__ import annotations

import json
from dataclasses import dataclass

from engine.structured.constraint import lark_json

from .common import ApiError

BODY_FIELDS = ("regex", "choice", "grammar", "json_schema")


def response_format(fmt, param: str, schema_key: str | None) -> dict:
    """Constraint fields for a response format; schema_key is where json_schema's
    schema sits ("json_schema" in chat's response_format, None in Responses' text.format)."""
    if fmt is None:
        return {}
    if not isinstance(fmt, dict) or not isinstance(fmt.get("type"), str):
        raise ApiError(400, f"'{param}' must be an object with a 'type'", param=param)
    kind = fmt["type"]
    if kind == "text":
        return {}
    if kind == "json_object":
        return {"json_schema": True}
    if kind == "json_schema":
        spec = fmt.get(schema_key) if schema_key else fmt
        if not isinstance(spec, dict):
            raise ApiError(400, f"'{param}.{schema_key}' must be an object", param=param)
        schema = spec.get("schema")
        if schema is None:
            return {"json_schema": True}
        if not isinstance(schema, dict):
            raise ApiError(400, f"'{param}' schema must be a JSON Schema object", param=param)
        return {"json_schema": schema}
    raise ApiError(400, f"'{param}.type' must be 'text', 'json_object' or 'json_schema', got {kind!r}",
                   param=param)


def body_constraint(body: dict) -> dict:
    """/v1/completions' (and chat's) direct fields: regex, choice, grammar, json_schema."""
    out = {k: body[k] for k in BODY_FIELDS if body.get(k) is not None}
    if "choice" in out and not isinstance(out["choice"], list):
        raise ApiError(400, "'choice' must be an array of strings", param="choice")
    for k in ("regex", "grammar"):
        if k in out and not isinstance(out[k], str):
            raise ApiError(400, f"'{k}' must be a string", param=k)
    if "json_schema" in out and not isinstance(out["json_schema"], (dict, bool)):
        raise ApiError(400, "'json_schema' must be a JSON Schema object", param="json_schema")
    return out


def merge(*parts: dict) -> dict:
    out: dict = {}
    for p in parts:
        if p and out:
            raise ApiError(400, f"only one output constraint per request; got {sorted({*out, *p})}")
        out.update(p)
    return out


ANY_TOOL = "any"


def forced_names(choice, param: str = "tool_choice"):
    """None (no call forced), ANY_TOOL, or [name] from any dialect's tool_choice:
    OpenAI chat {"type": "function", "function": {"name"}}, Responses {"type":
    "function", "name"}, Anthropic {"type": "any"} / {"type": "tool", "name"}."""
    if choice is None or choice in ("auto", "none"):
        return None
    if choice == "required":
        return ANY_TOOL
    if isinstance(choice, dict):
        kind = choice.get("type")
        if kind in ("auto", "none", None) and "function" not in choice and "name" not in choice:
            return None
        if kind == "any":
            return ANY_TOOL
        name = choice.get("name") or (choice.get("function") or {}).get("name")
        if kind in ("function", "tool") and isinstance(name, str):
            return [name]
    raise ApiError(400, f"unsupported '{param}': {json.dumps(choice)[:200]}", param=param)


@dataclass
class ForcedCall:
    constraint: dict  # SamplingParams fields
    json_convention: bool  # True: the whole output is {"name", "arguments"} (no markers)


def forced_call(engine, tools: list[dict] | None, names) -> ForcedCall:
    """Force one call among `names` (ANY_TOOL: any offered tool) of the canonical `tools`."""
    names = None if names == ANY_TOOL else names
    if not tools:
        raise ApiError(400, "tool_choice requires a call but no tools were given", param="tool_choice")
    by_name = {t["function"]["name"]: t["function"] for t in tools or []}
    for n in names or []:
        if n not in by_name:
            raise ApiError(400, f"tool_choice names '{n}', which is not among the tools",
                           param="tool_choice")
    chosen = [by_name[n] for n in (names or by_name)]
    calls = [{"type": "object", "properties": {"name": {"const": f["name"]},
                                               "arguments": _parameters(f)},
              "required": ["name", "arguments"], "additionalProperties": False} for f in chosen]
    schema = calls[0] if len(calls) == 1 else {"anyOf": calls}
    tok = engine.tokenizer
    start, end = getattr(tok, "tool_call_start", None), getattr(tok, "tool_call_end", None)
    if getattr(tok, "has_tool_calling", False) and _json_parser(tok) and start and end:
        grammar = f"start: {_lark_literal(start)} {lark_json(schema)} {_lark_literal(end)}"
        return ForcedCall({"grammar": grammar}, json_convention=False)
    return ForcedCall({"json_schema": schema}, json_convention=True)


def with_tool_note(engine, messages: list[dict], tools: list[dict]) -> list[dict]:
    """For a template that does not show tools (its text is the same with and without
    them), the JSON convention and the tools go into a system note."""
    from .common import chat_prompt

    if chat_prompt(engine, messages, tools) != chat_prompt(engine, messages, None):
        return messages
    return [{"role": "system", "content": _tool_note(tools)}, *messages]


def _tool_note(tools: list[dict]) -> str:
    lines = ["You can call these functions:"]
    for t in tools:
        f = t["function"]
        lines.append(f"- {f['name']}: {f.get('description') or ''} parameters: "
                     f"{json.dumps(_parameters(f), ensure_ascii=False)}")
    lines.append('Reply with exactly one JSON object {"name": <function name>, "arguments": {...}}.')
    return "\n".join(lines)


def prepare(engine, body: dict, messages: list[dict], tools: list[dict] | None, choice,
            fmt: dict) -> tuple[list[dict], dict, bool]:
    """(messages, SamplingParams constraint fields, json_convention) for a chat request:
    its response format or direct fields, or the call its tool_choice forces."""
    constraint = merge(fmt, body_constraint(body))
    names = forced_names(choice)
    if names is None:
        return messages, constraint, False
    forced = forced_call(engine, tools, names)
    constraint = merge(constraint, forced.constraint)
    if forced.json_convention:
        messages = with_tool_note(engine, messages, tools)
    return messages, constraint, forced.json_convention


def _parameters(f: dict) -> dict:
    p = f.get("parameters") or {"type": "object"}
    return p if isinstance(p, dict) else {"type": "object"}


def _json_parser(tok) -> bool:
    parser = getattr(tok, "_tool_parser", None)
    return getattr(parser, "__module__", "").endswith("json_tools") or \
        getattr(tok, "tool_parser_type", None) == "json_tools"


def _lark_literal(text: str) -> str:
    return json.dumps(text)
