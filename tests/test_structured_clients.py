"""Forced tool calls round trip with real agent clients on the default model: the
client forces a call, runs the tool, sends the result back and gets a final answer.

Gemma 3 270M has no tool-call syntax: forced calls follow the JSON convention
(kernelext/server/structured.py), and the tool traffic sent back is shown to its
strict template by the server's message normalization (kernelext/server/messages.py)."""

import asyncio
import os

import openai
import pydantic
import pytest

from engine import Engine, EngineConfig
from kernelext.server import start_server

os.environ.setdefault("OPENAI_AGENTS_DISABLE_TRACING", "1")
QUESTION = "What is the weather in Paris?"


@pytest.fixture(scope="module")
def url():
    with Engine.load("gemma-3-270m", EngineConfig(progress=False, max_batch=4)) as e:
        s = start_server(e, port=0)
        yield s.url + "/v1"
        s.stop()


@pytest.fixture
def ran():
    return []


def weather_tool(ran):
    def get_weather(city: str) -> str:
        """The current weather in a city."""
        ran.append(city)
        return f"It is sunny and 21 C in {city}."
    return get_weather


def test_openai_agents_sdk_tool_choice_required(url, ran):
    from agents import Agent, ModelSettings, OpenAIChatCompletionsModel, Runner, function_tool, set_tracing_disabled

    set_tracing_disabled(True)
    client = openai.AsyncOpenAI(base_url=url, api_key="unused", max_retries=0)
    # Not strict: under tool_choice auto (the SDK's second turn) a strict tool's calls are
    # held to its schema, and this base model, having seen its own call in the JSON
    # convention, writes it again on every turn (tests/test_structured_tools.py covers
    # strict tools under auto); the round trip needs a free second turn.
    tool = function_tool(weather_tool(ran), strict_mode=False)
    agent = Agent(name="assistant", instructions="Answer briefly.", tools=[tool],
                  model=OpenAIChatCompletionsModel(model="default", openai_client=client),
                  model_settings=ModelSettings(tool_choice="required", max_tokens=40, temperature=0))
    result = asyncio.run(Runner.run(agent, QUESTION, max_turns=4))
    assert ran and all(isinstance(c, str) and c for c in ran)  # the SDK ran the forced call
    # The SDK resets tool_choice after a call, so the model then answers in text.
    assert isinstance(result.final_output, str) and result.final_output.strip()


def test_langchain_bind_tools_tool_choice(url, ran):
    from langchain_core.messages import HumanMessage, ToolMessage
    from langchain_openai import ChatOpenAI

    get_weather = weather_tool(ran)
    llm = ChatOpenAI(base_url=url, api_key="unused", model="default", max_tokens=40, temperature=0,
                     max_retries=0)
    ask = [HumanMessage(QUESTION)]
    ai = llm.bind_tools([get_weather], tool_choice="get_weather").invoke(ask)
    (call,) = ai.tool_calls
    assert call["name"] == "get_weather" and isinstance(call["args"]["city"], str)
    final = llm.bind_tools([get_weather]).invoke(ask + [ai, ToolMessage(get_weather(**call["args"]),
                                                                        tool_call_id=call["id"])])
    assert ran and isinstance(final.content, str) and final.content.strip()


def test_pydantic_ai_output_tool(url, ran):
    from pydantic_ai import Agent, ToolOutput
    from pydantic_ai.messages import ToolCallPart
    from pydantic_ai.models.openai import OpenAIChatModel
    from pydantic_ai.providers.openai import OpenAIProvider

    class Report(pydantic.BaseModel):
        city: str
        summary: str = pydantic.Field(max_length=80)

    model = OpenAIChatModel("default", provider=OpenAIProvider(base_url=url, api_key="unused"))
    agent = Agent(model, output_type=ToolOutput(Report), tools=[weather_tool(ran)],
                  model_settings={"max_tokens": 200, "temperature": 0})
    result = agent.run_sync(QUESTION)
    assert isinstance(result.output, Report)  # the output tool's call, validated by the client
    calls = [p for m in result.all_messages() for p in m.parts if isinstance(p, ToolCallPart)]
    assert calls and calls[-1].tool_name == "final_result"
