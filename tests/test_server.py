"""The HTTP server, live on 127.0.0.1 with tiny models, through the official
openai and anthropic clients (and raw HTTP where a client would hide the wire)."""

import asyncio
import http.client
import json
import os
import queue
import re
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import anthropic
import openai
import pytest

from engine import Completion, Delta, Engine, EngineConfig, Usage
from kernelext.server import start_server
from tiny_models import tiny_model

ROOT = Path(__file__).resolve().parent.parent
HELLO = [{"role": "user", "content": "Hello, how are you?"}]
GREEDY = {"temperature": 0}


@pytest.fixture(scope="module")
def eng():
    e = Engine.load(tiny_model("qwen3"), EngineConfig(progress=False, max_batch=8))
    yield e
    e.close()


@pytest.fixture(scope="module")
def srv(eng):
    s = start_server(eng, port=0)
    yield s
    s.stop()


@pytest.fixture(scope="module")
def oai(srv):
    return openai.OpenAI(base_url=srv.url + "/v1", api_key="unused", max_retries=0)


@pytest.fixture(scope="module")
def ant(srv):
    return anthropic.Anthropic(base_url=srv.url, api_key="unused", max_retries=0)


def request(srv, method, path, body=None, headers=None, raw=None):
    """(status, headers, parsed JSON or text) of one raw HTTP request."""
    conn = http.client.HTTPConnection(srv.host, srv.port, timeout=60)
    data = raw if raw is not None else (json.dumps(body).encode() if body is not None else None)
    conn.request(method, path, body=data, headers={"content-type": "application/json", **(headers or {})})
    r = conn.getresponse()
    payload = r.read().decode()
    conn.close()
    is_json = r.headers.get("content-type", "").startswith("application/json")
    return r.status, r.headers, json.loads(payload) if is_json else payload


def plain_stop(text):
    """A 3-character stop string from inside `text` (printable ASCII, so no token splits it)."""
    for i in range(2, len(text) - 3):
        s = text[i:i + 3]
        if s.isascii() and s.isprintable() and s.strip() == s:
            return s
    pytest.skip("no plain substring in the sample output")


# -- OpenAI chat / completions ---------------------------------------------------

def test_chat_stream_matches_non_stream(oai, eng):
    full = oai.chat.completions.create(model=eng.model_name, messages=HELLO, max_tokens=12, **GREEDY)
    chunks = list(oai.chat.completions.create(model="default", messages=HELLO, max_completion_tokens=12,
                                              stream=True, stream_options={"include_usage": True}, **GREEDY))
    assert chunks[0].choices[0].delta.role == "assistant"
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 12
    assert chunks[-1].usage.prompt_tokens == full.usage.prompt_tokens == len(eng.encode(HELLO))
    assert chunks[-1].usage.prompt_tokens_details.cached_tokens == 0
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == full.choices[0].message.content
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "length"
    assert full.choices[0].finish_reason == "length" and full.usage.completion_tokens == 12
    assert full.choices[0].message.content == eng.generate(HELLO, max_tokens=12).text


def test_completions_stream_matches_non_stream(oai):
    full = oai.completions.create(model="default", prompt="def fibonacci(n):", max_tokens=10, **GREEDY)
    chunks = list(oai.completions.create(model="default", prompt="def fibonacci(n):", max_tokens=10,
                                         stream=True, **GREEDY))
    assert "".join(c.choices[0].text for c in chunks) == full.choices[0].text
    assert chunks[-1].choices[0].finish_reason == full.choices[0].finish_reason == "length"
    ids = oai.completions.create(model="default", prompt=[5, 6, 7], max_tokens=3, **GREEDY)
    assert ids.usage.prompt_tokens == 3


def test_stop_strings(oai, ant):
    text = oai.chat.completions.create(model="default", messages=HELLO, max_tokens=16,
                                       **GREEDY).choices[0].message.content
    stop = plain_stop(text)
    want = text[:text.find(stop)]
    r = oai.chat.completions.create(model="default", messages=HELLO, max_tokens=16, stop=[stop], **GREEDY)
    assert (r.choices[0].message.content or "", r.choices[0].finish_reason) == (want, "stop")
    chunks = list(oai.chat.completions.create(model="default", messages=HELLO, max_tokens=16, stop=stop,
                                              stream=True, **GREEDY))
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == want
    assert chunks[-1].choices[0].finish_reason == "stop"
    m = ant.messages.create(model="default", max_tokens=16, messages=HELLO, stop_sequences=[stop],
                            extra_body=GREEDY)
    assert (m.stop_reason, m.stop_sequence) == ("stop_sequence", stop)
    assert "".join(b.text for b in m.content) == want


