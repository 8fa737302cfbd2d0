"""The streaming core: one engine request as dialect-neutral output blocks.

Engine deltas are raw model text. For chat requests, mlx-lm's text state
machine (built from the tokenizer: thinking markers, tool-call markers, the
model's response format) splits that text into plain text, reasoning and
tool-call text, and the tokenizer's mlx-lm tool parser turns each tool-call
text into a call. Each dialect then renders the same blocks and pieces.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from typing import AsyncIterator, NamedTuple

from mlx_lm.generate import TextStateMachine, make_text_state_machine

from engine import EngineClosedError, EngineError, SamplingParams, TokenLogprob, Usage

from .common import ApiError, new_id
from .structured import JSON_SPACE

log = logging.getLogger("kernelext.server")


@dataclass
class Block:
    kind: str  # "text", "reasoning" or "tool_call"
    index: int  # position among the response's blocks
    text: str = ""  # for a tool call: its arguments, as JSON
    name: str = ""  # tool calls only
    call_id: str = ""
    logprobs: list[TokenLogprob] = field(default_factory=list)


class Piece(NamedTuple):
    block: Block
    text: str  # what this piece added to the block
    logprobs: list[TokenLogprob]
    new: bool  # the first piece of its block


class Generation:
    def __init__(self, engine, handle, prompt_ids: list[int], params: SamplingParams,
                 tools: list[dict] | None, chat: bool):
        tok = engine.tokenizer
        self.handle, self.params, self.prompt_tokens = handle, params, len(prompt_ids)
        self.blocks: list[Block] = []
        self.finish_reason: str | None = None  # "stop", "length" or "tool_calls"
        self.stop_sequence: str | None = None  # the stop string that ended the output
        self.usage: Usage | None = None
        self.error: ApiError | None = None  # set instead of finish_reason
        self.cancelled = False  # by a client disconnect or the server stopping
        self._tok, self._tools = tok, tools
        self._sm = make_text_state_machine(tok).make_state(_initial_state(tok, prompt_ids)) if chat else None
        self._tool_text: str | None = None  # inside a tool call: its text so far
        # Calls in the JSON convention of models without tool-call markers
        # (server/structured.py): "forced", the whole output is one {"name", "arguments"}
        # object; "auto", an output whose first non-space character is '{' is one. Held
        # back and turned into the call at the end.
        self.json_calls: str | None = None

    def joined(self, kind: str = "text") -> str:
        return "".join(b.text for b in self.blocks if b.kind == kind)

    @property
    def logprobs(self) -> list[TokenLogprob]:
        return [lp for b in self.blocks for lp in b.logprobs]

    async def pieces(self) -> AsyncIterator[Piece]:
        """Yield output pieces as they are generated; afterwards finish_reason/usage
        (or error) are set."""
        pending: list[TokenLogprob] = []  # logprobs of tokens whose text is held back
        try:
            async for delta in self.handle:
                pending.extend(delta.logprobs or ())
                for kind, text, name, call_id in self._parts(delta.text, delta.finish_reason is not None):
                    yield self._add(kind, text, name, call_id, pending if kind == "text" else [])
                    pending = []
        except EngineClosedError as e:
            self.error = ApiError(503, str(e))
            return
        except EngineError as e:
            self.error = ApiError(500, f"generation failed: {e}")
            return
        if pending and self.blocks:
            self.blocks[-1].logprobs.extend(pending)
        self._finish(self.handle.result())

    async def collect(self) -> "Generation":
        """Run to the end (non-streamed answers); raises the error, if any."""
        async for _ in self.pieces():
            pass
        if self.error:
            raise self.error
        return self

    def _finish(self, c) -> None:
        self.usage = c.usage
        if c.finish_reason == "cancelled":  # the client went away, or the server is stopping
            self.cancelled = True
            self.error = ApiError(503, "the request was cancelled (the server is stopping)")
            return
        made_calls = any(b.kind == "tool_call" for b in self.blocks)
        self.finish_reason = "tool_calls" if c.finish_reason == "stop" and made_calls else c.finish_reason
        # The engine reports EOS and stop strings alike as "stop"; an EOS token is
        # counted in completion_tokens but not returned, so equal counts mean a stop string.
        if c.finish_reason == "stop" and self.params.stop and c.usage.completion_tokens == len(c.token_ids):
            full = self._tok.decode(c.token_ids)
            hits = [(full.find(s), s) for s in self.params.stop if s in full]
            self.stop_sequence = min(hits)[1] if hits else None

    def _add(self, kind, text, name, call_id, logprobs) -> Piece:
        last = self.blocks[-1] if self.blocks else None
        new = last is None or last.kind != kind or kind == "tool_call"
        if new:
            last = Block(kind, len(self.blocks), name=name, call_id=call_id)
            self.blocks.append(last)
        last.text += text
        last.logprobs.extend(logprobs)
        return Piece(last, text, list(logprobs), new)

    def _parts(self, text: str, final: bool) -> list[tuple[str, str, str, str]]:
        if self.json_calls:
            return self._json_call(text, final)
        return self._split(text, final)

    def _split(self, text: str, final: bool) -> list[tuple[str, str, str, str]]:
        """(kind, text, tool name, call id) parts of newly generated text."""
        if self._sm is None:
            return [("text", text, "", "")] if text else []
        self._sm, segments = TextStateMachine.split(self._sm, text)
        if final:  # release what the machine held back as a possible marker
            self._sm, rest, state = TextStateMachine.flush(self._sm)
            segments.append((state, rest))
        out = []
        for state, chunk in segments:
            if state == "tool":
                self._tool_text = (self._tool_text or "") + chunk
                continue
            if self._tool_text is not None:  # a tool call just ended
                out += self._calls(self._tool_text)
                self._tool_text = None
            if chunk and state in ("normal", "reasoning", None):  # other states are control text
                out.append(("reasoning" if state == "reasoning" else "text", chunk, "", ""))
        if final and self._tool_text is not None:  # cut off inside a call
            out += self._calls(self._tool_text)
            self._tool_text = None
        return out

    def _json_call(self, text: str, final: bool) -> list[tuple[str, str, str, str]]:
        """The JSON convention's call, held back whole, then one call (or, cut off at the
        output limit or not a call of an offered tool, the text as it is)."""
        held = (self._tool_text or "") + text
        # Under auto the first visible character decides: '{' starts a call, else text.
        visible = held.lstrip(JSON_SPACE)  # the grammar's whitespace before a call
        if visible and self.json_calls == "auto" and not visible.startswith("{"):
            self._tool_text, self.json_calls = None, None  # text after all
            return self._split(held, final)
        self._tool_text = held
        if not final:
            return []
        self._tool_text = None
        try:
            call = json.loads(held)
            if not any(t["function"]["name"] == call["name"] for t in self._tools or []):
                raise KeyError(call["name"])
            return [("tool_call", json.dumps(call["arguments"], ensure_ascii=False), call["name"],
                     new_id("call_"))]
        except (ValueError, KeyError, TypeError):
            return [("text", held, "", "")] if held else []

    def _calls(self, text: str) -> list[tuple[str, str, str, str]]:
        """Tool calls parsed by the model's mlx-lm tool parser; unparseable text is
        returned as text (with its markers) rather than dropped."""
        try:
            parsed = self._tok.tool_parser(text, self._tools)
            calls = parsed if isinstance(parsed, list) else [parsed]
            out = []
            for c in calls:
                args = c.get("arguments", {})
                args = args if isinstance(args, str) else json.dumps(args, ensure_ascii=False)
                out.append(("tool_call", args, c["name"], c.get("id") or new_id("call_")))
            return out
        except Exception as e:  # parsers raise many kinds on malformed model output
            log.warning("could not parse a tool call (%s: %s)", type(e).__name__, e)
            raw = f"{self._tok.tool_call_start}{text}{self._tok.tool_call_end or ''}"
            return [("text", raw, "", "")]


def _initial_state(tok, prompt_ids: list[int]) -> str:
    """"reasoning" when the prompt leaves a thinking block open (as mlx-lm's server decides)."""
    state = "normal"
    if tok.has_thinking and tok.rfind_think_start(prompt_ids) > tok.rfind_think_end(prompt_ids):
        state = "reasoning"
    return tok.response_initial_state or state
