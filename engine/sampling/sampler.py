"""Turning logits into tokens, exactly and reproducibly.

The same functions define the target distribution p for plain decoding and for
speculative verification, so both sample from exactly the same p.

The math runs in numpy on one logits row copied off the model's output: MLX's
CPU `exp` over a 262k vocabulary costs ~6 ms where numpy's costs ~0.4 ms, and
the old MLX pipeline (log-softmax twice, then a Gumbel draw) cost ~19 ms per
sampled token on Gemma 3. Probabilities are normalized in float64.

A token is drawn by inverse CDF with one uniform keyed by (request seed,
absolute position, role): a request's tokens never depend on its batch
neighbours or on how steps were grouped, and a deterministic draft can be
checked by drawing the very token plain decoding would draw (see spec/verify.py).
"""

from __future__ import annotations

from collections import Counter

import numpy as np

from ..structured.masks import masked_logits
from .params import SamplingParams

# Roles of a keyed draw: the same (seed, position) gives independent uniforms per role.
ROLE_SAMPLE = 0  # plain decoding's draw (also the coupled check of a deterministic draft)
ROLE_ACCEPT = 1  # accept/reject of a sampled draft
ROLE_RESIDUAL = 2  # the residual sample after a rejection
ROLE_DRAFT = 3  # an MTP head drawing its draft
_MASK64 = (1 << 64) - 1
_TOP_P_CANDIDATES = 1024  # top-p sorts only these when they already hold the mass


def _splitmix64(x: int) -> int:
    x = (x + 0x9E3779B97F4A7C15) & _MASK64
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & _MASK64
    return x ^ (x >> 31)


def _mix(seed: int, position: int, role: int) -> int:
    return _splitmix64((seed & _MASK64) ^ _splitmix64((position << 4) | role))


def keyed_uniform(seed: int, position: int, role: int = ROLE_SAMPLE) -> float:
    """A float64 uniform in [0, 1) that depends only on (seed, position, role)."""
    return np.random.Generator(np.random.PCG64(_mix(seed, position, role))).random()


def apply_penalties(logits: np.ndarray, params: SamplingParams, context: set[int],
                    output_counts: Counter) -> np.ndarray:
    """Repetition penalty over prompt+output tokens, presence/frequency over output tokens
    (a penalized copy; the row stays float32 as the model produced it)."""
    logits = np.array(logits, dtype=np.float32)
    if params.repetition_penalty != 1.0 and context:
        ids = np.fromiter(context, dtype=np.int64, count=len(context))
        picked = logits[ids]
        p = np.float32(params.repetition_penalty)
        logits[ids] = np.where(picked > 0, picked / p, picked * p)
    if (params.presence_penalty or params.frequency_penalty) and output_counts:
        ids = np.fromiter(output_counts.keys(), dtype=np.int64, count=len(output_counts))
        counts = np.fromiter(output_counts.values(), dtype=np.float32, count=len(output_counts))
        logits[ids] -= np.float32(params.presence_penalty) + np.float32(params.frequency_penalty) * counts
    return logits


def target_probs(logits: np.ndarray, params: SamplingParams) -> np.ndarray:
    """The normalized float64 distribution a non-greedy request samples from.

    Temperature, then top-k, top-p and min-p with mlx-lm's semantics (top-p keeps a
    token when the mass strictly above it is below top_p; ties at a cut are kept).
    """
    x = np.asarray(logits, dtype=np.float32)
    weights = np.exp((x - x.max()) / np.float32(params.temperature)).astype(np.float64)
    vocab = weights.shape[-1]
    if params.top_k and params.top_k < vocab:
        drop = np.argpartition(-weights, params.top_k - 1)[params.top_k:]
        weights[drop] = 0.0
    if params.top_p < 1.0:
        weights[weights < _top_p_threshold(weights, params.top_p)] = 0.0
    if params.min_p > 0.0:
        weights[weights < weights.max() * params.min_p] = 0.0
    return weights / weights.sum()


def _top_p_threshold(weights: np.ndarray, top_p: float) -> float:
    """The smallest weight top-p keeps."""
    total = weights.sum()
    m = min(_TOP_P_CANDIDATES, weights.shape[-1])
    top = weights[np.argpartition(-weights, m - 1)[:m]] if m < weights.shape[-1] else weights
    top = -np.sort(-top)
    if m < weights.shape[-1] and top.sum() < top_p * total:
        top = -np.sort(-weights)  # the nucleus is wider than the candidates
    mass_above = np.cumsum(top) - top
    kept = int(np.count_nonzero(mass_above < top_p * total))
    return top[max(kept, 1) - 1]


def sample_index(probs: np.ndarray, u: float) -> int:
    """Inverse-CDF draw from a float64 distribution with a given uniform u in [0, 1)."""
    cdf = np.cumsum(probs)
    i = int(np.searchsorted(cdf, u * cdf[-1], side="right"))
    if i >= len(probs) or probs[i] == 0.0:  # u * total rounded onto the very top
        i = int(np.flatnonzero(probs)[-1])
    return i


def sample_token(logits: np.ndarray, params: SamplingParams, seed: int, position: int,
                 context: set[int], output_counts: Counter, allowed: np.ndarray | None = None) -> int:
    """The token one request draws at `position` from its float32 logits row.

    `allowed` (bool[vocab]) is a grammar's mask: forbidden tokens go to -inf first,
    then penalties, temperature, top-k/p, min-p and the keyed draw, unchanged."""
    if allowed is not None:
        logits = masked_logits(logits, allowed)
    if params.has_penalties:
        logits = apply_penalties(logits, params, context, output_counts)
    if params.greedy:
        return int(np.argmax(logits))
    return sample_index(target_probs(logits, params), keyed_uniform(seed, position, ROLE_SAMPLE))


def top_logprobs(logits: np.ndarray, n: int) -> tuple[np.ndarray, list[int]]:
    """Model log-probabilities of a row and the ids of its n most likely tokens."""
    x = np.asarray(logits, dtype=np.float32)
    shifted = x - x.max()
    logprobs = shifted - np.float32(np.log(np.exp(shifted, dtype=np.float64).sum()))
    if n == 0:
        return logprobs, []
    top = np.argpartition(-logprobs, n - 1)[:n]
    return logprobs, top[np.argsort(-logprobs[top], kind="stable")].tolist()
