"""Executes forward passes. It only computes; the scheduler decides what.

Prompts are prefilled one request at a time into that request's own
single-row cache (mlx-lm's per-layer cache objects: full KV, rotating
sliding-window KV, recurrent arrays). A prefilled request then joins the decode
batch: its cache is merged into mlx-lm's batch caches (left-padded rows), and
every step decodes one token for all rows in a single forward pass.
"""

from __future__ import annotations

import mlx.core as mx
from mlx_lm.models.cache import make_prompt_cache


class ModelRunner:
    def __init__(self, model):
        self.model = model
        self.batch_cache: list | None = None  # one batch cache per layer

    def new_cache(self) -> list:
        return make_prompt_cache(self.model)

    def prefill(self, cache: list, tokens: list[int]) -> None:
        self.model(mx.array(tokens)[None], cache=cache)
        mx.eval([c.state for c in cache])

    def add_rows(self, caches: list[list]) -> None:
        """Append requests (each a per-layer list of single-row caches) as new batch rows."""
        merged = [type(layer[0]).merge(list(layer)) for layer in zip(*caches)]
        if self.batch_cache is None:
            self.batch_cache = merged
        else:
            for mine, new in zip(self.batch_cache, merged):
                mine.extend(new)

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
        """Logits [rows, vocab] for the next token of every row (lazy)."""
        logits = self.model(mx.array(tokens)[:, None], cache=self.batch_cache)
        return logits[:, -1, :]
