"""What real agents send, on a live server with a tiny model: the request bodies Codex
CLI and Claude Code sent (tests/data/agent_requests.json) with their headers, query
strings and every field; SSE streams in each API's documented order (sse_order.py);
the default output limit and the clamp; headers and first event before generation;
keepalives during a long prefill; previous_response_id."""

import asyncio
import http.client
import json
import logging
import threading
from pathlib import Path

import anthropic
import openai
import pytest

from engine import Engine, EngineConfig
from kernelext.server import start_server
from kernelext.server.response_store import ResponseStore
from sse_order import check_anthropic, check_chat, check_responses, parse
from test_server import WEATHER, ScriptedEngine, tools_eng  # noqa: F401  (tools_eng is a fixture)
from tiny_models import tiny_model

CAPTURED = json.loads((Path(__file__).parent / "data" / "agent_requests.json").read_text())
KEY = "s3cret"
DEFAULT_LIMIT = 4


@pytest.fixture(scope="module")
def eng():
    e = Engine.load(tiny_model("qwen3"), EngineConfig(progress=False, max_batch=4))
    yield e
    e.close()


@pytest.fixture(scope="module")
def srv(eng):
    s = start_server(eng, port=0, api_key=KEY, default_max_tokens=DEFAULT_LIMIT)
    yield s
    s.stop()


def post(srv, path, body, headers=None):
    """(status, headers, raw body bytes) of one POST."""
    conn = http.client.HTTPConnection(srv.host, srv.port, timeout=120)
    conn.request("POST", path, json.dumps(body), {"content-type": "application/json", **(headers or {})})
    r = conn.getresponse()
    data = r.read()
    conn.close()
    return r.status, r.headers, data


# Each client's path and headers as captured (Claude Code: ?beta=true, x-api-key and
# its anthropic-* headers; Codex: a Bearer key and its x-codex-* headers).
CLIENT_WIRE = {
    "claude-code": ("/v1/messages?beta=true", {
        "x-api-key": KEY, "anthropic-version": "2023-06-01", "x-app": "cli",
        "anthropic-beta": "claude-code-20250219,interleaved-thinking-2025-05-14,context-management-2025-06-27",
        "anthropic-dangerous-direct-browser-access": "true"}),
    "codex-0.171.0": ("/v1/responses", {"authorization": f"Bearer {KEY}", "originator": "codex_exec",
                                        "x-codex-beta-features": "remote_compaction_v2"}),
    "codex-0.94.0": ("/v1/chat/completions", {"authorization": f"Bearer {KEY}", "originator": "codex_exec"}),
}
CHECKS = {"/v1/messages?beta=true": check_anthropic, "/v1/responses": check_responses,
          "/v1/chat/completions": check_chat}


def captured_cases():
    return [(key, i) for key, bodies in CAPTURED.items() if not key.startswith("_") for i in range(len(bodies))]


@pytest.mark.parametrize("key, i", captured_cases())
def test_captured_agent_requests_stream_in_documented_order(srv, key, i):
    path, headers = next(v for k, v in CLIENT_WIRE.items() if key.startswith(k))
    body = {**CAPTURED[key][i], "model": srv.engine.model_name}
    status, h, raw = post(srv, path, body, headers)
    assert status == 200, raw[:500]
    assert h["content-type"].startswith("text/event-stream")
    events, _ = parse(raw)
    final = CHECKS[path](events)
    if path == "/v1/responses":  # Codex sends no output limit: the server default applies
        assert final["usage"]["output_tokens"] <= DEFAULT_LIMIT


def test_bearer_on_the_anthropic_endpoint_and_x_api_key_on_openai_ones(srv):
    body = {"max_tokens": 2, "messages": [{"role": "user", "content": "Hi"}]}
    assert post(srv, "/v1/messages", body, {"authorization": f"Bearer {KEY}"})[0] == 200
    assert post(srv, "/v1/chat/completions", body, {"x-api-key": KEY})[0] == 200
    assert post(srv, "/v1/messages", body, {"authorization": "Bearer wrong"})[0] == 401


def test_fields_that_do_not_apply_are_accepted_and_logged_once(srv, caplog):
    caplog.set_level(logging.DEBUG, logger="kernelext.server")
    body = {"max_tokens": 2, "messages": [{"role": "user", "content": [
                {"type": "text", "text": "Hi", "cache_control": {"type": "ephemeral"}}]}],
            "thinking": {"type": "adaptive"}, "context_management": {"edits": []},
            "output_config": {"effort": "medium"}, "metadata": {"user_id": "u"},
            "tools": [{"type": "web_search_20250305", "name": "web_search"}],
            "zz_field_no_client_sends": 1}
    for _ in range(2):
        assert post(srv, "/v1/messages", body, {"x-api-key": KEY})[0] == 200
    logged = [r.getMessage() for r in caplog.records if r.name == "kernelext.server"]
    assert sum("zz_field_no_client_sends" in m for m in logged) == 1
    oai = {"max_output_tokens": 2, "input": "Hi", "store": False, "include": ["reasoning.encrypted_content"],
           "reasoning": {"summary": "auto"}, "prompt_cache_key": "k", "parallel_tool_calls": True,
           "client_metadata": {"a": "b"}, "tools": [{"type": "web_search"}, {"type": "custom", "name": "x"}]}
    assert post(srv, "/v1/responses", oai, {"x-api-key": KEY})[0] == 200
    chat = {"max_tokens": 2, "messages": [{"role": "user", "content": "Hi"}], "store": False,
            "reasoning_effort": "low", "parallel_tool_calls": False, "prompt_cache_key": "k",
            "tools": [{"type": "custom", "custom": {"name": "x"}}]}
    assert post(srv, "/v1/chat/completions", chat, {"x-api-key": KEY})[0] == 200


