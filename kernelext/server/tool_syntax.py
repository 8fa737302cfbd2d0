"""Tool calls in a model's own syntax, as llguidance Lark grammars.

mlx-lm reads a model's tool calls with the parser its tokenizer selects
(mlx_lm/tool_parsers/<name>.py): the text between the parser's start and end
markers becomes {name, arguments}. To force a call, or to hold a strict tool's call
to its parameter schema, the grammar must write text that this same parser reads
back into the tool's name and arguments valid against the schema. Each syntax below
is written from its parser:

  json_tools, longcat  <tool_call>{"name": ..., "arguments": {...}}</tool_call>
  qwen3_coder          <tool_call>\\n<function=NAME>\\n<parameter=K>\\nV\\n</parameter>\\n</function>\\n</tool_call>
  glm47 (and laguna)   <tool_call>NAME<arg_key>K</arg_key><arg_value>V</arg_value></tool_call>
  function_gemma       <start_function_call>call:NAME{K:<escape>text<escape>,K2:5}<end_function_call>
  gemma4               <|tool_call>call:NAME{K:<|"|>text<|"|>,K2:5}<tool_call|>
  pythonic             <|tool_call_start|>[NAME(K="text", K2=5)]<|tool_call_end|>
  mistral              [TOOL_CALLS]NAME[ARGS]{...}
  kimi_k2              <|tool_calls_section_begin|><|tool_call_begin|>functions.NAME:0<|tool_call_argument_begin|>{...}<|tool_call_end|><|tool_calls_section_end|>
  muse_spark           <atem:function_calls><atem:invoke name="NAME"><atem:parameter name="K">JSON</atem:parameter></atem:invoke></atem:function_calls>

Where a parser keeps a value as raw text (by the schema's type), the grammar writes
raw text the parser keeps unchanged (no closing tag inside, no surrounding spaces
where the parser strips them, ...); every other value is JSON (`%json`, with the
json_schema constraint's narrowing and separators), which the parser decodes.
A marker that is one added token of the tokenizer is written as that token.

`Unsupported` is raised for the other parsers (minimax_m2, minicpm5, kimi_k3) and
for schemas a syntax cannot carry (function_gemma and gemma4 values are scalars,
pythonic keys are identifiers, ...); structured.py then falls back as documented.
"""

from __future__ import annotations

import json
import keyword
import re
from dataclasses import dataclass
from typing import Callable

from engine.structured.constraint import lark_json


class Unsupported(ValueError):
    """The model's tool-call syntax cannot carry this call (or has no grammar here)."""


# -- building Lark text ------------------------------------------------------------

class Lark:
    """Rules under construction; literal text becomes a special token where the
    tokenizer has one for it (a grammar must emit the token the model was trained on)."""

    def __init__(self, tokenizer):
        self._tok, self._rules = tokenizer, []

    def rule(self, body: str, options: str = "") -> str:
        name = f"r{len(self._rules)}"
        self._rules.append(f"{name}{options}: {body}")
        return name

    def terminal(self, body: str) -> str:
        name = f"T{len(self._rules)}"
        self._rules.append(f"{name}: {body}")
        return name

    def lit(self, text: str) -> str:
        if not text:
            return '""'
        token = _special_token(self._tok, text)
        return f"<[{token}]>" if token is not None else json.dumps(text)

    def text(self) -> str:
        return "\n".join(self._rules)


def _special_token(tok, text: str) -> int | None:
    """The id of `text` if it is one added token. llguidance treats every added token
    as special (not as its text), as do the models: Qwen's <tool_call> is one token."""
    hf = getattr(tok, "_tokenizer", tok)
    added = getattr(hf, "added_tokens_decoder", {})
    ids = tok.encode(text, add_special_tokens=False)
    if len(ids) == 1 and ids[0] in added and added[ids[0]].content == text:
        return ids[0]
    return None


def _regex_literal(text: str) -> str:
    return re.escape(text).replace("/", "\\/")


