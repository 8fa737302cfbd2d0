"""Real agent clients end to end against the default model, nothing mocked: Codex CLI
(the current version over `responses`, the last that speaks `chat`), Claude Code (a
prompt, and `/context`, which calls /v1/messages/count_tokens), the OpenAI Agents SDK
(chat and responses models), LangChain (OpenAI and Anthropic), pydantic-ai and LiteLLM.

Each runs once against `kernelext serve` and once against `%llm serve` in a real
kernel, configured with exactly the text the server prints (snippets()). The CLIs
are the npm packages `make agents` installs (pinned) into build/; without npm they
are skipped, with the reason. Every client offers function tools and streams. The
server's default output limit keeps answers short, and both servers share one KV
cache directory, so the second server's prefill of the same prompts is a cache hit.
"""

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import urllib.request
from pathlib import Path

import pytest

from kernelext.server.runner import CLAUDE_HEADER, CODEX_HEADER
from test_extension import Kernel

ROOT = Path(__file__).resolve().parent.parent
AGENTS = ROOT / "build" / "agents" / "node_modules" / ".bin"
CODEX_CHAT = ROOT / "build" / "agents-codex-chat" / "node_modules" / ".bin" / "codex"
DEFAULT_LIMIT = 8  # the servers' default output limit (Codex sends none)
CLAUDE_MAX_OUTPUT = 16
CLIENT_TIMEOUT_S = 420  # a cold first prompt is ~4-5k tokens of prefill on a shared 2-core CPU
PROMPT = "Say hi."
# Both CLIs ship 4-5k tokens of system prompt (4-10 minutes of prefill on a loaded 2-core CI
# machine). The runs swap it for a short one with the CLIs' own options, so the suite stays
# within its time budget; the request shapes stay the CLIs' own (developer messages, the
# in-list system message, tools), and the full-size requests are replayed in
# test_agent_requests.py.
SHORT_SYSTEM_PROMPT = "You are a terse coding assistant."


def _cli(path: Path, what: str) -> Path:
    if shutil.which("npm") is None or shutil.which("node") is None:
        pytest.skip(f"npm is not installed, so {what} is not either (`make agents` installs it with npm)")
    if not path.exists():
        pytest.fail(f"{what} is not installed at {path}: run `make agents`")
    return path


# -- the two servers ---------------------------------------------------------------------------

class Served:
    def __init__(self, kind: str, url: str, snippets: str):
        self.kind, self.url, self.snippets = kind, url, snippets

    def counts(self) -> dict[str, float]:
        text = urllib.request.urlopen(f"{self.url}/metrics", timeout=30).read().decode()
        return {m[1]: float(m[2]) for m in re.finditer(r"^kernelext_http_(\w+) (\S+)$", text, re.M)}

    def section(self, header: str) -> str:
        """One client's configuration, verbatim from what the server printed."""
        text = self.snippets.split(header, 1)[1]
        return text.split("\n# ", 1)[0].strip("\n") + "\n"


def _env(cache: Path) -> dict:
    return dict(os.environ, TOKENIZERS_PARALLELISM="false", KERNELEXT_KV_CACHE=str(cache),
                PYTHONPATH=os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])))


@pytest.fixture(scope="module")
def kv_cache(tmp_path_factory):
    return tmp_path_factory.mktemp("shared-kv")


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    """One working directory for every run: the CLIs put it into their prompts."""
    return tmp_path_factory.mktemp("agent-work")


