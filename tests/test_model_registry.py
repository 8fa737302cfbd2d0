"""Several models in one process (engine/registry.py) and the server routing requests
to them by `model`: live on 127.0.0.1 through the official openai client and raw HTTP."""

import base64
import http.client
import json
import threading
import time

import numpy as np
import openai
import pytest

from engine import EngineConfig, ModelLoadError, ModelRegistry
from engine.registry import estimate_bytes
from kernelext.server import start_server
from tiny_embedders import write_tiny_bert, write_tiny_decoder_embedder
from tiny_models import tiny_model

CONFIG = EngineConfig(progress=False, max_batch=4)


@pytest.fixture(scope="module")
def dirs(tmp_path_factory):
    d = tmp_path_factory.mktemp("registry")
    return {"chat": tiny_model("qwen3"), "embed": write_tiny_bert(d / "bert"),
            "embed2": write_tiny_bert(d / "bert2", seed=1), "dec": write_tiny_decoder_embedder(d / "dec"),
            "rerank": write_tiny_bert(d / "cross", cross_encoder=True)}


@pytest.fixture(scope="module")
def served(dirs):
    models = ModelRegistry(config=CONFIG)
    models.add("chat", dirs["chat"], pin=True)
    models.add("embed", dirs["embed"])
    models.add("rerank", dirs["rerank"])
    models.add("dec", dirs["dec"], task="embed", load=False)  # known, loaded on first use
    srv = start_server(models, port=0)
    yield models, srv
    srv.stop()
    models.close()


def post(srv, path, body):
    conn = http.client.HTTPConnection(srv.host, srv.port, timeout=120)
    conn.request("POST", path, json.dumps(body).encode(), {"content-type": "application/json"})
    response = conn.getresponse()
    return response.status, json.loads(response.read())


def test_embeddings_through_the_openai_client(served):
    models, srv = served
    client = openai.OpenAI(base_url=srv.url + "/v1", api_key="unused", max_retries=0)
    emb = models.get("embed")
    texts = ["hello world", "def fibonacci(n): return n"]
    expected = emb.embed(texts)
    r = client.embeddings.create(model="embed", input=texts, encoding_format="float")
    assert [d.index for d in r.data] == [0, 1] and r.model == "embed"
    assert np.array_equal(np.array([d.embedding for d in r.data], np.float32), expected)
    tokens = sum(len(e.ids) for e in emb.tokenizer.texts(texts))
    assert r.usage.prompt_tokens == r.usage.total_tokens == tokens
    # the client's default asks for base64 and decodes it
    r = client.embeddings.create(model="embed", input="hello world")
    assert np.array_equal(np.array(r.data[0].embedding, np.float32), expected[0])
    # dimensions: truncated, then unit length again
    r = client.embeddings.create(model="embed", input="hello world", dimensions=8)
    cut = expected[0][:8] / np.linalg.norm(expected[0][:8])
    assert np.allclose(r.data[0].embedding, cut, atol=1e-6)
    # token ids, one list or several
    ids = emb.tokenizer.texts(["hello world"])[0].ids
    r = client.embeddings.create(model="embed", input=[ids, ids])
    assert np.array_equal(np.array(r.data[1].embedding, np.float32), expected[0])
    with pytest.raises(openai.BadRequestError, match="dimensions"):
        client.embeddings.create(model="embed", input="x", dimensions=10_000)
    with pytest.raises(openai.BadRequestError, match="generate model"):
        client.embeddings.create(model="chat", input="x")


def test_raw_base64_and_rerank(served):
    models, srv = served
    status, body = post(srv, "/v1/embeddings", {"model": "embed", "input": "hello", "encoding_format": "base64"})
    assert status == 200
    vector = np.frombuffer(base64.b64decode(body["data"][0]["embedding"]), "<f4")
    assert np.array_equal(vector, models.get("embed").embed("hello"))
    docs = ["def fibonacci(n): return n", "the cat sat", {"text": "import os"}]
    status, body = post(srv, "/v1/rerank", {"model": "rerank", "query": "fibonacci", "documents": docs,
                                            "top_n": 2, "return_documents": True})
    assert status == 200, body
    texts = [d if isinstance(d, str) else d["text"] for d in docs]
    expected = models.get("rerank").rerank("fibonacci", texts)
    assert [(r["index"], r["relevance_score"]) for r in body["results"]] == \
        [(r.index, r.relevance_score) for r in expected[:2]]
    assert body["results"][0]["document"]["text"] == texts[expected[0].index]
    assert body["usage"]["total_tokens"] > 0
    status, body = post(srv, "/v1/rerank", {"query": "q", "documents": "not a list"})
    assert status == 400
    status, body = post(srv, "/v1/rerank", {"model": "nope", "query": "q", "documents": ["d"]})
    assert status == 404


def test_chat_routed_and_models_listed(served):
    models, srv = served
    client = openai.OpenAI(base_url=srv.url + "/v1", api_key="unused", max_retries=0)
    r = client.chat.completions.create(model="chat", messages=[{"role": "user", "content": "Hi"}],
                                       max_tokens=3, temperature=0)
    assert r.model == "chat" and r.usage.completion_tokens >= 1
    listed = {m.id: (m.model_extra["task"], m.model_extra["state"]) for m in client.models.list().data}
    assert listed["chat"] == ("generate", "loaded") and listed["rerank"] == ("rerank", "loaded")
    assert listed["embed"] == ("embed", "loaded")


