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
  `tool_choice` "auto" (or none given) with a `strict: true` tool (OpenAI function
  tools; Anthropic tools' `strict` the same): text stays free, and a call the model
  starts is one of the offered tools, a strict one's arguments held to its schema.

Calls are written in the model's own tool-call syntax when its tokenizer has one
(tool_syntax.py: a grammar per mlx-lm parser, read back by that parser). Models
without tool-call markers, like the default Gemma 3 270M, follow this JSON convention:
a call is one object {"name": "<function>", "arguments": {...}} (forced: the whole
output; under auto: an output whose first non-space character is '{'), which the
server turns into the call (Generation.json_calls). The same object is how
issue-15's message normalization shows earlier calls to such models, so the model
sees its own calls in the form it is asked to write them. A forced call on a model
whose syntax has no grammar here (or cannot carry the schema) uses the JSON
convention too; strict tools under auto are then left unconstrained (logged once).
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass

from engine.structured.constraint import lark_json

from . import tool_syntax
from .common import ApiError, log_once

log = logging.getLogger("kernelext.server")

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
class ToolCalls:
    constraint: dict  # SamplingParams fields
    json_calls: str | None  # the JSON convention: "forced" (the whole output is the call),
    # "auto" (an output that starts with '{' is the call), None (the model's own syntax)


def forced_call(engine, tools: list[dict] | None, names) -> ToolCalls:
    """Force one call among `names` (ANY_TOOL: any offered tool) of the canonical `tools`,
    its arguments held to the tool's parameter schema (strict or not)."""
    names = None if names == ANY_TOOL else names
    if not tools:
        raise ApiError(400, "tool_choice requires a call but no tools were given", param="tool_choice")
    by_name = {t["function"]["name"]: t["function"] for t in tools or []}
    for n in names or []:
        if n not in by_name:
            raise ApiError(400, f"tool_choice names '{n}', which is not among the tools",
                           param="tool_choice")
    chosen = [(by_name[n]["name"], _parameters(by_name[n])) for n in (names or by_name)]
    tok = engine.tokenizer
    if tool_syntax.parser_name(tok) is not None:
        try:
            return ToolCalls({"grammar": tool_syntax.forced_grammar(tok, chosen)}, None)
        except tool_syntax.Unsupported as e:  # documented: the JSON convention instead
            log.info("forced call in the JSON convention: %s", e)
    return ToolCalls({"json_schema": tool_syntax.json_calls_schema(chosen)}, "forced")


def auto_calls(engine, tools: list[dict] | None, strict: set[str]) -> ToolCalls | None:
    """Under tool_choice auto: None unless a strict tool is offered. Then free text, and
    any call the model starts (its start marker, or '{' in the JSON convention) is one of
    the tools, a strict tool's arguments held to its parameter schema (others take any
    arguments the syntax can carry). Text outside calls is not constrained."""
    by_name = {t["function"]["name"]: _parameters(t["function"]) for t in tools or []}
    if not strict & by_name.keys():
        return None
    tok = engine.tokenizer
    if tool_syntax.parser_name(tok) is None:
        specs = [(n, p if n in strict else None) for n, p in by_name.items()]
        return ToolCalls({"grammar": _json_convention_auto(specs)}, "auto")
    try:
        tool_syntax.syntax_of(tok)
    except tool_syntax.Unsupported as e:
        log_once(logging.WARNING, f"strict tools are not enforced under tool_choice auto: {e}")
        return None
    specs = [(n, _expressible(tok, n, p) if n in strict else None) for n, p in by_name.items()]
    return ToolCalls({"grammar": tool_syntax.auto_grammar(tok, specs)}, None)


def _expressible(tok, name: str, schema: dict) -> dict | None:
    try:
        tool_syntax.auto_grammar(tok, [(name, schema)])
        return schema
    except tool_syntax.Unsupported as e:
        log_once(logging.WARNING, f"strict tool '{name}' is not enforced under tool_choice auto: {e}")
        return None


JSON_SPACE = " \t\n\r"  # what may precede a call's '{' (Generation strips the same)


def _json_convention_auto(specs: list[tuple[str, dict | None]]) -> str:
    """Text that does not start with '{' after JSON whitespace, or (after such
    whitespace) one {"name", "arguments"} object of an offered tool, as the forced
    JSON convention. ANY is every byte string (the complement of none), so free text
    may hold any tokens, even ones that are not whole UTF-8 characters."""
    call = lark_json(tool_syntax.json_calls_schema(specs))
    return ("%llguidance {}\nstart: FREE | call\n"
            "FREE: ~(/[ \\t\\n\\r]*\\{/ ANY)\nANY: ~/[^\\s\\S]/\n"
            f"call: /[ \\t\\n\\r]*/ {call}")


def strict_names(raw_tools: list[dict]) -> set[str]:
    """Names of the tools sent with `strict: true`, in any dialect's tool shape (OpenAI
    chat's {"function": {..., "strict"}}, Responses' and Anthropic's flat tools, Codex's
    namespaces)."""
    out = set()
    for t in raw_tools:
        fn = t.get("function") if isinstance(t.get("function"), dict) else t
        if fn.get("strict") is True and isinstance(fn.get("name"), str):
            out.add(fn["name"])
        if isinstance(t.get("tools"), list):
            out |= strict_names([x for x in t["tools"] if isinstance(x, dict)])
    return out


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
            fmt: dict, strict: set[str] = frozenset()) -> tuple[list[dict], dict, str | None]:
    """(messages, SamplingParams constraint fields, JSON-convention mode) for a chat
    request: its response format or direct fields, the call its tool_choice forces, or
    under auto its strict tools' calls. A response format holds the whole output, so
    with one no call can start and strict tools add nothing."""
    constraint = merge(fmt, body_constraint(body))
    names = forced_names(choice)
    if names is None:
        calls = None if constraint else auto_calls(engine, tools, strict)
    else:
        calls = forced_call(engine, tools, names)
        merge(constraint, calls.constraint)  # one output constraint per request
    if calls is None:
        return messages, constraint, None
    if calls.json_calls == "forced":
        # Only a forced call adds the note. Under auto a model told the convention would
        # be invited to call (a base model then calls again after every tool result);
        # one that writes it of its own accord (a template or system prompt that shows
        # tools) is held to the strict schemas all the same.
        messages = with_tool_note(engine, messages, tools)
    return messages, {**constraint, **calls.constraint}, calls.json_calls


def _parameters(f: dict) -> dict:
    p = f.get("parameters") or {"type": "object"}
    return p if isinstance(p, dict) else {"type": "object"}
