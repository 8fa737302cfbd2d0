"""Draft proposers for speculative decoding.

A drafter proposes up to `depth` next tokens per batch row. Deterministic
drafters (n-gram lookup) return no distribution: verification treats their
drafts as drawn from a one-hot q. Model drafters (MTP heads) also return the
distribution q each draft was sampled from, which exact verification needs.
"""

from __future__ import annotations

from dataclasses import dataclass

import mlx.core as mx
import numpy as np

from ..cache.handlers import rollback
from ..core.sequence import Sequence
from ..errors import NoDraftHeadError
from ..sampling.sampler import ROLE_DRAFT, keyed_uniform, sample_index, target_probs


@dataclass
class Draft:
    tokens: list[int]
    q_probs: list | None = None  # one float64 distribution per token, or None (one-hot)


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
        state = seq.draft_state.get("ngram")
        if state is None:
            state = seq.draft_state["ngram"] = {"upto": 0, **{n: {} for n in range(self.min_n, self.max_n + 1)}}
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


class MTPDrafter:
    """Drafts with a Multi-Token-Prediction head (native mtp.* weights or a trained head).

    The head's position t reads the trunk's hidden state at t and the token at t+1,
    and predicts the token at t+2. After every step, each row's newly committed
    (hidden, next token) pairs are pending; propose() feeds them to the head's own
    KV cache in one batched pass, whose last output drafts token 1; depth > 1
    chains the head on its own output, and those chained positions are trimmed
    from its cache again (they are not committed).
    """

    name = "mtp"
    deterministic = False

    def __init__(self, runner):
        self.runner = runner
        self.head = runner.head

    @staticmethod
    def observe(rows: list[Sequence], emitted: list[list[int]], hidden) -> None:
        """Queue each row's newly committed pairs (hidden: [rows, window, D]) for the head."""
        for i, (seq, tokens) in enumerate(zip(rows, emitted)):
            new = hidden[i, :len(tokens)]
            old = seq.draft_state.get("mtp")
            if old is not None:  # steps without drafting still feed the head later
                new, tokens = mx.concatenate([old["hidden"], new]), old["tokens"] + tokens
            seq.draft_state["mtp"] = {"hidden": new, "tokens": tokens}

    def propose(self, rows: list[Sequence], depths: list[int]) -> list[Draft]:
        head_cache = self.runner.batch_cache[self.runner.n_trunk:]
        pending = [seq.draft_state.pop("mtp", None) or {"hidden": None, "tokens": []} for seq in rows]
        counts = [len(p["tokens"]) for p in pending]
        window = max(counts)
        if window == 0:
            return [Draft([]) for _ in rows]
        dim = self.head.hidden_size
        hidden = mx.stack([mx.concatenate([p["hidden"], mx.zeros((window - n, dim), p["hidden"].dtype)])
                           if n else mx.zeros((window, dim)) for p, n in zip(pending, counts)])
        tokens = mx.array([p["tokens"] + [0] * (window - n) for p, n in zip(pending, counts)])
        logits, out = self.head(hidden, tokens, head_cache)
        rollback(head_cache, counts, window, [])  # keep only the real pairs
        last = mx.array([max(n - 1, 0) for n in counts])
        logits = mx.take_along_axis(logits, last[:, None, None], axis=1)[:, 0]
        out = mx.take_along_axis(out, last[:, None, None], axis=1)
        active = [i for i, (n, k) in enumerate(zip(counts, depths)) if n and k]
        steps = max((depths[i] for i in active), default=0)
        drafts = [Draft([], None if rows[i].params.greedy else []) for i in range(len(rows))]
        for step in range(steps):
            drafting = [i for i in active if step < depths[i]]
            sampled = [i for i in drafting if not rows[i].params.greedy]
            argmax = mx.argmax(logits, axis=-1)
            host = np.array(logits[mx.array(sampled)].astype(mx.float32)) if sampled else None
            argmax = argmax.tolist()
            picks = [d.tokens[-1] if d.tokens else 0 for d in drafts]
            for i in drafting:
                seq = rows[i]
                if seq.params.greedy:
                    tok = argmax[i]
                else:
                    q = target_probs(host[sampled.index(i)], seq.params)
                    tok = sample_index(q, keyed_uniform(seq.seed, seq.position + step, ROLE_DRAFT))
                    drafts[i].q_probs.append(q)
                drafts[i].tokens.append(tok)
                picks[i] = tok
            if step + 1 < steps:
                logits, out = self.head(out, mx.array(picks)[:, None], head_cache)
                logits = logits[:, 0]
        if steps > 1:
            mx.eval([c.state for c in head_cache])
            for c in head_cache:
                c.trim(steps - 1)
        return [d if d.tokens else Draft([]) for d in drafts]


class DrafterPool:
    """The engine's drafters by name, made on first use; requests may pick their own."""

    def __init__(self, runner, model_name: str):
        self.runner, self.model_name = runner, model_name
        self._made: dict = {}

    def get(self, name: str):
        if name == "auto":
            name = "mtp" if self.runner.head is not None else "ngram"
        if name == "mtp" and self.runner.head is None:
            raise NoDraftHeadError(
                f"{self.model_name} was loaded without an MTP head: load it with "
                "EngineConfig(drafter='mtp') to draft with one")
        if name not in self._made:
            self._made[name] = {"ngram": NgramDrafter, "none": NoDrafter,
                                "mtp": lambda: MTPDrafter(self.runner)}[name]()
        return self._made[name]
