"""What a request returns: streamed deltas and the final Completion."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any


@dataclass
class TokenLogprob:
    token_id: int
    token: str
    logprob: float
    top: list[tuple[int, str, float]] = field(default_factory=list)  # (id, text, logprob)


@dataclass
class Usage:
    prompt_tokens: int = 0
    completion_tokens: int = 0
    cached_tokens: int = 0  # prompt tokens served from the prefix cache
    ttft_s: float = 0.0  # submit -> first token
    prefill_tps: float = 0.0  # prompt tokens computed per second
    decode_tps: float = 0.0  # tokens per second after the first
    total_s: float = 0.0
    # Speculative decoding: drafts proposed and accepted, verify windows run.
    draft_tokens: int = 0
    accepted_tokens: int = 0
    verify_calls: int = 0

    @property
    def acceptance_rate(self) -> float | None:
        """Share of draft tokens accepted (None when nothing was drafted)."""
        return self.accepted_tokens / self.draft_tokens if self.draft_tokens else None

    @property
    def total_tokens(self) -> int:
        return self.prompt_tokens + self.completion_tokens


@dataclass
class Delta:
    """One streamed step of a request: new text and the tokens behind it."""

    text: str
    token_ids: list[int]
    logprobs: list[TokenLogprob] | None = None
    finish_reason: str | None = None  # set on the last delta: "stop", "length" or "cancelled"
    usage: Usage | None = None  # set on the last delta


@dataclass
class Completion:
    text: str
    token_ids: list[int]
    finish_reason: str
    usage: Usage
    logprobs: list[TokenLogprob] | None = None
    request_id: str = ""
    # With a constraint: the output parsed (a pydantic object for a pydantic schema,
    # JSON values for a dict schema, the text for regex/choice/grammar). When it
    # could not be (cut at max_tokens), parsed is None and error says why.
    parsed: Any = None
    # Why this request produced no usable result (engine.map keeps failed rows so).
    error: str | None = None
