"""Structured generation: constraints hold, and they change nothing else.

Exactness: with a seed, constrained output with speculation (drafts cut at the
grammar, masked verification) is token for token constrained plain decoding's,
batched or alone; the law of one speculative window with a mask, enumerated
exactly, equals plain masked decoding's.
"""

import itertools
import json
from collections import Counter

import numpy as np
import pydantic
import pytest

from engine import Engine, EngineConfig, InvalidRequestError, SamplingParams
from engine.structured.constraint import generation_schema
from engine.structured.masks import masked_distribution
from test_speculative import PROMPTS, V, ScriptedDrafter, dist_fn, enumerate_window, tiny_vocab_model, use_drafter
from tiny_models import tiny_model

PERSON = {"type": "object", "properties": {
    "name": {"type": "string", "maxLength": 12},
    "age": {"type": "integer", "minimum": 0, "maximum": 120},
    "tags": {"type": "array", "items": {"enum": ["a", "b", "c"]}, "maxItems": 3}},
    "required": ["name", "age"]}
CONSTRAINTS = [dict(json_schema=PERSON), dict(regex=r"[a-z]{2,6}-[0-9]{2,4}"),
               dict(choice=["red", "green", "blue", "dark red"]),
               dict(grammar='start: "(" expr ")"\nexpr: NUM (("+" | "*") NUM)*\nNUM: /[0-9]{1,3}/')]


class Person(pydantic.BaseModel):
    name: str = pydantic.Field(max_length=12)
    age: int = pydantic.Field(ge=0, le=120)


def make_engine(family="llama", **kw):
    cfg = dict(progress=False, max_batch=8, block_size=16, step_token_budget=64, drafter="none")
    cfg.update(kw)
    return Engine.load(tiny_model(family), EngineConfig(**cfg))


@pytest.fixture(scope="module")
def eng():
    e = make_engine()
    yield e
    e.close()


def _valid(constraint: dict, text: str) -> bool:
    import re

    import jsonschema
    if "json_schema" in constraint:
        try:
            jsonschema.validate(json.loads(text), constraint["json_schema"])
            return True
        except (ValueError, jsonschema.ValidationError):
            return False
    if "regex" in constraint:
        return re.fullmatch(constraint["regex"], text) is not None
    if "choice" in constraint:
        return text in constraint["choice"]
    return re.fullmatch(r"\(\d{1,3}([+*]\d{1,3})*\)", text) is not None


@pytest.mark.parametrize("constraint", CONSTRAINTS, ids=["json", "regex", "choice", "grammar"])
def test_constrained_output_is_valid_and_ends_with_stop(eng, constraint):
    for seed in range(4):
        c = eng.generate(PROMPTS[seed], SamplingParams(max_tokens=80, temperature=0.8, seed=seed,
                                                        **constraint))
        if c.finish_reason == "stop":
            assert _valid(constraint, c.text), c.text
            assert c.error is None and c.parsed is not None
        else:  # a random model may run a long grammar to max_tokens; the prefix is still legal
            assert c.finish_reason == "length" and c.error


