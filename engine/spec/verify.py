"""Exact verification of speculative drafts.

A deterministic draft (n-gram lookup, or any draft at temperature 0) is checked
by coupling: at each window position the row draws the very token plain
decoding would draw there (same processed distribution, same keyed uniform),
accepts the draft while they agree, and emits the drawn token at the first
disagreement (or the bonus token after the last draft). A draft d is then
accepted with probability p(d), and a rejection emits a sample of p conditioned
on not d, which is Leviathan-Chen's residual for a one-hot q; beyond having the
AR law, the tokens are identical to plain decoding with the same seed.

A draft sampled from a distribution q (an MTP head) follows Leviathan & Chen
(2023): accept with probability min(1, p(d)/q(d)); on the first rejection emit a
sample of the normalized residual (p - q)+ and stop; if all drafts are accepted,
emit the bonus token with the same keyed draw plain decoding makes there. p and
q are float64, so the window's law equals AR's to ~1e-15.

p is the very distribution the AR sampler uses at each position (temperature,
top-k/p, min-p and penalties, with the accepted draft prefix counted).

With a grammar (engine/structured), p at window position j is masked by the
grammar advanced through the first j drafts, and drafts were cut at the first
token the grammar rejects. For a sampled draft the cut means the kept draft was
in effect drawn from q restricted to permitted tokens, q' = normalize(q * mask):
acceptance and residual use q', and a cut position emits plain decoding's draw
from p. Given the prefix, the output at j is then p under both events (draft
permitted: Leviathan-Chen with q'; draft cut: a draw from p), so the window's law
stays plain constrained decoding's (tests/test_structured.py enumerates it).
Randomness is keyed by (request seed, absolute position, role), so no draw
depends on batch neighbours or on how the window was cut.
"""

from __future__ import annotations

from collections import Counter
from typing import Callable

import numpy as np

from .drafters import Draft
from ..structured.masks import masked_distribution, masked_logits
from ..sampling.sampler import (ROLE_ACCEPT, ROLE_RESIDUAL, apply_penalties, keyed_uniform, sample_index,
                                sample_token, target_probs)
from ..core.sequence import Sequence


def accept_probability(p_d: float, q_d: float) -> float:
    """min(1, p(d)/q(d)) in double precision; q(d) > 0 since d was drawn from q."""
    return 1.0 if p_d >= q_d else p_d / q_d


def residual_distribution(p: np.ndarray, q: np.ndarray) -> np.ndarray:
    """normalize(max(p - q, 0))."""
    r = np.maximum(p - q, 0.0)
    return r / r.sum()


def coupled_window(drafts: list[int], draw: Callable[[int], int]) -> list[int]:
    """Deterministic drafts: accept while plain decoding's own draw agrees."""
    out = []
    for j, d in enumerate(drafts):
        token = draw(j)
        if token != d:
            return out + [token]
        out.append(d)
    return out + [draw(len(drafts))]


def run_window(drafts: list[int], accept_prob: Callable[[int], float],
               uniform: Callable[[int], float], sample_residual: Callable[[int], int],
               sample_bonus: Callable[[], int]) -> list[int]:
    """Leviathan-Chen control flow: accepted drafts, then one residual or bonus token."""
    out = []
    for j, d in enumerate(drafts):
        if uniform(j) < accept_prob(j):
            out.append(d)
            continue
        return out + [sample_residual(j)]
    return out + [sample_bonus()]


class _Window:
    """One row's verify window: position j's logits with the draft prefix counted."""

    def __init__(self, logits: np.ndarray, seq: Sequence, drafts: list[int],
                 masks: np.ndarray | None = None):
        self.logits, self.seq, self.drafts, self.masks = logits, seq, drafts, masks
        self.pos0 = seq.position

    def allowed(self, j: int) -> np.ndarray | None:
        return None if self.masks is None else self.masks[j]

    def _state(self, j: int) -> tuple[set[int], Counter]:
        seq = self.seq
        if not seq.params.has_penalties or j == 0:
            return seq.context, seq.output_counts
        prefix = self.drafts[:j]
        return seq.context | set(prefix), seq.output_counts + Counter(prefix)

    def draw(self, j: int) -> int:
        """The token plain decoding would draw at window position j."""
        context, counts = self._state(j)
        seq = self.seq
        return sample_token(self.logits[j], seq.params, seq.seed, self.pos0 + j, context, counts,
                            self.allowed(j))

    def p(self, j: int) -> np.ndarray:
        row = self.logits[j]
        if self.masks is not None:
            row = masked_logits(row, self.masks[j])
        if self.seq.params.has_penalties:
            row = apply_penalties(row, self.seq.params, *self._state(j))
        return target_probs(row, self.seq.params)


def verify_row(logits: np.ndarray, seq: Sequence, draft: Draft,
               masks: np.ndarray | None = None) -> list[int]:
    """Tokens one row emits from its verify window (logits: float32 [window, vocab];
    masks: the grammar's bool[len(drafts) + 1, vocab], or None)."""
    window = _Window(logits, seq, draft.tokens, masks)
    if draft.q_probs is None or seq.params.greedy:
        return coupled_window(draft.tokens, window.draw)
    p = {}
    q = draft.q_probs
    if masks is not None:
        q = [masked_distribution(q[j], masks[j]) for j in range(len(draft.tokens))]

    def p_at(j: int) -> np.ndarray:
        if j not in p:
            p[j] = window.p(j)
        return p[j]

    drafts, pos0 = draft.tokens, seq.position
    return run_window(
        drafts, lambda j: accept_probability(p_at(j)[drafts[j]], q[j][drafts[j]]),
        lambda j: keyed_uniform(seq.seed, pos0 + j, ROLE_ACCEPT),
        lambda j: sample_index(residual_distribution(p_at(j), q[j]),
                               keyed_uniform(seq.seed, pos0 + j, ROLE_RESIDUAL)),
        lambda: window.draw(len(drafts)))