@pytest.fixture(scope="module", params=["kernelext serve", "%llm serve"])
def server(request, kv_cache):
    if request.param == "kernelext serve":
        proc = subprocess.Popen([sys.executable, "-m", "kernelext", "serve", "--port", "0",
                                 "--default-max-tokens", str(DEFAULT_LIMIT)],
                                stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True, env=_env(kv_cache))
        lines = []
        for line in proc.stdout:
            lines.append(line)
            if line.startswith("export CLAUDE_CODE_DISABLE_NONESSENTIAL_TRAFFIC"):
                break
        out = "".join(lines)
        assert "kernelext: serving" in out, out
        url = re.search(r"kernelext: serving .+? at (\S+)", out)[1]
        yield Served(request.param, url, out)
        proc.send_signal(signal.SIGINT)
        proc.wait(60)
    else:
        from jupyter_client.manager import start_new_kernel

        km, kc = start_new_kernel(kernel_name="python3", env=_env(kv_cache), startup_timeout=120)
        k = Kernel(km, kc)
        try:
            k.ok("%load_ext kernelext")
            out = k.finish(k.start(f"%llm serve --port 0 --default-max-tokens {DEFAULT_LIMIT}"), [])
            assert out.status == "ok", out.outputs
            url = re.search(r"kernelext: serving \S+ at (\S+)", out.stdout)[1]
            yield Served(request.param, url, out.stdout)
            k.ok("%llm stop")
        finally:
            kc.stop_channels()
            km.shutdown_kernel(now=True)


def _run(cmd, env, cwd, timeout=CLIENT_TIMEOUT_S) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, env=env, cwd=cwd, stdin=subprocess.DEVNULL, capture_output=True, text=True,
                          timeout=timeout)


def _grew(before: dict, after: dict, key: str) -> float:
    return after.get(key, 0) - before.get(key, 0)


# -- Codex CLI ---------------------------------------------------------------------------------

def _codex(server, workdir, tmp_path, binary: Path, wire_api: str | None = None):
    home = tmp_path / "home"
    (home / ".codex").mkdir(parents=True)
    config = server.section(CODEX_HEADER)
    if wire_api:  # the one change the older Codex needs
        config = config.replace('wire_api = "responses"', f'wire_api = "{wire_api}"')
    (home / ".codex" / "config.toml").write_text(config)
    env = {k: v for k, v in os.environ.items() if not k.startswith(("OPENAI_", "CODEX_"))}
    env.update(HOME=str(home), CODEX_HOME=str(home / ".codex"), NO_COLOR="1")
    last = tmp_path / "last-message.txt"
    instructions = tmp_path / "instructions.md"
    instructions.write_text(SHORT_SYSTEM_PROMPT + "\n")
    before = server.counts()
    # Codex gives up on a stream after 5 minutes without an event (SSE comments do not
    # count); a 5k-token prefill on a loaded 2-core CI machine can take that long.
    r = _run([str(binary), "exec", "--skip-git-repo-check", "--color", "never", "-C", str(workdir),
              "-o", str(last), "-c", "analytics.enabled=false", "-c", "check_for_update_on_startup=false",
              "-c", f"model_providers.kernelext.stream_idle_timeout_ms={CLIENT_TIMEOUT_S * 1000}",
              "-c", f"model_instructions_file={json.dumps(str(instructions))}", PROMPT],
             env, workdir)
    return r, last, before, server.counts()


def test_codex_cli_over_responses(server, workdir, tmp_path):
    r, last, before, after = _codex(server, workdir, tmp_path, _cli(AGENTS / "codex", "Codex CLI"))
    assert _grew(before, after, "answered_v1_responses") >= 1 and _grew(before, after, "errors") == 0
    assert r.returncode == 0, (r.stdout[-3000:], r.stderr[-3000:])
    assert last.read_text().strip(), (r.stdout[-3000:], r.stderr[-3000:])


