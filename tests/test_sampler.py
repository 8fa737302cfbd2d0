"""The sampler's building blocks against hand-computed expectations."""

from collections import Counter

import mlx.core as mx
import numpy as np
import pytest

from engine.sampler import apply_penalties, rng_key, sample_row, target_logprobs
from engine.sampling_params import SamplingParams
from engine.text_stream import TextStream


def test_penalties_match_definitions():
    logits = mx.array([2.0, -1.0, 0.5, 3.0])
    p = SamplingParams(repetition_penalty=2.0, presence_penalty=0.5, frequency_penalty=0.25)
    out = apply_penalties(mx.array(logits), p, context={0, 1}, output_counts=Counter({1: 2, 3: 1}))
    # token 0: repetition 2/2=1; token 1: -1*2=-2, then -0.5-0.25*2 -> -3; token 3: 3-0.5-0.25
    np.testing.assert_allclose(np.array(out), [1.0, -3.0, 0.5, 2.25], rtol=1e-6)


def test_target_distribution_filters():
    logits = mx.log(mx.array([0.5, 0.3, 0.15, 0.05]))
    top_k = np.exp(np.array(target_logprobs(logits, SamplingParams(temperature=1, top_k=2))))
    np.testing.assert_allclose(top_k, [0.625, 0.375, 0, 0], atol=1e-6)
    top_p = np.exp(np.array(target_logprobs(logits, SamplingParams(temperature=1, top_p=0.8))))
    np.testing.assert_allclose(top_p, [0.625, 0.375, 0, 0], atol=1e-6)
    min_p = np.exp(np.array(target_logprobs(logits, SamplingParams(temperature=1, min_p=0.2))))
    np.testing.assert_allclose(min_p, np.array([0.5, 0.3, 0.15, 0]) / 0.95, atol=1e-6)
    hot = np.exp(np.array(target_logprobs(logits, SamplingParams(temperature=2.0))))
    want = np.sqrt([0.5, 0.3, 0.15, 0.05])
    np.testing.assert_allclose(hot, want / want.sum(), atol=1e-6)


def test_sampling_follows_the_distribution():
    # Chi-square over 4000 keyed draws: the keyed RNG samples the target distribution.
    probs = np.array([0.5, 0.3, 0.15, 0.05])
    logits = mx.log(mx.array(probs))
    params = SamplingParams(temperature=1.0)
    draws = mx.stack([sample_row(logits, params, 1234, pos, set(), Counter())
                      for pos in range(4000)])
    counts = np.bincount(np.array(draws), minlength=4)
    chi2 = (((counts - 4000 * probs) ** 2) / (4000 * probs)).sum()
    assert chi2 < 16.27  # p = 0.001 at 3 degrees of freedom


def test_rng_key_depends_on_seed_position_role():
    k = lambda *a: tuple(np.array(rng_key(*a)).tolist())  # noqa: E731
    assert k(1, 5) == k(1, 5)
    assert len({k(1, 5), k(2, 5), k(1, 6), k(1, 5, 1)}) == 4


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
