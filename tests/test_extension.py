"""The IPython extension in a real kernel: magics, streaming display, options, interrupts, lifecycle.

One kernel for the whole module (its startup and imports take seconds). Tests share it
in file order; `Kernelext.model` is the tiny model, so whatever a test needs loads fast.
"""

import ast
import os
import time
from pathlib import Path

import pytest
from jupyter_client.manager import start_new_kernel

from kernelext.magics import interpolate
from kernelext.stream_display import markdown
from tiny_models import tiny_model

ROOT = Path(__file__).resolve().parent.parent
LONG_TEXT = ("The quick brown fox jumps over the lazy dog. A language model predicts the next word "
             "from the words that came before it. ") * 12  # a few 128-token cache blocks


class Cell:
    """What one execute_request produced: the reply status and the iopub outputs."""

    def __init__(self, status: str, outputs: list[tuple[str, dict]]):
        self.status, self.outputs = status, outputs

    def stream(self, name: str) -> str:
        return "".join(c["text"] for t, c in self.outputs if t == "stream" and c["name"] == name)

    @property
    def stdout(self) -> str:
        return self.stream("stdout")

    @property
    def stderr(self) -> str:
        return self.stream("stderr")

    def of_type(self, msg_type: str) -> list[dict]:
        return [c for t, c in self.outputs if t == msg_type]


class Kernel:
    def __init__(self, km, kc):
        self.km, self.kc = km, kc

    def start(self, code: str) -> str:
        return self.kc.execute(code)

    def collect(self, msg_id: str, timeout: float = 120, until=None) -> list[tuple[str, dict]]:
        """iopub outputs of msg_id until the kernel is idle (or `until(msg_type)` is true)."""
        outputs = []
        while True:
            msg = self.kc.get_iopub_msg(timeout=timeout)
            if msg["parent_header"].get("msg_id") != msg_id:
                continue
            kind = msg["msg_type"]
            if kind == "status" and msg["content"]["execution_state"] == "idle":
                return outputs
            if kind in ("stream", "display_data", "update_display_data", "execute_result", "error"):
                outputs.append((kind, msg["content"]))
                if until and until(kind):
                    return outputs

    def finish(self, msg_id: str, outputs: list) -> Cell:
        outputs = outputs + self.collect(msg_id)
        reply = self.kc.get_shell_msg(timeout=30)
        while reply["parent_header"].get("msg_id") != msg_id:  # a stale kernel_info reply of startup
            assert reply["msg_type"] == "kernel_info_reply", reply["msg_type"]
            reply = self.kc.get_shell_msg(timeout=30)
        return Cell(reply["content"]["status"], outputs)

    def run(self, code: str) -> Cell:
        return self.finish(self.start(code), [])

    def ok(self, code: str) -> str:
        """Run a cell that must succeed; returns its stdout."""
        cell = self.run(code)
        assert cell.status == "ok", (code, cell.outputs)
        return cell.stdout


@pytest.fixture(scope="module")
def model():
    return tiny_model("gemma3_text")


@pytest.fixture(scope="module")
def kernel(model, tmp_path_factory):
    caches = tmp_path_factory.mktemp("caches")
    env = dict(os.environ, TOKENIZERS_PARALLELISM="false",
               PYTHONPATH=os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])),
               KERNELEXT_MODEL_CACHE=str(caches / "models"), KERNELEXT_KV_CACHE=str(caches / "kv"))
    km, kc = start_new_kernel(kernel_name="python3", env=env, startup_timeout=120)
    k = Kernel(km, kc)
    k.ok("%load_ext kernelext")
    k.ok(f"%config Kernelext.model = {str(model)!r}")
    k.ok("from kernelext import get_engine")
    yield k
    kc.stop_channels()
    km.shutdown_kernel(now=True)


def test_interpolate_fills_known_names_and_keeps_code_braces():
    ns = {"name": "Ada", "n": 3, "items": [1, 2]}
    assert interpolate("Hi {name}, {n:03d} {items[1]} {name!r}", ns) == "Hi Ada, 003 2 'Ada'"
    code = ("def f(x):\n    return {x: 1, 'k': {}} | {n: 2}\n"
            "{unknown} {{name}} {name.missing} {0} {n:bad} f'{{'} {")
    assert interpolate(code, ns) == code


def test_markdown_closes_an_open_code_fence():
    assert markdown("Here:\n```python\nx = 1") == "Here:\n```python\nx = 1\n```"
    assert markdown("```\nx\n```\ndone") == "```\nx\n```\ndone"


def test_load_and_status(kernel, model):
    out = kernel.ok(f"%llm load {model}")
    assert out.startswith(f"kernelext: loaded {model} · cpu") and "float32" in out
    status = kernel.ok("%llm status")
    for row in ("model", "backend", "batch", "cache", "speculation", "requests", "tokens", "server"):
        assert f"{row}  " in status
    assert f"model  {model}" in status and "max 16" in status