@pytest.mark.parametrize("temperature", [0.0, 0.8])
@pytest.mark.parametrize("constraint", CONSTRAINTS, ids=["json", "regex", "choice", "grammar"])
def test_speculation_and_batching_leave_constrained_output_unchanged(eng, constraint, temperature):
    use_drafter(eng, type("Off", (), {"name": "none", "propose": None})())
    params = [SamplingParams(max_tokens=24, temperature=temperature, seed=i, **constraint)
              for i in range(len(PROMPTS))]
    plain = [eng.generate(p, params[i]) for i, p in enumerate(PROMPTS)]
    # Drafts right for 2 tokens, then wrong (mostly outside the grammar: cut there).
    refs = {tuple(eng.encode(p)): c.token_ids + [0] * 24 for p, c in zip(PROMPTS, plain)}
    use_drafter(eng, ScriptedDrafter(refs, 2, eng._loaded.vocab_size))
    before = eng.metrics()["spec_accepted_tokens"]
    spec_params = [SamplingParams(**{**vars(p), "depth": 4}) for p in params]
    handles = [eng.submit(p, spec_params[i]) for i, p in enumerate(PROMPTS)]  # one batch
    spec = [h.result() for h in handles]
    assert [c.token_ids for c in spec] == [c.token_ids for c in plain]
    assert [c.finish_reason for c in spec] == [c.finish_reason for c in plain]
    assert eng.metrics()["spec_accepted_tokens"] > before
    # Neighbours without a constraint are unchanged by constrained ones, and vice versa.
    free = [eng.generate(p, SamplingParams(max_tokens=12, temperature=temperature, seed=7))
            for p in PROMPTS[:4]]
    mixed = [eng.submit(p, SamplingParams(max_tokens=12, temperature=temperature, seed=7))
             if i % 2 else eng.submit(p, spec_params[i]) for i, p in enumerate(PROMPTS[:4])]
    got = [h.result().token_ids for h in mixed]
    use_drafter(eng, type("Off", (), {"name": "none", "propose": None})())
    assert got == [free[i].token_ids if i % 2 else plain[i].token_ids for i in range(4)]


def test_ngram_drafts_keep_constrained_output_unchanged():
    prompt = '{"name": "Ada", "age": 36} {"name": "Bob", "age": 41} {"name": "'
    with make_engine(drafter="ngram", depth=4) as e:
        for temperature in (0.0, 0.8):
            params = dict(max_tokens=30, temperature=temperature, seed=3, json_schema=PERSON)
            ar = e.generate(prompt, generation_mode="ar", **params)
            spec = e.generate(prompt, **params)
            assert spec.token_ids == ar.token_ids


def test_mtp_sampled_drafts_with_a_grammar_stay_valid():
    # A sampled draft head (q) under a mask: drafts cut at the grammar, q restricted.
    with make_engine("qwen3_5", drafter="mtp", depth=3) as e:
        handles = [e.submit(p, SamplingParams(max_tokens=40, temperature=0.8, seed=i, **c))
                   for i, (p, c) in enumerate(zip(PROMPTS, CONSTRAINTS * 2))]
        results = [h.result() for h in handles]
        assert e.metrics()["spec_drafted_tokens"] > 0
        for c, r in zip(CONSTRAINTS * 2, results):
            assert r.finish_reason == "length" or _valid(c, r.text), r.text
        greedy = [e.generate(p, SamplingParams(max_tokens=20, **c)).token_ids
                  for p, c in zip(PROMPTS[:4], CONSTRAINTS)]
        ar = [e.generate(p, SamplingParams(max_tokens=20, generation_mode="ar", **c)).token_ids
              for p, c in zip(PROMPTS[:4], CONSTRAINTS)]
        assert greedy == ar


def test_pydantic_schema_parses_into_the_model(eng):
    c = eng.generate("Person:", schema=Person, max_tokens=60, temperature=0.7, seed=2)
    if c.finish_reason == "stop":
        assert isinstance(c.parsed, Person)
    else:
        assert c.parsed is None and "does not parse" in c.error
    any_object = eng.generate("x", json_schema=True, max_tokens=40, seed=1, temperature=0.5)
    assert any_object.finish_reason == "length" or isinstance(any_object.parsed, dict)


