"""Engine: the caller's side of the engine (thread-safe; no MLX here).

Notebook cells and the HTTP server's loop call it from any thread. It encodes
prompts, admits requests into the bounded queue and hands them to the EngineCore
(core/engine_core.py) through the MLX worker's queue; results come back through
each request's RequestHandle. Everything that touches MLX runs in the core, on
the one long-lived MLX thread (core/worker.py), so no lock guards the model and
MLX never runs on short-lived threads.
"""

from __future__ import annotations

import itertools
import os
import random
from pathlib import Path
from typing import Iterator

from tqdm.auto import tqdm

from .config import EngineConfig, check_speculation
from .core.admission import Admission
from .core.sequence import Sequence
from .errors import InvalidRequestError, QueueFullError
from .front import CoreFront
from .handle import RequestHandle
from .metrics import EngineMetrics
from .models.store import DEFAULT_MODEL, resolve_model
from .outputs import Completion, Delta
from .sampling.params import SamplingParams
from .sampling.text_stream import TextStream
from .spec import tuning

Prompt = str | list[dict] | list[int]
_ids = itertools.count(1)


class Engine(CoreFront):
    """Use `Engine.load(model, config)`; the constructor is internal."""

    def __init__(self, model_path, config: EngineConfig, name: str, progress=None):
        self.config = config
        self.model_name = name
        self.model_path = model_path
        self.metrics_ = EngineMetrics()
        self._admission = Admission()
        # `progress` is called with a stage name from the MLX thread while loading.
        def build():  # on the MLX thread: the front never imports MLX
            from .core.engine_core import EngineCore
            return EngineCore(model_path=model_path, config=config, name=name, metrics=self.metrics_,
                              admission=self._admission, progress=progress)

        self._attach(build)

    @classmethod
    def load(cls, model: str | os.PathLike = DEFAULT_MODEL,
             config: EngineConfig | None = None, name: str | None = None) -> "Engine":
        config = config or EngineConfig()
        path = resolve_model(model, cache_dir=config.model_cache_dir, progress=config.progress)
        stages = ("tokenizer", "weights", "fingerprint", "ready")  # each reported when done
        with tqdm(total=len(stages), desc=f"Loading {Path(str(model)).name}", leave=False,
                  disable=not config.progress) as bar:
            def progress(done: str) -> None:
                bar.set_postfix_str(f"{done} done")
                bar.update()
            return cls(path, config, name=name or str(model), progress=progress)

    # -- public API (any thread) ---------------------------------------------
    @property
    def tokenizer(self):
        return self.core.loaded.tokenizer

    def encode(self, prompt: Prompt) -> list[int]:
        """Token ids of a prompt: text, chat messages (chat template) or ids as they are."""
        tok = self.core.loaded.tokenizer
        if isinstance(prompt, str):
            ids = tok.encode(prompt)
        elif isinstance(prompt, list) and all(isinstance(t, int) for t in prompt):
            ids = list(prompt)
        elif isinstance(prompt, list) and all(isinstance(m, dict) for m in prompt):
            ids = self._encode_chat(prompt)
        else:
            raise InvalidRequestError(
                "prompt must be a string, a list of chat messages ({'role', 'content'}) "
                f"or a list of token ids; got {type(prompt).__name__}")
        if not ids:
            raise InvalidRequestError("the prompt is empty (no tokens)")
        vocab = self.core.loaded.vocab_size
        if any(not 0 <= t < vocab for t in ids):
            raise InvalidRequestError(f"token ids must be in [0, {vocab})")
        return ids

    def _encode_chat(self, messages: list[dict]) -> list[int]:
        for m in messages:
            if "role" not in m or "content" not in m:
                raise InvalidRequestError(f"chat messages need 'role' and 'content': {m!r}")
        tok = self.core.loaded.tokenizer
        if tok.has_chat_template:
            text = tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
        else:  # plain fallback for models without a template
            text = "".join(f"{m['role']}: {m['content']}\n" for m in messages) + "assistant:"
            return tok.encode(text)
        return tok.encode(text, add_special_tokens=False)

    def submit(self, prompt: Prompt, params: SamplingParams | None = None, *,
               source: str = "python", **kwargs) -> RequestHandle:
        """Queue a request; returns at once with a handle to stream, wait on or cancel."""
        self._check_open()
        if self.core.group is not None:
            self.core.group.check()  # a group that lost a rank refuses new requests
        if params is not None and kwargs:
            raise InvalidRequestError("pass either a SamplingParams or keyword arguments, not both")
        if "schema" in kwargs:  # generate(prompt, schema=MyModel)
            kwargs["json_schema"] = kwargs.pop("schema")
        params = params or SamplingParams(**kwargs)
        if params.drafter == "mtp" and self.core.runner.head is None:
            raise InvalidRequestError(
                f"{self.model_name} was loaded without an MTP head; drafter='mtp' needs one")
        prompt_ids = self.encode(prompt)
        max_len = self.max_context
        if len(prompt_ids) >= max_len:
            raise InvalidRequestError(
                f"the prompt has {len(prompt_ids)} tokens; the context limit is {max_len}")
        matcher = self.core.new_matcher(params)  # a bad schema or grammar raises here
        # Free batch slots take requests at the next step; the rest must wait.
        scheduler = self.core.scheduler
        free = self.config.max_batch - len(scheduler.running) - len(scheduler.prefilling)
        if not self._admission.admit(free, self.config.max_waiting):
            self.metrics_.count("requests_rejected")
            raise QueueFullError(
                f"the waiting queue is full ({self.config.max_waiting} requests); retry later")
        request_id = f"req-{next(_ids)}"
        handle = RequestHandle(request_id, on_cancel=lambda h: self._worker.post(self.core, ("wake",)))
        seq = Sequence(
            request_id=request_id, prompt_ids=prompt_ids, params=params,
            seed=params.seed if params.seed is not None else random.getrandbits(63),
            handle=handle, text=TextStream(self.core.loaded.tokenizer.detokenizer, params.stop),
            max_len=max_len, source=source, matcher=matcher)
        self.metrics_.count("requests_submitted")
        self._worker.post(self.core, ("submit", seq))
        return handle

    def generate(self, prompt: Prompt, params: SamplingParams | None = None, **kwargs) -> Completion:
        """Run one request to the end (blocking)."""
        handle = self.submit(prompt, params, **kwargs)
        try:
            return handle.result()
        except BaseException:
            handle.cancel()  # e.g. KeyboardInterrupt in a notebook cell
            raise

    def map(self, prompts, params: SamplingParams | None = None, *, progress: bool = True,
            **kwargs) -> list[Completion]:
        """Run a list (or pandas Series) of prompts through the batch; one Completion per
        prompt, in order, behind a progress bar. `schema=MyModel` fills each `.parsed`.
        A failed row carries its error in `.error`; Ctrl-C returns the rows done so far
        (the others cancelled). See batch_map.py."""
        from .batch_map import run_map
        self._check_open()
        return run_map(self, prompts, params, kwargs, progress)

    def stream(self, prompt: Prompt, params: SamplingParams | None = None,
               **kwargs) -> Iterator[Delta]:
        """Yield Deltas as tokens are produced; closing the iterator cancels the request."""
        handle = self.submit(prompt, params, **kwargs)
        try:
            yield from handle
        finally:
            handle.cancel()

    async def astream(self, prompt: Prompt, params: SamplingParams | None = None, **kwargs):
        """Async version of stream() for asyncio code (the HTTP server)."""
        handle = self.submit(prompt, params, **kwargs)
        try:
            async for delta in handle:
                yield delta
        finally:
            handle.cancel()

    async def agenerate(self, prompt: Prompt, params: SamplingParams | None = None,
                        **kwargs) -> Completion:
        handle = self.submit(prompt, params, **kwargs)
        try:
            return await handle.aresult()
        finally:
            handle.cancel()

    @property
    def memory_bytes(self) -> int:
        """RAM the model's weights hold, as loaded (the model registry counts it)."""
        return int(self.core.status()["weight_bytes"])

    def metrics(self) -> dict:
        out = self.metrics_.snapshot()
        out.update(model=self.model_name, max_batch=self.config.max_batch)
        out["cache_efficiency"] = (out["cached_tokens"] / out["prompt_tokens"]
                                   if out["prompt_tokens"] else 0.0)
        out.update(self.core.status())
        return out

    def cache_info(self) -> dict:
        """Prefix-cache state: hits, misses, efficiency, hot/SSD usage against budgets."""
        pc = self.prefix_cache
        m = self.metrics_.snapshot()
        info = {"enabled": pc is not None,
                "cached_tokens": m["cached_tokens"], "prompt_tokens": m["prompt_tokens"],
                "efficiency": m["cached_tokens"] / m["prompt_tokens"] if m["prompt_tokens"] else 0.0}
        if pc is not None:
            info.update(pc.info())
        return info

    def clear_cache(self) -> None:
        """Drop every cached block, in RAM and on SSD (this model's and any other's)."""
        if self.prefix_cache is not None:
            self.call(self.prefix_cache.clear)

    def set_cache_budgets(self, hot_bytes: int | None = None, ssd_bytes: int | None = None) -> None:
        """Change the RAM and/or SSD budgets of the running engine; evicts down to them."""
        for value in (hot_bytes, ssd_bytes):
            if value is not None and (not isinstance(value, int) or value < 0):
                raise InvalidRequestError(f"cache budgets must be integers >= 0, got {value!r}")
        if self.prefix_cache is not None:
            self.call(lambda: self.prefix_cache.set_budgets(hot_bytes, ssd_bytes))
        if hot_bytes is not None:
            self.config.hot_cache_bytes = hot_bytes
        if ssd_bytes is not None:
            self.config.ssd_cache_bytes = ssd_bytes

    def set_options(self, *, max_batch: int | None = None, depth: int | str | None = None,
                    drafter: str | None = None) -> None:
        """Change batch size and speculation of the running engine (applied between steps)."""
        cfg = self.config
        if max_batch is not None and not (isinstance(max_batch, int) and
                                          1 <= max_batch <= cfg.step_token_budget - cfg.block_size):
            raise InvalidRequestError(
                f"max_batch must be an integer in [1, {cfg.step_token_budget - cfg.block_size}]")
        check_speculation(drafter or cfg.drafter, cfg.depth if depth is None else depth)

        def apply():
            if drafter is not None and drafter != self.drafter.name:
                self.core.set_drafter(drafter)  # raises if mtp has no head
            if max_batch is not None:
                cfg.max_batch = max_batch
            if depth is not None:
                cfg.depth = depth

        self.call(apply)

    def tune(self, *, batch: int | None = None, temperature: float = 0.0, gen_tokens: int = 48,
             depths: tuple[int, ...] | None = None) -> dict:
        """Measure decode tok/s with plain decoding (depth 0) and each draft depth (by
        default 1-4, 6 and 8, up to max_depth), at the current batch size and sampling,
        on a code-editing workload; keep the fastest as the most depth="auto" drafts,
        and persist it per model, machine and drafter."""
        if depths is None:
            depths = tuple(d for d in (0, 1, 2, 3, 4, 6, 8) if d <= self.config.max_depth)
        batch = batch or max(1, len(self.core.scheduler.running))
        prompts = [tuning.TUNING_PROMPTS[i % len(tuning.TUNING_PROMPTS)] for i in range(batch)]

        def run(depth: int) -> float:
            params = SamplingParams(max_tokens=gen_tokens, temperature=temperature, seed=0,
                                    depth=depth)
            handles = [self.submit(p, params, source="tune") for p in prompts]
            usages = [h.result().usage for h in handles]
            # Decode speed: tokens after the first over the time after the first.
            return sum(u.completion_tokens - 1 for u in usages) / max(
                max(u.total_s - u.ttft_s for u in usages), 1e-9)

        run(0)  # warm-up: prefill the prompts once (the prefix cache keeps them)
        results = {d: run(d) for d in depths}
        best = max(results, key=results.get)
        self.speculation.tuned_depth = best
        tuning.save(self.core.tune_key(), best, results)
        return {"depth": best, "tok_s": results, "batch": batch, "drafter": self.drafter.name}

    def train_mtp_head(self, **options):
        """Train an MTP draft head for this model by self-distillation: see
        engine.spec.mtp_train.train_mtp_head for the options. It runs its MLX work
        through call(), on the engine thread."""
        from .spec.mtp_train import train_mtp_head
        if self.core.group is not None:  # its forwards would run on rank 0 alone
            raise InvalidRequestError("training a draft head is not available for a model split "
                                      "across ranks (hostfile); train it on one machine")
        return train_mtp_head(self, **options)

    @property
    def backend(self) -> str:
        return self.core.backend

    @property
    def max_context(self) -> int:
        limit = self.core.loaded.max_context
        return min(self.config.max_context or limit, limit)

    # -- the core's parts, for tests, benches and the dashboard (read on any thread;
    #    change them only through call()) ----------------------------------------
    @property
    def _loaded(self):
        return self.core.loaded

    @property
    def fingerprint(self) -> str:
        return self.core.fingerprint

    @property
    def runner(self):
        return self.core.runner

    @property
    def scheduler(self):
        return self.core.scheduler

    @property
    def prefix_cache(self):
        return self.core.prefix_cache

    @property
    def speculation(self):
        return self.core.speculation

    @property
    def drafter(self):
        return self.core.drafter

    @drafter.setter
    def drafter(self, drafter) -> None:
        self.core.drafter = drafter

    def _tune_key(self) -> str:
        return self.core.tune_key()