def test_logprobs_and_extra_sampling_fields(oai):
    r = oai.chat.completions.create(model="default", messages=HELLO, max_tokens=5, logprobs=True,
                                    top_logprobs=2, **GREEDY)
    content = r.choices[0].logprobs.content
    assert len(content) == 5 and all(len(t.top_logprobs) == 2 for t in content)
    assert all(t.logprob == t.top_logprobs[0].logprob for t in content)  # greedy picks the top token
    r = oai.completions.create(model="default", prompt="Hello", max_tokens=4, logprobs=1, **GREEDY)
    assert len(r.choices[0].logprobs.token_logprobs) == 4
    r = oai.chat.completions.create(model="default", messages=HELLO, max_tokens=4, seed=3, top_p=0.9,
                                    extra_body={"top_k": 5, "min_p": 0.05, "depth": 0,
                                                "generation_mode": "ar"})
    assert r.usage.completion_tokens == 4


# -- Responses API ---------------------------------------------------------------

def test_responses_stream_and_non_stream(oai):
    kwargs = dict(model="default", instructions="Be brief.", input="Hello", max_output_tokens=8, **GREEDY)
    full = oai.responses.create(**kwargs)
    assert full.status == "incomplete" and full.incomplete_details.reason == "max_output_tokens"
    assert full.usage.output_tokens == 8 and full.usage.input_tokens_details.cached_tokens == 0
    with oai.responses.stream(**kwargs) as stream:
        events = list(stream)
        final = stream.get_final_response()
    kinds = [e.type for e in events]
    deltas = kinds.count("response.output_text.delta")
    assert deltas >= 1 and kinds == [
        "response.created", "response.in_progress", "response.output_item.added",
        "response.content_part.added", *["response.output_text.delta"] * deltas,
        "response.output_text.done", "response.content_part.done", "response.output_item.done",
        "response.completed"]
    assert [e.sequence_number for e in events] == list(range(len(events)))
    assert final.output_text == full.output_text
    assert "".join(e.delta for e in events if e.type == "response.output_text.delta") == full.output_text


# -- Anthropic -------------------------------------------------------------------

def test_anthropic_messages_stream_and_non_stream(ant, eng):
    kwargs = dict(model="default", max_tokens=8, messages=HELLO, extra_body=GREEDY,
                  system=[{"type": "text", "text": "Be brief."}])
    full = ant.messages.create(**kwargs)
    assert full.stop_reason == "max_tokens" and full.usage.output_tokens == 8
    assert full.usage.cache_read_input_tokens == 0
    with ant.messages.stream(**kwargs) as stream:
        kinds = [e.type for e in stream]
        final = stream.get_final_message()
    deltas = kinds.count("content_block_delta")
    kinds = [k for k in kinds if k != "text"]  # the helper adds "text" events
    assert deltas >= 1 and kinds == ["message_start", "content_block_start", *["content_block_delta"] * deltas,
                                     "content_block_stop", "message_delta", "message_stop"]
    assert final.content[0].text == full.content[0].text
    assert final.usage.output_tokens == 8 and final.stop_reason == "max_tokens"

    chat = [{"role": "system", "content": "Be brief."}, *HELLO]
    count = ant.messages.count_tokens(model="default", messages=HELLO, system="Be brief.")
    assert count.input_tokens == len(eng.encode(chat)) == full.usage.input_tokens


# -- auth ------------------------------------------------------------------------

def test_api_key(eng):
    with pytest.raises(ValueError, match="API key"):
        start_server(eng, host="0.0.0.0", port=0)
    s = start_server(eng, port=0, api_key="s3cret")
    try:
        for key in (None, "wrong"):
            headers = {"authorization": f"Bearer {key}"} if key else {}
            assert request(s, "GET", "/v1/models", headers=headers)[0] == 401
        status, _, body = request(s, "POST", "/v1/messages", {"max_tokens": 1, "messages": HELLO},
                                  headers={"x-api-key": "wrong"})
        assert status == 401 and body["type"] == "error" and body["error"]["type"] == "authentication_error"
        assert request(s, "GET", "/v1/models", headers={"authorization": "Bearer s3cret"})[0] == 200
        assert request(s, "GET", "/v1/models", headers={"x-api-key": "s3cret"})[0] == 200
        assert request(s, "GET", "/health")[0] == 200  # liveness stays open
        with pytest.raises(openai.AuthenticationError):
            openai.OpenAI(base_url=s.url + "/v1", api_key="nope", max_retries=0).models.list()
        ok = anthropic.Anthropic(base_url=s.url, api_key="s3cret", max_retries=0)  # sends x-api-key
        assert ok.messages.create(model="default", max_tokens=2, messages=HELLO).usage.output_tokens == 2
    finally:
        s.stop()