def test_the_default_output_limit_applies_when_a_request_sets_none(srv):
    client = openai.OpenAI(base_url=srv.url + "/v1", api_key=KEY, max_retries=0)
    r = client.chat.completions.create(model="default", messages=[{"role": "user", "content": "Hello"}],
                                       temperature=0)
    assert r.usage.completion_tokens == DEFAULT_LIMIT and r.choices[0].finish_reason == "length"
    r = client.completions.create(model="default", prompt="Hello", temperature=0)
    assert r.usage.completion_tokens == DEFAULT_LIMIT
    r = client.chat.completions.create(model="default", messages=[{"role": "user", "content": "Hello"}],
                                       temperature=0, max_tokens=DEFAULT_LIMIT + 3)
    assert r.usage.completion_tokens == DEFAULT_LIMIT + 3


def test_an_output_limit_beyond_the_context_is_clamped():
    e = Engine.load(tiny_model("qwen3"), EngineConfig(progress=False, max_batch=2, max_context=48))
    s = start_server(e, port=0)
    try:
        ant = anthropic.Anthropic(base_url=s.url, api_key="unused", max_retries=0)
        with ant.messages.stream(model="default", max_tokens=32000, extra_body={"temperature": 0},
                                 messages=[{"role": "user", "content": "Hello"}]) as stream:
            m = stream.get_final_message()
        assert m.stop_reason == "max_tokens" and m.usage.input_tokens + m.usage.output_tokens == 48
    finally:
        s.stop()
        e.close()


# -- Responses: stored responses and input items ------------------------------------------

def test_previous_response_id_continues_a_stored_conversation(srv):
    client = openai.OpenAI(base_url=srv.url + "/v1", api_key=KEY, max_retries=0)
    kw = dict(model="default", instructions="Be brief.", max_output_tokens=3, temperature=0)
    first = client.responses.create(input="Hello", **kw)
    second = client.responses.create(input="And then?", previous_response_id=first.id, **kw)
    assert second.previous_response_id == first.id
    whole = client.responses.create(input=[
        {"role": "user", "content": "Hello"},
        {"type": "message", "id": first.output[0].id, "role": "assistant", "status": "completed",
         "content": [{"type": "output_text", "text": first.output_text, "annotations": []}]},
        {"role": "user", "content": "And then?"}], **kw)
    assert second.usage.input_tokens == whole.usage.input_tokens
    assert second.output_text == whole.output_text
    third = client.responses.create(input="Go on.", previous_response_id=second.id, **kw)
    assert third.usage.input_tokens > second.usage.input_tokens
    unstored = client.responses.create(input="Hello", store=False, **kw)
    with pytest.raises(openai.NotFoundError, match="previous response"):
        client.responses.create(input="x", previous_response_id=unstored.id, **kw)


def test_the_response_store_is_bounded():
    store = ResponseStore(capacity=2)
    for rid in ("a", "b", "c"):
        store.put(rid, [{"role": "user", "content": rid}])
    assert store.get("a") is None and store.get("b") and store.get("c") and len(store) == 2


def test_input_items_with_or_without_ids(srv):
    client = openai.OpenAI(base_url=srv.url + "/v1", api_key=KEY, max_retries=0)
    items = [{"type": "message", "role": "user", "content": [{"type": "input_text", "text": "Weather?"}]},
             {"type": "reasoning", "summary": [], "encrypted_content": "opaque"},
             {"type": "function_call", "call_id": "c1", "name": "get_weather", "arguments": '{"city": "Paris"}'},
             {"type": "function_call_output", "call_id": "c1", "output": "sunny"},
             {"role": "user", "content": "Thanks"}]
    ids = ["msg_1", "rs_1", "fc_1", "fco_1", "msg_2"]
    kw = dict(model="default", max_output_tokens=2, tools=[{"type": "function", **WEATHER}])
    plain = client.responses.create(input=items, **kw)
    with_ids = client.responses.create(input=[{**it, "id": i} for it, i in zip(items, ids)], **kw)
    assert plain.usage.input_tokens == with_ids.usage.input_tokens > 0