def raw_text(lk: Lark, schema: dict, forbid: tuple[str, ...], strip: bool = False,
             not_null: bool = False) -> str:
    """A string value written as raw text: an enum/const as literals, else any text of
    the schema's length without the `forbid` substrings (the parser's closing tags)."""
    values = _enum(schema)
    if values is not None:
        ok = [v for v in values if isinstance(v, str) and not any(f in v for f in forbid)
              and (not strip or v == v.strip()) and not (not_null and v.lower() == "null")]
        if not ok:
            raise Unsupported("no enum value can be written in this syntax")
        return "(" + " | ".join(json.dumps(v) for v in ok) + ")"
    if "pattern" in schema or "format" in schema:
        raise Unsupported("a string with a pattern or format needs JSON")
    lo, hi = int(schema.get("minLength", 0)), schema.get("maxLength")
    parts = [f"/(?s:.{{{lo},{'' if hi is None else int(hi)}}})/"]
    parts += [f"~/(?s:.*){_regex_literal(f)}(?s:.*)/" for f in forbid]
    if strip:  # no space at either end: Python's str.strip() also strips \x1c-\x1f
        parts.append(r"/([^\s\x1c-\x1f]((?s:.*)[^\s\x1c-\x1f])?)?/")
    if not_null:
        parts.append("~/(?i:null)/")
    return lk.terminal(" & ".join(parts))


def _enum(schema: dict) -> list | None:
    if "const" in schema:
        return [schema["const"]]
    return list(schema["enum"]) if isinstance(schema.get("enum"), list) else None


def _string_enum(schema: dict) -> bool:
    values = _enum(schema)
    return values is not None and all(isinstance(v, str) for v in values)


def _json_value(schema: dict, top: dict) -> str:
    defs = {k: top[k] for k in ("$defs", "definitions") if k in top}
    return lark_json({**schema, **defs})


def _resolve(schema: dict, top: dict) -> dict:
    """A property's schema with a local $ref followed (types decide raw text or JSON)."""
    ref = schema.get("$ref") if isinstance(schema, dict) else None
    if isinstance(ref, str) and ref.startswith("#/"):
        target = top
        for part in ref[2:].split("/"):
            target = target.get(part, {}) if isinstance(target, dict) else {}
        return {**target, **{k: v for k, v in schema.items() if k != "$ref"}}
    return schema if isinstance(schema, dict) else {}


def _properties(schema: dict) -> list[tuple[str, dict, bool]]:
    """(key, schema, required) in the schema's order; the call writes no other keys."""
    if not isinstance(schema, dict):
        raise Unsupported("the parameters are not a JSON Schema object")
    if any(k in schema for k in ("anyOf", "oneOf", "allOf", "patternProperties", "$ref")):
        raise Unsupported("the parameters' schema is not a plain object schema")
    required = set(schema.get("required") or ())
    return [(k, _resolve(v, schema), k in required) for k, v in (schema.get("properties") or {}).items()]


def sequence(lk: Lark, items: list[tuple[str, bool]], sep: str) -> str:
    """The items in order, optional ones may be left out, `sep` between those present."""
    first = rest = '""'  # after the last item
    for expr, required in reversed(items):
        f, r = f"{expr} {rest}", f"{sep} {expr} {rest}"
        if not required:
            f, r = f"{f} | {first}", f"{r} | {rest}"
        first, rest = lk.rule(f), lk.rule(r)
    return first


def _in_order(items: list[tuple[str, bool]]) -> str:
    return " ".join(e if req else f"({e})?" for e, req in items) or '""'


def _type(schema: dict) -> str | None:
    t = schema.get("type")
    return t if isinstance(t, str) else None


def _key(key: str, pattern: str = r"\w+") -> str:
    if not re.fullmatch(pattern, key):
        raise Unsupported(f"parameter name {key!r} cannot be written in this syntax")
    return key


def _name(name: str, pattern: str = r"[\w.-]+") -> str:
    if not re.fullmatch(pattern, name):
        raise Unsupported(f"function name {name!r} cannot be written in this syntax")
    return name