# -- load, queueing, disconnects ---------------------------------------------------

def test_32_concurrent_clients(oai):
    def one(i):
        return oai.chat.completions.create(model="default", max_tokens=6,
                                           messages=[{"role": "user", "content": f"Count to {i}"}])
    with ThreadPoolExecutor(32) as pool:
        results = list(pool.map(one, range(32)))
    assert all(r.usage.completion_tokens == 6 for r in results)


def test_full_queue_gets_429_with_retry_after():
    e = Engine.load(tiny_model("qwen3"), EngineConfig(progress=False, max_batch=8, max_waiting=24))
    s = start_server(e, port=0)
    barrier = threading.Barrier(64)

    def one(i):
        barrier.wait()
        return request(s, "POST", "/v1/completions", {"prompt": f"{i} apples", "max_tokens": 100})
    try:
        with ThreadPoolExecutor(64) as pool:
            results = list(pool.map(one, range(64), timeout=120))
    finally:
        s.stop()
        e.close()
    rejected = [(h, b) for status, h, b in results if status == 429]
    assert rejected and sum(status == 200 for status, _, _ in results) >= 32
    assert len(rejected) + sum(status == 200 for status, _, _ in results) == 64
    assert all(h["retry-after"] == "1" and b["error"]["type"] == "rate_limit_error" for h, b in rejected)
    assert e.metrics()["requests_rejected"] == len(rejected) == s.stats()["rejected"]


def wait_for(predicate, timeout=10.0):
    end = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < end, "timed out"
        time.sleep(0.02)


def test_client_disconnect_cancels_its_request(srv, eng):
    before = eng.metrics()["requests_cancelled"]
    conn = http.client.HTTPConnection(srv.host, srv.port, timeout=30)
    conn.request("POST", "/v1/chat/completions", json.dumps(
        {"messages": HELLO, "max_tokens": 3000, "stream": True}), {"content-type": "application/json"})
    r = conn.getresponse()
    assert r.status == 200 and r.readline().startswith(b"data: ")
    conn.sock.shutdown(socket.SHUT_RDWR)
    conn.close()
    wait_for(lambda: eng.metrics()["requests_cancelled"] == before + 1)
    wait_for(lambda: eng.metrics()["running"] == 0 and srv.stats()["active_streams"] == 0)


# -- errors, health, metrics, models -----------------------------------------------

@pytest.mark.parametrize("path, body, status, param", [
    ("/v1/chat/completions", {"messages": HELLO, "max_tokens": "many"}, 400, "max_tokens"),
    ("/v1/chat/completions", {"messages": HELLO, "temperature": True}, 400, "temperature"),
    ("/v1/chat/completions", {"messages": "hi"}, 400, "messages"),
    ("/v1/chat/completions", {"messages": HELLO, "n": 2}, 400, "n"),
    ("/v1/chat/completions", {"messages": HELLO, "model": "gpt-9"}, 404, "model"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "hi " * 5000}]}, 400, "messages"),
    ("/v1/completions", {"prompt": [1] * 5000}, 400, "prompt"),
    ("/v1/completions", {"prompt": "x", "top_p": 0}, 400, None),
    ("/v1/responses", {"input": [{"type": "no_such_item"}]}, 400, "input[0]"),
    ("/v1/responses", {"input": [{"type": "web_search_call"}]}, 400, "input"),
])
def test_openai_style_errors(srv, path, body, status, param):
    got, _, err = request(srv, "POST", path, body)
    assert got == status and set(err["error"]) == {"message", "type", "param", "code"}
    assert err["error"]["param"] == param


@pytest.mark.parametrize("path", ["/v1/chat/completions", "/v1/completions", "/v1/responses", "/v1/messages",
                                  "/v1/messages/count_tokens"])
def test_malformed_fields_are_4xx(srv, path):
    for field in ("messages", "prompt", "input", "system", "tools", "stop", "stop_sequences", "stream_options"):
        for value in (1, "x", [1], [None], [{}], [{"role": "user", "content": [{"type": "image"}]}],
                      [{"role": "user", "content": "hi", "tool_calls": [{"function": "x"}]}]):
            status, _, err = request(srv, "POST", path, {"max_tokens": 1, "max_output_tokens": 1, field: value})
            assert 400 <= status < 500 or status == 200, (field, value, status, err)


