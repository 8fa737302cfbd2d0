"""Speculative decoding is exact: laws, greedy identity, cache state, batch invariance."""

import itertools
from collections import Counter

import mlx.core as mx
import numpy as np
import pytest
from mlx.utils import tree_map
from mlx_lm.models import llama

import engine.core.engine_core as llm_engine
from engine import Engine, EngineConfig, SamplingParams
from engine.spec.drafters import Draft
from engine.core.model_runner import ModelRunner
from engine.sampling.sampler import keyed_uniform, sample_index, target_probs
from engine.spec.verify import accept_probability, coupled_window, residual_distribution, run_window
from tiny_models import FAMILIES, tiny_model

PROMPTS = ["def fibonacci(n):", "Hello", "The quick brown fox jumps over the lazy dog, and then",
           "import os\nimport sys\n\n", "class Config:\n    def __init__(self, path):\n",
           "one two three four five six", "for i in range(10):", "x = [1, 2, 3]"]


class ScriptedDrafter:
    """Drafts from a known continuation per prompt: right for the first `good` tokens of
    each window, then wrong ones, so every accept pattern can be forced."""

    name = "scripted"
    deterministic = True

    def __init__(self, references: dict, good: int, vocab: int):
        self.references, self.good, self.vocab = references, good, vocab

    def propose(self, rows, depths):
        out = []
        for seq, k in zip(rows, depths):
            ref = self.references[tuple(seq.prompt_ids)]
            done = len(seq.output_ids)
            right = ref[done:done + k]  # draft j is checked against window position j
            draft = [t if j < self.good else (t + 1 + j) % self.vocab for j, t in enumerate(right)]
            out.append(Draft(draft))
        return out


class SelfDrafter:
    """A model drafter: samples drafts from the target model itself at a colder
    temperature (no cache: tiny models only). q then piles onto p's favourite token,
    so rejections happen and the residual (p - q)+ differs sharply from p."""

    name = "self"
    deterministic = False

    def __init__(self, model, temperature=0.4):
        self.model, self.params = model, SamplingParams(temperature=temperature, top_k=4)

    def propose(self, rows, depths):
        out = []
        for seq, k in zip(rows, depths):
            context, tokens, qs = seq.prompt_ids + seq.output_ids, [], []
            for j in range(k):
                logits = self.model(mx.array(context + tokens)[None])[0, -1]
                q = target_probs(np.array(logits), self.params)
                tokens.append(sample_index(q, keyed_uniform(seq.seed, seq.position + j, 7)))
                qs.append(q)
            out.append(Draft(tokens, qs if k else None))
        return out


def make_engine(family, **kw):
    cfg = dict(progress=False, max_batch=8, block_size=16, step_token_budget=64, drafter="none")
    cfg.update(kw)
    return Engine.load(tiny_model(family), EngineConfig(**cfg))


def use_drafter(eng, drafter):
    def swap():
        eng.drafter = drafter
        eng.speculation.drafter_name = drafter.name
    eng.call(swap)


@pytest.fixture(scope="module", params=FAMILIES)
def family(request):
    return request.param


@pytest.fixture(scope="module")
def eng(family):
    e = make_engine(family)
    yield e
    e.close()


@pytest.mark.parametrize("good", [0, 1, 2, 4])
@pytest.mark.parametrize("depth", [1, 3, 4])
def test_greedy_identity_for_every_accept_pattern(eng, good, depth):
    use_drafter(eng, type("Off", (), {"name": "none", "propose": None})())
    ref = {tuple(eng.encode(p)): eng.generate(p, max_tokens=23).token_ids for p in PROMPTS}
    vocab = eng._loaded.vocab_size
    use_drafter(eng, ScriptedDrafter(ref, good, vocab))
    # max_tokens=23 makes the last window end mid-window for every depth tested.
    handles = [eng.submit(p, max_tokens=23, depth=depth) for p in PROMPTS]
    results = [h.result() for h in handles]
    assert [r.token_ids for r in results] == list(ref.values())
    assert all(r.usage.verify_calls > 0 for r in results)
    accepted = sum(r.usage.accepted_tokens for r in results)
    drafted = sum(r.usage.draft_tokens for r in results)
    if good >= depth:
        assert accepted == drafted  # every draft right: all accepted
    elif good == 0:
        assert accepted == 0
    else:
        assert 0 < accepted < drafted


