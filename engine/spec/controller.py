"""Chooses draft depth per row and keeps the speculation statistics.

Adaptive depth: each row keeps a running estimate a of the probability that a
draft token is accepted; a window of k drafts then emits (1 - a^(k+1)) / (1 - a)
tokens on average. The engine measures what a step costs for each (batch
size, window) it has run; the depth that maximises tokens per unit of cost
wins, and 0 wins when the batch is compute-bound (cost grows with the window
as fast as the expected tokens do).

Seeded sampled requests drafted by a model (an MTP head) are the exception: the
tokens Leviathan-Chen emits depend on the drafts (their law does not), so their
depth comes from their own acceptance with fixed prior costs, and the same seed
drafts, and so samples, the same way alone, in any batch, and on any run.
Deterministic drafts need no such care: verification emits exactly the tokens
plain decoding would (spec/verify.py).
"""

from __future__ import annotations

import statistics
from collections import deque

from ..config import EngineConfig
from ..core.sequence import Sequence

_EWMA = 0.2  # weight of a new observation of acceptance
_COST_SAMPLES = 9  # step costs are the median of the last few measurements per (batch, window)
_UNMEASURED_SLOPE = 0.05  # assumed extra cost per window token before a (batch, window) is measured
_EXPLORE_EVERY = 64  # steps; then the first row tries one draft more, so stale costs get re-measured


