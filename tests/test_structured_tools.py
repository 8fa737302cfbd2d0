"""Tool calls in the model's own syntax, and strict tools under tool_choice auto.

Forced calls: in every mlx-lm tool-call syntax with a grammar (server/tool_syntax.py),
a seeded call parses back with mlx-lm's own parser into an offered tool's name and
arguments valid against its schema; other syntaxes fall back to the JSON convention.

Strict tools under auto: tiny models that start calls of their own (tests/tool_models.py)
are served; every call of a strict tool has schema-valid arguments, text outside calls
is drawn exactly as without a grammar, and speculation changes nothing.
"""

import importlib
import json
from types import SimpleNamespace

import anthropic
import jsonschema
import openai
import pytest

from engine import Engine, EngineConfig, SamplingParams
from kernelext.server import start_server, structured, tool_syntax
from kernelext.server.structured import JSON_SPACE
from test_speculative import ScriptedDrafter, use_drafter
from tiny_models import tiny_model, write_tiny_model
from tool_models import END_ID, START_ID, json_model, marker_model

WEATHER_PARAMS = {"type": "object", "properties": {
    "city": {"type": "string", "maxLength": 20}, "unit": {"enum": ["C", "F"]},
    "days": {"type": "integer", "minimum": 1, "maximum": 7}, "rain": {"type": "boolean"}},
    "required": ["city", "unit", "days"], "additionalProperties": False}
EVENT_PARAMS = {"type": "object", "properties": {
    "title": {"type": "string", "maxLength": 12},
    "tags": {"type": "array", "items": {"type": "string", "maxLength": 6}, "maxItems": 2},
    "at": {"$ref": "#/$defs/time"}},
    "required": ["title", "tags", "at"], "additionalProperties": False,
    "$defs": {"time": {"type": "object", "properties": {"hour": {"type": "integer", "minimum": 0, "maximum": 23}},
                       "required": ["hour"], "additionalProperties": False}}}
TZ_PARAMS = {"type": "object", "properties": {"tz": {"type": "string", "maxLength": 10}}, "required": ["tz"]}


def fn(name, params, strict=None):
    f = {"name": name, "description": f"the {name} tool", "parameters": params}
    return {"type": "function", "function": {**f, **({"strict": strict} if strict is not None else {})}}


WEATHER, EVENT, TIME = fn("get_weather", WEATHER_PARAMS, True), fn("add_event", EVENT_PARAMS, True), fn("get_time", TZ_PARAMS)
SCALAR_ONLY = ("function_gemma", "gemma4")  # their values are scalars: no arrays or objects
ASK = [{"role": "user", "content": "What is the weather in Paris?"}]


def _tokenizer(parser):
    from mlx_lm.tokenizer_utils import load
    return load(tiny_model("llama"), tokenizer_config_extra={"tool_parser_type": parser})


def _parse(parser, text, tools):
    """The call text as mlx-lm's server reads it: between the markers, by the parser."""
    mod = importlib.import_module(f"mlx_lm.tool_parsers.{parser}")
    assert text.startswith(mod.tool_call_start) and text.endswith(mod.tool_call_end), text
    inner = text[len(mod.tool_call_start):len(text) - len(mod.tool_call_end)]
    calls = mod.parse_tool_call(inner, tools)
    return calls if isinstance(calls, list) else [calls]


def _valid(name, arguments, tools):
    (params,) = [t["function"]["parameters"] for t in tools if t["function"]["name"] == name]
    jsonschema.validate(arguments, params)


@pytest.fixture(scope="module")
def eng():
    with Engine.load(tiny_model("llama"), EngineConfig(progress=False, drafter="none")) as e:
        yield e


@pytest.mark.parametrize("parser", tool_syntax.SUPPORTED)
def test_forced_call_in_each_syntax_parses_back_with_mlx_lms_parser(eng, parser):
    tok = _tokenizer(parser)
    assert tool_syntax.parser_name(tok) == parser
    tools = [WEATHER, TIME] if parser in SCALAR_ONLY else [WEATHER, EVENT, TIME]
    grammar = tool_syntax.forced_grammar(tok, [(t["function"]["name"], t["function"]["parameters"])
                                               for t in tools])
    for seed in range(4):
        c = eng.generate(eng.encode("Call:"), SamplingParams(grammar=grammar, max_tokens=300,
                                                             temperature=0.8, seed=seed))
        assert c.finish_reason == "stop", c.text
        (call,) = _parse(parser, c.text, tools)
        _valid(call["name"], call["arguments"], tools)


