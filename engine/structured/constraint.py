"""A request's constraint, compiled to an llguidance grammar.

llguidance (guidance-ai, Rust) was picked over xgrammar and outlines-core by
measured mask time on Gemma 3's 262k vocabulary and a 151k byte-level BPE
(bench/grammar_libraries.py): a few tens of microseconds per mask, grammars
compiled in tens of milliseconds (outlines-core builds a full token index per
regex, seconds here), numpy bitmasks, rollback and draft-prefix masks built in,
and no torch dependency (xgrammar imports torch).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

import llguidance

from ..errors import InvalidRequestError

# JSON is generated compactly with one space after ',' and ':': a small base model
# given free whitespace can pad forever; fixed separators make the output canonical.
_JSON_OPTIONS = {"whitespace_flexible": False, "item_separator": ", ", "key_separator": ": "}
_DECIMALS = 1e-6  # numbers without a multipleOf are generated with at most 6 decimals

_OBJECT_OPEN_KEYS = ("additionalProperties", "patternProperties", "unevaluatedProperties")


def generation_schema(schema: Any, in_all_of: bool = False) -> Any:
    """The schema the grammar follows: a subset of the caller's, so every output still
    validates against the schema as given. Two narrowings, as OpenAI's strict mode and
    vLLM do: objects admit only their listed properties unless the schema says
    otherwise (a base model, free to add keys, invents them until max_tokens), and
    numbers carry at most 6 decimals unless a multipleOf says otherwise (else
    "1068.0000000..." runs on). Members of an allOf stay open: each may name only
    part of the object's properties."""
    if isinstance(schema, list):
        return [generation_schema(s, in_all_of) for s in schema]
    if not isinstance(schema, dict):
        return schema
    out = {}
    for key, value in schema.items():
        if key in ("properties", "$defs", "definitions", "patternProperties", "dependentSchemas"):
            out[key] = ({k: generation_schema(v) for k, v in value.items()}
                        if isinstance(value, dict) else value)
        elif key in ("items", "prefixItems", "anyOf", "oneOf", "not", "additionalProperties",
                     "contains", "if", "then", "else"):
            out[key] = generation_schema(value)
        elif key == "allOf":
            out[key] = generation_schema(value, in_all_of=True)
        else:
            out[key] = value
    types = out.get("type")
    types = types if isinstance(types, list) else [types]
    if ("object" in types or "properties" in out) and not in_all_of and \
            not any(k in out for k in _OBJECT_OPEN_KEYS) and "properties" in out:
        out["additionalProperties"] = False
    if "number" in types and "multipleOf" not in out:
        out["multipleOf"] = _DECIMALS
    return out


@dataclass(frozen=True)
class Constraint:
    kind: str  # "json_schema" | "regex" | "choice" | "grammar"
    grammar: str  # llguidance's grammar definition
    model: Any = None  # the pydantic class the output parses into, if one was given

    def parse(self, text: str) -> Any:
        """The finished output as an object: the pydantic model, or JSON values."""
        if self.kind != "json_schema":
            return text
        if self.model is not None:
            return self.model.model_validate_json(text)
        return json.loads(text)


def lark_json(schema: dict) -> str:
    """`%json {...}` for a Lark grammar, with the same narrowing and separators as a
    json_schema constraint (server/structured.py wraps forced calls in tool-call markers)."""
    return "%json " + json.dumps({**generation_schema(schema), "x-guidance": _JSON_OPTIONS})


def schema_of(json_schema: Any) -> tuple[dict, Any]:
    """(JSON Schema dict, pydantic class or None) for what SamplingParams.json_schema accepts."""
    if json_schema is True:
        return {"type": "object"}, None
    if isinstance(json_schema, type) and hasattr(json_schema, "model_json_schema"):
        return json_schema.model_json_schema(), json_schema
    if isinstance(json_schema, dict):
        return json_schema, None
    raise InvalidRequestError(
        "json_schema must be a JSON Schema dict, a pydantic model class or True, "
        f"got {type(json_schema).__name__}")


def constraint_of(params) -> Constraint | None:
    """The request's constraint as a grammar definition (not yet checked against a tokenizer)."""
    if params.json_schema is not None:
        schema, model = schema_of(params.json_schema)
        try:
            grammar = llguidance.LLMatcher.grammar_from_json_schema(generation_schema(schema),
                                                                    defaults=_JSON_OPTIONS)
        except ValueError as e:
            raise InvalidRequestError(f"invalid json_schema: {e}") from None
        return Constraint("json_schema", grammar, model)
    if params.regex is not None:
        return Constraint("regex", llguidance.grammar_from("regex", params.regex))
    if params.choice is not None:
        return Constraint("choice", llguidance.grammar_from("choice", list(params.choice)))
    if params.grammar is not None:
        try:
            return Constraint("grammar", llguidance.grammar_from("grammar", params.grammar))
        except ValueError as e:
            raise InvalidRequestError(f"invalid grammar: {e}") from None
    return None


def check(constraint: Constraint, tokenizer: llguidance.LLTokenizer) -> None:
    """Raise InvalidRequestError naming the problem if the grammar cannot compile."""
    is_error, messages = llguidance.LLMatcher.validate_grammar_with_warnings(
        constraint.grammar, tokenizer)
    if is_error:
        what = {"json_schema": "json_schema", "regex": "regex", "choice": "choice",
                "grammar": "grammar"}[constraint.kind]
        raise InvalidRequestError(f"invalid {what}: {messages[0] if messages else 'does not compile'}")
