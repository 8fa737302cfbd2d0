"""The Python agent frameworks, each as a user would point it at a kernelext server:
one streamed request with a function tool offered, a small output limit, and the
answer printed. Run as a script so that each client runs in a fresh process and
its exit status counts (tests/test_real_clients.py):

    python tests/agent_clients.py CLIENT BASE_URL MODEL API_KEY
"""

from __future__ import annotations

import asyncio
import os
import sys

# No telemetry, no network look-ups beyond the server under test.
os.environ.setdefault("LITELLM_LOCAL_MODEL_COST_MAP", "True")
os.environ.setdefault("LITELLM_TELEMETRY", "False")
os.environ.setdefault("LANGSMITH_TRACING", "false")
os.environ.setdefault("OPENAI_AGENTS_DISABLE_TRACING", "1")

MAX_TOKENS = 16
QUESTION = "What is the weather in Paris?"


def get_weather(city: str) -> str:
    """The current weather in a city."""
    return f"It is sunny in {city}."


WEATHER_SCHEMA = {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}


def openai_agents(url: str, model: str, key: str, api: str) -> str:
    from agents import Agent, ModelSettings, OpenAIChatCompletionsModel, OpenAIResponsesModel, Runner
    from agents import function_tool, set_tracing_disabled
    from openai import AsyncOpenAI

    set_tracing_disabled(True)
    client = AsyncOpenAI(base_url=f"{url}/v1", api_key=key, max_retries=0)
    kind = OpenAIChatCompletionsModel if api == "chat" else OpenAIResponsesModel
    agent = Agent(name="assistant", instructions="Answer briefly.", tools=[function_tool(get_weather)],
                  model=kind(model=model, openai_client=client),
                  model_settings=ModelSettings(max_tokens=MAX_TOKENS))

    async def run() -> str:
        result = Runner.run_streamed(agent, QUESTION, max_turns=3)
        async for _ in result.stream_events():
            pass
        return str(result.final_output or "")
    return asyncio.run(run())


def langchain_openai(url: str, model: str, key: str) -> str:
    from langchain_openai import ChatOpenAI

    llm = ChatOpenAI(base_url=f"{url}/v1", api_key=key, model=model, max_tokens=MAX_TOKENS, max_retries=0,
                     streaming=True).bind_tools([get_weather])
    return "".join(str(chunk.content) for chunk in llm.stream(QUESTION))


def langchain_anthropic(url: str, model: str, key: str) -> str:
    from langchain_anthropic import ChatAnthropic

    llm = ChatAnthropic(base_url=url, api_key=key, model=model, max_tokens=MAX_TOKENS, max_retries=0,
                        streaming=True).bind_tools([get_weather])
    text = []
    for chunk in llm.stream(QUESTION):
        content = chunk.content
        if isinstance(content, str):
            text.append(content)
        else:
            text += [part.get("text", "") for part in content if isinstance(part, dict)]
    return "".join(text)


def pydantic_ai(url: str, model: str, key: str) -> str:
    from pydantic_ai import Agent
    from pydantic_ai.models.openai import OpenAIChatModel
    from pydantic_ai.providers.openai import OpenAIProvider

    agent = Agent(OpenAIChatModel(model, provider=OpenAIProvider(base_url=f"{url}/v1", api_key=key)),
                  instructions="Answer briefly.", tools=[get_weather],
                  model_settings={"max_tokens": MAX_TOKENS})

    async def run() -> str:
        async with agent.run_stream(QUESTION) as result:
            return "".join([piece async for piece in result.stream_text(delta=True)])
    return asyncio.run(run())


def litellm(url: str, model: str, key: str) -> str:
    import litellm as lib

    lib.telemetry = False
    stream = lib.completion(model=f"openai/{model}", api_base=f"{url}/v1", api_key=key, stream=True,
                            max_tokens=MAX_TOKENS, messages=[{"role": "user", "content": QUESTION}],
                            tools=[{"type": "function", "function": {
                                "name": "get_weather", "description": "The current weather in a city.",
                                "parameters": WEATHER_SCHEMA}}])
    return "".join(chunk.choices[0].delta.content or "" for chunk in stream if chunk.choices)


CLIENTS = {
    "openai-agents-chat": lambda *a: openai_agents(*a, api="chat"),
    "openai-agents-responses": lambda *a: openai_agents(*a, api="responses"),
    "langchain-openai": langchain_openai,
    "langchain-anthropic": langchain_anthropic,
    "pydantic-ai": pydantic_ai,
    "litellm": litellm,
}

if __name__ == "__main__":
    name, url, model, key = sys.argv[1:5]
    answer = CLIENTS[name](url, model, key)
    print(answer)
    sys.exit(0 if answer.strip() else 3)
