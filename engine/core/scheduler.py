"""Decides what each engine step computes. It never touches MLX.

Every running request decodes one token per step. Whatever remains of the
step's token budget goes to prompt chunks of requests still prefilling (first
come, first served), so a long prompt is spread over several steps instead of
freezing the streams that are already generating.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field

from ..config import EngineConfig
from .sequence import Sequence, SeqStatus


@dataclass
class StepPlan:
    # (request, token budget): prompt tokens to compute, cached blocks restored for free
    prefill: list[tuple[Sequence, int]] = field(default_factory=list)


class Scheduler:
    def __init__(self, config: EngineConfig):
        self.config = config
        self.waiting: deque[Sequence] = deque()
        self.prefilling: list[Sequence] = []
        self.running: list[Sequence] = []  # order = rows of the decode batch
        self.filling: list[Sequence] = []  # cache fills (cache/reply_fill.py): no batch slot

    def add(self, seq: Sequence) -> None:
        (self.filling if seq.fill_only else self.waiting).append(seq)

    def has_work(self) -> bool:
        return bool(self.waiting or self.prefilling or self.running or self.filling)

    def active(self) -> list[Sequence]:
        return [*self.waiting, *self.prefilling, *self.running, *self.filling]

    def schedule(self) -> StepPlan:
        slots = self.config.max_batch - len(self.running) - len(self.prefilling)
        while slots > 0 and self.waiting:
            seq = self.waiting.popleft()
            seq.status = SeqStatus.PREFILLING
            self.prefilling.append(seq)
            slots -= 1
        plan = StepPlan()
        budget = self.config.step_token_budget - len(self.running)
        block = self.config.block_size
        # Cache fills first: each is at most a block plus a reply, and the request that
        # needs it (an agent's next turn) then restores its blocks in the same step.
        for seq in [*self.filling, *self.prefilling]:
            # Every prefilling request is visited, even with no budget left: restoring
            # cached blocks costs no compute, and a fully cached prompt can join now.
            n = min(seq.prefill_remaining, budget)
            if n < seq.prefill_remaining:
                n -= n % block  # whole blocks only, except a prompt's final partial block
            plan.prefill.append((seq, n))
            budget -= n
        return plan

    def join_ready(self) -> list[Sequence]:
        """Move fully prefilled requests into the decode batch; returns them."""
        ready = [s for s in self.prefilling
                 if s.prefill_remaining == 0 and s.status is SeqStatus.PREFILLING]
        for seq in ready:
            self.prefilling.remove(seq)
            seq.status = SeqStatus.RUNNING
            self.running.append(seq)
        return ready

    def remove_finished(self) -> list[int] | None:
        """Drop finished requests; returns the batch rows to keep, or None if all rows stay."""
        self.waiting = deque(s for s in self.waiting if s.status is not SeqStatus.FINISHED)
        self.prefilling = [s for s in self.prefilling if s.status is not SeqStatus.FINISHED]
        self.filling = [s for s in self.filling if s.status is not SeqStatus.FINISHED]
        keep = [i for i, s in enumerate(self.running) if s.status is not SeqStatus.FINISHED]
        if len(keep) == len(self.running):
            return None
        self.running = [self.running[i] for i in keep]
        return keep