def test_codex_namespace_tools_are_shown_flat(tools_eng):  # noqa: F811
    s = start_server(tools_eng, port=0)
    try:
        client = openai.OpenAI(base_url=s.url + "/v1", api_key="unused", max_retries=0)
        kw = dict(model="default", input="Weather?", max_output_tokens=1)
        flat = client.responses.create(tools=[{"type": "function", **WEATHER}], **kw)
        nested = client.responses.create(tools=[{"type": "namespace", "name": "weather", "description": "d",
                                                 "tools": [{"type": "function", **WEATHER}]},
                                                {"type": "web_search"}], **kw)
        none = client.responses.create(**kw)
        assert nested.usage.input_tokens == flat.usage.input_tokens > none.usage.input_tokens
    finally:
        s.stop()


# -- event order with reasoning, text and tool calls (scripted output) ------------------------

def test_every_dialect_streams_reasoning_text_and_tool_calls_in_documented_order(tools_eng):  # noqa: F811
    s = start_server(ScriptedEngine(tools_eng), port=0)
    try:
        ask = [{"role": "user", "content": "Weather in Paris?"}]
        _, _, raw = post(s, "/v1/responses", {"input": "Weather in Paris?", "stream": True,
                                              "tools": [{"type": "function", **WEATHER}]})
        events, _ = parse(raw)
        final = check_responses(events)
        assert [o["type"] for o in final["output"]] == ["reasoning", "message", "function_call"]
        assert final["usage"]["input_tokens_details"]["cached_tokens"] == 0
        _, _, raw = post(s, "/v1/messages", {"max_tokens": 64, "stream": True, "messages": ask,
                                             "tools": [{"name": "get_weather", "input_schema": WEATHER["parameters"]}]})
        events, _ = parse(raw)
        assert check_anthropic(events)["delta"]["stop_reason"] == "tool_use"
        assert [d["content_block"]["type"] for n, d in events if n == "content_block_start"] == [
            "thinking", "text", "tool_use"]
        _, _, raw = post(s, "/v1/chat/completions", {"stream": True, "messages": ask,
                                                     "stream_options": {"include_usage": True},
                                                     "tools": [{"type": "function", "function": WEATHER}]})
        events, _ = parse(raw)
        check_chat(events)
    finally:
        s.stop()


# -- long prompts: headers at once, keepalives -----------------------------------------------

class GatedEngine(ScriptedEngine):
    """Generation starts only when the test opens the gate (a prefill that takes forever)."""

    def __init__(self, engine):
        super().__init__(engine)
        self.gate = threading.Event()

    def submit(self, prompt_ids, params, source):
        handle, gate = super().submit(prompt_ids, params, source), self.gate
        inner = handle._gen

        async def gated():
            while not gate.is_set():
                await asyncio.sleep(0.01)
            async for d in inner():
                yield d
        handle._gen = gated
        return handle


@pytest.mark.parametrize("path, body, first", [
    ("/v1/messages", {"max_tokens": 64, "messages": [{"role": "user", "content": "Hi"}]}, "message_start"),
    ("/v1/responses", {"input": "Hi"}, "response.created"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "Hi"}]}, "chat.completion.chunk"),
])
def test_headers_first_event_and_keepalives_come_before_any_output(tools_eng, path, body, first):  # noqa: F811
    gated = GatedEngine(tools_eng)
    s = start_server(gated, port=0, keepalive_s=0.05)
    try:
        conn = http.client.HTTPConnection(s.host, s.port, timeout=30)
        conn.request("POST", path, json.dumps({**body, "stream": True}), {"content-type": "application/json"})
        r = conn.getresponse()  # the status line and headers, while generation has not started
        assert r.status == 200 and r.headers["content-type"].startswith("text/event-stream")
        # Anthropic documents `ping` events; the OpenAI APIs get SSE comments.
        keepalive = b"event: ping" if path == "/v1/messages" else b": keepalive"
        head = b""
        while head.count(keepalive) < 2:
            head += r.read1(4096)
        assert first in head.split(keepalive)[0].decode()
        assert gated.gate.is_set() is False
        gated.gate.set()
        events, comments = parse(head + r.read())
        assert (comments if path != "/v1/messages" else sum(n == "ping" for n, _ in events)) >= 2
        {"/v1/messages": check_anthropic, "/v1/responses": check_responses,
         "/v1/chat/completions": check_chat}[path](events)
        conn.close()
    finally:
        gated.gate.set()
        s.stop()


def test_keepalives_while_a_real_long_prompt_prefills(eng):
    s = start_server(eng, port=0, keepalive_s=0.001)
    try:
        text = " ".join(f"word{i}" for i in range(700))
        _, _, raw = post(s, "/v1/messages", {"max_tokens": 2, "stream": True,
                                             "messages": [{"role": "user", "content": text}]})
        events, _ = parse(raw)
        check_anthropic(events)
        assert any(n == "ping" for n, _ in events)
    finally:
        s.stop()