def test_generate_streams_into_one_throttled_display(kernel):
    kernel.ok("name = 'Ada'")
    cell = kernel.run("%%generate -n 40 --out c\nSay hello to {name}.")
    assert cell.status == "ok"
    [first] = cell.of_type("display_data")
    updates = cell.of_type("update_display_data")
    display_id = first["transient"]["display_id"]
    assert updates and all(u["transient"]["display_id"] == display_id for u in updates)
    final = updates[-1]["data"]
    assert final["text/markdown"].endswith("· length*") and "40 tokens" in final["text/plain"]
    text, total_s = kernel.ok("print(repr(c.text), c.usage.total_s)").rsplit(" ", 1)
    assert final["text/plain"].startswith(ast.literal_eval(text) + "\n\n40 tokens")
    # ~10 updates a second (40 deltas), plus the final one.
    assert len(updates) <= float(total_s) * 10 + 2


def test_prompt_interpolation_and_out(kernel):
    kernel.ok("word = 'Hello'")
    kernel.ok("%%generate --raw -n 6 --out a\n{word} world")
    kernel.ok("%%generate --raw -n 6 --out b\nHello world")
    assert kernel.ok("print(type(a).__name__, a.finish_reason, len(a.token_ids), "
                     "a.token_ids == b.token_ids, a.usage.prompt_tokens == b.usage.prompt_tokens)"
                     ) == "Completion length 6 True True\n"


def test_sampling_options(kernel):
    for out, opts in [("s1", "-t 1.0 --seed 7"), ("s2", "-t 1.0 --seed 7"), ("s3", "-t 1.0 --seed 8"),
                      ("g", ""), ("k1", "-t 1.0 --seed 3 --top-k 1"), ("p", "-t 1.0 --seed 3 --top-p 0.01")]:
        kernel.ok(f"%%generate -n 8 {opts} --out {out}\nTell me a story.")
    assert kernel.ok("print(s1.text == s2.text, s1.token_ids != s3.token_ids, "
                     "k1.token_ids == g.token_ids == p.token_ids)") == "True True True\n"


def test_generate_structured_output_options(kernel):
    kernel.ok("import pydantic\nclass Pet(pydantic.BaseModel):\n    name: str = pydantic.Field(max_length=8)\n"
              "    legs: int = pydantic.Field(ge=0, le=8)\n"
              "grammar = 'start: \"(\" /[0-9]/ \")\"'")
    kernel.ok("%%generate --raw -n 60 -t 0.8 --seed 1 --json-schema Pet --out pet\nA pet:")
    # IPython expands {...} in magic lines: a regex's counts are written {{3}}.
    kernel.ok("%%generate --raw -n 20 --regex '[a-z]{{3}}-[0-9]{{2}}' --out code\nA code:")
    kernel.ok("%%generate --raw -n 20 --choice yes,no --out yn\nYes or no?")
    kernel.ok("%%generate --raw -n 20 -t 1.0 --seed 2 --grammar grammar --out g\nDigit:")
    assert kernel.ok("import re\nprint(pet.finish_reason == 'length' or isinstance(pet.parsed, Pet), "
                     "bool(re.fullmatch('[a-z]{3}-[0-9]{2}', code.text)), yn.text in ('yes', 'no'), "
                     "bool(re.fullmatch(r'\\([0-9]\\)', g.text)))") == "True True True True\n"
    bad = kernel.run("%%generate --regex '(' \nx")
    assert bad.status == "error" and "invalid regex" in str(bad.outputs)
    assert kernel.run("%%generate --json-schema Nope\nx").status == "error"


def test_stop_strings(kernel):
    kernel.ok("%%generate --raw -n 16 --out g\nHello")
    kernel.ok("stop = next(g.text[i:i + 3] for i in range(4, 13) if g.text[i:i + 3].isalnum())")
    kernel.ok("%%generate --raw -n 16 --stop zzqq --stop {stop} --out s\nHello")
    assert kernel.ok("print(s.finish_reason, stop not in s.text, g.text.startswith(s.text), "
                     "len(s.text) < len(g.text))") == "stop True True True\n"


def test_system_prompt_and_raw(kernel):
    kernel.ok("%%generate -n 2 --out chat\nHi")
    kernel.ok("%%generate -n 2 --system 'You are terse.' --out system\nHi")
    kernel.ok("%%generate -n 2 --raw --out raw\nHi")
    kernel.ok("%config Kernelext.system_prompt = 'You are terse.'")
    kernel.ok("%%generate -n 2 --out default_system\nHi")
    kernel.ok("%config Kernelext.system_prompt = None")
    assert kernel.ok("print(raw.usage.prompt_tokens < chat.usage.prompt_tokens < system.usage.prompt_tokens"
                     " == default_system.usage.prompt_tokens)") == "True\n"