@pytest.mark.parametrize("bad,match", [
    (dict(json_schema={"type": "object", "properties": {"a": {"$ref": "#/$defs/missing"}}}), "json_schema"),
    (dict(json_schema={"type": "frobnicate"}), "json_schema"),
    (dict(regex="(unclosed"), "regex"),
    (dict(grammar="start: undefined_rule"), "grammar"),
    (dict(choice=[]), "choice"),
    (dict(choice="yes"), "choice"),
    (dict(json_schema=42), "json_schema"),
    (dict(regex="a+", choice=["a"]), "at most one"),
])
def test_bad_constraints_are_clear_errors_and_submit_nothing(eng, bad, match):
    submitted = eng.metrics()["requests_submitted"]
    with pytest.raises(InvalidRequestError, match=match):
        eng.submit("x", max_tokens=4, **bad)
    assert eng.metrics()["requests_submitted"] == submitted
    assert eng.generate("x", max_tokens=3).finish_reason == "length"  # the engine goes on


def test_generation_schema_is_a_narrowing():
    s = generation_schema({"type": "object", "properties": {"x": {"type": "number"},
                                                            "o": {"type": "object", "properties": {}}},
                           "allOf": [{"properties": {"y": {"type": "integer"}}}]})
    assert s["additionalProperties"] is False and s["properties"]["x"]["multipleOf"] == 1e-6
    assert "additionalProperties" not in s["allOf"][0]
    kept = generation_schema({"type": "object", "properties": {}, "additionalProperties": {"type": "string"}})
    assert kept["additionalProperties"] == {"type": "string"}


# -- the law of one speculative window under a mask, enumerated exactly ---------------

def toy_mask(context) -> np.ndarray:
    """A context-dependent 'grammar' over V tokens: never repeat the last token, and
    token 0 only after token 3 (so drafts are often cut)."""
    ok = np.ones(V, dtype=bool)
    ok[context[-1]] = False
    if context[-1] != 3:
        ok[0] = False
    return ok


def _masked_window_law(drafts, ctx, p, q, renormalize=True):
    """run_window as engine/spec/verify.py runs it under a mask: cut at the first
    forbidden draft, masked p, q restricted to the mask (Leviathan-Chen with q')."""
    keep = next((j for j, d in enumerate(drafts) if not toy_mask(ctx + list(drafts[:j]))[d]), len(drafts))
    drafts = list(drafts[:keep])
    pd = [p(ctx + drafts[:j]) for j in range(keep + 1)]
    if q is None:
        return enumerate_window(drafts, pd, None)
    qd = [q(ctx + drafts[:j]) for j in range(keep)]
    if renormalize:
        qd = [masked_distribution(qd[j], toy_mask(ctx + drafts[:j])) for j in range(keep)]
    return enumerate_window(drafts, pd, qd)


def _laws(K, drafter, renormalize=True):
    # Hot enough that p spreads over several permitted tokens (the toy logits are sharp).
    params = SamplingParams(temperature=5.0, top_p=0.95, top_k=4)
    p = dist_fn(tiny_vocab_model(0), params, toy_mask)
    q = dist_fn(tiny_vocab_model(1), SamplingParams(temperature=1.3))  # unmasked drafter
    ctx, n = [1, 3], K + 1
    ar = Counter()
    for seq in itertools.product(range(V), repeat=n):
        prob = np.prod([p(ctx + list(seq[:j]))[seq[j]] for j in range(n)])
        if prob > 0:
            ar[seq] += prob
    spec = Counter()
    for drafts in itertools.product(range(V), repeat=K):
        if drafter == "model":
            w = float(np.prod([q(ctx + list(drafts[:j]))[drafts[j]] for j in range(K)]))
            law = _masked_window_law(drafts, ctx, p, q, renormalize)
        else:
            if drafts != tuple((ctx[-1] + 1 + j) % V for j in range(K)):
                continue
            w, law = 1.0, _masked_window_law(drafts, ctx, p, None)
        for out, prob in law.items():
            for tail in itertools.product(range(V), repeat=n - len(out)):
                full = out + tail
                tp = np.prod([p(ctx + list(full[:j]))[full[j]] for j in range(len(out), n)])
                if tp > 0:
                    spec[full] += w * prob * tp
    return ar, spec