def test_syntaxes_without_a_grammar_are_a_clear_error(caplog):
    with pytest.raises(tool_syntax.Unsupported, match="minimax_m2"):
        tool_syntax.forced_grammar(_tokenizer("minimax_m2"), [("get_time", TZ_PARAMS)])
    with pytest.raises(tool_syntax.Unsupported, match="'tags'.*scalar"):
        tool_syntax.forced_grammar(_tokenizer("function_gemma"), [("add_event", EVENT_PARAMS)])
    # Under auto such strict tools are left unconstrained, with a warning (structured.py
    # reads nothing but the engine's tokenizer).
    with caplog.at_level("WARNING", logger="kernelext.server"):
        gemma = SimpleNamespace(tokenizer=_tokenizer("function_gemma"))
        grammar = structured.auto_calls(gemma, [EVENT, WEATHER], {"add_event", "get_weather"}).constraint["grammar"]
        assert "call:get_weather{" in grammar and "call:add_event{" in grammar
        assert structured.auto_calls(SimpleNamespace(tokenizer=_tokenizer("minimax_m2")), [WEATHER],
                                     {"get_weather"}) is None
    assert "'add_event' is not enforced" in caplog.text and "minimax_m2" in caplog.text


def _serve(path, **config):
    e = Engine.load(path, EngineConfig(progress=False, max_batch=8, drafter="none", **config))
    s = start_server(e, port=0)
    return e, s, openai.OpenAI(base_url=s.url + "/v1", api_key="unused", max_retries=0)


def test_forced_call_falls_back_to_the_json_convention_for_other_syntaxes(tmp_path):
    path = write_tiny_model("llama", tmp_path / "minimax")
    config = json.loads((path / "tokenizer_config.json").read_text())
    (path / "tokenizer_config.json").write_text(json.dumps({**config, "tool_parser_type": "minimax_m2"}))
    e, s, client = _serve(path)
    try:
        assert tool_syntax.parser_name(e.tokenizer) == "minimax_m2"
        r = client.chat.completions.create(model="default", messages=ASK, tools=[WEATHER, TIME],
                                           tool_choice="required", max_tokens=100, temperature=0.8, seed=1)
        assert r.choices[0].finish_reason == "tool_calls"
        (call,) = r.choices[0].message.tool_calls
        _valid(call.function.name, json.loads(call.function.arguments), [WEATHER, TIME])
    finally:
        s.stop()
        e.close()


@pytest.mark.parametrize("parser", ["qwen3_coder", "function_gemma"])
def test_forced_call_through_the_server_in_the_models_syntax(tmp_path, parser):
    e, s, client = _serve(marker_model(tmp_path / parser, parser))
    try:
        for seed in range(3):
            r = client.chat.completions.create(model="default", messages=ASK, tools=[WEATHER, TIME],
                                               tool_choice={"type": "function", "function": {"name": "get_weather"}},
                                               max_tokens=200, temperature=0.8, seed=seed)
            assert r.choices[0].finish_reason == "tool_calls"
            (call,) = r.choices[0].message.tool_calls  # read by the model's mlx-lm parser
            assert call.function.name == "get_weather"
            _valid("get_weather", json.loads(call.function.arguments), [WEATHER])
    finally:
        s.stop()
        e.close()


# -- strict tools under tool_choice auto -------------------------------------------------

def _auto_grammar(e, tools, strict):
    calls = structured.auto_calls(e, tools, strict)
    return calls.constraint["grammar"]


def _prefix(ids, stop_at):
    """ids up to and including the first token in stop_at (all of them if none)."""
    for k, t in enumerate(ids):
        if t in stop_at:
            return ids[:k + 1]
    return ids


def _text_marker_model(path):
    """json_tools with <tool_call> as plain text (not one token): the lazy-trigger grammar."""
    path = write_tiny_model("llama", path)
    config = json.loads((path / "tokenizer_config.json").read_text())
    (path / "tokenizer_config.json").write_text(json.dumps({**config, "tool_parser_type": "json_tools"}))
    return path


@pytest.mark.parametrize("parser", ["json_tools", "qwen3_coder", "function_gemma", "json_convention",
                                    "text_marker"])
