"""One row's grammar state, and the tokenizer view llguidance needs."""

from __future__ import annotations

import threading

import llguidance
import llguidance.hf

from ..errors import EngineError, InvalidRequestError
from .constraint import Constraint, check


class GrammarError(EngineError):
    """A row's output left its grammar (a sampler or mask bug; the row fails)."""


class GrammarTokenizer:
    """The model's tokenizer as llguidance sees it (token bytes, EOS), built on first use:
    it takes seconds on a 262k vocabulary, which requests without constraints never pay.
    The last one built is kept per process by `key` (the model's fingerprint), so reloading the
    same model in a notebook does not pay again."""

    _built: dict = {}
    _lock = threading.Lock()

    def __init__(self, tokenizer, vocab_size: int, key: str = ""):
        self._tokenizer, self.vocab_size = tokenizer, vocab_size
        self._key = (key, vocab_size, tuple(sorted(tokenizer.eos_token_ids))) if key else None
        self._ll: llguidance.LLTokenizer | None = None

    @property
    def ll(self) -> llguidance.LLTokenizer:
        with self._lock:
            if self._ll is None:
                self._ll = self._built.get(self._key) if self._key else None
            if self._ll is None:
                hf = getattr(self._tokenizer, "_tokenizer", self._tokenizer)
                self._ll = llguidance.hf.from_tokenizer(
                    hf, n_vocab=self.vocab_size, eos_token=sorted(self._tokenizer.eos_token_ids))
                if self._key:
                    GrammarTokenizer._built = {self._key: self._ll}  # one model's at a time
            return self._ll


class RowMatcher:
    """Advanced with every emitted token; the mask of the next token is read from it
    (masks.py). Drafts are checked against it without changing it."""

    def __init__(self, tokenizer: GrammarTokenizer, constraint: Constraint):
        check(constraint, tokenizer.ll)
        self.constraint = constraint
        self.matcher = llguidance.LLMatcher(tokenizer.ll, constraint.grammar, log_level=0)
        if self.matcher.is_error():
            raise InvalidRequestError(f"invalid {constraint.kind}: {self.matcher.get_error()}")

    def valid_prefix(self, tokens: list[int]) -> int:
        """How many leading tokens the grammar accepts from here (the state is unchanged)."""
        return self.matcher.validate_tokens(tokens) if tokens else 0

    def advance(self, tokens: list[int]) -> int:
        """Consume emitted tokens; returns how many belong to the output: all of them,
        or up to the one that completed the grammar."""
        for k, token in enumerate(tokens):
            if not self.matcher.consume_token(token):
                raise GrammarError(f"token {token} left the {self.constraint.kind} constraint: "
                                   f"{self.matcher.get_error()}")
            if self.matcher.is_stopped():
                return k + 1
        return len(tokens)

    @property
    def done(self) -> bool:
        """The grammar admits nothing more: the request ends here."""
        return self.matcher.is_stopped()
