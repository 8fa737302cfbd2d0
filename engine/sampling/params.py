"""Per-request sampling parameters, validated on construction."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

from ..errors import InvalidRequestError


@dataclass
class SamplingParams:
    max_tokens: int = 256
    temperature: float = 0.0  # 0 = greedy
    top_p: float = 1.0
    top_k: int = 0  # 0 = off
    min_p: float = 0.0
    repetition_penalty: float = 1.0  # HF style, over prompt and output tokens
    presence_penalty: float = 0.0  # OpenAI style, over output tokens
    frequency_penalty: float = 0.0
    seed: int | None = None  # None: a fresh random seed per request
    stop: list[str] = field(default_factory=list)
    logprobs: int | None = None  # None = off; n >= 0 = chosen token + top-n alternatives
    # Speculative decoding: draft depth for this request (None = the engine's choice,
    # 0 = plain decode); generation_mode "ar" forces plain autoregressive decoding.
    depth: int | None = None
    generation_mode: str = "auto"
    drafter: str | None = None  # "mtp" | "ngram" | "none" for this request; None = the engine's
    # Structured generation (engine/structured), at most one: the output must match it.
    json_schema: Any = None  # a JSON Schema dict, a pydantic model class, or True (any JSON object)
    regex: str | None = None
    choice: list[str] | None = None  # exactly one of these strings
    grammar: str | None = None  # Lark (llguidance's dialect) or GBNF text

    def __post_init__(self) -> None:
        if isinstance(self.stop, str):
            self.stop = [self.stop]
        self.stop = list(self.stop or [])
        _check(isinstance(self.max_tokens, int) and self.max_tokens >= 1,
               f"max_tokens must be an integer >= 1, got {self.max_tokens!r}")
        _check(_finite(self.temperature) and self.temperature >= 0,
               f"temperature must be a finite number >= 0, got {self.temperature!r}")
        _check(_finite(self.top_p) and 0 < self.top_p <= 1,
               f"top_p must be in (0, 1], got {self.top_p!r}")
        _check(isinstance(self.top_k, int) and self.top_k >= 0,
               f"top_k must be an integer >= 0, got {self.top_k!r}")
        _check(_finite(self.min_p) and 0 <= self.min_p < 1,
               f"min_p must be in [0, 1), got {self.min_p!r}")
        _check(_finite(self.repetition_penalty) and self.repetition_penalty > 0,
               f"repetition_penalty must be > 0, got {self.repetition_penalty!r}")
        for name in ("presence_penalty", "frequency_penalty"):
            value = getattr(self, name)
            _check(_finite(value) and -2 <= value <= 2, f"{name} must be in [-2, 2], got {value!r}")
        _check(self.seed is None or isinstance(self.seed, int),
               f"seed must be an integer or None, got {self.seed!r}")
        _check(all(isinstance(s, str) and s for s in self.stop),
               f"stop must be non-empty strings, got {self.stop!r}")
        _check(len(self.stop) <= 16, "at most 16 stop strings")
        _check(self.logprobs is None or (isinstance(self.logprobs, int) and 0 <= self.logprobs <= 20),
               f"logprobs must be None or an integer in [0, 20], got {self.logprobs!r}")
        _check(self.depth is None or (isinstance(self.depth, int) and 0 <= self.depth <= 16),
               f"depth must be None or an integer in [0, 16], got {self.depth!r}")
        _check(self.drafter in (None, "mtp", "ngram", "none"),
               f"drafter must be None, 'mtp', 'ngram' or 'none', got {self.drafter!r}")
        _check(self.generation_mode in ("auto", "ar"),
               f"generation_mode must be 'auto' or 'ar', got {self.generation_mode!r}")
        constraints = [n for n in ("json_schema", "regex", "choice", "grammar")
                       if getattr(self, n) is not None and getattr(self, n) is not False]
        _check(len(constraints) <= 1, f"at most one of json_schema, regex, choice and grammar, got {constraints}")
        if self.json_schema is False:
            self.json_schema = None
        for name in ("regex", "grammar"):
            value = getattr(self, name)
            _check(value is None or (isinstance(value, str) and value),
                   f"{name} must be a non-empty string, got {value!r}")
        if isinstance(self.choice, tuple):
            self.choice = list(self.choice)
        _check(self.choice is None or (isinstance(self.choice, list) and self.choice
                                       and all(isinstance(c, str) and c for c in self.choice)),
               f"choice must be a non-empty list of non-empty strings, got {self.choice!r}")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0

    @property
    def constrained(self) -> bool:
        return any(getattr(self, n) is not None for n in ("json_schema", "regex", "choice", "grammar"))

    @property
    def has_penalties(self) -> bool:
        return (self.repetition_penalty != 1.0 or self.presence_penalty != 0.0
                or self.frequency_penalty != 0.0)


def _finite(x) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


def _check(ok: bool, message: str) -> None:
    if not ok:
        raise InvalidRequestError(message)