def test_auto_grammar_leaves_text_exact_and_speculation_changes_nothing(tmp_path, parser):
    path = (json_model(tmp_path / "m") if parser == "json_convention" else
            _text_marker_model(tmp_path / "m") if parser == "text_marker" else marker_model(tmp_path / "m", parser))
    with Engine.load(path, EngineConfig(progress=False, max_batch=8, block_size=16, drafter="none")) as e:
        grammar = _auto_grammar(e, [WEATHER, TIME], {"get_weather"})
        prompt = e.tokenizer.apply_chat_template(ASK, add_generation_prompt=True)
        brace = e.encode("{")[-1]
        seeds = range(8)
        for temperature in (0.0, 0.8) if parser == "json_tools" else (0.8,):
            kw = dict(max_tokens=60, temperature=temperature)
            free = [e.generate(prompt, SamplingParams(seed=s, **kw)) for s in seeds]
            held = [e.generate(prompt, SamplingParams(seed=s, grammar=grammar, **kw)) for s in seeds]
            for f, h in zip(free, held):
                if parser == "json_convention":  # the first visible character decides
                    if not f.text.lstrip(JSON_SPACE).startswith("{"):
                        assert h.token_ids == f.token_ids
                    else:  # a call: the same tokens up to its '{'
                        assert h.text.lstrip(JSON_SPACE).startswith("{")
                        assert h.token_ids[:len(_prefix(f.token_ids, {brace}))] == _prefix(f.token_ids, {brace})
                else:  # the same tokens up to the first call's start marker
                    cut = _prefix(f.token_ids, {START_ID})
                    assert h.token_ids[:len(cut)] == cut
            # One batch: the same tokens as alone.
            batch = [e.submit(prompt, SamplingParams(seed=s, grammar=grammar, **kw)) for s in seeds]
            assert [h.result().token_ids for h in batch] == [c.token_ids for c in held]
            # Speculation: drafts right for 2 tokens, then wrong; the same tokens come out.
            refs = {tuple(prompt): [c.token_ids + [0] * 60 for c in held]}
            for i, s in enumerate(seeds):
                use_drafter(e, ScriptedDrafter({tuple(prompt): refs[tuple(prompt)][i]}, 2, e._loaded.vocab_size))
                before = e.metrics()["spec_accepted_tokens"]
                spec = e.generate(prompt, SamplingParams(seed=s, grammar=grammar, depth=4, **kw))
                assert spec.token_ids == held[i].token_ids
                assert e.metrics()["spec_accepted_tokens"] > before or len(held[i].token_ids) < 3
            use_drafter(e, type("Off", (), {"name": "none", "propose": None})())
        if parser not in ("json_convention", "text_marker"):
            assert any(START_ID in h.token_ids for h in held)  # calls were started


@pytest.mark.parametrize("marker", ["added_token", "text"])
def test_auto_grammar_holds_strict_calls_and_frees_the_rest(tmp_path, marker):
    import llguidance

    from engine.structured.matcher import GrammarTokenizer
    path = marker_model(tmp_path / "m", "json_tools") if marker == "added_token" else _text_marker_model(tmp_path / "m")
    with Engine.load(path, EngineConfig(progress=False, drafter="none")) as e:
        grammar = _auto_grammar(e, [WEATHER, TIME], {"get_weather"})
        ll = GrammarTokenizer(e.tokenizer, e._loaded.vocab_size).ll

        def accepts(text):
            m = llguidance.LLMatcher(ll, grammar, log_level=0)
            ids = e.tokenizer.encode(text, add_special_tokens=False)
            return m.validate_tokens(ids) == len(ids) and m.consume_tokens(ids) and m.is_accepting()
        call = '<tool_call>{"name": "get_weather", "arguments": {"city": "Oslo", "unit": "C", "days": 2}}</tool_call>'
        assert accepts("Let me check. " + call + " Done { } <b>")
        assert accepts('<tool_call>{"name": "get_time", "arguments": {"anything": [1]}}</tool_call>')  # not strict
        assert not accepts(call.replace('"C"', '"K"'))  # outside the enum
        assert not accepts(call.replace('"days": 2', '"days": 9'))  # above the maximum
        assert not accepts('<tool_call>{"name": "delete_all", "arguments": {}}</tool_call>')  # not offered
        assert not accepts("Let me check. <tool_call>just text</tool_call>")


def _chat_calls(client, tools, seeds, **kw):
    out = []
    for seed in seeds:
        r = client.chat.completions.create(model="default", messages=ASK, tools=tools, max_tokens=150,
                                           temperature=0.8, seed=seed, **kw)
        out.append(r.choices[0])
    return out


def _anthropic_strict_weather(url: str, seeds) -> list:
    """ASK over the anthropic client with the weather tool marked strict, one message per seed."""
    ant = anthropic.Anthropic(base_url=url, api_key="unused", max_retries=0)
    tools = [{"name": "get_weather", "description": "weather", "input_schema": WEATHER_PARAMS, "strict": True}]
    return [ant.messages.create(model="default", max_tokens=150, messages=ASK, tools=tools,
                                extra_body={"seed": seed, "temperature": 0.8}) for seed in seeds]


