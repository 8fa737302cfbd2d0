"""The sampler's building blocks against hand-computed expectations."""

from collections import Counter

import numpy as np
import pytest

from engine.sampling.sampler import (apply_penalties, keyed_uniform, sample_index, sample_token,
                            target_probs, top_logprobs)
from engine.sampling.params import SamplingParams
from engine.sampling.text_stream import TextStream


def test_penalties_match_definitions():
    logits = np.array([2.0, -1.0, 0.5, 3.0], dtype=np.float32)
    p = SamplingParams(repetition_penalty=2.0, presence_penalty=0.5, frequency_penalty=0.25)
    out = apply_penalties(logits, p, context={0, 1}, output_counts=Counter({1: 2, 3: 1}))
    assert out.dtype == np.float32 and logits[1] == -1.0  # a penalized copy
    # token 0: repetition 2/2=1; token 1: -1*2=-2, then -0.5-0.25*2 -> -3; token 3: 3-0.5-0.25
    np.testing.assert_allclose(np.array(out), [1.0, -3.0, 0.5, 2.25], rtol=1e-6)


def test_target_distribution_filters():
    logits = np.log(np.array([0.5, 0.3, 0.15, 0.05], dtype=np.float32))
    top_k = target_probs(logits, SamplingParams(temperature=1, top_k=2))
    np.testing.assert_allclose(top_k, [0.625, 0.375, 0, 0], atol=1e-6)
    top_p = target_probs(logits, SamplingParams(temperature=1, top_p=0.8))
    np.testing.assert_allclose(top_p, [0.625, 0.375, 0, 0], atol=1e-6)
    min_p = target_probs(logits, SamplingParams(temperature=1, min_p=0.2))
    np.testing.assert_allclose(min_p, np.array([0.5, 0.3, 0.15, 0]) / 0.95, atol=1e-6)
    hot = target_probs(logits, SamplingParams(temperature=2.0))
    want = np.sqrt([0.5, 0.3, 0.15, 0.05])
    np.testing.assert_allclose(hot, want / want.sum(), atol=1e-6)
    assert top_k.dtype == np.float64 and abs(hot.sum() - 1) < 1e-15


@pytest.mark.parametrize("top_p", [0.05, 0.5, 0.9, 0.999])
def test_top_p_cuts_where_a_full_sort_cuts(top_p):
    # mlx-lm's rule (sort ascending, drop a token when the mass above it reaches top_p)
    # in float64 over a full sort; the sampler sorts only the top 1024 candidates when
    # they hold the nucleus, and must cut at the same token either way.
    rng = np.random.default_rng(0)
    for scale in (8.0, 0.5):  # peaked (nucleus inside the candidates) and flat (wider)
        logits = (rng.standard_normal(50_000) * scale).astype(np.float32)
        ours = target_probs(logits, SamplingParams(temperature=1.0, top_p=top_p)) > 0
        w = np.exp((logits - logits.max()).astype(np.float32)).astype(np.float64)
        ascending = np.sort(w)
        mass_above = np.cumsum(ascending[::-1])[::-1] - ascending
        threshold = ascending[np.count_nonzero(mass_above >= top_p * w.sum())]
        assert np.array_equal(ours, w >= threshold), (top_p, scale)


def test_sampling_follows_the_distribution():
    # Chi-square over 4000 keyed draws: the keyed inverse-CDF draw samples the target.
    probs = np.array([0.5, 0.3, 0.15, 0.05])
    logits = np.log(probs).astype(np.float32)
    params = SamplingParams(temperature=1.0)
    draws = [sample_token(logits, params, 1234, pos, set(), Counter()) for pos in range(4000)]
    counts = np.bincount(draws, minlength=4)
    chi2 = (((counts - 4000 * probs) ** 2) / (4000 * probs)).sum()
    assert chi2 < 16.27  # p = 0.001 at 3 degrees of freedom


def test_inverse_cdf_never_picks_a_zero_probability_token():
    probs = np.array([0.0, 0.5, 0.0, 0.5, 0.0])
    assert [sample_index(probs, u) for u in (0.0, 0.4999, 0.5, 0.9999999999999999)] == [1, 1, 3, 3]


def test_keyed_uniform_depends_on_seed_position_role():
    assert keyed_uniform(1, 5) == keyed_uniform(1, 5)
    assert len({keyed_uniform(1, 5), keyed_uniform(2, 5), keyed_uniform(1, 6), keyed_uniform(1, 5, 1)}) == 4


def test_top_logprobs_are_normalized_and_ordered():
    logits = np.array([1.0, 3.0, 2.0, -1.0], dtype=np.float32)
    logprobs, top = top_logprobs(logits, 3)
    assert top == [1, 2, 0]
    assert abs(np.exp(logprobs.astype(np.float64)).sum() - 1) < 1e-6


class _Detok:
    """Yields one preset text segment per token."""

    def __init__(self, segments):
        self.segments, self.last_segment = segments, ""

    def add_token(self, token):
        self.last_segment = self.segments[token]

    def finalize(self):
        self.last_segment = ""


@pytest.mark.parametrize("segments,stops,out,stopped", [
    (["Hel", "lo W", "orld", "!"], ["o Wo"], "Hell", True),
    (["ab", "c<", "/s", ">tail"], ["</s>"], "abc", True),
    (["ab", "c<", "d"], ["</s>"], "abc<d", False),
    (["a", "b"], [], "ab", False),
])
def test_text_stream_holds_back_partial_stops(segments, stops, out, stopped):
    stream = TextStream(_Detok(segments), stops)
    released = []
    for i in range(len(segments)):
        released.append(stream.add(i))
        assert not any(s in "".join(released) for s in stops)
        if stream.stopped:
            break
    released.append(stream.finish())
    assert "".join(released) == out == stream.text
    assert stream.stopped is stopped