# -- the syntaxes ----------------------------------------------------------------------
# Each writes one call's text between the markers: call(lk, name, schema); schema None
# means "any arguments" (a non-strict tool beside strict ones under tool_choice auto).

def json_call_schema(name: str, schema: dict | None) -> dict:
    """{"name", "arguments"}: the JSON syntaxes' call, and the JSON convention's."""
    return {"type": "object", "properties": {"name": {"const": name},
                                             "arguments": schema or {"type": "object"}},
            "required": ["name", "arguments"], "additionalProperties": False}


def json_calls_schema(tools: list[tuple[str, dict | None]]) -> dict:
    """One call of any of `tools`. Each tool's $defs move to the root (a "$ref" points
    from the document's root), renamed per tool so that two tools' names cannot clash."""
    calls, defs = [], {}
    for i, (name, schema) in enumerate(tools):
        if isinstance(schema, dict):
            renames = {}
            for key in ("$defs", "definitions"):
                for d, body in (schema.get(key) or {}).items():
                    renames[f"#/{key}/{d}"] = f"#/$defs/t{i}.{d}"
            schema = _rename_refs({k: v for k, v in schema.items() if k not in ("$defs", "definitions")},
                                  renames)
            for ref, new in renames.items():
                key, d = ref[2:].split("/", 1)
                defs[new.rsplit("/", 1)[1]] = _rename_refs(tools[i][1][key][d], renames)
        calls.append(json_call_schema(name, schema))
    out = calls[0] if len(calls) == 1 else {"anyOf": calls}
    return {**out, "$defs": defs} if defs else out


def _rename_refs(schema, renames: dict):
    if isinstance(schema, dict):
        return {k: (renames.get(v, v) if k == "$ref" and isinstance(v, str) else _rename_refs(v, renames))
                for k, v in schema.items()}
    if isinstance(schema, list):
        return [_rename_refs(v, renames) for v in schema]
    return schema


def _json_call(lk: Lark, name: str, schema: dict | None) -> str:
    return lark_json(json_calls_schema([(name, schema)]))


_QWEN_STRINGS = {"string", "str", "text", "varchar", "char", "enum"}
_JSON_TYPES = {"integer", "number", "boolean", "object", "array"}
_NO_TAGS = r"[^\s<>]+"
q = json.dumps  # a Lark string literal


def _qwen3_coder(lk: Lark, name: str, schema: dict | None) -> str:
    head = lk.lit(f"\n<function={_name(name, _NO_TAGS)}>\n")
    tail = f'{lk.lit("</function>")} {q(chr(10))}'
    if schema is None:
        free = raw_text(lk, {}, ("</parameter>",))
        return f'{head} ("<parameter=" /[^\\s<>]+/ ">\\n" {free} "\\n</parameter>\\n")* {tail}'
    items = []
    for key, prop, req in _properties(schema):
        t = (_type(prop) or "").lower()
        if t in _QWEN_STRINGS or (not t and _string_enum(prop)):  # kept as raw text
            value = raw_text(lk, prop, ("</parameter>",), not_null=True)
        elif t in _JSON_TYPES or (not t and ("properties" in prop or "items" in prop)):
            value = _json_value(prop, schema)  # the parser decodes it by its type
        else:
            raise Unsupported(f"parameter {key!r}: qwen3_coder reads values by a single 'type'")
        items.append((f'{q(f"<parameter={_key(key, _NO_TAGS)}>" + chr(10))} {value} '
                      f'"\\n</parameter>\\n"', req))
    return f"{head} {_in_order(items)} {tail}"