def test_codex_cli_over_chat(server, workdir, tmp_path):
    """0.94.0 is the last Codex CLI that accepts wire_api = "chat" (0.95.0 refuses it)."""
    r, last, before, after = _codex(server, workdir, tmp_path, _cli(CODEX_CHAT, "Codex CLI 0.94.0"),
                                    wire_api="chat")
    assert _grew(before, after, "answered_v1_chat_completions") >= 1 and _grew(before, after, "errors") == 0
    if r.returncode != 0 and "ran out of room in the model's context window" in r.stderr + r.stdout:
        # Codex's chat client reads finish_reason "length" (the output limit) as a full
        # context; the base model practically never ends a turn before the limit.
        pytest.xfail("the base model did not end its turn within the output limit, which Codex 0.94 "
                     "over chat reports as a full context window")
    assert r.returncode == 0, (r.stdout[-3000:], r.stderr[-3000:])
    assert last.read_text().strip(), (r.stdout[-3000:], r.stderr[-3000:])


# -- Claude Code -------------------------------------------------------------------------------

def _claude_env(server, tmp_path) -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("ANTHROPIC_", "CLAUDE_"))}
    for line in server.section(CLAUDE_HEADER).splitlines():  # `export K=V` lines, as a shell would
        if line.startswith("export "):
            key, value = line[7:].split("=", 1)
            env[key] = subprocess.run(["sh", "-c", f"printf %s {value}"], capture_output=True, text=True).stdout
    home = tmp_path / "home"
    home.mkdir()
    env.update(HOME=str(home), CLAUDE_CODE_MAX_OUTPUT_TOKENS=str(CLAUDE_MAX_OUTPUT), DISABLE_AUTOUPDATER="1",
               DISABLE_TELEMETRY="1", DISABLE_ERROR_REPORTING="1", NO_COLOR="1")
    return env


def test_claude_code(server, workdir, tmp_path):
    claude = _cli(AGENTS / "claude", "Claude Code")
    before = server.counts()
    r = _run([str(claude), "-p", PROMPT, "--output-format", "json", "--system-prompt", SHORT_SYSTEM_PROMPT,
              "--tools", "Bash"], _claude_env(server, tmp_path), workdir)
    after = server.counts()
    assert _grew(before, after, "answered_v1_messages") >= 1 and _grew(before, after, "errors") == 0, r.stdout
    result = json.loads(r.stdout.strip().splitlines()[-1])
    if r.returncode != 0 and "output token maximum" in str(result.get("result")):
        # Claude Code treats stop_reason "max_tokens" as an error once its continuation
        # attempts are spent; the default model is a base model that practically never
        # ends a turn, so this is the model, not the protocol.
        pytest.xfail(f"the base model did not end its turn within {CLAUDE_MAX_OUTPUT} tokens: {result['result']}")
    assert r.returncode == 0 and not result.get("is_error") and str(result.get("result", "")).strip(), r.stdout


def test_claude_code_counts_tokens(server, workdir, tmp_path):
    """`/context` has Claude Code count its prompt with /v1/messages/count_tokens."""
    claude = _cli(AGENTS / "claude", "Claude Code")
    before = server.counts()
    r = _run([str(claude), "-p", "/context", "--system-prompt", SHORT_SYSTEM_PROMPT, "--tools", "Bash"],
             _claude_env(server, tmp_path), workdir)
    after = server.counts()
    assert r.returncode == 0 and "Context Usage" in r.stdout, (r.stdout[-2000:], r.stderr[-2000:])
    assert _grew(before, after, "answered_v1_messages_count_tokens") >= 1
    assert _grew(before, after, "errors") == 0


# -- Python agent frameworks -----------------------------------------------------------------

@pytest.mark.parametrize("client", ["openai-agents-chat", "openai-agents-responses", "langchain-openai",
                                    "langchain-anthropic", "pydantic-ai", "litellm"])
def test_python_agent_frameworks(server, workdir, client):
    model = re.search(r'model = "([^"]+)"', server.section(CODEX_HEADER))[1]
    before = server.counts()
    r = _run([sys.executable, str(ROOT / "tests" / "agent_clients.py"), client, server.url, model, "none"],
             dict(os.environ), workdir, timeout=300)
    assert r.returncode == 0 and r.stdout.strip(), (r.stdout[-2000:], r.stderr[-3000:])
    assert _grew(before, server.counts(), "errors") == 0
