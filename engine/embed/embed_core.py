"""EmbedCore: runs embedding and reranking jobs on the MLX thread, one bounded
batch per step, so the worker interleaves them with every generation core's steps.

A step takes the oldest job's next inputs (longest first, which keeps padding
small) up to `embed_batch` rows and `embed_batch_tokens` padded tokens. While a
generation core also has work on the thread, a step is held to the generation
step budget (`step_token_budget` tokens) instead, so embedding a corpus costs a
stream at most one step's worth of delay per token.
"""

from __future__ import annotations

import time
from collections import deque
from concurrent.futures import Future
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from ..config import EngineConfig
from ..errors import EngineClosedError
from ..core.worker import run_call
from ..metrics import PoolingMetrics
from .model_kinds import PoolingSpec
from .runner import PoolingRunner, padded_width
from .tokenize import Encoded


@dataclass(eq=False)
class PoolingJob:
    inputs: list[Encoded]
    future: Future = field(default_factory=Future)
    done: int = 0  # inputs computed so far (read by the caller's progress bar)
    cancelled: bool = False

    def __post_init__(self) -> None:
        self.order = sorted(range(len(self.inputs)), key=lambda i: -len(self.inputs[i].ids))
        self.results: list[np.ndarray | None] = [None] * len(self.inputs)


class EmbedCore:
    def __init__(self, model_path: Path, spec: PoolingSpec, config: EngineConfig, name: str,
                 metrics: PoolingMetrics, yes_no=None, progress=None):
        self.config, self.model_name, self.spec, self.metrics = config, name, spec, metrics
        self.runner = PoolingRunner(model_path, spec, config.dtype, yes_no)
        self.jobs: deque[PoolingJob] = deque()
        self.sharing_thread = False  # set by the worker: another core has work this round
        self.closed = False
        if progress:
            progress("ready")

    def status(self) -> dict:
        return dict(backend=self.runner.backend, dtype=self.runner.dtype,
                    weight_bytes=self.runner.weight_bytes, waiting=len(self.jobs))

    def has_work(self) -> bool:
        return bool(self.jobs)

    def handle_command(self, item: tuple) -> None:
        kind = item[0]
        if kind == "submit":
            job = item[1]
            if self.closed:
                job.future.set_exception(EngineClosedError("the engine was closed"))
            elif job.inputs:
                self.jobs.append(job)
            else:
                job.future.set_result([])
        elif kind == "call":
            run_call(item)

    def step(self) -> None:
        job = self.jobs[0]
        if job.cancelled:
            self.jobs.popleft()
            return
        cfg = self.config
        tokens = cfg.step_token_budget if self.sharing_thread else cfg.embed_batch_tokens
        take = []
        while job.done + len(take) < len(job.inputs) and len(take) < cfg.embed_batch:
            i = job.order[job.done + len(take)]
            width = padded_width(len(job.inputs[job.order[job.done]].ids))  # the longest of the batch
            if take and width * (len(take) + 1) > tokens:
                break
            take.append(i)
        start = time.perf_counter()
        try:
            out = self.runner.run([job.inputs[i] for i in take])
        except Exception as e:
            self.jobs.popleft()
            job.future.set_exception(e)
            return
        for i, row in zip(take, out):
            job.results[i] = row
        job.done += len(take)
        self.metrics.batch(len(take), sum(len(job.inputs[i].ids) for i in take), time.perf_counter() - start)
        if job.done == len(job.inputs):
            self.jobs.popleft()
            job.future.set_result(np.stack(job.results))

    def recover(self, error: Exception) -> None:
        self._abort_all(error)

    def shutdown(self) -> None:
        self.closed = True
        self._abort_all(EngineClosedError("the engine was closed"))
        self.runner.model = None

    def _abort_all(self, error: Exception) -> None:
        while self.jobs:
            job = self.jobs.popleft()
            if not job.future.done():
                job.future.set_exception(error)
