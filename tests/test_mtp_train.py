"""Training MTP draft heads by self-distillation: learning, files, resume, drafter choice,
and exact speculative decoding with a trained head."""

import shutil
from types import SimpleNamespace

import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest
from mlx.utils import tree_flatten
from mlx_lm.utils import load_model

import engine.spec.mtp_head as mtp_head
from engine import Engine, EngineConfig, ModelLoadError
from engine.cpu import fused_layers
from engine.spec import mtp_train
from engine.spec.mtp_head import LOCAL_HEAD, MTPHead, trunk_hidden
from test_speculative import PROMPTS, _assert_same_law, _position_counts, make_engine
from tiny_models import tiny_model, tokenizer_corpus, write_tiny_model

FAMILY = "gemma3_text"  # the default model's family: tied embeddings, sliding window
# Small and quick; a draft vocabulary smaller than the tiny vocabulary (768) exercises
# the scatter into full-vocabulary logits.
SMALL = dict(tokens=4000, seq_len=64, draft_vocab=512, lr=1e-2, progress=False)


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    path = tmp_path_factory.mktemp("corpus") / "corpus.txt"
    path.write_text(tokenizer_corpus() * 4)
    return path


@pytest.fixture(scope="module")
def trained(corpus, tmp_path_factory):
    """(result, the head as trained (before saving), the model's fingerprint)."""
    out = tmp_path_factory.mktemp("head") / "head.safetensors"
    kept = {}
    with pytest.MonkeyPatch.context() as mp:
        close = mtp_train._Trainer.close

        def keep_head(self):
            kept["head"] = self.head
            close(self)

        mp.setattr(mtp_train._Trainer, "close", keep_head)
        with make_engine(FAMILY) as eng:
            result = eng.train_mtp_head(corpus=corpus, out=out, steps=60, **SMALL)
            fingerprint = eng.fingerprint
    return result, kept["head"], fingerprint


def load_engine(path, **kw):
    return Engine.load(path, EngineConfig(progress=False, block_size=16, step_token_budget=64, **kw))


def test_training_lowers_loss_and_raises_agreement(trained):
    result = trained[0]
    assert result.steps == len(result.losses) == len(result.agreements) == 60
    assert np.mean(result.losses[-5:]) < 0.9 * np.mean(result.losses[:5])
    assert np.mean(result.agreements[-5:]) > np.mean(result.agreements[:5]) + 0.2
    assert result.agreement > 0.05  # held-out, against the trunk's top-1 over the full vocabulary
    assert result.draft_vocab_size == 512 and 0 < result.vocab_coverage < 1
    assert result.tokens_per_s > 0 and set(result.timings) == {"corpus", "trunk", "train", "eval"}
    assert result.path.exists() and mtp_train._state_path(result.path).exists()


def test_saved_head_reloads_and_drafts_identically(trained):
    result, head, fingerprint = trained
    model = load_model(tiny_model(FAMILY))[0]
    if fused_layers.enabled():  # as the engine loads it: the head's norms take the trunk's class
        fused_layers.install(model)
    loaded = MTPHead.load(result.path, model, fingerprint)
    assert mx.array_equal(loaded.draft_vocab, head.draft_vocab).item()
    tokens = mx.array([[5, 9, 300, 41, 77, 12, 600, 8, 9, 41]])
    hidden = trunk_hidden(model, tokens)
    for a, b in zip(head(hidden, tokens, head.make_cache()), loaded(hidden, tokens, loaded.make_cache())):
        assert mx.array_equal(a, b).item()
    logits = loaded(hidden, tokens)[0]
    outside = np.setdiff1d(np.arange(768), np.array(loaded.draft_vocab))
    assert np.isneginf(np.array(logits[..., mx.array(outside)])).all()  # q = 0 outside the subset
    meta = mx.load(str(result.path), return_metadata=True)[1]["kernelext_mtp"]
    assert '"draft_vocab_size": 512' in meta and '"agreement"' in meta


def test_wrong_model_is_refused(trained):
    result, _, fingerprint = trained
    other = tiny_model(FAMILY, seed=1)  # same architecture, other weights
    with pytest.raises(ModelLoadError, match="was made for base model"):
        load_engine(other, drafter="mtp", mtp_head=str(result.path))
    with load_engine(other, drafter="auto") as eng:  # not a candidate for "auto" either
        assert eng.drafter.name == "ngram"
    with pytest.raises(ModelLoadError, match="gemma3_text model"):
        MTPHead.load(result.path, load_model(tiny_model("llama"))[0], fingerprint)


def test_resume_continues_from_the_saved_step(corpus, tmp_path, monkeypatch):
    options = dict(corpus=corpus, steps=8, **SMALL)
    with make_engine(FAMILY) as eng:
        straight = eng.train_mtp_head(out=tmp_path / "straight.safetensors", **options)

        step, calls = mtp_train._Trainer.step, []

        def interrupted(self):  # Ctrl-C between steps 4 and 5
            if self.history["step"] == 4 and "interrupt" not in calls:
                calls.append("interrupt")
                raise KeyboardInterrupt
            calls.append(self.history["step"])
            step(self)

        monkeypatch.setattr(mtp_train._Trainer, "step", interrupted)
        out = tmp_path / "resumed.safetensors"
        with pytest.raises(KeyboardInterrupt):
            eng.train_mtp_head(out=out, **options)
        resumed = eng.train_mtp_head(out=out, **options)
        assert calls == [0, 1, 2, 3, "interrupt", 4, 5, 6, 7]  # steps 0-3 were not redone
        assert resumed.steps == 8
        np.testing.assert_allclose(resumed.losses, straight.losses, rtol=1e-4)
        model = eng._loaded.model
        a, b = (dict(tree_flatten(MTPHead.load(r.path, model, eng.fingerprint).parameters()))
                for r in (straight, resumed))
        for k in a:
            np.testing.assert_allclose(np.array(a[k]), np.array(b[k]), rtol=1e-3, atol=1e-5)

        with pytest.warns(UserWarning, match="different run"):
            other = eng.train_mtp_head(out=out, **{**options, "lr": 5e-3})
        assert calls[-8:] == list(range(8)) and other.steps == 8
        eng.train_mtp_head(out=out, resume=False, **options)
        assert calls[-8:] == list(range(8))