def test_stop_string_and_eos_mid_window(eng):
    use_drafter(eng, type("Off", (), {"name": "none", "propose": None})())
    full = eng.generate(PROMPTS[2], max_tokens=30)
    stop = full.text[len(full.text) // 2:len(full.text) // 2 + 3]
    want = eng.generate(PROMPTS[2], max_tokens=30, stop=[stop])
    ref = {tuple(eng.encode(PROMPTS[2])): full.token_ids}
    use_drafter(eng, ScriptedDrafter(ref, 4, eng._loaded.vocab_size))
    got = eng.generate(PROMPTS[2], max_tokens=30, stop=[stop], depth=4)
    assert got.text == want.text and got.finish_reason == "stop"
    assert stop not in got.text


def test_seeded_sampling_is_batch_invariant_with_speculation(eng):
    use_drafter(eng, type("Off", (), {"name": "none", "propose": None})())
    greedy = {tuple(eng.encode(p)): eng.generate(p, max_tokens=40).token_ids for p in PROMPTS}
    use_drafter(eng, ScriptedDrafter(greedy, 3, eng._loaded.vocab_size))
    params = [SamplingParams(max_tokens=20, temperature=0.7, top_k=5, seed=i, depth=3)
              for i in range(len(PROMPTS))]
    alone = [eng.generate(p, params[i]).token_ids for i, p in enumerate(PROMPTS)]
    handles = [eng.submit(p, params[i]) for i, p in enumerate(PROMPTS)]
    assert [h.result().token_ids for h in handles] == alone
    assert eng.metrics()["spec_accepted_tokens"] > 0


@pytest.mark.parametrize("params", [
    dict(temperature=0.7, top_k=5),
    dict(temperature=1.0, top_p=0.9, repetition_penalty=1.3, presence_penalty=0.5),
    dict(temperature=0.0, frequency_penalty=0.7),
])
def test_deterministic_drafts_reproduce_plain_decoding_exactly(eng, params):
    # Coupled verification draws what plain decoding draws: same seed, same tokens,
    # whatever the accept pattern, even when sampling.
    use_drafter(eng, type("Off", (), {"name": "none", "propose": None})())
    accepted = eng.metrics()["spec_accepted_tokens"]
    runs = {}
    for good in (None, 0, 2, 4):
        if good is not None:
            greedy = {tuple(eng.encode(p)): eng.generate(p, max_tokens=40).token_ids for p in PROMPTS}
            use_drafter(eng, ScriptedDrafter(greedy, good, eng._loaded.vocab_size))
        runs[good] = [eng.generate(p, SamplingParams(max_tokens=24, seed=i, depth=4, **params)).token_ids
                      for i, p in enumerate(PROMPTS)]
    assert runs[0] == runs[2] == runs[4] == runs[None]
    assert eng.metrics()["spec_accepted_tokens"] > accepted


def test_failed_verification_leaves_caches_untouched(eng, monkeypatch):
    use_drafter(eng, type("Off", (), {"name": "none", "propose": None})())
    ref = {tuple(eng.encode(p)): eng.generate(p, max_tokens=16).token_ids for p in PROMPTS[:3]}
    use_drafter(eng, ScriptedDrafter(ref, 2, eng._loaded.vocab_size))
    calls = Counter()
    real = llm_engine.verify_row

    def flaky(logits, seq, draft, masks=None):
        calls["n"] += 1
        if calls["n"] % 3 == 0:
            raise RuntimeError("injected verification failure")
        return real(logits, seq, draft, masks)

    monkeypatch.setattr(llm_engine, "verify_row", flaky)
    with pytest.warns(RuntimeWarning, match="speculative step failed"):
        handles = [eng.submit(p, max_tokens=16, depth=3) for p in PROMPTS[:3]]
        got = [h.result().token_ids for h in handles]
    assert got == list(ref.values())


def _row_state(runner, row):
    """One batch row's cache contents: attention KV in temporal order, recurrent states."""
    out = []
    for c in runner.batch_cache:
        if hasattr(c, "extract") and not hasattr(c, "cache"):
            single = c.extract(row)
            keys, values = single.keys, single.values
            if hasattr(single, "_temporal_order"):  # rotating: unroll the ring buffer
                keys, values = single._temporal_order(keys), single._temporal_order(values)
            n = min(single.offset, keys.shape[2])
            if hasattr(single, "max_size"):  # the next token sees the last window-1 of them
                n = min(n, single.max_size - 1)
            out += [np.array(keys[..., -n:, :]), np.array(values[..., -n:, :])]
        else:
            out += [np.array(c.cache[0][row]), np.array(c.cache[1][row])]
    return out


@pytest.mark.parametrize("keep", [[1, 3], [4, 2], [2, 2], [4, 4]])
def test_cache_state_after_accept_pattern_equals_plain_decoding(family, keep):
    e = make_engine(family)
    model = e._loaded.model
    prompts = [e.encode(p) for p in PROMPTS[2:4]]
    e.close()
    window = 4
    fed = [[prompts[0][-1], 7, 9, 11], [prompts[1][-1], 21, 23, 25]]

    def runner_for(rows):
        r = ModelRunner(model)
        caches = []
        for ids in rows:
            c = r.new_cache()
            r.prefill(c, ids[:-1], ids[1:])
            caches.append(c)
        r.add_rows(caches)
        return r

    spec = runner_for(prompts)
    spec.verify(fed)
    spec.commit(keep, window)
    plains = []
    for row in range(2):
        plain = runner_for([prompts[row]])
        for token in fed[row][:keep[row]]:
            plain.decode([token])
        mx.eval([c.state for c in plain.batch_cache])
        for got, want in zip(_row_state(spec, row), _row_state(plain, 0)):
            assert got.shape == want.shape
            np.testing.assert_allclose(got, want, atol=2e-4, rtol=1e-4)
        plains.append(plain)
    # And the next step computes the same thing from either state.
    next_logits = spec.decode([41, 41])
    for row, plain in enumerate(plains):
        np.testing.assert_allclose(np.array(next_logits[row]), np.array(plain.decode([41])[0]),
                                   atol=5e-4, rtol=1e-4)


# -- the law of one speculative window, enumerated exactly ------------------------------

V = 5


def tiny_vocab_model(seed):
    args = llama.ModelArgs(model_type="llama", hidden_size=16, num_hidden_layers=1,
                           intermediate_size=32, num_attention_heads=2, num_key_value_heads=1,
                           rms_norm_eps=1e-5, vocab_size=V, rope_theta=10000.0,
                           tie_word_embeddings=False)
    mx.random.seed(seed)
    m = llama.Model(args)
    m.update(tree_map(lambda p: p * 3.0, m.parameters()))
    return m


def dist_fn(model, params, mask=None):
    """context -> float64 probabilities of the next token under `params` (memoized);
    mask(context) -> bool[V] is a grammar's mask, applied as the engine applies it."""
    from engine.structured.masks import masked_logits
    memo = {}

    def p(context):
        key = tuple(context)
        if key not in memo:
            logits = np.array(model(mx.array(context)[None])[0, -1])
            if mask is not None:
                logits = masked_logits(logits, mask(context))
            memo[key] = target_probs(logits, params)
        return memo[key]
    return p


def enumerate_window(drafts, p, q):
    """Exact law of run_window's output: drive it through every branch of its draws."""
    law = Counter()
    stack = [[]]
    while stack:
        script = stack.pop()
        weight, pos = [1.0], [0]

        def choose(options):
            if pos[0] < len(script):
                value, prob = options[script[pos[0]]]
            else:
                for i in range(1, len(options)):
                    stack.append(script[:pos[0]] + [i])
                script.append(0)
                value, prob = options[0]
            pos[0] += 1
            weight[0] *= prob
            return value

        if q is None:  # deterministic drafts: coupled with plain decoding's own draws
            out = coupled_window(drafts, lambda j: choose(list(enumerate(p[j].tolist()))))
        else:
            a = [accept_probability(p[j][d], q[j][d]) for j, d in enumerate(drafts)]
            out = run_window(
                drafts, lambda j: a[j],
                lambda j: choose([(0.0, a[j]), (1.0, 1 - a[j])]),  # u < a  <=> accept
                lambda j: choose(list(enumerate(
                    residual_distribution(p[j], q[j]).tolist()))),
                lambda: choose(list(enumerate(p[len(drafts)].tolist()))))
        if weight[0] > 0:
            law[tuple(out)] += weight[0]
    return law


@pytest.mark.parametrize("K", [1, 2, 3, 4])
@pytest.mark.parametrize("drafter", ["model", "deterministic"])
def test_window_law_equals_ar_law(K, drafter):
    params = SamplingParams(temperature=0.8, top_p=0.9, top_k=3)
    p = dist_fn(tiny_vocab_model(0), params)
    q = dist_fn(tiny_vocab_model(1), SamplingParams(temperature=1.3))  # a different drafter
    ctx = [1, 3]
    n = K + 1
    ar = Counter()
    for seq in itertools.product(range(V), repeat=n):
        prob = 1.0
        for j in range(n):
            prob *= p(ctx + list(seq[:j]))[seq[j]]
        if prob > 0:
            ar[seq] += prob
    spec = Counter()
    draft_space = itertools.product(range(V), repeat=K)
    for drafts in draft_space:
        if drafter == "model":
            qd = [q(ctx + list(drafts[:j])) for j in range(K)]
            w = float(np.prod([qd[j][drafts[j]] for j in range(K)]))
        else:  # a deterministic drafter proposing this fixed guess
            if drafts != tuple((ctx[-1] + 1 + j) % V for j in range(K)):
                continue
            qd, w = None, 1.0
        if w == 0:
            continue
        pd = [p(ctx + list(drafts[:j])) for j in range(K + 1)]
        for out, prob in enumerate_window(list(drafts), pd, qd).items():
            # Complete to n tokens with AR draws so both laws are over the same space.
            tails = itertools.product(range(V), repeat=n - len(out))
            for tail in tails:
                full = out + tail
                tp = 1.0
                for j in range(len(out), n):
                    tp *= p(ctx + list(full[:j]))[full[j]]
                if tp > 0:
                    spec[full] += w * prob * tp
    keys = set(ar) | set(spec)
    assert max(abs(ar[k] - spec[k]) for k in keys) < 1e-9
    assert abs(sum(spec.values()) - 1) < 1e-9


# -- end to end: MTP heads and sampled output laws -------------------------------------

def _chi2_critical(dof: int, z: float = 3.09) -> float:
    """Wilson-Hilferty approximation of the chi-square quantile (z=3.09: p = 0.001)."""
    return dof * (1 - 2 / (9 * dof) + z * (2 / (9 * dof)) ** 0.5) ** 3


def _position_counts(eng, prompt, seeds, positions, **params):
    counts = [Counter() for _ in range(positions)]
    for seed in seeds:
        # Hot and top-k: the tiny models' logits are sharp, so this spreads p over 4 tokens.
        tokens = eng.generate(prompt, SamplingParams(max_tokens=positions, temperature=3.0,
                                                     top_k=4, seed=seed, **params)).token_ids
        for j, t in enumerate(tokens):
            counts[j][t] += 1
    return counts


def _assert_same_law(a: Counter, b: Counter) -> None:
    cats = sorted(set(a) | set(b))
    na, nb = sum(a.values()), sum(b.values())
    stat = 0.0
    for c in cats:
        total = a[c] + b[c]
        for n, obs in ((na, a[c]), (nb, b[c])):
            exp = total * n / (na + nb)
            stat += (obs - exp) ** 2 / exp
    dof = max(len(cats) - 1, 1)
    assert stat < _chi2_critical(dof), (stat, dof, a, b)


@pytest.mark.parametrize("family,drafter", [("llama", "scripted"), ("gemma3_text", "self"),
                                            ("qwen3_5", "mtp")])
def test_sampled_token_frequencies_match_ar(family, drafter):
    n, positions = 300, 4
    prompt = PROMPTS[0]
    with make_engine(family) as ar:
        ar_counts = _position_counts(ar, prompt, range(n), positions)
        greedy = {tuple(ar.encode(prompt)): ar.generate(prompt, max_tokens=40).token_ids}
    with make_engine(family, drafter="mtp" if drafter == "mtp" else "none") as spec:
        if drafter == "scripted":
            use_drafter(spec, ScriptedDrafter(greedy, 4, spec._loaded.vocab_size))
        elif drafter == "self":
            use_drafter(spec, SelfDrafter(spec._loaded.model))
        spec_counts = _position_counts(spec, prompt, range(n, 2 * n), positions, depth=3)
        m = spec.metrics()
    assert m["spec_verify_calls"] > 0 and m["spec_drafted_tokens"] > 0
    if drafter != "mtp":  # the tiny model's native head is random: it is rarely right
        assert 0 < m["spec_accepted_tokens"] < m["spec_drafted_tokens"]
    for a, b in zip(ar_counts, spec_counts):
        _assert_same_law(a, b)


def test_mtp_greedy_identity_and_prefix_cache(tmp_path):
    with make_engine("qwen3_5") as ar:
        want = [ar.generate(p, max_tokens=21).token_ids for p in PROMPTS]
    with make_engine("qwen3_5", drafter="mtp", depth=3, cache_dir=str(tmp_path)) as spec:
        first = [spec.generate(p, max_tokens=21).token_ids for p in PROMPTS]
        long_prompt = " ".join(PROMPTS) * 2
        a = spec.generate(long_prompt, max_tokens=12)
        b = spec.generate(long_prompt, max_tokens=12)  # head KV restored from the prefix cache
        handles = [spec.submit(p, max_tokens=21) for p in PROMPTS]
        batched = [h.result().token_ids for h in handles]
        assert spec.metrics()["spec_verify_calls"] > 0
    assert first == want and batched == want
    assert b.usage.cached_tokens > 0 and a.token_ids == b.token_ids


def test_mtp_without_a_head_is_a_clear_error():
    from engine import EngineError
    with pytest.raises(EngineError, match="no MTP draft head"):
        make_engine("llama", drafter="mtp")


def test_tune_picks_and_persists_a_depth():
    from engine.spec import tuning
    with make_engine("llama", drafter="ngram", depth="auto") as eng:
        result = eng.tune(gen_tokens=8, depths=(0, 1, 2))
        assert result["depth"] in (0, 1, 2) and set(result["tok_s"]) == {0, 1, 2}
        assert all(v > 0 for v in result["tok_s"].values())
        assert result["depth"] == max(result["tok_s"], key=result["tok_s"].get)
        key = eng._tune_key()
        assert tuning.load_tuned_depth(key) == result["depth"]
    with make_engine("llama", drafter="ngram", depth="auto") as again:
        assert again.speculation.tuned_depth == result["depth"]


def test_set_options_changes_the_running_engine():
    from engine import EngineError, InvalidRequestError
    with make_engine("llama", drafter="ngram") as eng:
        eng.set_options(depth=2, max_batch=3, drafter="none")
        assert (eng.config.depth, eng.config.max_batch, eng.drafter.name) == (2, 3, "none")
        handles = [eng.submit(p, max_tokens=6) for p in PROMPTS]
        assert all(h.result().finish_reason == "length" for h in handles)
        assert eng.metrics()["spec_verify_calls"] == 0
        for bad in (dict(depth=-1), dict(depth="deep"), dict(max_batch=0), dict(drafter="x")):
            with pytest.raises(InvalidRequestError):
                eng.set_options(**bad)
        with pytest.raises(EngineError, match="MTP"):
            eng.set_options(drafter="mtp")
        assert eng.drafter.name == "none"  # a refused change leaves the engine as it was


def test_default_model_ngram_greedy_identity():
    """Gemma 3 270M copying code: n-gram drafts are mostly accepted, output unchanged,
    with max_tokens and a stop string landing mid-window."""
    from engine.spec.tuning import TUNING_PROMPTS
    prompt = TUNING_PROMPTS[1]
    with Engine.load("gemma-3-270m", EngineConfig(progress=False, drafter="ngram", depth=4,
                                                  max_batch=4)) as eng:
        ar = eng.generate(prompt, max_tokens=47, generation_mode="ar")
        spec = eng.generate(prompt, max_tokens=47)
        assert spec.token_ids == ar.token_ids
        assert spec.usage.accepted_tokens >= 10
        stop = ar.text[len(ar.text) // 2:len(ar.text) // 2 + 4]
        ar_stop = eng.generate(prompt, max_tokens=47, stop=[stop], generation_mode="ar")
        spec_stop = eng.generate(prompt, max_tokens=47, stop=[stop])
        assert spec_stop.text == ar_stop.text and spec_stop.finish_reason == "stop"


def test_requests_pick_their_own_drafter():
    from engine import InvalidRequestError
    with make_engine("qwen3_5", drafter="mtp", depth=2) as eng:
        want = [eng.generate(p, max_tokens=12, generation_mode="ar").token_ids for p in PROMPTS[:4]]
        kinds = ["mtp", "ngram", "none", None]
        handles = [eng.submit(p, max_tokens=12, drafter=k) for p, k in zip(PROMPTS[:4], kinds)]
        results = [h.result() for h in handles]
        assert [r.token_ids for r in results] == want
        assert results[0].usage.draft_tokens > 0 and results[2].usage.draft_tokens == 0
    with make_engine("llama", drafter="ngram") as eng, pytest.raises(InvalidRequestError, match="MTP"):
        eng.submit("x", drafter="mtp")


def test_adaptive_depth_follows_acceptance_and_measured_cost():
    from engine.config import EngineConfig as Cfg
    from engine.spec.controller import SpeculationController
    ctl = SpeculationController(Cfg(progress=False), "ngram")
    for window in range(1, 6):  # latency-bound: a longer window costs little more
        ctl.observe_step(1, window, 0.100 * (1 + 0.05 * (window - 1)), window)
    assert ctl.best_depth(0.9, 1, 4) == 4
    assert ctl.best_depth(0.05, 1, 4) == 0  # drafts almost never accepted: not worth it
    for window in range(1, 6):  # compute-bound batch: cost grows with the window
        ctl.observe_step(16, window, 0.400 * window, 16 * window)
    assert ctl.best_depth(0.9, 16, 4) == 0


def test_unmeasured_window_costs_at_least_a_measured_forward_of_fewer_rows():
    from engine.config import EngineConfig as Cfg
    from engine.spec.controller import SpeculationController
    ctl = SpeculationController(Cfg(progress=False), "ngram")
    ctl.observe_step(2, 1, 0.050, 2)
    ctl.observe_step(8, 1, 0.100, 8)
    ctl.observe_step(4, 4, 0.300, 8)  # 16 rows
    assert ctl._cost(8, 2) == pytest.approx(0.300)  # 16 rows: no cheaper than (4, 4)
    assert ctl._cost(8, 3) == pytest.approx(0.300)  # 24 rows: a floor, not an extrapolation
    assert ctl._cost(2, 2) == pytest.approx(0.0525)  # 4 rows: nothing measured above 2, the slope guess
    assert ctl.best_depth(0.6, 8, 4) == 0  # 8 rows compute-bound: windows don't pay
    assert ctl.best_depth(0.6, None, 4) > 0  # the fixed prior (pinned rows) is unchanged


def test_first_plain_step_after_a_window_is_charged_to_the_window():
    from engine.config import EngineConfig as Cfg
    from engine.spec.controller import SpeculationController
    ctl = SpeculationController(Cfg(progress=False), "ngram")
    for _ in range(3):
        ctl.observe_step(8, 1, 0.100, 8)
    ctl.observe_step(8, 3, 0.150, 16)
    ctl.observe_step(8, 1, 0.140, 8)  # re-lays out the caches: 40 ms beyond a plain step
    assert ctl._cost(8, 1) == pytest.approx(0.100)
    assert ctl._cost(8, 3) == pytest.approx(0.190)
    ctl.observe_step(8, 1, 0.120, 8)  # a later plain step is plain decoding's own
    assert list(ctl.step_cost[(8, 1)])[-1] == pytest.approx(0.120)
