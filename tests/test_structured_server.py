"""Structured output over HTTP, through the official clients: response formats,
/v1/completions constraints, forced tool calls in every dialect, 400s for
constraints that do not compile (nothing submitted)."""

import json
import re

import anthropic
import jsonschema
import openai
import pytest

from engine import Engine, EngineConfig
from kernelext.server import start_server
from test_server import eng, oai, srv  # noqa: F401  (the same tiny model's server)
from tiny_models import write_tiny_model

PERSON = {"type": "object", "properties": {"name": {"type": "string", "maxLength": 12},
                                           "age": {"type": "integer", "minimum": 0, "maximum": 120}},
          "required": ["name", "age"], "additionalProperties": False}
WEATHER = {"type": "function", "function": {
    "name": "get_weather", "description": "The current weather in a city", "strict": True,
    "parameters": {"type": "object", "properties": {"city": {"type": "string", "maxLength": 20},
                                                    "unit": {"enum": ["C", "F"]}},
                   "required": ["city", "unit"], "additionalProperties": False}}}
TIME = {"type": "function", "function": {
    "name": "get_time", "description": "The time in a timezone",
    "parameters": {"type": "object", "properties": {"tz": {"type": "string", "maxLength": 20}},
                   "required": ["tz"]}}}
ASK = [{"role": "user", "content": "What is the weather in Paris?"}]


def test_chat_response_format(oai):
    r = oai.chat.completions.create(model="default", messages=ASK, max_tokens=60, temperature=0.8, seed=1,
                                    response_format={"type": "json_schema", "json_schema": {
                                        "name": "person", "strict": True, "schema": PERSON}})
    if r.choices[0].finish_reason == "stop":
        jsonschema.validate(json.loads(r.choices[0].message.content), PERSON)
    r = oai.chat.completions.create(model="default", messages=ASK, max_tokens=60, seed=2,
                                    response_format={"type": "json_object"})
    assert r.choices[0].finish_reason == "length" or isinstance(json.loads(r.choices[0].message.content), dict)


def test_responses_text_format(oai):
    fmt = {"type": "json_schema", "name": "person", "schema": PERSON, "strict": True}
    r = oai.responses.create(model="default", input="A person:", max_output_tokens=60, temperature=0.5,
                             text={"format": fmt})
    assert r.text.format.type == "json_schema"
    if r.status == "completed":
        jsonschema.validate(json.loads(r.output_text), PERSON)


def test_completions_regex_choice_grammar(oai):
    r = oai.completions.create(model="default", prompt="Code:", max_tokens=20, temperature=1.0, seed=3,
                               extra_body={"regex": "[A-Z]{3}-[0-9]{3}"})
    assert re.fullmatch("[A-Z]{3}-[0-9]{3}", r.choices[0].text) and r.choices[0].finish_reason == "stop"
    r = oai.completions.create(model="default", prompt="Pick:", max_tokens=20,
                               extra_body={"choice": ["alpha", "beta", "gamma"]})
    assert r.choices[0].text in ("alpha", "beta", "gamma")
    r = oai.completions.create(model="default", prompt="Sum:", max_tokens=20, temperature=1.0, seed=4,
                               extra_body={"grammar": 'root ::= "(" [0-9] "+" [0-9] ")"'})  # GBNF
    assert re.fullmatch(r"\(\d\+\d\)", r.choices[0].text)
    r = oai.completions.create(model="default", prompt="JSON:", max_tokens=60, seed=5,
                               extra_body={"response_format": {"type": "json_schema", "json_schema": {
                                   "name": "p", "schema": PERSON}}})
    assert r.choices[0].finish_reason == "length" or json.loads(r.choices[0].text)


@pytest.mark.parametrize("kind,kwargs,names", [
    ("chat", dict(response_format={"type": "json_schema", "json_schema": {
        "name": "x", "schema": {"type": "object", "properties": {"a": {"$ref": "#/$defs/none"}}}}}), "json_schema"),
    ("chat", dict(response_format={"type": "yaml"}), "response_format"),
    ("chat", dict(tools=[WEATHER], tool_choice={"type": "function", "function": {"name": "nope"}}), "nope"),
    ("chat", dict(tool_choice="required"), "no tools"),
    ("completions", dict(extra_body={"regex": "(unclosed"}), "regex"),
    ("completions", dict(extra_body={"grammar": "start: missing_rule"}), "grammar"),
    ("completions", dict(extra_body={"regex": "a", "choice": ["a"]}), "one"),
])
def test_bad_constraints_are_400_and_submit_nothing(oai, eng, kind, kwargs, names):
    before = eng.metrics()["requests_submitted"]
    with pytest.raises(openai.BadRequestError) as e:
        if kind == "chat":
            oai.chat.completions.create(model="default", messages=ASK, max_tokens=8, **kwargs)
        else:
            oai.completions.create(model="default", prompt="x", max_tokens=8, **kwargs)
    assert names in e.value.message
    assert eng.metrics()["requests_submitted"] == before


