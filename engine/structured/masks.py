"""Next-token masks: computed beside the forward, applied on the host.

A mask is llguidance's bitmask (one bit per vocabulary id, int32 words). Masks for
a step are computed on a helper thread, started just before the forward and read
just after it: llguidance releases the GIL, the forward runs in MLX on the engine
thread, so on a multi-core machine the mask costs no wall time. For a verify
window the row's masks at positions 0..len(draft) are computed with the matcher
advanced through each draft prefix, then rolled back to where it was.
"""

from __future__ import annotations

from concurrent.futures import Future, ThreadPoolExecutor

import llguidance.numpy as llnp
import numpy as np


def allowed(bitmask: np.ndarray, vocab: int) -> np.ndarray:
    """bool[vocab]: the tokens one bitmask row permits."""
    return np.unpackbits(bitmask.view(np.uint8), bitorder="little", count=vocab).view(bool)


def masked_logits(logits: np.ndarray, ok: np.ndarray) -> np.ndarray:
    """The logits row with forbidden tokens at -inf (before penalties and sampling)."""
    return np.where(ok, logits, np.float32(-np.inf)).astype(np.float32, copy=False)


def masked_distribution(q: np.ndarray, ok: np.ndarray) -> np.ndarray:
    """q restricted to permitted tokens and renormalized. Drafts are cut at the first
    forbidden token, so a kept draft was in effect drawn from this (spec/verify.py)."""
    q = np.where(ok, q, 0.0)
    return q / q.sum()


class StepMasks:
    """This step's masks: row index -> bool[positions, vocab] (position j: after the
    row's first j drafts). Rows without a constraint have none."""

    def __init__(self, future: Future | None, slots: dict[int, tuple[int, int]],
                 bitmask: np.ndarray | None, vocab: int):
        self._future, self._slots, self._bitmask, self._vocab = future, slots, bitmask, vocab
        self._rows: dict[int, np.ndarray] = {}

    def wait(self) -> "StepMasks":
        if self._future is not None:
            self._future.result()
            self._future = None
        return self

    def row(self, i: int) -> np.ndarray | None:
        if i not in self._slots:
            return None
        if i not in self._rows:
            self.wait()
            start, n = self._slots[i]
            self._rows[i] = np.stack([allowed(self._bitmask[start + j], self._vocab) for j in range(n)])
        return self._rows[i]


NO_MASKS = StepMasks(None, {}, None, 0)


class MaskComputer:
    """Starts each step's mask computation on one helper thread."""

    def __init__(self, vocab: int):
        self.vocab = vocab
        self._thread = ThreadPoolExecutor(1, thread_name_prefix="kernelext-grammar-masks")
        self._last: StepMasks = NO_MASKS

    def start(self, matchers: list, drafts: list[list[int]]) -> StepMasks:
        """matchers[i]: row i's RowMatcher or None; drafts[i]: its (already cut) draft."""
        self._last.wait()  # a step that failed may have left one running on these matchers
        jobs, slots, offset = [], {}, 0
        for i, (m, draft) in enumerate(zip(matchers, drafts)):
            if m is not None:
                jobs.append((m.matcher, offset, list(draft)))
                slots[i] = (offset, len(draft) + 1)
                offset += len(draft) + 1
        if not jobs:
            return NO_MASKS
        bitmask = llnp.allocate_token_bitmask(offset, self.vocab)
        self._last = StepMasks(self._thread.submit(self._fill, jobs, bitmask), slots, bitmask,
                               self.vocab)
        return self._last

    @staticmethod
    def _fill(jobs: list, bitmask: np.ndarray) -> None:
        """Row by row on this one thread. llguidance's parallel executor (a rayon pool)
        measured 2-3x slower for 8 rows on a busy 2-core machine than this loop, and its
        workers compete with the forward for the same cores."""
        for matcher, k, draft in jobs:
            llnp.fill_next_token_bitmask(matcher, bitmask, k)
            consumed = 0
            for j, token in enumerate(draft):  # the masks after each draft prefix
                if matcher.is_stopped():  # the grammar ended inside the draft: only EOS from here
                    bitmask[k + j + 1] = bitmask[k + j]
                    continue
                matcher.consume_token(token)
                consumed += 1
                llnp.fill_next_token_bitmask(matcher, bitmask, k + j + 1)
            if consumed:
                matcher.rollback(consumed)

    def close(self) -> None:
        self._last.wait()
        self._thread.shutdown(wait=False)