def test_plain_prints_instead_of_a_display(kernel):
    cell = kernel.run("%%generate -n 5 --plain\nHi")
    assert cell.status == "ok" and not cell.of_type("display_data")
    assert "\n\n5 tokens · prompt" in cell.stdout and cell.stdout.endswith("· length\n")


def _session_turns(kernel, session: str) -> None:
    kernel.ok(f"%%generate -n 6 --session {session} --out t1\n{LONG_TEXT}")
    kernel.ok(f"%%generate -n 6 --session {session} --out t2\nAnd then?")


def test_session_carries_the_conversation(kernel):
    _session_turns(kernel, "chat")
    kernel.ok("ext = next(c for c in get_ipython().configurables if type(c).__name__ == 'Kernelext')")
    assert kernel.ok("m = ext.sessions['chat']; print([x['role'] for x in m], m[1]['content'] == t1.text, "
                     "m[2]['content'], t2.usage.prompt_tokens > t1.usage.prompt_tokens + 5)"
                     ) == "['user', 'assistant', 'user', 'assistant'] True And then? True\n"


def test_session_second_turn_reuses_the_prefix_cache(kernel):
    _session_turns(kernel, "cached")
    assert int(kernel.ok("print(t2.usage.cached_tokens)")) >= 128


def test_config_changes_take_effect(kernel):
    kernel.ok("%config Kernelext.max_tokens = 3")
    kernel.ok("%%generate --out d\nHi")
    assert "Current: 3" in kernel.ok("%config Kernelext")
    kernel.ok("%config Kernelext.max_tokens = 256")
    assert kernel.ok("print(d.usage.completion_tokens)") == "3\n"
    # Engine settings wait for the next load; cache budgets apply live.
    assert "next `%llm load`" in kernel.ok("%config Kernelext.max_batch = 4")
    kernel.ok("%config Kernelext.hot_cache_bytes = 12345678")
    assert kernel.ok("c = get_engine().config; print(c.max_batch, c.hot_cache_bytes)") == "16 12345678\n"
    kernel.ok("%config Kernelext.kv_dtype = 'float32'")
    kernel.ok("%llm load")
    assert "max 4" in kernel.ok("%llm status")
    assert kernel.ok("print(get_engine().config.kv_dtype)") == "float32\n"
    kernel.ok("%config Kernelext.max_batch = 16")
    kernel.ok("%config Kernelext.kv_dtype = None")
    kernel.ok("%config Kernelext.hot_cache_bytes = None")


@pytest.mark.parametrize("code", [
    "%%generate --max-tokens abc\nHi",
    "%%generate --drafter fast\nHi",
    "%%generate -t -1\nHi",
    "%%generate --raw --session s\nHi",
    "%llm bogus",
    "%llm bench --batch 1,x",
])
def test_bad_options_give_a_one_line_usage_error(kernel, code):
    cell = kernel.run(code)
    assert cell.status == "error"
    assert not cell.of_type("error")  # the message that would carry a traceback
    assert cell.stderr.startswith("UsageError: ") and cell.stderr.count("\n") == 1
    assert "Traceback" not in cell.stdout + cell.stderr


def test_interrupt_cancels_the_request_and_the_kernel_keeps_going(kernel):
    kernel.ok("bg = get_engine().submit('Hello', max_tokens=600)")
    msg_id = kernel.start("%%generate --raw -n 3000\nHello")
    streamed = kernel.collect(msg_id, until=lambda kind: kind == "update_display_data")
    t0 = time.monotonic()
    kernel.km.interrupt_kernel()
    cell = kernel.finish(msg_id, streamed)
    assert time.monotonic() - t0 < 10
    assert cell.status == "error" and cell.of_type("error")[0]["ename"] == "KeyboardInterrupt"
    final = cell.of_type("update_display_data")[-1]["data"]["text/plain"]
    assert final.endswith("· cancelled")
    assert kernel.ok("r = bg.result(); print(r.finish_reason, len(r.token_ids), "
                     "get_engine().metrics()['requests_cancelled'] >= 1)") == "length 600 True\n"
    assert "3 tokens" in kernel.ok("%%generate -n 3 --plain\nHi")


def test_get_engine_from_python(kernel, model):
    assert kernel.ok("from kernelext import get_engine\ne = get_engine()\n"
                     "print(type(e).__name__, e.model_name, e.generate('Hi', max_tokens=2).finish_reason)"
                     ) == f"Engine {model} length\n"