class SpeculationController:
    def __init__(self, config: EngineConfig, drafter_name: str):
        self.config = config
        self.drafter_name = drafter_name
        # (rows, window) -> recent step times in seconds. A median, not a running mean:
        # one step slowed by a neighbour process would otherwise rule a window out.
        self.step_cost: dict[tuple[int, int], deque] = {}
        # Their medians, updated with each sample: the depth choice reads them for every
        # row and depth of every step, and the floor in _cost() scans them all.
        self.median_cost: dict[tuple[int, int], float] = {}
        self.attempts = [0] * 16  # per draft position: drafts verified there
        self.accepts = [0] * 16
        self.verify_calls = 0
        self.drafted = 0
        self.accepted = 0
        self.spec_time = self.spec_tokens = 0.0
        self.plain_time = self.plain_tokens = 0.0
        self.last_depths: list[int] = []
        self.tuned_depth: int | None = None  # set by Engine.tune()
        self._after_window: tuple[int, int] | None = None  # (batch, window) of the last verify step
        self._steps = 0

    # -- decisions --------------------------------------------------------------
    def depths(self, rows: list[Sequence], drafters: list) -> list[int]:
        """Draft depth per row, given each row's drafter (rows with NoDrafter get 0)."""
        self._steps += 1
        explore = self._steps % _EXPLORE_EVERY == 0  # one row, once in a while: the window
        # cost applies to the whole batch, so exploring more often would tax every row
        depths = []
        for seq, drafter in zip(rows, drafters):
            if drafter.name == "none":
                depths.append(0)
                continue
            pinned = _reproducible(seq.params) and not drafter.deterministic
            depths.append(self._depth(seq, len(rows), explore, pinned))
            explore = False
        self.last_depths = depths
        return depths

    def _depth(self, seq: Sequence, batch: int, explore: bool = False, pinned: bool = False) -> int:
        params = seq.params
        room = min(params.max_tokens - len(seq.output_ids), seq.max_len - seq.position) - 1
        if params.generation_mode == "ar" or room <= 0:
            return 0
        if params.depth is not None:
            return min(params.depth, room)
        if self.config.depth != "auto":
            return min(self.config.depth, room)
        limit = min(self.tuned_depth if self.tuned_depth is not None else self.config.max_depth,
                    self.config.max_depth, room)
        if pinned:
            # A seeded request drafted by a model: its sampled path depends on the drafts
            # (the law does not), so it must draft the same way every time. Its depth
            # follows its own acceptance only, never measured timings or its neighbours.
            return self.best_depth(seq.acceptance, None, limit)
        best = self.best_depth(seq.acceptance, batch, limit)
        if explore:
            # A cost measured during a noisy moment would otherwise rule a depth
            # out for good: now and then, measure one draft more than the best.
            return min(best + 1, limit)
        return best

    def cap_drafts(self, rows: list[Sequence], drafts: list) -> None:
        """Trim the drafts of adaptive rows to the batch's best window (in place).
        Rows with an explicit depth, or seeded rows with sampled drafts, keep theirs."""
        if len(rows) < 2 or self.config.depth != "auto":
            return
        cap = self.window_cap(rows, [len(d.tokens) for d in drafts])
        for seq, d in zip(rows, drafts):
            pinned = _reproducible(seq.params) and d.q_probs is not None
            if len(d.tokens) > cap and seq.params.depth is None and not pinned:
                d.tokens = d.tokens[:cap]
                if d.q_probs is not None:
                    d.q_probs = d.q_probs[:cap] or None

    def window_cap(self, rows: list[Sequence], drafted: list[int]) -> int:
        """The most drafts any row may keep this step, decided for the whole batch.

        A window's cost falls on every row while only rows with drafts gain, so with
        the drafts in hand, pick the cap that maximises the batch's expected tokens
        per measured step cost (the engine leaves rows with an explicit depth and
        seeded rows with sampled drafts uncapped).
        """
        longest = max(drafted)
        best_cap, best_rate = longest, -1.0
        for cap in range(longest + 1):
            tokens = 0.0
            for seq, k in zip(rows, drafted):
                a, k = min(seq.acceptance, 0.999), min(k, cap)
                tokens += (1 - a ** (k + 1)) / (1 - a)
            rate = tokens / self._cost(len(rows), cap + 1)
            if rate > best_rate * 1.02:
                best_cap, best_rate = cap, rate
        return best_cap

    def best_depth(self, acceptance: float, batch: int | None, limit: int) -> int:
        """Depth maximising expected tokens per cost; batch=None uses the fixed prior costs."""
        base = self._cost(batch, 1)
        best, best_rate = 0, 1.0 / base
        a = min(acceptance, 0.999)
        for k in range(1, limit + 1):
            rate = ((1 - a ** (k + 1)) / (1 - a)) / self._cost(batch, k + 1)
            if rate > best_rate * 1.02:  # a margin against noise in the cost table
                best, best_rate = k, rate
        return best

    def _cost(self, batch: int | None, window: int) -> float:
        measured = self.median_cost.get((batch, window))
        if measured is not None:
            return measured
        base = self.median_cost.get((batch, 1), 1.0)
        guess = base * (1 + _UNMEASURED_SLOPE * (window - 1))
        if batch is None:
            return guess
        # A forward over more rows (batch x window) costs at least what a measured one
        # over fewer rows did. Without this floor every new batch size would try long
        # windows at the optimistic slope, which a batch that is compute-bound pays for.
        rows = batch * window
        floor = max((cost for (b, w), cost in self.median_cost.items()
                     if b is not None and b * w <= rows), default=0.0)
        return max(guess, floor)

    # -- observations -----------------------------------------------------------
    def observe_step(self, batch: int, window: int, seconds: float, tokens: int) -> None:
        after, self._after_window = self._after_window, (batch, window) if window > 1 else None
        if window == 1 and after is not None and after[0] == batch and self.step_cost.get((batch, 1)):
            # The first plain step after a verify window pays to re-lay out the sliding-window
            # caches (a multi-token update leaves mlx-lm's rotating cache a longer buffer, which
            # the next one-token update copies). That cost belongs to the window, not to plain
            # decoding, or plain steps would look dearer whenever speculation runs.
            extra = seconds - self._cost(batch, 1)
            if extra > 0:
                self.step_cost[after][-1] += extra
                self.median_cost[after] = statistics.median(self.step_cost[after])
                self.spec_time += extra
                seconds -= extra
        samples = self.step_cost.setdefault((batch, window), deque(maxlen=_COST_SAMPLES))
        samples.append(seconds)
        self.median_cost[batch, window] = statistics.median(samples)
        if window > 1:
            self.spec_time += seconds
            self.spec_tokens += tokens
        else:
            self.plain_time += seconds
            self.plain_tokens += tokens

    def observe_row(self, seq: Sequence, drafted: int, accepted: int) -> None:
        if drafted == 0:
            return
        self.verify_calls += 1
        self.drafted += drafted
        self.accepted += accepted
        seq.verify_calls += 1
        seq.drafted_tokens += drafted
        seq.accepted_tokens += accepted
        for j in range(min(accepted + 1, drafted)):
            self.attempts[j] += 1
            self.accepts[j] += j < accepted
        # Per-token acceptance seen in this window (a rejection ends the window).
        observed = accepted / (accepted + (accepted < drafted))
        seq.acceptance = (1 - _EWMA) * seq.acceptance + _EWMA * observed

    def metrics(self) -> dict:
        positions = [a / n for a, n in zip(self.accepts, self.attempts) if n]
        return {
            "spec_drafter": self.drafter_name,
            "spec_depth": self.config.depth,
            "spec_row_depths": list(self.last_depths),
            "spec_acceptance_per_position": positions,
            "spec_mean_accepted": self.accepted / self.verify_calls if self.verify_calls else 0.0,
            "spec_verify_calls": self.verify_calls,
            "spec_drafted_tokens": self.drafted,
            "spec_accepted_tokens": self.accepted,
            "spec_decode_tps": self.spec_tokens / self.spec_time if self.spec_time else 0.0,
            "plain_decode_tps": self.plain_tokens / self.plain_time if self.plain_time else 0.0,
        }


def _reproducible(params) -> bool:
    """A seeded sampled request (whose model drafts must not depend on timing or neighbours)."""
    return params.seed is not None and not params.greedy