def _args_valid(call, tools):
    schema = next(t["function"]["parameters"] for t in tools if t["function"]["name"] == call.function.name)
    jsonschema.validate(json.loads(call.function.arguments), schema)


@pytest.mark.parametrize("stream", [False, True])
def test_openai_chat_tool_choice_forces_a_call(oai, stream):
    for choice, want in (("required", None), ({"type": "function", "function": {"name": "get_time"}}, "get_time")):
        kwargs = dict(model="default", messages=ASK, tools=[WEATHER, TIME], tool_choice=choice,
                      max_tokens=80, temperature=0.8, seed=7)
        if stream:
            chunks = list(oai.chat.completions.create(stream=True, **kwargs))
            calls = [tc for ch in chunks if ch.choices for tc in (ch.choices[0].delta.tool_calls or [])]
            finish = [ch.choices[0].finish_reason for ch in chunks if ch.choices and ch.choices[0].finish_reason]
            assert finish == ["tool_calls"] and len(calls) == 1
            call = calls[0]
        else:
            r = oai.chat.completions.create(**kwargs)
            assert r.choices[0].finish_reason == "tool_calls" and not r.choices[0].message.content
            (call,) = r.choices[0].message.tool_calls
        assert want is None or call.function.name == want
        _args_valid(call, [WEATHER, TIME])


def test_responses_and_anthropic_tool_choice(oai, srv):
    r = oai.responses.create(model="default", input="Weather in Oslo?", max_output_tokens=80,
                             tools=[{"type": "function", **WEATHER["function"]}],
                             tool_choice={"type": "function", "name": "get_weather"})
    (call,) = [o for o in r.output if o.type == "function_call"]
    assert call.name == "get_weather"
    jsonschema.validate(json.loads(call.arguments), WEATHER["function"]["parameters"])
    ant = anthropic.Anthropic(base_url=srv.url, api_key="unused", max_retries=0)
    tools = [{"name": f["function"]["name"], "description": f["function"]["description"],
              "input_schema": f["function"]["parameters"]} for f in (WEATHER, TIME)]
    for choice in ({"type": "any"}, {"type": "tool", "name": "get_time"}):
        m = ant.messages.create(model="default", max_tokens=80, messages=ASK, tools=tools, tool_choice=choice)
        (use,) = [b for b in m.content if b.type == "tool_use"]
        assert m.stop_reason == "tool_use" and (choice["type"] == "any" or use.name == "get_time")
        jsonschema.validate(use.input, next(t["input_schema"] for t in tools if t["name"] == use.name))


_HERMES = (
    "{%- if tools %}<|im_start|>system\n<tools>{% for t in tools %}{{ t | tojson }}{% endfor %}</tools>\n"
    "Call a tool as <tool_call>{\"name\": ..., \"arguments\": ...}</tool_call><|im_end|>\n{% endif %}"
    "{%- for message in messages %}{%- if message.tool_calls %}<|im_start|>assistant\n"
    "{%- for tool_call in message.tool_calls %}{%- if tool_call.function %}{%- set tool_call = tool_call.function %}"
    "{%- endif %}<tool_call>{\"name\": \"{{ tool_call.name }}\", \"arguments\": {{ tool_call.arguments | tojson }}}"
    "</tool_call>{%- endfor %}<|im_end|>\n{%- else %}<|im_start|>{{ message.role }}\n{{ message.content }}"
    "<|im_end|>\n{%- endif %}{%- endfor %}{%- if add_generation_prompt %}<|im_start|>assistant\n{%- endif %}")


def test_forced_call_in_the_models_own_tool_call_syntax(tmp_path):
    path = write_tiny_model("qwen3", tmp_path / "hermes")
    config = json.loads((path / "tokenizer_config.json").read_text())
    (path / "tokenizer_config.json").write_text(json.dumps({**config, "chat_template": _HERMES}))
    with Engine.load(path, EngineConfig(progress=False)) as e:
        assert e.tokenizer.has_tool_calling and e.tokenizer.tool_call_start == "<tool_call>"
        s = start_server(e, port=0)
        try:
            client = openai.OpenAI(base_url=s.url + "/v1", api_key="unused", max_retries=0)
            r = client.chat.completions.create(model="default", messages=ASK, tools=[WEATHER, TIME],
                                               tool_choice="required", max_tokens=80, seed=1, temperature=0.8)
            assert r.choices[0].finish_reason == "tool_calls"
            (call,) = r.choices[0].message.tool_calls  # parsed by mlx-lm's json_tools parser
            _args_valid(call, [WEATHER, TIME])
            raw = e.generate(e.encode("x"), grammar=_last_grammar(e, [WEATHER, TIME]), max_tokens=80)
            assert raw.text.startswith("<tool_call>") and raw.text.endswith("</tool_call>")
        finally:
            s.stop()


def _last_grammar(e, tools):
    from kernelext.server import structured
    return structured.forced_call(e, tools, structured.ANY_TOOL).constraint["grammar"]
