"""Embeddings and reranking (engine/embed): the default model against
sentence-transformers' vectors, batch invariance, tiny random BERT and decoder
embedders and rerankers checked against mlx-lm's own forward, and sharing the MLX
thread with generation."""

import json
import threading
from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest

from engine import (DEFAULT_EMBEDDING_MODEL, Engine, EngineConfig, InvalidRequestError, PoolingEngine,
                    open_model)
from engine.embed import packed_encoder
from tiny_embedders import write_tiny_bert, write_tiny_causal_reranker, write_tiny_decoder_embedder
from tiny_models import tiny_model

FIXTURE = Path(__file__).parent / "fixtures" / f"{DEFAULT_EMBEDDING_MODEL}-reference.json"
TEXTS = ["hello world", "def fibonacci(n): return n", "the quick brown fox " * 12, "a", "import os",
         "Counter objects count things", "x" * 40]
CONFIG = dict(progress=False)


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("embedders")
    return {"bert": write_tiny_bert(d / "bert"), "bert_cls": write_tiny_bert(d / "bert-cls", pooling="cls"),
            "cross": write_tiny_bert(d / "cross", cross_encoder=True),
            "decoder": write_tiny_decoder_embedder(d / "decoder"),
            "causal": write_tiny_causal_reranker(d / "tiny-reranker")}


@pytest.fixture(scope="module")
def minilm():
    e = PoolingEngine.load(DEFAULT_EMBEDDING_MODEL, EngineConfig(**CONFIG))
    yield e
    e.close()


def test_default_model_matches_sentence_transformers(minilm):
    ref = json.loads(FIXTURE.read_text())
    ours = minilm.embed(ref["texts"])
    theirs = np.array(ref["vectors"], np.float32)
    cosine = (ours * theirs).sum(1) / np.linalg.norm(ours, axis=1) / np.linalg.norm(theirs, axis=1)
    assert cosine.min() >= 1 - 1e-3, cosine
    assert np.allclose(np.linalg.norm(ours, axis=1), 1, atol=1e-5)  # its config normalizes
    assert minilm.task == "embed" and minilm.spec.pooling == "mean" and minilm.spec.max_length == 256
    # on this CPU, through the packed bfloat16 path (the one the embeddings bench measures)
    assert (minilm.core.runner.packed is not None) == packed_encoder.available()


@pytest.mark.skipif(not packed_encoder.available(), reason="the packed encoder kernels need the CPU "
                    "backend with AVX-512 BF16 and `make native`")
@pytest.mark.parametrize("kind", ["bert", "cross"])
def test_packed_encoder_agrees_with_the_padded_float32_forward(tiny_dir, kind):
    """On this CPU encoders run packed with bfloat16 products (engine/embed/packed_encoder.py);
    their token states stay close to MLX's float32 forward of the padded batch."""
    with open_model(tiny_dir[kind], EngineConfig(**CONFIG)) as e:
        runner = e.core.runner
        assert runner.packed is not None and "bfloat16" in runner.dtype
        trunk = runner.model.bert if kind == "cross" else runner.model
        inputs = e.tokenizer.pairs("fibonacci", TEXTS) if kind == "cross" else e.tokenizer.texts(TEXTS)
        for encoded in inputs:
            packed = e.call(lambda: runner.token_states(encoded))
            ids, types = mx.array([encoded.ids]), mx.array([encoded.types])
            float32 = e.call(lambda: np.array(trunk(ids, mx.ones(ids.shape, mx.int32), types)[0]))
            cosine = (packed * float32).sum(1) / np.linalg.norm(packed, axis=1) / np.linalg.norm(float32, axis=1)
            assert cosine.min() >= 0.9999, cosine


def test_default_model_batch_invariance(minilm):
    ref = json.loads(FIXTURE.read_text())["texts"]
    together = minilm.embed(ref)
    for i, text in enumerate(ref):
        assert np.array_equal(minilm.embed(text), together[i]), text
    # in another batch, with other neighbours and another padded width
    assert np.array_equal(minilm.embed([ref[5], "some neighbour"])[0], together[5])


@pytest.mark.parametrize("kind", ["bert", "bert_cls", "decoder"])
def test_tiny_embedder_batch_invariance(tiny_dir, kind):
    with open_model(tiny_dir[kind], EngineConfig(**CONFIG)) as e:
        together = e.embed(TEXTS)
        assert together.shape == (len(TEXTS), e.dimensions)
        assert np.allclose(np.linalg.norm(together, axis=1), 1, atol=1e-5)
        for i, text in enumerate(TEXTS):
            assert np.array_equal(e.embed(text), together[i]), text
        assert np.array_equal(e.embed(TEXTS[::-1])[::-1], together)


def test_pooling_modes_read_from_the_sentence_transformers_config(tiny_dir):
    with open_model(tiny_dir["bert"], EngineConfig(**CONFIG)) as mean, \
            open_model(tiny_dir["bert_cls"], EngineConfig(**CONFIG)) as cls:
        assert (mean.spec.pooling, cls.spec.pooling) == ("mean", "cls")
        encoded = mean.tokenizer.texts(["hello world"])[0]
        h = mean.call(lambda: mean.core.runner.token_states(encoded))
        expected_mean = h.mean(0) / np.linalg.norm(h.mean(0))
        assert np.allclose(mean.embed("hello world"), expected_mean, atol=1e-6)
        assert np.allclose(cls.embed("hello world"), h[0] / np.linalg.norm(h[0]), atol=1e-6)