def test_trained_heads_are_found_for_mtp_and_left_out_by_auto(trained, tmp_path, monkeypatch):
    result = trained[0]
    model_dir = write_tiny_model(FAMILY, tmp_path / "model")  # same weights: same fingerprint
    with load_engine(model_dir) as eng:  # "auto" is the default
        assert eng.config.drafter == "auto" and eng.drafter.name == "ngram"
    shutil.copy(result.path, model_dir / LOCAL_HEAD)
    with load_engine(model_dir, drafter="mtp") as eng:
        assert eng.drafter.name == "mtp" and eng.runner.head.draft_vocab.size == 512
    # "auto" takes native heads only (a trained head can draft slower than n-gram).
    with load_engine(model_dir) as eng:
        assert eng.drafter.name == "ngram"
    (model_dir / LOCAL_HEAD).unlink()
    bundled = tmp_path / "bundled"
    bundled.mkdir()
    shutil.copy(result.path, bundled / "tiny.safetensors")
    monkeypatch.setattr(mtp_head, "BUNDLED_HEADS", bundled)
    with load_engine(model_dir, drafter="mtp") as eng:
        assert eng.drafter.name == "mtp" and eng.metrics()["spec_drafter"] == "mtp"


def test_draft_vocab_logits_match_the_full_head_on_quantized_models():
    """Restricted logits equal the full head's on the subset, for tied and untied output
    projections, plain and quantized."""
    ids = mx.array([3, 17, 200, 767])
    for family in ("llama", "qwen3"):
        model = load_model(tiny_model(family))[0]
        for quantized in (False, True):
            if quantized:
                nn.quantize(model, group_size=32, bits=8)
            head = MTPHead.create(model, seed=0)
            tokens = mx.array([[5, 9, 300, 41]])
            hidden = trunk_hidden(model, tokens)
            full = head(hidden, tokens)[0]
            head.set_draft_vocab(ids)
            sub = head(hidden, tokens)[0]
            np.testing.assert_allclose(np.array(sub[..., ids]), np.array(full[..., ids]), rtol=1e-4, atol=1e-3)
            assert mx.isinf(sub).sum().item() == sub.size - 4 * ids.size
    with pytest.raises(ModelLoadError, match="sorted unique"):
        head.set_draft_vocab([5, 3])


# -- exactness with a trained head ---------------------------------------------------

@pytest.fixture(scope="module")
def spec_engine(trained):
    result = trained[0]
    with make_engine(FAMILY, drafter="mtp", mtp_head=str(result.path)) as eng:
        yield eng


def test_greedy_identity_with_trained_head(spec_engine):
    with make_engine(FAMILY) as ar:
        want = [ar.generate(p, max_tokens=23).token_ids for p in PROMPTS]
    before = spec_engine.metrics()["spec_accepted_tokens"]
    for depth in (1, 3):  # max_tokens=23 ends mid-window at depth 3
        handles = [spec_engine.submit(p, max_tokens=23, depth=depth) for p in PROMPTS]
        assert [h.result().token_ids for h in handles] == want
    m = spec_engine.metrics()
    assert m["spec_drafter"] == "mtp" and m["spec_accepted_tokens"] > before


def test_sampled_token_frequencies_match_ar_with_trained_head(spec_engine):
    n, positions, prompt = 300, 4, PROMPTS[0]
    with make_engine(FAMILY) as ar:
        ar_counts = _position_counts(ar, prompt, range(n), positions)
    before = spec_engine.metrics()
    spec_counts = _position_counts(spec_engine, prompt, range(n, 2 * n), positions, depth=3)
    m = spec_engine.metrics()
    drafted = m["spec_drafted_tokens"] - before["spec_drafted_tokens"]
    accepted = m["spec_accepted_tokens"] - before["spec_accepted_tokens"]
    assert 0 < accepted < drafted  # both the accept and the reject paths ran
    for a, b in zip(ar_counts, spec_counts):
        _assert_same_law(a, b)


def test_train_mtp_magic(capsys):
    from kernelext.magics import LLMMagics

    calls = {}

    class FakeEngine:
        def train_mtp_head(self, **options):
            calls.update(options)
            return SimpleNamespace(path="/m/head.safetensors", steps=3, agreement=0.5, tokens_per_s=99.0)

    magics = LLMMagics(None, SimpleNamespace(ensure_engine=FakeEngine))
    magics.llm("train-mtp --tokens 500 --corpus /x")
    assert calls == {"tokens": 500, "corpus": "/x"}
    assert "/m/head.safetensors: 3 steps" in capsys.readouterr().out