@pytest.mark.parametrize("K", [1, 2, 3])
@pytest.mark.parametrize("drafter", ["model", "deterministic"])
def test_masked_window_law_equals_masked_ar_law(K, drafter):
    ar, spec = _laws(K, drafter)
    assert max(abs(ar[k] - spec[k]) for k in set(ar) | set(spec)) < 1e-9
    assert abs(sum(spec.values()) - 1) < 1e-9
    assert all(toy_mask([1, 3] + list(k[:j]))[k[j]] for k in spec for j in range(len(k)))


def test_masked_window_law_needs_q_restricted_to_the_mask():
    # The enumeration can tell: cutting drafts but keeping the raw q changes the law.
    ar, spec = _laws(2, "model", renormalize=False)
    assert max(abs(ar[k] - spec[k]) for k in set(ar) | set(spec)) > 1e-3


# -- the default model: real-world schemas at temperature 0.8 --------------------------

REAL_WORLD = {
    "contact": {"type": "object", "properties": {
        "name": {"type": "string", "minLength": 1, "maxLength": 40},
        "age": {"type": "integer", "minimum": 0, "maximum": 130},
        # Bounded, as real schemas bound it (a base model at temperature 0.8 can loop inside
        # an unbounded string, "0000000.0000...", past max_tokens: a length cut, not a
        # grammar failure; which seed does depends on the last bits of the logits).
        "email": {"type": "string", "format": "email", "maxLength": 64},
        "nickname": {"type": "string", "maxLength": 20}},
        "required": ["name", "age"]},
    "order": {"type": "object", "$defs": {"item": {"type": "object", "properties": {
        "sku": {"type": "string", "pattern": "^[A-Z]{3}-[0-9]{3}$"},
        "qty": {"type": "integer", "minimum": 1, "maximum": 99},
        "price": {"type": "number", "minimum": 0, "maximum": 10000}},
        "required": ["sku", "qty", "price"], "additionalProperties": False}},
        "properties": {
            "id": {"type": "string", "minLength": 3, "maxLength": 12},
            "status": {"enum": ["pending", "shipped", "delivered"]},
            "items": {"type": "array", "items": {"$ref": "#/$defs/item"}, "minItems": 1, "maxItems": 3},
            "shipping": {"type": "object", "properties": {
                "city": {"type": "string", "maxLength": 30},
                "country": {"type": "string", "enum": ["US", "FR", "DE", "JP"]}},
                "required": ["city", "country"]}},
        "required": ["id", "status", "items", "shipping"], "additionalProperties": False},
    "event": {"type": "object", "properties": {
        "title": {"type": "string", "maxLength": 60},
        "date": {"type": "string", "format": "date"},
        "attendees": {"type": "array", "items": {"type": "string", "maxLength": 30}, "maxItems": 4},
        "online": {"type": "boolean"},
        "rating": {"type": ["number", "null"], "minimum": 0, "maximum": 5}},
        "required": ["title", "date", "online"]},
}


@pytest.fixture(scope="module")
def gemma():
    e = Engine.load("gemma-3-270m", EngineConfig(progress=False, max_batch=8, drafter="ngram"))
    yield e
    e.close()


def test_default_model_outputs_are_always_valid(gemma):
    import jsonschema
    jobs = [(name, seed) for name in REAL_WORLD for seed in range(3)]
    handles = [gemma.submit(f"A {name} record as JSON:\n", max_tokens=160, temperature=0.8,
                            seed=seed, json_schema=REAL_WORLD[name]) for name, seed in jobs]
    for (name, _), h in zip(jobs, handles):
        c = h.result()
        assert c.finish_reason == "stop", c.text
        jsonschema.validate(c.parsed, REAL_WORLD[name], format_checker=jsonschema.FormatChecker())