def test_request_during_a_load_waits_for_it(served, monkeypatch):
    """Two requests for a known model that is not resident: one load, both answered."""
    models, srv = served
    models.unload("dec")
    assert {m["name"]: m["state"] for m in models.status()}["dec"] == "unloaded"
    import engine.registry as registry
    loads, real = [], registry.open_model

    def slow_open(*args, **kwargs):
        loads.append(1)
        time.sleep(1.0)  # the second request arrives while this load runs
        return real(*args, **kwargs)

    monkeypatch.setattr(registry, "open_model", slow_open)
    results = []
    threads = [threading.Thread(target=lambda: results.append(
        post(srv, "/v1/embeddings", {"model": "dec", "input": "hello"}))) for _ in range(2)]
    for t in threads:
        t.start()
        time.sleep(0.3)
    for t in threads:
        t.join()
    assert len(loads) == 1 and [s for s, _ in results] == [200, 200]
    assert results[0][1]["data"][0]["embedding"] == results[1][1]["data"][0]["embedding"]


def test_a_loaded_chat_model_counts_what_it_holds(served):
    models, _ = served
    chat = models.get("chat")
    held = {m["name"]: m["bytes"] for m in models.status()}["chat"]
    assert held == chat.memory_bytes == chat.metrics()["weight_bytes"] > 0


def test_eviction_lru_pinned_and_budget(dirs):
    size = estimate_bytes(dirs["embed"], CONFIG)
    assert estimate_bytes(dirs["embed2"], CONFIG) == size
    models = ModelRegistry(memory_budget=int(2.5 * size), config=CONFIG)
    try:
        models.add("a", dirs["embed"], pin=True)
        models.add("b", dirs["embed2"])
        models.add("c", dirs["embed"])  # no room for three: b (LRU, unpinned, idle) goes
        state = {m["name"]: m["state"] for m in models.status()}
        assert state == {"a": "loaded", "b": "unloaded", "c": "loaded"}
        # b on demand: c is now the least recently used unpinned model
        models.get("b").embed("x")
        assert {m["name"]: m["state"] for m in models.status()}["c"] == "unloaded"
        # a leased model is not evicted: nothing can make room
        with models.lease("b"):
            with pytest.raises(ModelLoadError, match="cannot be evicted"):
                models.get("c")
        assert {m["name"]: m["state"] for m in models.status()} == {"a": "loaded", "b": "loaded", "c": "failed"}
        models.get("c")  # after the lease: b is evicted instead
    finally:
        models.close()


def test_idle_ttl_unloads_unpinned_models(dirs):
    models = ModelRegistry(ttl_s=0.5, config=CONFIG)
    try:
        models.add("pinned", dirs["embed"], pin=True)
        models.add("ttl", dirs["embed2"])
        with models.lease("ttl") as e:
            time.sleep(1.5)  # leased: kept however long
            assert models.sweep() == []
            e.embed("still here")
        deadline = time.monotonic() + 10
        while {m["name"]: m["state"] for m in models.status()}["ttl"] == "loaded":
            assert time.monotonic() < deadline, "the TTL never unloaded the idle model"
            time.sleep(0.1)
        assert {m["name"]: m["state"] for m in models.status()} == {"pinned": "loaded", "ttl": "unloaded"}
        assert models.get("ttl").embed("back").shape == (32,)  # loads again on demand
    finally:
        models.close()


def test_unknown_model_is_a_clear_error():
    models = ModelRegistry(config=CONFIG)
    with pytest.raises(ModelLoadError, match="unknown model 'nope'"):
        models.get("nope")
    with pytest.raises(ModelLoadError, match="does not exist"):
        models.add("bad", "/no/such/model")
    assert models.status()[0]["state"] == "failed"


def test_cli_serves_several_models(dirs):
    import os
    import queue
    import re
    import signal
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parent.parent
    proc = subprocess.Popen(
        [sys.executable, "-m", "kernelext", "serve", "--model", str(dirs["chat"]),
         "--model", f"emb={dirs['embed']}", "--model", f"rr={dirs['rerank']}", "--pin", "emb", "--port", "0"],
        cwd=root, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        env={**os.environ, "PYTHONPATH": str(root)})
    lines = queue.Queue()
    threading.Thread(target=lambda: [lines.put(line) for line in proc.stdout], daemon=True).start()
    try:
        while not (m := re.search(r"serving (.*) at (http://127\.0\.0\.1:\d+)", lines.get(timeout=120))):
            pass
        assert "emb (embed)" in m[1] and "rr (rerank)" in m[1] and "(generate)" in m[1]
        client = openai.OpenAI(base_url=m[2] + "/v1", api_key="unused", max_retries=0)
        assert client.completions.create(model="default", prompt="Hi", max_tokens=2).usage.completion_tokens == 2
        assert len(client.embeddings.create(model="emb", input="hi").data[0].embedding) == 32
        listed = {x.id: x.model_extra["pinned"] for x in client.models.list().data}
        assert listed == {str(dirs["chat"]): False, "emb": True, "rr": False}
        proc.send_signal(signal.SIGINT)
        assert proc.wait(30) == 0
        assert "Traceback" not in proc.stderr.read()
    finally:
        proc.kill()
