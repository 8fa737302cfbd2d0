"""Engine-side state of one request."""

from __future__ import annotations

import time
from collections import Counter
from dataclasses import dataclass, field
from enum import Enum

from ..handle import RequestHandle
from ..outputs import TokenLogprob
from ..sampling.params import SamplingParams
from ..sampling.text_stream import TextStream


class SeqStatus(Enum):
    WAITING = "waiting"  # queued, holds no cache
    PREFILLING = "prefilling"  # own single-row cache, prompt being computed in chunks
    RUNNING = "running"  # a row of the decode batch
    FINISHED = "finished"


@dataclass(eq=False)
class Sequence:
    request_id: str
    prompt_ids: list[int]
    params: SamplingParams
    seed: int
    handle: RequestHandle
    text: TextStream
    max_len: int  # context limit: prompt + output never exceed it
    source: str = "python"
    # A cache fill (cache/reply_fill.py): prefills a finished request's prompt + reply
    # into the prefix cache and never decodes or reaches a caller.
    fill_only: bool = False
    status: SeqStatus = SeqStatus.WAITING
    # Prompt tokens whose KV is in `cache`; the last prompt token is never
    # prefilled here, it is the first decode input (as in mlx-lm's generate).
    num_computed: int = 0
    cached_tokens: int = 0
    cache: list | None = None
    block_keys: list[str] = field(default_factory=list)  # prefix-cache keys of full prompt blocks
    blocks: list[dict] = field(default_factory=list)  # payloads of the blocks now in `cache`
    output_ids: list[int] = field(default_factory=list)
    output_counts: Counter = field(default_factory=Counter)
    logprobs: list[TokenLogprob] | None = None
    finish_reason: str | None = None
    matcher: object | None = None  # structured/matcher.RowMatcher when the output is constrained
    draft_state: dict = field(default_factory=dict)  # per drafter name: its per-request state
    acceptance: float = 0.5  # running estimate of P(a draft token is accepted)
    drafted_tokens: int = 0
    accepted_tokens: int = 0
    verify_calls: int = 0
    completion_tokens: int = 0  # output_ids plus a final EOS token, which is not shown
    t_submit: float = field(default_factory=time.perf_counter)
    t_prefill_start: float | None = None
    t_prefill_end: float | None = None
    t_first_token: float | None = None
    t_last_token: float | None = None

    def __post_init__(self) -> None:
        self.context = set(self.prompt_ids)  # for the repetition penalty
        if self.params.logprobs is not None:
            self.logprobs = []

    @property
    def prefill_target(self) -> int:
        return len(self.prompt_ids) - 1

    @property
    def prefill_remaining(self) -> int:
        return self.prefill_target - self.num_computed

    @property
    def last_token(self) -> int:
        return self.output_ids[-1] if self.output_ids else self.prompt_ids[-1]

    @property
    def position(self) -> int:
        """Absolute position of the next token this request will sample."""
        return len(self.prompt_ids) + len(self.output_ids)

    def append(self, token: int) -> None:
        self.output_ids.append(token)
        self.output_counts[token] += 1
        self.context.add(token)