def test_answers_while_the_callers_loop_is_busy(srv):
    answered = []
    client = threading.Thread(target=lambda: answered.append(request(srv, "GET", "/health")[0]))

    async def busy_cell():
        client.start()
        time.sleep(1.0)  # blocks this loop, as a busy notebook cell blocks the kernel's
        return list(answered)
    assert asyncio.run(busy_cell()) == [200]
    client.join()


def test_error_bodies_and_statuses(srv):
    status, _, err = request(srv, "POST", "/v1/chat/completions", raw=b"{not json")
    assert status == 400 and "malformed JSON" in err["error"]["message"]
    status, _, err = request(srv, "POST", "/v1/completions", {"prompt": [1] * 5000})
    assert status == 400 and err["error"]["code"] == "context_length_exceeded"
    status, _, err = request(srv, "POST", "/v1/messages", {"messages": HELLO, "max_tokens": 4, "model": "claude"})
    assert status == 404 and err == {"type": "error", "error": {"type": "not_found_error",
                                                              "message": err["error"]["message"]}}
    status, _, err = request(srv, "POST", "/v1/messages", {"messages": HELLO})
    assert status == 400 and err["error"]["type"] == "invalid_request_error"
    status, _, err = request(srv, "POST", "/v1/messages/count_tokens", raw=b"[1, 2]")
    assert status == 400 and err["type"] == "error"
    assert request(srv, "GET", "/v1/nothing")[0] == 404
    assert request(srv, "GET", "/v1/chat/completions")[0] == 405


def test_health_metrics_models(srv, eng, oai):
    status, _, body = request(srv, "GET", "/health")
    assert status == 200 and body["status"] == "ok"
    assert [m.id for m in oai.models.list()] == [eng.model_name]
    status, headers, text = request(srv, "GET", "/metrics")
    assert status == 200 and headers["content-type"].startswith("text/plain")
    values = dict(line.rsplit(" ", 1) for line in text.splitlines() if not line.startswith("#"))
    assert float(values["kernelext_requests_submitted"]) == eng.metrics()["requests_submitted"]
    assert float(values["kernelext_http_requests"]) >= 1 and "kernelext_decode_tps" in values
    assert all(re.fullmatch(r"kernelext_\w+(\{.*\})?", name) for name in values)


def test_snippets(srv):
    text = srv.snippets()
    assert f'base_url="{srv.url}/v1"' in text and f'base_url="{srv.url}"' in text
    assert 'wire_api = "responses"' in text and "[model_providers.kernelext]" in text


# -- stopping --------------------------------------------------------------------

def test_stop_during_stream_cancels_and_frees_port(eng):
    s = start_server(eng, port=0)
    client = openai.OpenAI(base_url=s.url + "/v1", api_key="unused", max_retries=0)
    before = eng.metrics()["requests_cancelled"]
    first, outcome = threading.Event(), queue.Queue()

    def read():
        try:
            for _ in client.chat.completions.create(model="default", messages=HELLO, max_tokens=3000,
                                                    stream=True):
                first.set()
            outcome.put("ended")
        except openai.APIError as e:
            outcome.put(e)
    reader = threading.Thread(target=read)
    reader.start()
    assert first.wait(30)
    t0 = time.monotonic()
    s.stop()
    assert time.monotonic() - t0 < 5
    reader.join(10)
    assert not reader.is_alive() and "stopping" in str(outcome.get_nowait())
    assert eng.metrics()["requests_cancelled"] == before + 1
    s.stop()  # idempotent
    again = start_server(eng, port=s.port)  # the port is free
    assert request(again, "GET", "/health")[0] == 200
    again.stop()


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
def test_cli_serves_and_exits_cleanly(sig):
    proc = subprocess.Popen(
        [sys.executable, "-m", "kernelext", "serve", "--model", str(tiny_model("qwen3")), "--port", "0",
         "--kv-dtype", "float32"],
        cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        env={**os.environ, "PYTHONPATH": str(ROOT)})
    lines = queue.Queue()
    threading.Thread(target=lambda: [lines.put(line) for line in proc.stdout], daemon=True).start()
    try:
        while not (m := re.search(r"at (http://127\.0\.0\.1:(\d+))", lines.get(timeout=60))):
            pass
        client = openai.OpenAI(base_url=m[1] + "/v1", api_key="unused", max_retries=0)
        assert client.completions.create(model="default", prompt="Hi", max_tokens=3).usage.completion_tokens == 3
        proc.send_signal(sig)
        assert proc.wait(30) == 0
        assert "Traceback" not in proc.stderr.read()
    finally:
        proc.kill()