def test_decoder_embedder_is_mlx_lm_last_hidden_state(tiny_dir):
    from mlx_lm import load
    model, tokenizer = load(str(tiny_dir["decoder"]))
    with open_model(tiny_dir["decoder"], EngineConfig(**CONFIG)) as e:
        assert e.spec.pooling == "lasttoken"
        got = e.embed(TEXTS)
        for text, vector in zip(TEXTS, got):
            last = np.array(model.model(mx.array([tokenizer.encode(text)]))[0, -1])
            assert np.allclose(vector, last / np.linalg.norm(last), atol=1e-5)
        # the model's named prompt is put before the text
        query = e.embed(TEXTS[0], prompt_name="query")
        last = np.array(model.model(mx.array([tokenizer.encode("Instruct: find the passage\nQuery:" + TEXTS[0])]))[0, -1])
        assert np.allclose(query, last / np.linalg.norm(last), atol=1e-5)
        with pytest.raises(InvalidRequestError, match="no prompt"):
            e.embed("x", prompt_name="nope")


def test_causal_reranker_is_p_yes_of_mlx_lm_logits(tiny_dir):
    from mlx_lm import load
    model, tokenizer = load(str(tiny_dir["causal"]))
    with open_model(tiny_dir["causal"], EngineConfig(**CONFIG)) as e:
        assert e.task == "rerank"
        results = e.rerank("fibonacci", TEXTS)
        assert [r.relevance_score for r in results] == sorted((r.relevance_score for r in results), reverse=True)
        yes, no = e.tokenizer.yes_no
        for r, encoded in zip(sorted(results, key=lambda r: r.index), e.tokenizer.pairs("fibonacci", TEXTS)):
            logits = np.array(model(mx.array([encoded.ids]))[0, -1], np.float64)
            p_yes = np.exp(logits[yes]) / (np.exp(logits[yes]) + np.exp(logits[no]))
            assert abs(r.relevance_score - p_yes) < 1e-5


def test_cross_encoder(tiny_dir):
    with open_model(tiny_dir["cross"], EngineConfig(**CONFIG)) as e:
        assert e.task == "rerank"
        results = e.rerank("fibonacci numbers", TEXTS, top_n=3, return_documents=True)
        assert len(results) == 3 and all(r.document == TEXTS[r.index] for r in results)
        scores = [r.relevance_score for r in e.rerank("fibonacci numbers", TEXTS)]
        assert scores == sorted(scores, reverse=True) and all(0 < s < 1 for s in scores)
        assert scores[:3] == [r.relevance_score for r in results]
        alone = {i: e.rerank("fibonacci numbers", [t])[0].relevance_score for i, t in enumerate(TEXTS)}
        assert {r.index: r.relevance_score for r in e.rerank("fibonacci numbers", TEXTS)} == alone
        pair = e.tokenizer.pairs("query", ["document"])[0]
        assert pair.types[0] == 0 and pair.types[-1] == 1  # [CLS] q [SEP] d [SEP]
        with pytest.raises(InvalidRequestError, match="not an embedding"):
            e.embed("x")
        with pytest.raises(InvalidRequestError, match="top_n"):
            e.rerank("q", TEXTS, top_n=0)


def test_token_id_inputs_and_errors(tiny_dir):
    with open_model(tiny_dir["bert"], EngineConfig(**CONFIG)) as e:
        ids = e.tokenizer.texts(["hello world"])[0].ids
        assert np.array_equal(e.embed([ids])[0], e.embed("hello world"))
        with pytest.raises(InvalidRequestError):
            e.embed([[10 ** 9]])
        with pytest.raises(InvalidRequestError, match="not a reranking"):
            e.rerank("q", ["d"])


def test_embedding_shares_the_thread_with_generation(tiny_dir):
    """A long embedding job does not hold a stream back: the worker steps the
    generation core between the embedding batches."""
    chat = Engine.load(tiny_model("qwen3"), EngineConfig(progress=False, drafter="none"))
    try:
        with open_model(tiny_dir["bert"], EngineConfig(**CONFIG)) as e:
            chat.generate("warm up", max_tokens=2)
            result = {}
            job = threading.Thread(target=lambda: result.setdefault("v", e.embed(TEXTS * 400)))
            job.start()
            while e.metrics()["texts"] == 0:  # the job runs
                pass
            done = chat.generate("Hello", max_tokens=8, temperature=0)
            assert done.usage.completion_tokens == 8
            assert "v" not in result, "the stream waited for the whole embedding job"
            job.join()
            assert result["v"].shape == (len(TEXTS) * 400, e.dimensions)
    finally:
        chat.close()


def test_reranker_shares_a_loaded_chat_models_weights(tiny_dir):
    with open_model(tiny_dir["causal"], EngineConfig(**CONFIG)) as alone:
        expected = alone.rerank("fibonacci", TEXTS)
        assert not alone.core.runner.shares_weights
    chat = Engine.load(tiny_dir["causal"], EngineConfig(progress=False))
    try:
        with open_model(tiny_dir["causal"], EngineConfig(**CONFIG), task="rerank") as shared:
            assert shared.core.runner.shares_weights and shared.memory_bytes == 0
            assert shared.core.runner.model is chat.core.loaded.model
            got = shared.rerank("fibonacci", TEXTS)
            assert [r.index for r in got] == [r.index for r in expected]
            assert np.allclose([r.relevance_score for r in got], [r.relevance_score for r in expected], atol=1e-6)
            chat.generate("Hello", max_tokens=4)  # the chat engine still decodes (row kernels)
    finally:
        chat.close()
