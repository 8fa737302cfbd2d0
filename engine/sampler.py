"""Turning logits into tokens, exactly and reproducibly.

The same functions define the target distribution for plain decoding and (later)
for speculative verification, so both sample from exactly the same p.
Randomness is keyed by (request seed, absolute position, role): a request's
tokens never depend on its batch neighbours or on how steps were grouped.
"""

from __future__ import annotations

from collections import Counter

import mlx.core as mx
import numpy as np
from mlx_lm.sample_utils import apply_min_p, apply_top_k, apply_top_p

from .sampling_params import SamplingParams

ROLE_SAMPLE = 0
_MASK64 = (1 << 64) - 1


def _splitmix64(x: int) -> int:
    x = (x + 0x9E3779B97F4A7C15) & _MASK64
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & _MASK64
    return x ^ (x >> 31)


def _mix(seed: int, position: int, role: int) -> int:
    return _splitmix64((seed & _MASK64) ^ _splitmix64((position << 4) | role))


def rng_key(seed: int, position: int, role: int = ROLE_SAMPLE) -> mx.array:
    """A PRNG key that depends only on the request's seed, the token position and the role."""
    return mx.random.key(_mix(seed, position, role))


def keyed_uniform(seed: int, position: int, role: int) -> float:
    """A float64 uniform in [0, 1) keyed like rng_key (for exact accept/reject draws)."""
    return np.random.Generator(np.random.PCG64(_mix(seed, position, role))).random()


def apply_penalties(logits: mx.array, params: SamplingParams, context: set[int],
                    output_counts: Counter) -> mx.array:
    """Repetition penalty over prompt+output tokens, presence/frequency over output tokens."""
    if params.repetition_penalty != 1.0 and context:
        ids = mx.array(sorted(context))
        picked = logits[ids]
        p = params.repetition_penalty
        logits[ids] = mx.where(picked > 0, picked / p, picked * p)
    if (params.presence_penalty or params.frequency_penalty) and output_counts:
        ids = mx.array(list(output_counts.keys()))
        counts = mx.array(list(output_counts.values()), dtype=mx.float32)
        logits[ids] = logits[ids] - (params.presence_penalty + params.frequency_penalty * counts)
    return logits


def target_logprobs(logits: mx.array, params: SamplingParams) -> mx.array:
    """The normalized float32 log-distribution a non-greedy request samples from."""
    x = logits.astype(mx.float32) / params.temperature
    logprobs = x - mx.logsumexp(x, axis=-1, keepdims=True)
    if params.top_k and params.top_k < logprobs.shape[-1]:
        logprobs = apply_top_k(logprobs, params.top_k)
    if params.top_p < 1.0:
        logprobs = apply_top_p(logprobs, params.top_p)
    if params.min_p > 0.0:
        logprobs = apply_min_p(logprobs, params.min_p)
    return logprobs - mx.logsumexp(logprobs, axis=-1, keepdims=True)


def sample_row(logits: mx.array, params: SamplingParams, seed: int, position: int,
               context: set[int], output_counts: Counter) -> mx.array:
    """The token (lazy scalar) one request draws at `position` from its logits row."""
    if params.has_penalties:
        logits = apply_penalties(logits, params, context, output_counts)
    if params.greedy:
        return mx.argmax(logits, axis=-1)
    return mx.random.categorical(target_logprobs(logits, params), key=rng_key(seed, position))


def top_logprobs(logits: mx.array, n: int) -> tuple[mx.array, mx.array]:
    """Model log-probabilities of a row and the ids of its n most likely tokens."""
    logprobs = logits.astype(mx.float32)
    logprobs = logprobs - mx.logsumexp(logprobs, axis=-1, keepdims=True)
    if n == 0:
        return logprobs, mx.array([], dtype=mx.int32)
    top_ids = mx.argpartition(-logprobs, kth=n - 1, axis=-1)[:n]
    order = mx.argsort(-logprobs[top_ids])
    return logprobs, top_ids[order]
