"""Executes forward passes. It only computes; the scheduler decides what.

Prompts are prefilled one request at a time into that request's own
single-row cache (mlx-lm's per-layer cache objects: full KV, rotating
sliding-window KV, recurrent arrays). A prefilled request then joins the decode
batch: its cache is merged into mlx-lm's batch caches (left-padded rows), and
every step decodes one token for all rows in a single forward pass.

With an MTP draft head, each request's cache list is the trunk's layers
followed by the head's own layer(s), so the prefix cache and the batch treat
the head's KV like any other layer; forwards then also keep the trunk's final
hidden states, which the head consumes.

A chunk-invariant model (models/loader.py's `chunk_invariant`: quantized CPU kernels and
exact attention) leaves the same KV bits however a prompt is split into prefill calls, so
the engine may prefill it in large chunks; with a draft head it may not (the head's float
products depend on the row count). Its caches hold float16 KV unless the config says
float32 (`kv_dtype`): every forward stores through `row_attention.storing_kv`.
"""

from __future__ import annotations

import mlx.core as mx
from mlx_lm.models.cache import ArraysCache, make_prompt_cache

from ..cache.handlers import rollback
from ..models import row_attention
from ..models.loader import decode_products
from ..spec.mtp_head import trunk_forward
from ..cache.recurrent_capture import RecurrentCapture


class ModelRunner:
    def __init__(self, model, head=None, chunk_invariant: bool = False, kv_dtype: str = "auto"):
        self.model = model
        self.head = head
        self._exact_prefill = chunk_invariant
        self.chunk_invariant = chunk_invariant and head is None
        # The KV caches' type where it is not the activations': a chunk-invariant model's
        # exact attention reads float16 as it is (a head's caches would be written outside).
        self.kv_dtype = mx.float16 if self.chunk_invariant and kv_dtype == "auto" else None
        self.n_trunk = len(make_prompt_cache(model))  # trunk layers come first in every cache list
        self.batch_cache: list | None = None  # one batch cache per layer
        self.hidden: mx.array | None = None  # trunk hidden states of the last decode/verify
        self.capture = RecurrentCapture(model)
        self._saved: list | None = None  # cache state before an uncommitted verify

    def new_cache(self) -> list:
        cache = make_prompt_cache(self.model)
        return cache + self.head.make_cache() if self.head is not None else cache

    def _forward(self, inputs: mx.array, cache: list) -> mx.array:
        with row_attention.storing_kv(self.kv_dtype):
            if self.head is None:
                return self.model(inputs, cache=cache)
            logits, self.hidden = trunk_forward(self.model, inputs, cache[:self.n_trunk])
        return logits

    def prefill(self, cache: list, tokens: list[int], next_tokens: list[int]) -> None:
        """Compute `tokens` into `cache`; `next_tokens` (each token's successor) feed the head."""
        with row_attention.exact(self.model if self._exact_prefill else None):
            self._forward(mx.array(tokens)[None], cache)
        if self.head is not None:
            self.head(self.hidden, mx.array(next_tokens)[None], cache[self.n_trunk:])
        mx.eval([c.state for c in cache])

    def add_rows(self, caches: list[list]) -> None:
        """Append requests (each a per-layer list of single-row caches) as new batch rows."""
        merged = [type(layer[0]).merge(list(layer)) for layer in zip(*caches)]
        if self.batch_cache is None:
            self.batch_cache = merged
        else:
            for mine, new in zip(self.batch_cache, merged):
                mine.extend(new)

    def row_cache(self, row: int) -> list:
        """Batch row `row` as single-row caches (its keys in time order, no padding)."""
        return [c.extract(row) for c in self.batch_cache]

    def keep_rows(self, rows: list[int]) -> None:
        if not rows:
            self.batch_cache = None
            return
        for c in self.batch_cache:
            c.filter(rows)

    def reset(self) -> None:
        self.batch_cache = None
        mx.clear_cache()

    def decode(self, tokens: list[int]) -> mx.array:
        """Logits [rows, vocab] for the next token of every row."""
        with decode_products(self.model):
            logits = self._forward(mx.array(tokens)[:, None], self.batch_cache)
        return logits[:, -1, :]

    # -- speculative verification: nothing is final until commit() ------------
    def verify(self, windows: list[list[int]]) -> mx.array:
        """Logits [rows, window, vocab] for equal-length windows (last token + drafts)."""
        self._saved = [_snapshot(c) for c in self.batch_cache]
        try:
            with self.capture, decode_products(self.model):
                logits = self._forward(mx.array(windows), self.batch_cache)
            mx.eval(logits, self.hidden)
        except BaseException:
            self.abort()
            raise
        return logits

    def commit(self, keep: list[int], window: int) -> None:
        """Keep the first keep[i] window positions of row i in every layer's cache."""
        try:
            rollback(self.batch_cache[:self.n_trunk], keep, window, self.capture.records)
            mx.eval([c.state for c in self.batch_cache])
        except BaseException:
            self.abort()
            raise
        self._saved = None
        self.capture.records = []

    def abort(self) -> None:
        """Put the caches back as they were before verify()."""
        if self._saved is not None:
            for c, state in zip(self.batch_cache, self._saved):
                c.state = state
        self._saved = None
        self.capture.records = []


def _snapshot(cache):
    """The cache's state, detached: `a -= 1` and `a[i] = x` mutate an mx.array's Python
    object in place, so every array gets a wrapper of its own (the data is shared)."""
    if isinstance(cache, ArraysCache):
        state = [list(cache.cache), cache.left_padding, cache.lengths]
    else:
        state = list(cache.state)
    return [_detach(x) for x in state]


def _detach(x):
    if isinstance(x, list):
        return [_detach(v) for v in x]
    return mx.array(x) if isinstance(x, mx.array) else x
