"""PoolingEngine: the caller's side of an embedding or reranking model (thread-safe,
no MLX). It tokenizes on the caller's thread and posts jobs to its EmbedCore on the
one MLX thread (core/worker.py), which steps it beside every generation core.

    emb = PoolingEngine.load("all-minilm-l6-v2")
    vectors = emb.embed(["a text", "another"])          # numpy [2, 384]
    rr = PoolingEngine.load("path/to/cross-encoder")
    rr.rerank("query", ["doc a", "doc b"], top_n=1)    # [RerankResult(index, score)]
"""

from __future__ import annotations

import asyncio
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from tqdm.auto import tqdm

from ..config import EngineConfig
from ..errors import InvalidRequestError
from ..front import CoreFront
from ..metrics import PoolingMetrics
from ..models.store import DEFAULT_EMBEDDING_MODEL, resolve_model
from .model_kinds import PoolingSpec, detect_task, pooling_spec
from .tokenize import Encoded, PoolingTokenizer

PROGRESS_MIN_TEXTS = 256  # embed() shows a progress bar from this many texts


@dataclass
class RerankResult:
    index: int  # the document's position in the request
    relevance_score: float
    document: str | None = None


class PoolingEngine(CoreFront):
    """Use `PoolingEngine.load(model, task=...)`; the constructor is internal."""

    def __init__(self, model_path: Path, config: EngineConfig, name: str, task: str | None = None,
                 progress=None):
        task = task or detect_task(model_path, name)
        if task not in ("embed", "rerank"):
            raise InvalidRequestError(f"{name} is a {task} model, not an embedding or reranking model")
        self.config, self.model_name, self.model_path, self.task = config, name, model_path, task
        self.spec: PoolingSpec = pooling_spec(model_path, task)
        self.tokenizer = PoolingTokenizer(model_path, self.spec)
        self.metrics_ = PoolingMetrics()

        def build():  # on the MLX thread
            from .embed_core import EmbedCore
            return EmbedCore(model_path, self.spec, config, name, self.metrics_,
                             self.tokenizer.yes_no, progress)

        self._attach(build)

    @classmethod
    def load(cls, model: str | os.PathLike = DEFAULT_EMBEDDING_MODEL, config: EngineConfig | None = None,
             task: str | None = None, name: str | None = None) -> "PoolingEngine":
        config = config or EngineConfig()
        path = resolve_model(model, cache_dir=config.model_cache_dir, progress=config.progress)
        return cls(path, config, name=name or str(model), task=task)

    # -- embeddings -----------------------------------------------------------
    @property
    def dimensions(self) -> int:
        return int(self.spec.config.get("hidden_size") or 0)

    def prompt(self, prompt_name: str | None = None) -> str:
        """The text put before each input: a named prompt of the model's sentence-transformers
        config (Qwen3-Embedding's "query"), or its default one."""
        name = prompt_name or self.spec.default_prompt_name
        if name is None:
            return ""
        if name not in self.spec.prompts:
            raise InvalidRequestError(f"{self.model_name} has no prompt {name!r}"
                                      f" (it has: {', '.join(self.spec.prompts) or 'none'})")
        return self.spec.prompts[name]

    def encode(self, inputs: str | list[str] | list[int] | list[list[int]],
               prompt_name: str | None = None) -> list[Encoded]:
        """Texts, or token-id lists as they are (truncated to the model's length)."""
        self._check_task("embed")
        if isinstance(inputs, str):
            inputs = [inputs]
        if not isinstance(inputs, list):
            raise InvalidRequestError(f"expected a string or a list, got {type(inputs).__name__}")
        if inputs and all(isinstance(t, int) and not isinstance(t, bool) for t in inputs):
            inputs = [inputs]  # one text as token ids
        if all(isinstance(t, str) for t in inputs):
            return self.tokenizer.texts(inputs, self.prompt(prompt_name))
        vocab = self.tokenizer.tok.get_vocab_size()
        for ids in inputs:
            if not (isinstance(ids, list) and ids and all(isinstance(t, int) and 0 <= t < vocab for t in ids)):
                raise InvalidRequestError(
                    f"inputs must be strings or non-empty lists of token ids in [0, {vocab})")
        return [Encoded(list(ids[:self.spec.max_length])) for ids in inputs]

    def embed(self, texts: str | list[str] | list[list[int]], *, prompt_name: str | None = None,
              progress: bool | None = None) -> np.ndarray:
        """Vectors [len(texts), dim] as float32 numpy (unit length when the model normalizes).
        A progress bar shows for long lists."""
        single = isinstance(texts, str)
        inputs = self.encode(texts, prompt_name)
        show = (self.config.progress if progress is None else progress) and len(inputs) >= PROGRESS_MIN_TEXTS
        out = self._run(inputs, show)
        return out[0] if single else out

    async def aembed(self, inputs, prompt_name: str | None = None) -> tuple[np.ndarray, int]:
        """embed() for asyncio code (the HTTP server): the vectors and the tokens they took."""
        encoded = self.encode(inputs, prompt_name)
        job = self._submit(encoded)
        try:
            return await asyncio.wrap_future(job.future), sum(len(e.ids) for e in encoded)
        finally:
            job.cancelled = True  # a no-op once done

    # -- reranking ------------------------------------------------------------
    def rerank(self, query: str, documents: list[str], *, top_n: int | None = None,
               return_documents: bool = False, instruction: str | None = None) -> list[RerankResult]:
        """Documents by relevance to `query`, most relevant first (at most top_n)."""
        inputs = self._pairs(query, documents, instruction)
        return self._ranked(self._run(inputs, False), documents, top_n, return_documents)

    async def arerank(self, query: str, documents: list[str], *, top_n: int | None = None,
                      return_documents: bool = False, instruction: str | None = None
                      ) -> tuple[list[RerankResult], int]:
        inputs = self._pairs(query, documents, instruction)
        job = self._submit(inputs)
        try:
            scores = await asyncio.wrap_future(job.future)
        finally:
            job.cancelled = True
        return self._ranked(scores, documents, top_n, return_documents), sum(len(e.ids) for e in inputs)

    def _pairs(self, query, documents, instruction=None) -> list[Encoded]:
        self._check_task("rerank")
        if not isinstance(query, str) or not query:
            raise InvalidRequestError("query must be a non-empty string")
        if not isinstance(documents, list) or not all(isinstance(d, str) for d in documents):
            raise InvalidRequestError("documents must be a list of strings")
        return self.tokenizer.pairs(query, documents, instruction)

    @staticmethod
    def _ranked(scores, documents, top_n, return_documents) -> list[RerankResult]:
        if top_n is not None and (not isinstance(top_n, int) or top_n < 1):
            raise InvalidRequestError(f"top_n must be a positive integer, got {top_n!r}")
        order = sorted(range(len(documents)), key=lambda i: -float(scores[i]))[:top_n]
        return [RerankResult(i, float(scores[i]), documents[i] if return_documents else None) for i in order]

    # -- jobs ------------------------------------------------------------------
    def _submit(self, inputs: list[Encoded]):
        from .embed_core import PoolingJob  # numpy only; kept beside the core that runs it

        self._check_open()
        job = PoolingJob(inputs)
        self.metrics_.count("requests_submitted")
        job.future.add_done_callback(lambda f: self.metrics_.count(
            "requests_failed" if f.exception() else "requests_completed"))
        self._worker.post(self.core, ("submit", job))
        return job

    def _run(self, inputs: list[Encoded], show_progress: bool) -> np.ndarray:
        job = self._submit(inputs)
        try:
            if not show_progress:
                return job.future.result()
            # The bar lives on the caller's thread (in a notebook: the cell's output).
            with tqdm(total=len(inputs), desc=f"Embedding with {Path(self.model_name).name}",
                      unit="text", leave=False) as bar:
                while True:
                    try:
                        return job.future.result(timeout=0.2)
                    except TimeoutError:
                        bar.update(job.done - bar.n)
        finally:
            job.cancelled = True  # Ctrl-C in a cell: the core drops the rest

    def metrics(self) -> dict:
        out = self.metrics_.snapshot()
        out.update(model=self.model_name, task=self.task, pooling=self.spec.pooling,
                   dimensions=self.dimensions, max_length=self.spec.max_length)
        out.update(self.core.status())
        return out

    @property
    def backend(self) -> str:
        return self.core.runner.backend

    @property
    def memory_bytes(self) -> int:
        return self.core.runner.weight_bytes

    def _check_task(self, task: str) -> None:
        if self.task != task:
            what = {"embed": "an embedding", "rerank": "a reranking"}[task]
            raise InvalidRequestError(f"{self.model_name} is not {what} model (its task is {self.task})")
