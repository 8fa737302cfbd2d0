"""Draft proposers for speculative decoding.

A drafter proposes up to `depth` next tokens per batch row. Deterministic
drafters (n-gram lookup) return no distribution: verification treats their
drafts as drawn from a one-hot q. Model drafters (MTP heads) also return the
log-distribution q each draft was sampled from, which exact verification needs.
"""

from __future__ import annotations

from dataclasses import dataclass

from .sequence import Sequence


@dataclass
class Draft:
    tokens: list[int]
    q_logprobs: list | None = None  # one float32 log-distribution per token, or None (one-hot)


class NgramDrafter:
    """Prompt lookup: continue the most recent earlier occurrence of the current suffix.

    Code edits and agent loops repeat long spans of their context, so the text
    after the last match of the trailing n-gram is often what comes next.
    """

    name = "ngram"
    deterministic = True

    def __init__(self, max_n: int = 4, min_n: int = 2):
        self.max_n, self.min_n = max_n, min_n

    def propose(self, rows: list[Sequence], depths: list[int]) -> list[Draft]:
        return [Draft(self._lookup(seq, k) if k > 0 else []) for seq, k in zip(rows, depths)]

    def _lookup(self, seq: Sequence, k: int) -> list[int]:
        tokens = seq.prompt_ids + seq.output_ids
        index = self._index(seq, tokens)
        for n in range(self.max_n, self.min_n - 1, -1):
            start = index[n].get(tuple(tokens[-n:]))
            if start is not None:
                return tokens[start:start + k]
        return []

    def _index(self, seq: Sequence, tokens: list[int]) -> dict[int, dict]:
        """n-gram -> where its latest earlier occurrence continues, updated incrementally.

        Only n-grams ending before the last token are indexed, so a lookup of the
        current suffix always finds an earlier occurrence, never itself.
        """
        state = seq.draft_state
        if state is None:
            state = seq.draft_state = {"upto": 0, **{n: {} for n in range(self.min_n, self.max_n + 1)}}
        for end in range(state["upto"], len(tokens) - 1):  # n-gram tokens[end-n+1 .. end]
            for n in range(self.min_n, self.max_n + 1):
                if end + 1 >= n:
                    state[n][tuple(tokens[end + 1 - n:end + 1])] = end + 1
        state["upto"] = max(state["upto"], len(tokens) - 1)
        return state


class NoDrafter:
    name = "none"
    deterministic = True

    def propose(self, rows: list[Sequence], depths: list[int]) -> list[Draft]:
        return [Draft([]) for _ in rows]