def _glm47(lk: Lark, name: str, schema: dict | None) -> str:
    head = q(_name(name, _NO_TAGS))
    if schema is None:
        free = raw_text(lk, {}, ("</arg_value>",))
        return f'{head} ("<arg_key>" /[^<>]+/ "</arg_key><arg_value>" {free} "</arg_value>")*'
    items = []
    for key, prop, req in _properties(schema):
        # glm47 keeps a value raw exactly when the schema's type is "string" (stripped);
        # anything else it decodes as JSON, which also gives an untyped enum its string.
        value = (raw_text(lk, prop, ("</arg_value>",), strip=True) if _type(prop) == "string"
                 else _json_value(prop, schema))
        key = _key(key, r"[^<>]+")
        items.append((f'{q(f"<arg_key>{key}</arg_key><arg_value>")} {value} "</arg_value>"', req))
    return f"{head} {_in_order(items)}"


def _scalar_call(delimiter: str, forbid: tuple[str, ...], names: str) -> Callable:
    """function_gemma and gemma4: call:NAME{K:V,...}; strings between delimiters, other
    values scalar JSON (function_gemma's parser splits at ',' and stops at the first '}')."""
    def call(lk: Lark, name: str, schema: dict | None) -> str:
        head = q(f"call:{_name(name, names)}{{")
        if schema is None:
            return f'{head} /[^{{}}]*/ "}}"'
        items = []
        for key, prop, req in _properties(schema):
            t = _type(prop)
            if t == "string" or (t is None and _string_enum(prop)):
                d = lk.lit(delimiter)
                value = f"{d} {raw_text(lk, prop, (delimiter, *forbid))} {d}"
            elif t in ("integer", "number", "boolean", "null"):
                value = _json_value(prop, schema)
            else:
                raise Unsupported(f"parameter {key!r}: only scalar values can be written in this syntax")
            items.append((f"{q(_key(key) + ':')} {value}", req))
        return f'{head} {sequence(lk, items, q(","))} "}}"'
    return call


def _pythonic(lk: Lark, name: str, schema: dict | None) -> str:
    # Python's literal syntax reads JSON values (the parser maps true/false/null).
    head = q("[" + _name(name, r"[A-Za-z_][\w.]*") + "(")
    if schema is None:
        return f'{head} /[^\\]]*/ ")]"'
    items = []
    for key, prop, req in _properties(schema):
        if not key.isidentifier() or keyword.iskeyword(key):
            raise Unsupported(f"parameter {key!r} is not a Python identifier")
        items.append((f"{q(key + '=')} {_json_value(prop, schema)}", req))
    return f'{head} {sequence(lk, items, q(", "))} ")]"'


def _mistral(lk: Lark, name: str, schema: dict | None) -> str:
    name = q(_name(name, r"[\w-]+"))
    return f'{name} {lk.lit("[ARGS]")} {lark_json(schema or {"type": "object"})}'


def _kimi_k2(lk: Lark, name: str, schema: dict | None) -> str:
    return (f'{lk.lit("<|tool_call_begin|>")} {q("functions." + _name(name) + ":0")} '
            f'{lk.lit("<|tool_call_argument_begin|>")} {lark_json(schema or {"type": "object"})} '
            f'{lk.lit("<|tool_call_end|>")}')


_NO_QUOTES = r'[^"<>]+'


def _muse_spark(lk: Lark, name: str, schema: dict | None) -> str:
    head = q(f'<atem:invoke name="{_name(name, _NO_QUOTES)}">')
    if schema is None:
        param = f'"<atem:parameter name=\\"" /[^"<>]+/ "\\">" {lark_json({})} "</atem:parameter>"'
        return f'{head} ({param})* "</atem:invoke>"'
    items = [(f'{q(f"<atem:parameter name=" + chr(34) + _key(k, _NO_QUOTES) + chr(34) + ">")} '
              f'{_json_value(p, schema)} "</atem:parameter>"', req) for k, p, req in _properties(schema)]
    return f'{head} {_in_order(items)} "</atem:invoke>"'


@dataclass(frozen=True)
class Syntax:
    parser: str  # mlx-lm's parser module name
    start: str
    end: str
    call: Callable[[Lark, str, dict | None], str]


