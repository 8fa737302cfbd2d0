"""Server-sent event streams parsed from raw bytes and checked against each API's
documented order (OpenAI Chat Completions and Responses streaming, Anthropic Messages
streaming). Each check raises AssertionError naming the first event out of place."""

from __future__ import annotations

import json


def parse(raw: bytes) -> tuple[list[tuple[str | None, object]], int]:
    """(event name or None, data as JSON or "[DONE]") per event, and the number of
    comment lines (keepalives) between them."""
    events, comments = [], 0
    for block in raw.decode().split("\n\n"):
        name, data = None, []
        for line in block.split("\n"):
            if line.startswith(":"):
                comments += 1
            elif line.startswith("event:"):
                name = line[6:].strip()
            elif line.startswith("data:"):
                data.append(line[5:].strip())
        if data:
            payload = "\n".join(data)
            events.append((name, payload if payload == "[DONE]" else json.loads(payload)))
    return events, comments


def check_chat(events) -> None:
    """Chat Completions: a first chunk with the assistant role, content/tool-call deltas,
    one chunk with a finish_reason, an optional usage chunk (no choices), then [DONE]."""
    assert events and events[-1][1] == "[DONE]", "the stream must end with [DONE]"
    chunks = [d for _, d in events[:-1]]
    assert all(c["object"] == "chat.completion.chunk" and c["id"] == chunks[0]["id"] for c in chunks)
    assert chunks[0]["choices"][0]["delta"].get("role") == "assistant", "the first chunk carries the role"
    finished = [i for i, c in enumerate(chunks) if c["choices"] and c["choices"][0]["finish_reason"]]
    assert len(finished) == 1, "exactly one chunk has a finish_reason"
    for c in chunks[finished[0] + 1:]:
        assert c["choices"] == [] and c["usage"], "after the finish only the usage chunk may come"


def check_responses(events) -> dict:
    """Responses: created, in_progress, then per output item: output_item.added, its
    part/delta/done events, output_item.done; last response.completed (or .failed).
    sequence_number counts from 0. Returns the final response."""
    kinds = [d["type"] for _, d in events]
    assert [n for n, _ in events] == kinds, "each event's name is its type"
    assert [d["sequence_number"] for _, d in events] == list(range(len(events)))
    assert kinds[:2] == ["response.created", "response.in_progress"], kinds[:2]
    assert kinds[-1] in ("response.completed", "response.failed"), kinds[-1]
    i, index = 2, 0
    while i < len(kinds) - 1:
        assert kinds[i] == "response.output_item.added", (i, kinds[i])
        item = events[i][1]["item"]
        assert events[i][1]["output_index"] == index
        i += 1
        if item["type"] == "message":
            want = ["response.content_part.added", "response.output_text.delta", "response.output_text.done",
                    "response.content_part.done"]
        elif item["type"] == "function_call":
            want = ["response.function_call_arguments.delta", "response.function_call_arguments.done"]
        else:
            assert item["type"] == "reasoning", item
            want = ["response.reasoning_text.delta", "response.reasoning_text.done"]
        if want[0].endswith(".added"):
            assert kinds[i] == want.pop(0), (i, kinds[i])
            i += 1
        while kinds[i] == want[0]:  # the deltas
            assert events[i][1]["output_index"] == index
            i += 1
        for kind in want[1:]:
            assert kinds[i] == kind, (i, kinds[i], kind)
            i += 1
        assert kinds[i] == "response.output_item.done" and events[i][1]["output_index"] == index, (i, kinds[i])
        assert events[i][1]["item"]["status"] == "completed"
        i, index = i + 1, index + 1
    final = events[-1][1]["response"]
    assert len(final.get("output", [])) == index
    return final


def check_anthropic(events) -> dict:
    """Messages: message_start, then per content block content_block_start, its deltas,
    content_block_stop (indexes 0, 1, ...), then message_delta and message_stop; ping
    anywhere. Returns message_delta's data."""
    events = [(n, d) for n, d in events if n != "ping"]
    kinds = [d["type"] for _, d in events]
    assert [n for n, _ in events] == kinds, "each event's name is its type"
    assert kinds[0] == "message_start" and kinds[-2:] == ["message_delta", "message_stop"], kinds
    i, index = 1, 0
    while i < len(kinds) - 2:
        assert kinds[i] == "content_block_start" and events[i][1]["index"] == index, (i, kinds[i])
        i += 1
        while kinds[i] == "content_block_delta":
            assert events[i][1]["index"] == index
            i += 1
        assert kinds[i] == "content_block_stop" and events[i][1]["index"] == index, (i, kinds[i])
        i, index = i + 1, index + 1
    return events[-2][1]