@pytest.mark.parametrize("parser", ["json_tools", "qwen3_coder", "function_gemma"])
def test_strict_tools_under_auto_through_the_clients_with_markers(tmp_path, parser):
    e, s, client = _serve(marker_model(tmp_path / parser, parser))
    try:
        choices = _chat_calls(client, [WEATHER, TIME], range(6))
        calls = [c for ch in choices for c in ch.message.tool_calls or []]
        strict_calls = [c for c in calls if c.function.name == "get_weather"]
        assert strict_calls and any(ch.message.content for ch in choices)  # calls and free text
        for c in strict_calls:
            _valid("get_weather", json.loads(c.function.arguments), [WEATHER])
        for c in calls:
            assert c.function.name in ("get_weather", "get_time")
        assert all(ch.finish_reason in ("tool_calls", "stop", "length") for ch in choices)
        # Responses: the same tools, flat, strict.
        r = client.responses.create(model="default", input="Weather in Oslo?", max_output_tokens=150,
                                    temperature=0.8, tools=[{"type": "function", **WEATHER["function"]}])
        for item in r.output:
            if item.type == "function_call":
                _valid(item.name, json.loads(item.arguments), [WEATHER])
        # Anthropic: tools' `strict` is honoured the same way.
        uses = [b for m in _anthropic_strict_weather(s.url, range(4)) for b in m.content if b.type == "tool_use"]
        assert uses
        for b in uses:
            _valid(b.name, b.input, [WEATHER])
    finally:
        s.stop()
        e.close()


def test_strict_tools_under_auto_in_the_json_convention(tmp_path):
    e, s, client = _serve(json_model(tmp_path / "json"))
    try:
        assert tool_syntax.parser_name(e.tokenizer) is None
        # Both strict here: a non-strict tool's arguments are any object, which a random
        # model keeps writing to the output limit.
        tools = [WEATHER, fn("get_time", TZ_PARAMS, True)]
        choices = _chat_calls(client, tools, range(8))
        calls = [c for ch in choices for c in ch.message.tool_calls or []]
        texts = [ch.message.content for ch in choices if not ch.message.tool_calls]
        assert calls and texts
        for c in calls:
            _valid(c.function.name, json.loads(c.function.arguments), tools)
        for t in texts:  # text never starts with '{', unless cut off inside a call
            assert not (t or "").lstrip(JSON_SPACE).startswith("{") or \
                any(ch.finish_reason == "length" for ch in choices if ch.message.content == t)
        # Streamed: the held-back call comes out as one tool call.
        seed = next(i for i, ch in enumerate(choices) if ch.message.tool_calls)
        chunks = list(client.chat.completions.create(model="default", messages=ASK, tools=tools,
                                                     max_tokens=150, temperature=0.8, seed=seed, stream=True))
        streamed = [tc for ch in chunks if ch.choices for tc in ch.choices[0].delta.tool_calls or []]
        assert [tc.function.arguments for tc in streamed] == [choices[seed].message.tool_calls[0].function.arguments]
        # Non-strict tools under auto stay unconstrained: exactly the output without tools
        # (this template does not show tools, and no note is added).
        loose = [fn("get_weather", WEATHER_PARAMS), TIME]
        for seed in range(3):
            a = client.chat.completions.create(model="default", messages=ASK, tools=loose, max_tokens=40,
                                               temperature=0.8, seed=seed)
            b = client.chat.completions.create(model="default", messages=ASK, max_tokens=40, temperature=0.8,
                                               seed=seed)
            assert a.choices[0].message.content == b.choices[0].message.content
            assert not a.choices[0].message.tool_calls
        # Anthropic and Responses over the same convention.
        uses = []
        for m in _anthropic_strict_weather(s.url, range(6)):
            uses += [b for b in m.content if b.type == "tool_use"]
            assert m.stop_reason == ("tool_use" if any(b.type == "tool_use" for b in m.content)
                                     else m.stop_reason)
        for b in uses:
            _valid(b.name, b.input, [WEATHER])
        outputs = [client.responses.create(model="default", input="Weather?", max_output_tokens=150, temperature=0.8,
                                           tools=[{"type": "function", **WEATHER["function"]}],
                                           extra_body={"seed": seed}).output for seed in range(6)]
        for item in (i for out in outputs for i in out):
            if item.type == "function_call":
                _valid(item.name, json.loads(item.arguments), [WEATHER])
    finally:
        s.stop()
        e.close()
