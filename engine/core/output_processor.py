"""Turns a step's sampled tokens into what callers see: text deltas, logprobs,
stop and length checks, the final Completion with its usage. Runs on the MLX
thread after each forward; it never touches MLX itself.
"""

from __future__ import annotations

import time

import numpy as np

from ..metrics import EngineMetrics
from ..outputs import Completion, Delta, TokenLogprob, Usage
from ..sampling.sampler import top_logprobs
from .sequence import SeqStatus, Sequence


class OutputProcessor:
    def __init__(self, tokenizer, metrics: EngineMetrics):
        self.tokenizer = tokenizer
        self.eos = set(tokenizer.eos_token_ids)
        self.metrics = metrics

    @staticmethod
    def logprobs(seq: Sequence, logits: np.ndarray) -> tuple | None:
        n = seq.params.logprobs
        return top_logprobs(logits, n) if n is not None else None

    def emit(self, seq: Sequence, tokens: list[int], logprob_infos: list, now: float,
             grammar_done: bool = False) -> None:
        """Deliver this step's tokens of one row, stopping at the first that ends it
        (grammar_done: the last token completed the row's grammar, which ends it too)."""
        if seq.t_first_token is None:
            seq.t_first_token = now
            self.metrics.ttft(now - seq.t_submit)
        seq.t_last_token = now
        delta = Delta("", [])
        for token, info in zip(tokens, logprob_infos):
            seq.completion_tokens += 1
            if token in self.eos:
                self.finish(seq, "stop", delta)
                return
            seq.append(token)
            delta.text += seq.text.add(token)
            delta.token_ids.append(token)
            if info is not None:
                entry = self._token_logprob(token, *info)
                delta.logprobs = (delta.logprobs or []) + [entry]
                seq.logprobs.append(entry)
            if seq.text.stopped:
                self.finish(seq, "stop", delta)
                return
            if len(seq.output_ids) >= seq.params.max_tokens or seq.position >= seq.max_len:
                self.finish(seq, "length", delta)
                return
        if grammar_done:
            self.finish(seq, "stop", delta)
            return
        seq.handle._push(delta)

    def _token_logprob(self, token: int, logprobs: np.ndarray, top_ids: list[int]) -> TokenLogprob:
        decode = self.tokenizer.decode
        return TokenLogprob(token, decode([token]), float(logprobs[token]),
                            [(t, decode([t]), float(logprobs[t])) for t in top_ids])

    def finish(self, seq: Sequence, reason: str, delta: Delta) -> None:
        delta.text += seq.text.finish()
        delta.finish_reason = reason
        seq.status = SeqStatus.FINISHED
        seq.finish_reason = reason
        seq.cache = None
        usage = usage_of(seq)
        delta.usage = usage
        name = {"cancelled": "requests_cancelled"}.get(reason, "requests_completed")
        self.metrics.count(name)
        completion = Completion(text=seq.text.text, token_ids=list(seq.output_ids),
                                finish_reason=reason, usage=usage, logprobs=seq.logprobs,
                                request_id=seq.request_id)
        if seq.matcher is not None and reason != "cancelled":
            try:
                completion.parsed = seq.matcher.constraint.parse(completion.text)
            except ValueError as e:  # json's and pydantic's errors are ValueErrors
                completion.error = (f"the output does not parse ({reason}): "
                                    f"{type(e).__name__}: {str(e)[:300]}")
        seq.handle._push(delta, completion=completion)

    def fail(self, seq: Sequence, error: Exception) -> None:
        seq.status = SeqStatus.FINISHED
        seq.cache = None
        if not seq.fill_only:  # a cache fill has no caller: it is just not cached
            self.metrics.count("requests_failed")
        seq.handle._fail(error)


def usage_of(seq: Sequence) -> Usage:
    end = seq.t_last_token or time.perf_counter()
    prefill_s = (seq.t_prefill_end or 0) - (seq.t_prefill_start or 0)
    computed = seq.num_computed - seq.cached_tokens
    decode_s = end - (seq.t_first_token or end)
    return Usage(
        prompt_tokens=len(seq.prompt_ids), completion_tokens=seq.completion_tokens,
        cached_tokens=seq.cached_tokens,
        ttft_s=(seq.t_first_token - seq.t_submit) if seq.t_first_token else 0.0,
        prefill_tps=computed / prefill_s if prefill_s > 0 else 0.0,
        decode_tps=(seq.completion_tokens - 1) / decode_s if decode_s > 0 else 0.0,
        total_s=end - seq.t_submit, draft_tokens=seq.drafted_tokens,
        accepted_tokens=seq.accepted_tokens, verify_calls=seq.verify_calls)
