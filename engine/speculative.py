"""Exact verification of speculative drafts (Leviathan & Chen, 2023).

For each draft token d at window position j, with p the target distribution
(the very same processed distribution the AR sampler would draw from there:
temperature, top-k/p, min-p and penalties, with the accepted draft prefix
counted) and q the distribution d was drawn from (one-hot for deterministic
drafters): accept with probability min(1, p(d)/q(d)); on the first rejection
emit a sample of the normalized residual (p - q)+ and stop; if all drafts are
accepted, emit a bonus token sampled from p at the next position (the same
keyed draw plain decoding makes there). p and q are taken in float64. The emitted
tokens then have exactly the AR law, at any temperature. At temperature 0, p is
one-hot at its argmax, so this reduces to "accept while the draft is the argmax".

Randomness is keyed by (request seed, absolute position, role), so no draw
depends on batch neighbours or on how the window was cut.
"""

from __future__ import annotations

from collections import Counter
from typing import Callable

import mlx.core as mx
import numpy as np

from .drafters import Draft
from .sampler import ROLE_SAMPLE, apply_penalties, keyed_uniform, rng_key, target_logprobs
from .sequence import Sequence

ROLE_ACCEPT = 1
ROLE_RESIDUAL = 2
ROLE_DRAFT = 3


def accept_probability(p_d: float, q_d: float) -> float:
    """min(1, p(d)/q(d)) in double precision; q(d) > 0 since d was drawn from q."""
    return 1.0 if p_d >= q_d else p_d / q_d


def probs64(logprobs: mx.array) -> np.ndarray:
    """A distribution as float64 probabilities, normalized exactly in float64.

    p and q are used in float64 throughout acceptance, so the window's law equals
    AR's to ~1e-15; float32 normalization alone would leave ~1e-8 of slack.
    """
    x = np.array(logprobs.astype(mx.float32), dtype=np.float64)
    p = np.exp(x - x.max())
    return p / p.sum()


def residual_distribution(p: np.ndarray, q: np.ndarray | None, draft: int) -> np.ndarray:
    """normalize(max(p - q, 0)); q=None means q is one-hot at `draft`."""
    if q is None:
        r = p.copy()
        r[draft] = 0.0
    else:
        r = np.maximum(p - q, 0.0)
    return r / r.sum()


def sample_distribution(probs: np.ndarray, u: float) -> int:
    """Inverse-CDF draw from a float64 distribution with a given uniform u in [0, 1)."""
    cdf = np.cumsum(probs)
    return int(min(np.searchsorted(cdf, u * cdf[-1], side="right"), len(probs) - 1))


def run_window(drafts: list[int], accept_prob: Callable[[int], float],
               uniform: Callable[[int], float], sample_residual: Callable[[int], int],
               sample_bonus: Callable[[], int]) -> list[int]:
    """The window's control flow: accepted drafts, then one residual or bonus token."""
    out = []
    for j, d in enumerate(drafts):
        if uniform(j) < accept_prob(j):
            out.append(d)
            continue
        return out + [sample_residual(j)]
    return out + [sample_bonus()]


def _window_logprobs(logits: mx.array, seq: Sequence, drafts: list[int]) -> list[mx.array]:
    """Target log-distributions at each window position, the draft prefix counted."""
    params = seq.params
    counts, context = Counter(seq.output_counts), set(seq.context)
    out = []
    for j in range(len(drafts) + 1):
        row = logits[j]
        if params.has_penalties:
            row = apply_penalties(mx.array(row), params, context, counts)
        out.append(target_logprobs(row, params) if not params.greedy else row)
        if j < len(drafts):
            counts[drafts[j]] += 1
            context.add(drafts[j])
    return out


def verify_row(logits: mx.array, seq: Sequence, draft: Draft) -> list[int]:
    """Tokens one row emits from its verify window (logits: [window, vocab])."""
    drafts = draft.tokens
    pos0 = seq.position
    dists = _window_logprobs(logits, seq, drafts)
    if seq.params.greedy:  # p is one-hot at the argmax: accept while drafts match it
        picks = mx.stack([mx.argmax(d) for d in dists]).tolist()
        return run_window(drafts, lambda j: float(picks[j] == drafts[j]), lambda j: 0.0,
                          lambda j: picks[j], lambda: picks[len(drafts)])
    p = [probs64(d) for d in dists]
    q = [probs64(x) for x in draft.q_logprobs] if draft.q_logprobs is not None else None

    def accept(j: int) -> float:
        return accept_probability(p[j][drafts[j]], q[j][drafts[j]] if q is not None else 1.0)

    def residual(j: int) -> int:
        r = residual_distribution(p[j], q[j] if q is not None else None, drafts[j])
        return sample_distribution(r, keyed_uniform(seq.seed, pos0 + j, ROLE_RESIDUAL))

    def bonus() -> int:
        k = len(drafts)
        return mx.random.categorical(dists[k], key=rng_key(seq.seed, pos0 + k, ROLE_SAMPLE)).item()

    return run_window(drafts, accept, lambda j: keyed_uniform(seq.seed, pos0 + j, ROLE_ACCEPT),
                      residual, bonus)
