"""Chat messages as every client sends them -> messages every chat template accepts.

Each dialect parses its request into canonical messages ({"role", "content": str,
"tool_calls"?, "tool_call_id"?}); this module sits between that and the template,
once for all three dialects. Real agents send what strict templates (Gemma's,
Llama 2's, Mistral's) refuse: Codex a system message, developer messages and several
user messages in a row; Claude Code a system message in the middle of `messages`.
So, always:

  1. `developer` becomes `system`;
  2. every system message, wherever it is, joins one leading system message;
  3. consecutive messages of the same role merge into one (tool results excepted:
     each answers its own call id).

Then, only if the template still refuses, these are tried (5, then 4, then both):

  4. the system text folds into the first user turn (templates without a system role);
  5. tool results become user turns and tool calls assistant text (templates without
     tool roles, such as Gemma's), merged again by rule 3.

A template that refuses even that raises TemplateRejected (a 400 naming the rules).
"""

from __future__ import annotations

import json
from typing import Callable

RULES = ("developer messages become system messages; system messages merge into one leading "
         "system message; consecutive messages of one role merge")
FOLD_RULE = "the system text folds into the first user turn"
TOOLS_RULE = "tool results become user turns"

Render = Callable[[list[dict]], str]


class TemplateRejected(ValueError):
    """The template refused the messages after every rule; the message names them."""


def normalize(messages: list[dict]) -> list[dict]:
    """Rules 1-3: one leading system message, no two neighbours of one role."""
    system = [m["content"] for m in messages if m["role"] in ("system", "developer") and m["content"]]
    rest = [m for m in messages if m["role"] not in ("system", "developer")]
    out = [{"role": "system", "content": "\n\n".join(system)}] if system else []
    return out + merge_neighbours(rest)


def merge_neighbours(messages: list[dict]) -> list[dict]:
    out: list[dict] = []
    for m in messages:
        last = out[-1] if out else None
        if last is None or last["role"] != m["role"] or m["role"] == "tool":
            out.append(dict(m))
            continue
        last["content"] = "\n\n".join(c for c in (last["content"], m["content"]) if c)
        if m.get("tool_calls"):
            last["tool_calls"] = [*last.get("tool_calls", []), *m["tool_calls"]]
    return out


def fold_system(messages: list[dict]) -> list[dict]:
    """Rule 4: the leading system text becomes the start of the first user turn."""
    if not messages or messages[0]["role"] != "system":
        return messages
    system, rest = messages[0]["content"], messages[1:]
    for i, m in enumerate(rest):
        if m["role"] == "user":
            return [*rest[:i], {**m, "content": f"{system}\n\n{m['content']}"}, *rest[i + 1:]]
    return [{"role": "user", "content": system}, *rest]


def tools_as_text(messages: list[dict]) -> list[dict]:
    """Rule 5: tool traffic as plain turns, for templates that know only user/assistant."""
    out = []
    for m in messages:
        if m["role"] == "tool":
            out.append({"role": "user", "content": f"Tool result ({m.get('tool_call_id') or 'call'}):\n"
                                                   f"{m['content']}"})
        elif m.get("tool_calls"):
            calls = "\n".join(json.dumps({"name": c["function"]["name"], "arguments": c["function"]["arguments"]},
                                         ensure_ascii=False) for c in m["tool_calls"])
            out.append({"role": m["role"], "content": "\n\n".join(c for c in (m["content"], calls) if c)})
        else:
            out.append(m)
    return merge_neighbours(out)


def render(messages: list[dict], template: Render) -> str:
    """The template's text for `messages` after normalization (and, if it refuses,
    the fallbacks); TemplateRejected naming the rules applied when nothing is accepted."""
    base = normalize(messages)
    has_system = bool(base) and base[0]["role"] == "system"
    has_tools = any(m["role"] == "tool" or m.get("tool_calls") for m in base)
    attempts = [(base, RULES)]
    if has_tools:
        attempts.append((tools_as_text(base), f"{RULES}; {TOOLS_RULE}"))
    if has_system:
        attempts.append((fold_system(base), f"{RULES}; {FOLD_RULE}"))
    if has_system and has_tools:
        attempts.append((tools_as_text(fold_system(base)), f"{RULES}; {FOLD_RULE}; {TOOLS_RULE}"))
    error = None
    for candidate, _ in attempts:
        try:
            return template(candidate)
        except Exception as e:  # jinja raises whatever the template does not accept
            error = e
    raise TemplateRejected(f"the chat template rejected the messages after normalization "
                           f"({attempts[-1][1]}): {error}")