_SYNTAXES = {s.parser: s for s in (
    Syntax("json_tools", "<tool_call>", "</tool_call>", _json_call),
    Syntax("longcat", "<longcat_tool_call>", "</longcat_tool_call>", _json_call),  # reads JSON too
    Syntax("qwen3_coder", "<tool_call>", "</tool_call>", _qwen3_coder),
    Syntax("glm47", "<tool_call>", "</tool_call>", _glm47),
    Syntax("function_gemma", "<start_function_call>", "<end_function_call>",
           _scalar_call("<escape>", ("}",), r"\w+")),
    Syntax("gemma4", "<|tool_call>", "<tool_call|>", _scalar_call('<|"|>', ("\x00",), r"[\w-]+")),
    Syntax("pythonic", "<|tool_call_start|>", "<|tool_call_end|>", _pythonic),
    Syntax("mistral", "[TOOL_CALLS]", "", _mistral),
    Syntax("kimi_k2", "<|tool_calls_section_begin|>", "<|tool_calls_section_end|>", _kimi_k2),
    Syntax("muse_spark", "<atem:function_calls>", "</atem:function_calls>", _muse_spark),
)}
SUPPORTED = tuple(_SYNTAXES)


def parser_name(tok) -> str | None:
    """The mlx-lm tool parser the tokenizer selected (None: no tool-call markers)."""
    if not getattr(tok, "has_tool_calling", False):
        return None
    module = getattr(getattr(tok, "_tool_parser", None), "__module__", "") or ""
    return module.rsplit(".", 1)[-1] or None


def syntax_of(tok) -> Syntax:
    name = parser_name(tok)
    if name not in _SYNTAXES:
        raise Unsupported(f"no grammar for mlx-lm's {name!r} tool-call syntax "
                          f"(supported: {', '.join(SUPPORTED)})")
    return _SYNTAXES[name]


def _calls(lk: Lark, syntax: Syntax, tools: list[tuple[str, dict | None]]) -> str:
    """One call of any of `tools` ((name, parameter schema or None)), between markers."""
    if syntax.call is _json_call:  # the name is inside the JSON: one schema for all
        return lark_json(json_calls_schema(tools))
    return lk.rule(" | ".join(syntax.call(lk, n, s) for n, s in tools))


def forced_grammar(tok, tools: list[tuple[str, dict]]) -> str:
    """Exactly one call of one of `tools`, markers included; the grammar ends there."""
    syntax, lk = syntax_of(tok), Lark(tok)
    body = _calls(lk, syntax, tools)
    call = lk.rule(f"{lk.lit(syntax.start)} {body} {lk.lit(syntax.end)}")
    return f"%llguidance {{}}\nstart: {call}\n{lk.text()}"


def auto_grammar(tok, tools: list[tuple[str, dict | None]]) -> str:
    """Free text, and calls wherever the model starts one (its start marker): each call is
    one of `tools`, with a schema held to it (None: any arguments in the syntax). Text
    outside calls is not constrained, so its tokens are drawn exactly as without a grammar.
    A syntax without an end marker (mistral) ends the output with its call."""
    syntax, lk = syntax_of(tok), Lark(tok)
    body = _calls(lk, syntax, tools)
    start, end = lk.lit(syntax.start), lk.lit(syntax.end)
    marker = _special_token(tok, syntax.start)
    if marker is not None:  # an added token: text is any tokens but it (and EOS, which ends)
        text = lk.rule(f"<[^{','.join(map(str, sorted({marker, *tok.eos_token_ids})))}]>*")
        call = lk.rule(f"{start} {body} {end}")
        top = f"start: {text} ({call} {text})*" if syntax.end else f"start: {text} {call}?"
    else:  # a text marker: text up to its first occurrence, lazily; text holds no added tokens
        trigger = lk.rule("TEXT " + start, "[lazy]")
        call = lk.rule(f"{trigger} {body} {end}")
        top = f"start: {call}* TEXT" if syntax.end else f"start: TEXT | {call}"
    # TEXT: every byte string (the complement of none): tokens that are not whole UTF-8
    # characters stay free too.
    return "%llguidance {}\n" + top + "\nTEXT: ~/[^\\s\\S]/\n" + lk.text()
