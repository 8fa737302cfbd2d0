"""Message normalization (kernelext/server/messages.py) against real chat templates:
every tiny family's and the default model's (Gemma 3's, which refuses anything but
strictly alternating user/assistant turns), fed with the requests Codex CLI and
Claude Code really send (tests/data/agent_requests.json, captured from the CLIs)."""

import json
from pathlib import Path

import pytest
from transformers import AutoTokenizer

from kernelext.server import anthropic_api, openai_api, responses_api
from kernelext.server.messages import (
    FOLD_RULE,
    RULES,
    TOOLS_RULE,
    TemplateRejected,
    fold_system,
    normalize,
    render,
    tools_as_text,
)
from tiny_models import FAMILIES, tiny_model

CAPTURED = json.loads((Path(__file__).parent / "data" / "agent_requests.json").read_text())


def _default_model_dir():
    from engine.models.store import resolve_model
    return resolve_model("gemma-3-270m", progress=False)


@pytest.fixture(scope="module", params=[*FAMILIES, "gemma-3-270m"])
def template(request):
    """(name, render function) for one real chat template."""
    path = _default_model_dir() if request.param == "gemma-3-270m" else tiny_model(request.param)
    tok = AutoTokenizer.from_pretrained(str(path))
    return request.param, lambda ms: tok.apply_chat_template(ms, add_generation_prompt=True, tokenize=False)


def canonical(key: str, body: dict) -> list[dict]:
    """A captured body through its dialect's own parser (what the server hands to render)."""
    if "/v1/messages" in key:
        return anthropic_api._chat(body)[0]
    if "/v1/responses" in key:
        instructions = [{"role": "system", "content": body["instructions"]}] if body.get("instructions") else []
        return instructions + responses_api._messages(body)
    return [openai_api._message(m, i) for i, m in enumerate(body["messages"])]


def captured_cases():
    return [(key, i) for key, bodies in CAPTURED.items() if not key.startswith("_") for i in range(len(bodies))]


# -- the rules on their own ------------------------------------------------------------

def test_developer_and_scattered_system_messages_become_one_leading_system_message():
    got = normalize([{"role": "user", "content": "u1"}, {"role": "system", "content": "s1"},
                     {"role": "developer", "content": "d1"}, {"role": "user", "content": "u2"},
                     {"role": "system", "content": ""}])
    assert got == [{"role": "system", "content": "s1\n\nd1"}, {"role": "user", "content": "u1\n\nu2"}]


def test_same_role_neighbours_merge_but_tool_results_keep_their_call_ids():
    call = {"id": "c1", "type": "function", "function": {"name": "f", "arguments": {}}}
    got = normalize([{"role": "user", "content": "a"}, {"role": "user", "content": "b"},
                     {"role": "assistant", "content": "x"}, {"role": "assistant", "content": "", "tool_calls": [call]},
                     {"role": "tool", "tool_call_id": "c1", "content": "r1"},
                     {"role": "tool", "tool_call_id": "c2", "content": "r2"}])
    assert got == [{"role": "user", "content": "a\n\nb"}, {"role": "assistant", "content": "x", "tool_calls": [call]},
                   {"role": "tool", "tool_call_id": "c1", "content": "r1"},
                   {"role": "tool", "tool_call_id": "c2", "content": "r2"}]


def test_fold_system_into_the_first_user_turn():
    msgs = [{"role": "system", "content": "S"}, {"role": "assistant", "content": "A"}, {"role": "user", "content": "U"}]
    assert fold_system(msgs) == [{"role": "assistant", "content": "A"}, {"role": "user", "content": "S\n\nU"}]
    assert fold_system([{"role": "system", "content": "S"}]) == [{"role": "user", "content": "S"}]


def test_tool_traffic_as_plain_turns():
    call = {"id": "c1", "type": "function", "function": {"name": "get_time", "arguments": {"tz": "UTC"}}}
    got = tools_as_text([{"role": "user", "content": "time?"}, {"role": "assistant", "content": "", "tool_calls": [call]},
                         {"role": "tool", "tool_call_id": "c1", "content": "12:00"},
                         {"role": "user", "content": "thanks"}])
    assert [m["role"] for m in got] == ["user", "assistant", "user"]
    assert '"get_time"' in got[1]["content"] and "12:00" in got[2]["content"] and got[2]["content"].endswith("thanks")


STRICT_NO_SYSTEM = ("{%- for m in messages %}{%- if m['role'] == 'system' %}"
                    "{{ raise_exception('System role not supported') }}{%- endif %}"
                    "[{{ m['role'] }}]{{ m['content'] }}{%- endfor %}")


def jinja(source: str):
    from transformers.utils.chat_template_utils import _compile_jinja_template
    compiled = _compile_jinja_template(source)
    return lambda ms: compiled.render(messages=ms, add_generation_prompt=True)


def test_a_template_without_system_role_gets_the_system_text_in_the_first_user_turn():
    text = render([{"role": "developer", "content": "Be brief."}, {"role": "user", "content": "Hi"}],
                  jinja(STRICT_NO_SYSTEM))
    assert text == "[user]Be brief.\n\nHi"


def test_a_template_that_refuses_everything_names_the_rules():
    refuse = jinja("{{ raise_exception('nope') }}")
    with pytest.raises(TemplateRejected) as e:
        render([{"role": "system", "content": "S"}, {"role": "user", "content": "U"},
                {"role": "tool", "tool_call_id": "c", "content": "R"}], refuse)
    message = str(e.value)
    assert RULES in message and FOLD_RULE in message and TOOLS_RULE in message and "nope" in message


# -- real templates, real clients' messages -------------------------------------------

@pytest.mark.parametrize("key, i", captured_cases())
def test_captured_requests_render_with_every_template(template, key, i):
    name, apply = template
    messages = canonical(key, CAPTURED[key][i])
    text = render(messages, apply)
    # Nothing is lost: every message's text (its first line, templates may trim) is in the prompt.
    for m in messages:
        first = m["content"].strip().split("\n")[0]
        assert first in text, (name, key, i, m["role"], first)


def test_the_default_models_template_needs_the_normalization():
    """Gemma 3's template refuses Codex's messages as they are (the bug this fixes) and
    shows Claude Code's in-list system message as a turn of a role it was never trained on."""
    tok = AutoTokenizer.from_pretrained(str(_default_model_dir()))
    for key, i in captured_cases():
        messages = canonical(key, CAPTURED[key][i])
        if key.startswith("codex"):
            with pytest.raises(Exception, match="roles must alternate"):
                tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
        text = tok.apply_chat_template(normalize(messages), add_generation_prompt=True, tokenize=False)
        assert "<start_of_turn>system" not in text and "<start_of_turn>developer" not in text
        assert text.count("<start_of_turn>user") >= 1 and text.endswith("<start_of_turn>model\n")


def test_tool_round_trip_with_the_default_models_template():
    """Gemma's template has no tool role: results become user turns (rule 5)."""
    tok = AutoTokenizer.from_pretrained(str(_default_model_dir()))
    apply = lambda ms: tok.apply_chat_template(ms, add_generation_prompt=True, tokenize=False)  # noqa: E731
    call = {"id": "c1", "type": "function", "function": {"name": "get_time", "arguments": {}}}
    text = render([{"role": "system", "content": "S"}, {"role": "user", "content": "time?"},
                   {"role": "assistant", "content": "", "tool_calls": [call]},
                   {"role": "tool", "tool_call_id": "c1", "content": "12:00"}], apply)
    assert "12:00" in text and "get_time" in text and text.endswith("<start_of_turn>model\n")