def test_default_model_regex_choice_grammar(gemma):
    phone = gemma.generate("Call me at ", regex=r"\([0-9]{3}\) [0-9]{3}-[0-9]{4}", temperature=0.8, seed=1)
    assert phone.finish_reason == "stop" and _valid(dict(regex=r"\([0-9]{3}\) [0-9]{3}-[0-9]{4}"), phone.text)
    mood = gemma.generate("Review: I loved it! Sentiment:", choice=["positive", "negative", "neutral"])
    assert mood.text in ("positive", "negative", "neutral") and mood.finish_reason == "stop"
    sql = gemma.generate("SQL: ", grammar='start: "SELECT " COL " FROM " NAME ";"\nCOL: "*" | NAME\n'
                                          'NAME: /[a-z_]{1,12}/', temperature=0.8, seed=2)
    assert sql.finish_reason == "stop"
    assert __import__("re").fullmatch(r"SELECT (\*|[a-z_]{1,12}) FROM [a-z_]{1,12};", sql.text), sql.text


# -- engine.map: a column of prompts through the batch ---------------------------------

def test_map_keeps_order_parses_and_reports_failed_rows(eng):
    prompts = [f"Record {i}: {PROMPTS[i % len(PROMPTS)]}" for i in range(12)]
    prompts[5] = [10 ** 6]  # a token id outside the vocabulary: this row fails, the others go on
    prompts[9] = "word " * (eng.max_context + 5)  # longer than the context
    params = SamplingParams(max_tokens=40, temperature=0.7, seed=4, json_schema=PERSON)
    got = eng.map(prompts, params, progress=False)
    assert len(got) == len(prompts)
    for i, (p, c) in enumerate(zip(prompts, got)):
        if i in (5, 9):
            assert c.finish_reason == "error" and c.error and c.parsed is None
            continue
        want = eng.generate(p, params)
        assert c.token_ids == want.token_ids and c.parsed == want.parsed
        assert c.finish_reason == "length" or isinstance(c.parsed, dict)
    pd = pytest.importorskip("pandas")
    series = pd.Series(["Ada", "Bob"], index=[10, 20])
    by_series = eng.map(series, schema=Person, max_tokens=40, seed=1, progress=False)
    assert [c.token_ids for c in by_series] == [eng.generate(p, schema=Person, max_tokens=40, seed=1).token_ids
                                                for p in series]


def test_map_ctrl_c_keeps_the_rows_already_done(eng):
    import signal
    import threading
    first = eng.map(PROMPTS[:2], max_tokens=4, progress=False)  # rows done quickly
    prompts = PROMPTS[:2] + [f"{p} again" for p in PROMPTS] * 4
    # Ctrl-C as soon as this map's first row is done: the batch holds 8 rows, so the
    # rest are still running or waiting then (a fixed delay raced a fast machine).
    done_before = eng.metrics()["requests_completed"]
    stop = threading.Event()

    def interrupt_after_first_row():
        while not stop.is_set():
            if eng.metrics()["requests_completed"] > done_before:
                # A real SIGINT, as Ctrl-C sends: it also wakes a main thread blocked on
                # a result (interrupt_main only sets a flag that a blocked wait never reads).
                signal.pthread_kill(threading.main_thread().ident, signal.SIGINT)
                return
            stop.wait(0.001)

    # Python's own Ctrl-C handler, whatever an earlier test in this process installed.
    handler = signal.signal(signal.SIGINT, signal.default_int_handler)
    watcher = threading.Thread(target=interrupt_after_first_row)
    watcher.start()
    try:
        got = eng.map(prompts, max_tokens=400, progress=False)
    finally:
        stop.set()
        watcher.join()
        signal.signal(signal.SIGINT, handler)
    assert len(got) == len(prompts)
    cancelled = [c for c in got if c.finish_reason == "cancelled"]
    done = [c for c in got if c.finish_reason in ("stop", "length")]
    assert cancelled and all(c.error for c in cancelled)
    assert done and first[0].token_ids == got[0].token_ids[:4]
    assert eng.generate("x", max_tokens=2).finish_reason == "length"  # the engine goes on