# -- tools and reasoning ------------------------------------------------------------

_TOOLS_TEMPLATE = (
    "{%- if tools %}<|im_start|>system\n{%- for tool in tools %}{{ tool | tojson }}\n{%- endfor %}"
    "<|im_end|>\n{%- endif %}"
    "{%- for message in messages %}<|im_start|>{{ message['role'] }}\n{{ message['content'] }}"
    "{%- for call in message.tool_calls or [] %}<tool_call>{{ call.function | tojson }}</tool_call>"
    "{%- endfor %}<|im_end|>\n{%- endfor %}"
    "{%- if add_generation_prompt %}<|im_start|>assistant\n{%- endif %}")
WEATHER = {"name": "get_weather", "description": "Weather in a city",
           "parameters": {"type": "object", "properties": {"city": {"type": "string"}}}}
SCRIPT = ('<think>Paris is in France.</think>Let me check.'
          '<tool_call>{"name": "get_weather", "arguments": {"city": "Paris"}}</tool_call>')


@pytest.fixture(scope="module")
def tools_eng(tmp_path_factory):
    """A tiny model whose template shows tools and whose tokenizer has mlx-lm's JSON tool parser."""
    path = tmp_path_factory.mktemp("tools") / "qwen3-tools"
    shutil.copytree(tiny_model("qwen3"), path)
    config = json.loads((path / "tokenizer_config.json").read_text())
    config.update(chat_template=_TOOLS_TEMPLATE, tool_parser_type="json_tools")
    (path / "tokenizer_config.json").write_text(json.dumps(config))
    e = Engine.load(path, EngineConfig(progress=False, max_batch=4))
    yield e
    e.close()


def test_tools_reach_the_template(tools_eng):
    s = start_server(tools_eng, port=0)
    try:
        tok = tools_eng.tokenizer
        assert tok.has_tool_calling

        def rendered(messages, tools):
            return len(tok.encode(tok.apply_chat_template(messages, tools=tools, add_generation_prompt=True,
                                                          tokenize=False), add_special_tokens=False))
        fn = {"type": "function", "function": WEATHER}
        call = {"id": "c1", "type": "function", "function": {"name": "get_weather", "arguments": {"city": "Paris"}}}
        want = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Weather?"},
                {"role": "assistant", "content": "", "tool_calls": [call]},
                {"role": "tool", "tool_call_id": "c1", "content": "sunny"}]
        oai = openai.OpenAI(base_url=s.url + "/v1", api_key="unused", max_retries=0)
        r = oai.responses.create(model="default", max_output_tokens=2, instructions="Be brief.",
                                 tools=[{"type": "function", **WEATHER}, {"type": "web_search"}], input=[
                                     {"type": "message", "role": "user",
                                      "content": [{"type": "input_text", "text": "Weather?"}]},
                                     {"type": "reasoning", "id": "rs_1", "summary": []},
                                     {"type": "function_call", "call_id": "c1", "name": "get_weather",
                                      "arguments": '{"city": "Paris"}'},
                                     {"type": "function_call_output", "call_id": "c1", "output": "sunny"}])
        assert r.usage.input_tokens == rendered(want, [fn]) > rendered(want, None)
        r = oai.chat.completions.create(model="default", max_tokens=2, tools=[fn], messages=[
            {"role": "developer", "content": "Be brief."}, want[1],
            {"role": "assistant", "content": None, "tool_calls": [
                {**call, "function": {**call["function"], "arguments": '{"city": "Paris"}'}}]}, want[3]])
        assert r.usage.prompt_tokens == rendered(want, [fn])
        ant = anthropic.Anthropic(base_url=s.url, api_key="unused", max_retries=0)
        count = ant.messages.count_tokens(
            model="default", system="Be brief.", tools=[{"name": "get_weather", "description": "Weather in a city",
                                                         "input_schema": WEATHER["parameters"]}],
            messages=[want[1], {"role": "assistant", "content": [
                {"type": "tool_use", "id": "c1", "name": "get_weather", "input": {"city": "Paris"}}]},
                {"role": "user", "content": [{"type": "tool_result", "tool_use_id": "c1", "content": "sunny"}]}])
        assert count.input_tokens == rendered(want, [fn])
    finally:
        s.stop()