def test_bench_prints_a_table(kernel):
    out = kernel.ok("%llm bench --prompt-tokens 16 --gen-tokens 4 --batch 1,2")
    header, *rows = out.splitlines()[1:]
    assert header.split() == ["batch", "prompt", "gen", "PP", "tok/s", "TG", "tok/s", "TTFT"]
    assert [row.split()[:2] for row in rows] == [["1", "16"], ["2", "16"]]


def test_cache_info_and_clear(kernel):
    assert "block_size" in kernel.ok("%llm cache info")
    assert kernel.ok("%llm cache clear") == "kernelext: prefix cache cleared\n"


def test_serve_and_stop(kernel):
    out = kernel.ok("%llm serve --port 0")
    url = out.splitlines()[0].rsplit(" ", 1)[1]
    assert url.startswith("http://127.0.0.1:") and "base_url" in out
    assert f"server  {url}" in kernel.ok("%llm status")
    assert kernel.ok("%llm stop") == f"kernelext: stopped the server at {url}\n"
    assert kernel.run("%llm serve --host 0.0.0.0 --port 0").stderr.startswith("UsageError: %llm serve:")


def test_http_requests_are_answered_while_a_cell_is_busy(kernel):
    import openai

    url = kernel.ok("%llm serve --port 0").splitlines()[0].rsplit(" ", 1)[1]
    busy = kernel.start("import time\nprint('started', flush=True)\ntime.sleep(15)\n"
                        "print('ended at', time.time())")
    try:
        kernel.collect(busy, until=lambda kind: kind == "stream")  # the cell is running
        client = openai.OpenAI(base_url=url + "/v1", api_key="unused")
        reply = client.chat.completions.create(
            model="default", messages=[{"role": "user", "content": "Hi"}], max_tokens=8)
        answered_at = time.time()
        assert reply.usage.completion_tokens == 8
    finally:
        cell = kernel.finish(busy, [])
    assert cell.status == "ok"
    ended_at = float(cell.stdout.split("ended at ")[1])
    assert answered_at < ended_at  # answered while the kernel was busy with the cell
    kernel.ok("%llm stop")


def test_several_models_by_name(kernel, model, tmp_path):
    from tiny_embedders import write_tiny_bert
    bert = write_tiny_bert(tmp_path / "bert")
    out = kernel.ok(f"%llm load {bert} --as emb --pin")
    assert out.startswith(f"kernelext: loaded {bert} as 'emb' (embed, pinned)")
    status = kernel.ok("%llm status")
    assert f"model  {model}" in status and "emb: embed · loaded · pinned" in status
    assert kernel.ok("from kernelext import get_model\nprint(get_model('emb').embed(['a', 'b']).shape)") == "(2, 32)\n"
    url = kernel.ok("%llm serve --port 0").splitlines()[0].rsplit(" ", 1)[1]
    try:
        import openai
        client = openai.OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0)
        assert {m.id for m in client.models.list().data} == {str(model), "emb"}
        assert len(client.embeddings.create(model="emb", input="a").data[0].embedding) == 32
    finally:
        kernel.ok("%llm stop")
    assert kernel.ok("%llm unload emb") == "kernelext: emb unloaded\n"
    assert "emb:" not in kernel.ok("%llm status")
    assert kernel.run("%llm load --as x").stderr.startswith("UsageError: %llm load --as NAME needs a MODEL")
    assert kernel.run("%llm unload nope").stderr.startswith("UsageError: no model named 'nope'")


def test_unload_and_reload_leave_one_instance(kernel):
    count = ("ip = get_ipython(); print(sum(type(c).__name__ in ('Kernelext', 'LLMMagics') "
             "for c in ip.configurables), 'llm' in ip.magics_manager.magics['line'], "
             "'generate' in ip.magics_manager.magics['cell'], 'LLMMagics' in ip.magics_manager.registry)")
    assert kernel.ok("%llm unload") == "kernelext: engine closed\n"
    assert kernel.ok("%llm status").startswith("kernelext: no model loaded")
    kernel.ok("%llm load")
    kernel.ok("old = get_engine()")
    kernel.ok("%reload_ext kernelext")
    kernel.ok("%reload_ext kernelext")
    assert kernel.ok(count) == "2 True True True\n"
    # The old engine was closed; the settings (the tiny default model) carried over.
    out = kernel.ok("%%generate -n 3 --plain\nHi")
    assert "no model loaded; loading" in out and out.count("3 tokens") == 1
    assert kernel.ok("try:\n    old.submit('Hi')\nexcept Exception as e:\n    print(type(e).__name__)"
                     ) == "EngineClosedError\n"

    kernel.ok("%unload_ext kernelext")
    assert kernel.ok(count) == "0 False False False\n"
    assert "not found" in kernel.run("%llm status").stderr
    kernel.ok("%load_ext kernelext")
    assert kernel.ok(count) == "2 True True True\n"
    assert kernel.ok("%%generate -n 2 --plain\nHi").count("2 tokens") == 1