class ScriptedHandle:
    """A RequestHandle stand-in that "generates" fixed text, token by token."""

    def __init__(self, tokenizer, text, prompt_tokens):
        ids = tokenizer.encode(text, add_special_tokens=False)
        usage = Usage(prompt_tokens=prompt_tokens, completion_tokens=len(ids) + 1)  # + EOS
        self._deltas = [Delta(tokenizer.decode([t]), [t]) for t in ids]
        self._deltas[-1].finish_reason, self._deltas[-1].usage = "stop", usage
        self._completion = Completion(text, ids, "stop", usage)

    async def _gen(self):
        for d in self._deltas:
            yield d

    def __aiter__(self):
        return self._gen()

    def result(self):
        return self._completion

    def cancel(self):
        pass


class ThinkingTokenizer:
    """The tiny tokenizer, plus the <think> markers its vocabulary lacks."""
    has_thinking, think_start, think_end = True, "<think>", "</think>"

    def __init__(self, tok):
        self._tok = tok

    def __getattr__(self, name):
        return getattr(self._tok, name)

    def rfind_think_start(self, ids):
        return -1

    rfind_think_end = rfind_think_start


class ScriptedEngine:
    def __init__(self, engine):
        self.tokenizer = ThinkingTokenizer(engine.tokenizer)
        self.model_name, self.max_context, self.encode = "scripted", engine.max_context, engine.encode

    def submit(self, prompt_ids, params, source):
        assert source == "http"
        return ScriptedHandle(self.tokenizer, SCRIPT, len(prompt_ids))


def test_tool_calls_and_reasoning_in_every_dialect(tools_eng):
    s = start_server(ScriptedEngine(tools_eng), port=0)
    try:
        oai = openai.OpenAI(base_url=s.url + "/v1", api_key="unused", max_retries=0)
        kwargs = dict(model="default", messages=[{"role": "user", "content": "Weather in Paris?"}],
                      tools=[{"type": "function", "function": WEATHER}])
        r = oai.chat.completions.create(**kwargs)
        msg = r.choices[0].message
        assert r.choices[0].finish_reason == "tool_calls" and msg.content == "Let me check."
        assert msg.model_extra["reasoning"] == "Paris is in France."
        assert msg.tool_calls[0].function.name == "get_weather"
        assert json.loads(msg.tool_calls[0].function.arguments) == {"city": "Paris"}
        chunks = list(oai.chat.completions.create(**kwargs, stream=True))
        calls = [tc for c in chunks for tc in c.choices[0].delta.tool_calls or []]
        assert [(tc.index, tc.function.name, json.loads(tc.function.arguments)) for tc in calls] == [
            (0, "get_weather", {"city": "Paris"})]
        assert "".join(c.choices[0].delta.content or "" for c in chunks) == "Let me check."
        assert chunks[-1].choices[0].finish_reason == "tool_calls"

        rkw = dict(model="default", input="Weather in Paris?", tools=[{"type": "function", **WEATHER}])
        r = oai.responses.create(**rkw)
        assert [o.type for o in r.output] == ["reasoning", "message", "function_call"]
        assert r.output_text == "Let me check." and r.output[2].name == "get_weather"
        assert json.loads(r.output[2].arguments) == {"city": "Paris"}
        with oai.responses.stream(**rkw) as stream:
            kinds = [e.type for e in stream]
            final = stream.get_final_response()
        assert [o.type for o in final.output] == ["reasoning", "message", "function_call"]
        assert kinds.count("response.output_item.added") == kinds.count("response.output_item.done") == 3
        assert "response.function_call_arguments.done" in kinds and kinds[-1] == "response.completed"

        ant = anthropic.Anthropic(base_url=s.url, api_key="unused", max_retries=0)
        akw = dict(model="default", max_tokens=64, messages=[{"role": "user", "content": "Weather in Paris?"}],
                   tools=[{"name": "get_weather", "input_schema": WEATHER["parameters"]}])
        with ant.messages.stream(**akw) as stream:
            streamed = stream.get_final_message()
        for m in (ant.messages.create(**akw), streamed):
            assert [b.type for b in m.content] == ["thinking", "text", "tool_use"]
            assert m.content[0].thinking == "Paris is in France." and m.content[1].text == "Let me check."
            assert (m.content[2].name, m.content[2].input) == ("get_weather", {"city": "Paris"})
            assert m.stop_reason == "tool_use"
    finally:
        s.stop()
