"""The engine: one long-lived thread owns the model and every MLX call.

Callers on any thread (notebook cells, the HTTP server's loop) submit requests
through a thread-safe inbox and read results from a RequestHandle. MLX must
only ever run on this thread: MLX aborts at exit when generation ran on
short-lived threads, and one owner means no locks around the model.
"""

from __future__ import annotations

import hashlib
import itertools
import os
import random
import threading
import time
import warnings
from concurrent.futures import Future
from pathlib import Path
from typing import Any, Callable, Iterator

import mlx.core as mx
import numpy as np
from tqdm.auto import tqdm

from . import backend, loader, tuning
from .config import EngineConfig, check_speculation, default_kv_cache_dir
from .drafters import Draft, MTPDrafter, NgramDrafter, NoDrafter
from .errors import (
    EngineClosedError,
    InvalidRequestError,
    NoDraftHeadError,
    QueueFullError,
    UnsupportedModelError,
)
from .handle import RequestHandle
from .kv_blocks import file_digest, model_fingerprint
from .metrics import EngineMetrics
from .model_runner import ModelRunner
from .model_store import DEFAULT_MODEL, resolve_model
from .mtp_head import MTPHead, head_candidates, head_matches
from .mtp_train import TrainResult, train_mtp_head
from .outputs import Completion, Delta, TokenLogprob, Usage
from .prefix_cache import PrefixCache
from .sampler import sample_token, top_logprobs
from .sampling_params import SamplingParams
from .scheduler import Scheduler
from .sequence import SeqStatus, Sequence
from .speculation import SpeculationController
from .speculative import verify_row
from .text_stream import TextStream
from .worker import MLXWorker

Prompt = str | list[dict] | list[int]
_ids = itertools.count(1)


class Engine:
    """Use `Engine.load(model, config)`; the constructor is internal."""

    def __init__(self, model_path, config: EngineConfig, name: str, progress=None):
        self.config = config
        self.model_name = name
        self.model_path = model_path
        self.metrics_ = EngineMetrics()
        self.scheduler = Scheduler(config)
        self.prefix_cache: PrefixCache | None = None
        self._worker = MLXWorker.get()
        self._waiting_lock = threading.Lock()
        self._queued = 0  # submitted and not yet given a batch slot (the bounded queue)
        self._closed = False
        self._progress = progress  # called with a stage name from the MLX thread while loading
        ready: Future = Future()
        self._worker.post(self, ("attach", ready))
        try:
            ready.result()  # re-raises a load error in the caller
        except BaseException:
            # Interrupted (Ctrl-C in a cell) while the model loads: it is freed once loaded.
            self._closed = True
            self._worker.post(self, ("stop", Future()))
            raise

    @classmethod
    def load(cls, model: str | os.PathLike = DEFAULT_MODEL,
             config: EngineConfig | None = None) -> "Engine":
        config = config or EngineConfig()
        path = resolve_model(model, cache_dir=config.model_cache_dir, progress=config.progress)
        stages = ("weights", "tokenizer", "fingerprint", "ready")  # each reported when done
        with tqdm(total=len(stages), desc=f"Loading {Path(str(model)).name}", leave=False,
                  disable=not config.progress) as bar:
            def progress(done: str) -> None:
                bar.set_postfix_str(f"{done} done")
                bar.update()
            return cls(path, config, name=str(model), progress=progress)

    # -- public API (any thread) ---------------------------------------------
    @property
    def tokenizer(self):
        return self._loaded.tokenizer

    def encode(self, prompt: Prompt) -> list[int]:
        """Token ids of a prompt: text, chat messages (chat template) or ids as they are."""
        tok = self._loaded.tokenizer
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
        vocab = self._loaded.vocab_size
        if any(not 0 <= t < vocab for t in ids):
            raise InvalidRequestError(f"token ids must be in [0, {vocab})")
        return ids

    def _encode_chat(self, messages: list[dict]) -> list[int]:
        for m in messages:
            if "role" not in m or "content" not in m:
                raise InvalidRequestError(f"chat messages need 'role' and 'content': {m!r}")
        tok = self._loaded.tokenizer
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
        if params is not None and kwargs:
            raise InvalidRequestError("pass either a SamplingParams or keyword arguments, not both")
        params = params or SamplingParams(**kwargs)
        if params.drafter == "mtp" and self.runner.head is None:
            raise InvalidRequestError(
                f"{self.model_name} was loaded without an MTP head; drafter='mtp' needs one")
        prompt_ids = self.encode(prompt)
        max_len = self.max_context
        if len(prompt_ids) >= max_len:
            raise InvalidRequestError(
                f"the prompt has {len(prompt_ids)} tokens; the context limit is {max_len}")
        with self._waiting_lock:
            # Free batch slots take requests at the next step; the rest must wait.
            free = self.config.max_batch - len(self.scheduler.running) - len(self.scheduler.prefilling)
            if self._queued - max(free, 0) >= self.config.max_waiting:
                self.metrics_.count("requests_rejected")
                raise QueueFullError(
                    f"the waiting queue is full ({self.config.max_waiting} requests); retry later")
            self._queued += 1
        request_id = f"req-{next(_ids)}"
        handle = RequestHandle(request_id, on_cancel=lambda h: self._worker.post(self, ("wake",)))
        seq = Sequence(
            request_id=request_id, prompt_ids=prompt_ids, params=params,
            seed=params.seed if params.seed is not None else random.getrandbits(63),
            handle=handle, text=TextStream(self._loaded.tokenizer.detokenizer, params.stop),
            max_len=max_len, source=source)
        self.metrics_.count("requests_submitted")
        self._worker.post(self, ("submit", seq))
        return handle

    def generate(self, prompt: Prompt, params: SamplingParams | None = None, **kwargs) -> Completion:
        """Run one request to the end (blocking)."""
        handle = self.submit(prompt, params, **kwargs)
        try:
            return handle.result()
        except BaseException:
            handle.cancel()  # e.g. KeyboardInterrupt in a notebook cell
            raise

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

    def call(self, fn: Callable[[], Any]) -> Any:
        """Run fn on the engine thread between steps (for anything that touches MLX)."""
        self._check_open()
        if self._worker.on_thread():
            return fn()
        future: Future = Future()
        self._worker.post(self, ("call", fn, future))
        return future.result()

    def metrics(self) -> dict:
        out = self.metrics_.snapshot()
        out.update(
            model=self.model_name, backend=self.backend, blas=backend.blas(),
            dtype=self._loaded.dtype, max_batch=self.config.max_batch,
            packed_output_bytes=loader.packed_output_bytes(self._loaded.model),
            row_kernel_bytes=self._loaded.row_kernel_bytes,
            quantized_weight_bytes=self._loaded.quantized_weight_bytes,
            running=len(self.scheduler.running), prefilling=len(self.scheduler.prefilling),
            waiting=len(self.scheduler.waiting))
        out["cache_efficiency"] = (out["cached_tokens"] / out["prompt_tokens"]
                                   if out["prompt_tokens"] else 0.0)
        if self.prefix_cache is not None:
            out.update({f"cache_{k}": v for k, v in self.prefix_cache.info().items()
                        if isinstance(v, (int, float))})
        out.update(self.speculation.metrics())
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
                self.drafter = self._make_drafter(drafter)  # raises if mtp has no head
                cfg.drafter, self.speculation.drafter_name = drafter, self.drafter.name
                self.speculation.tuned_depth = tuning.load_tuned_depth(self._tune_key())
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
        batch = batch or max(1, len(self.scheduler.running))
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
        tuning.save(self._tune_key(), best, results)
        return {"depth": best, "tok_s": results, "batch": batch, "drafter": self.drafter.name}

    def train_mtp_head(self, **options) -> TrainResult:
        """Train an MTP draft head for this model by self-distillation: see
        engine.mtp_train.train_mtp_head for the options."""
        return train_mtp_head(self, **options)

    @property
    def backend(self) -> str:
        return "cpu" if loader.on_cpu() else "gpu"

    @property
    def max_context(self) -> int:
        return min(self.config.max_context or self._loaded.max_context, self._loaded.max_context)

    def close(self) -> None:
        """Cancel everything and free the model. The shared MLX thread keeps running."""
        if self._closed:
            return
        self._closed = True
        done: Future = Future()
        self._worker.post(self, ("stop", done))
        if not self._worker.on_thread():
            done.result()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    @property
    def closed(self) -> bool:
        return self._closed

    def _check_open(self) -> None:
        if self._closed:
            raise EngineClosedError("the engine is closed")

    # -- on the MLX worker thread ----------------------------------------------
    def _start(self, ready: Future) -> bool:
        try:
            progress = self._progress or (lambda stage: None)
            self._loaded = loader.load(self.model_path, self.config.dtype, progress)
            self._eos = set(self._loaded.tokenizer.eos_token_ids)
            self.fingerprint = model_fingerprint(self._loaded.path, self._loaded.dtype,
                                                 memo_file=self._kv_dir() / "weight-digests.json")
            progress("fingerprint")
            head, head_id = None, ""
            if self.config.drafter in ("mtp", "auto"):
                try:
                    # "auto" takes native heads only: the trained head shipped for the
                    # default model drafts slower than n-gram there (bench/bench_mtp.py),
                    # so trained heads are used when asked for with drafter="mtp".
                    head, head_id = self._load_head(trained=self.config.drafter == "mtp")
                except NoDraftHeadError:
                    if self.config.drafter == "mtp":
                        raise
            self.runner = ModelRunner(self._loaded.model, head)
            self._drafters: dict = {}  # by name; requests may pick their own
            self.prefix_cache = self._make_prefix_cache(head_id)
            self.drafter = self._make_drafter(self.config.drafter)
            self.speculation = SpeculationController(self.config, self.drafter.name)
            self.speculation.tuned_depth = tuning.load_tuned_depth(self._tune_key())
            progress("ready")
        except BaseException as e:
            self._closed = True
            ready.set_exception(e)
            return False
        ready.set_result(None)
        return True

    def _kv_dir(self) -> Path:
        return Path(self.config.cache_dir) if self.config.cache_dir else default_kv_cache_dir()

    def _load_head(self, trained: bool = True) -> tuple[MTPHead, str]:
        """The native MTP head, else (if `trained`) a trained head made for exactly this model."""
        model = self._loaded.model
        try:
            return MTPHead.from_checkpoint(self._loaded.path, model), "native"
        except NoDraftHeadError as missing:
            if not trained:
                raise
            for path in head_candidates(self.config.mtp_head, self._loaded.path):
                if head_matches(path, self.fingerprint):
                    return MTPHead.load(path, model, self.fingerprint), file_digest(path)
            if self.config.mtp_head:  # asked for explicitly: say why it does not fit
                return MTPHead.load(self.config.mtp_head, model, self.fingerprint), ""
            raise NoDraftHeadError(
                f"{self.model_name} has no MTP draft head (no native mtp.* weights and no "
                "trained head for it); use drafter='ngram', or train one with "
                "engine.train_mtp_head()") from missing

    def _make_prefix_cache(self, head_id: str) -> PrefixCache | None:
        cfg = self.config
        if not cfg.prefix_cache:
            return None
        kv_dir = self._kv_dir()
        # With a draft head its KV is cached too, so the head is part of the identity.
        fingerprint = hashlib.sha256(f"{self.fingerprint}|head={head_id}".encode()).hexdigest()
        try:
            return PrefixCache(self.runner.new_cache(), fingerprint, cfg.block_size,
                               cfg.hot_cache_bytes, kv_dir / "blocks" if cfg.ssd_cache else None,
                               cfg.ssd_cache_bytes)
        except UnsupportedModelError as e:
            warnings.warn(f"kernelext: prefix cache off for this model: {e}", stacklevel=2)
            return None

    def _make_drafter(self, name: str):
        if name == "auto":
            name = "mtp" if self.runner.head is not None else "ngram"
        if name == "mtp" and self.runner.head is None:
            raise NoDraftHeadError(
                f"{self.model_name} was loaded without an MTP head: load it with "
                "EngineConfig(drafter='mtp') to draft with one")
        if name not in self._drafters:
            self._drafters[name] = {"ngram": NgramDrafter, "none": NoDrafter,
                                    "mtp": lambda: MTPDrafter(self.runner)}[name]()
        return self._drafters[name]

    def _drafter_named(self, name: str):
        return self.drafter if name == self.drafter.name else self._make_drafter(name)

    def _tune_key(self) -> str:
        return tuning.key(self.fingerprint, self.backend, backend.blas(), self.drafter.name)

    def has_work(self) -> bool:
        return self.scheduler.has_work()

    def _handle(self, item: tuple) -> None:
        kind = item[0]
        if kind == "submit":
            if self._closed:
                item[1].handle._fail(EngineClosedError("the engine was closed"))
            else:
                self.scheduler.add(item[1])
        elif kind == "call":
            _, fn, future = item
            try:
                future.set_result(fn())
            except BaseException as e:
                future.set_exception(e)
        # "wake" only interrupts the worker's wait; cancellations are read at each step

    def _shutdown(self) -> None:
        self._abort_all(EngineClosedError("the engine was closed"))
        if self.prefix_cache is not None:
            self.prefix_cache.close()  # flushes queued SSD writes
        self._loaded.model = None

    def _recover(self, error: Exception) -> None:
        """An unexpected error inside a step: fail what was in flight, keep serving."""
        if hasattr(self, "runner"):  # else the load failed: nothing is in flight
            self._abort_all(error)

    def _abort_all(self, error: Exception) -> None:
        for seq in self.scheduler.active():
            self._fail(seq, error)
        with self._waiting_lock:
            self._queued -= len(self.scheduler.waiting)
        self.scheduler = Scheduler(self.config)
        self.runner.reset()

    def _step(self) -> None:
        for seq in self.scheduler.active():
            if seq.handle.cancel_requested:
                self._finish(seq, "cancelled", Delta("", []))
        self._drop_finished()
        was_waiting = len(self.scheduler.waiting)
        plan = self.scheduler.schedule()
        with self._waiting_lock:
            self._queued -= was_waiting - len(self.scheduler.waiting)
        prefilled = 0
        for seq, n in plan.prefill:
            prefilled += n
            try:
                self._prefill(seq, n)
            except Exception as e:
                self._fail(seq, e)
        joining = self.scheduler.join_ready()
        if joining:
            self.runner.add_rows([s.cache for s in joining])
            for s in joining:
                s.cache = None
        rows = self.scheduler.running
        if rows:
            try:
                self._decode(rows)
            except Exception as e:
                for seq in rows:
                    self._fail(seq, e)
                self.runner.reset()
        self.metrics_.step(decoded=len(rows), prefilled=prefilled, rows=len(rows))
        self._drop_finished()

    def _prefill(self, seq: Sequence, budget: int) -> None:
        """Bring seq's cache forward: restore cached blocks, compute whole blocks within budget."""
        block, pc = self.config.block_size, self.prefix_cache
        if seq.cache is None:
            seq.cache = self.runner.new_cache()
            seq.t_prefill_start = time.perf_counter()
            if pc is not None:
                seq.block_keys = pc.keys(seq.prompt_ids[:seq.prefill_target])
        while True:
            # At every block boundary take what is cached by now (maybe published
            # a moment ago by a request with the same prefix that is ahead of this one).
            done_blocks = seq.num_computed // block
            if pc is not None and seq.num_computed % block == 0 and done_blocks < len(seq.block_keys):
                found = pc.lookup(seq.block_keys[done_blocks:])
                if found:
                    seq.blocks.extend(found)
                    seq.cache = pc.restore(seq.blocks)
                    seq.num_computed += len(found) * block
                    seq.cached_tokens += len(found) * block
            take = min(block - seq.num_computed % block, seq.prefill_remaining)
            if take == 0 or take > budget:
                break
            start = seq.num_computed
            self.runner.prefill(seq.cache, seq.prompt_ids[start:start + take],
                                seq.prompt_ids[start + 1:start + take + 1])
            seq.num_computed += take
            budget -= take
            done_blocks = seq.num_computed // block
            if pc is not None and seq.num_computed % block == 0 and done_blocks <= len(seq.block_keys):
                seq.blocks.append(pc.publish(seq.block_keys[done_blocks - 1], seq.cache))
        if seq.prefill_remaining == 0:
            seq.t_prefill_end = time.perf_counter()
            if pc is not None:
                hits = seq.cached_tokens // block
                pc.record(hits, len(seq.block_keys) - hits)
            seq.blocks = []

    def _decode(self, rows: list[Sequence]) -> None:
        names = [s.params.drafter or self.drafter.name for s in rows]
        depths = self.speculation.depths(rows, [self._drafter_named(n) for n in names])
        drafts = self._propose(rows, names, depths) if any(depths) else None
        if drafts is not None:
            self.speculation.cap_drafts(rows, drafts)
        if drafts is not None and any(d.tokens for d in drafts):
            try:
                self._speculative_decode(rows, drafts)
                return
            except Exception as e:  # the caches are as they were: decode this step plainly
                warnings.warn(f"kernelext: speculative step failed, decoding plainly: {e!r}",
                              RuntimeWarning, stacklevel=2)
        self._plain_decode(rows)

    def _propose(self, rows: list[Sequence], names: list[str], depths: list[int]) -> list[Draft]:
        """Each row's drafts from its own drafter. Every drafter sees all rows (a head
        must still be fed the rows it does not draft for) with depth 0 for the others."""
        drafts = [Draft([]) for _ in rows]
        for name in sorted({n for n, d in zip(names, depths) if d}):
            mine = [d if n == name else 0 for n, d in zip(names, depths)]
            drafter = self._drafter_named(name)
            for i, draft in enumerate(drafter.propose(rows, mine)):
                if mine[i]:
                    drafts[i] = draft
        return drafts

    def _plain_decode(self, rows: list[Sequence]) -> None:
        start = time.perf_counter()
        logits = _on_host(self.runner.decode([s.last_token for s in rows]))
        tokens = [sample_token(logits[i], s.params, s.seed, s.position, s.context, s.output_counts)
                  for i, s in enumerate(rows)]
        now = time.perf_counter()
        self.speculation.observe_step(len(rows), 1, now - start, len(rows))
        if self.runner.head is not None:
            MTPDrafter.observe(rows, [[t] for t in tokens], self.runner.hidden)
        for i, (seq, token) in enumerate(zip(rows, tokens)):
            self._emit(seq, [token], [self._logprobs(seq, logits[i])], now)

    def _speculative_decode(self, rows: list[Sequence], drafts: list[Draft]) -> None:
        start = time.perf_counter()
        window = 1 + max(len(d.tokens) for d in drafts)
        # Rows with fewer drafts are padded; their extra positions are rolled back.
        windows = [[s.last_token] + d.tokens + [s.last_token] * (window - 1 - len(d.tokens))
                   for s, d in zip(rows, drafts)]
        logits = self.runner.verify(windows)
        try:
            logits = _on_host(logits)
            emitted = [verify_row(logits[i], s, d) for i, (s, d) in enumerate(zip(rows, drafts))]
            self.runner.commit([len(e) for e in emitted], window)
        except BaseException:
            self.runner.abort()
            raise
        now = time.perf_counter()
        self.speculation.observe_step(len(rows), window, now - start, sum(map(len, emitted)))
        if self.runner.head is not None:
            MTPDrafter.observe(rows, emitted, self.runner.hidden)
        for i, (seq, draft, tokens) in enumerate(zip(rows, drafts, emitted)):
            self.speculation.observe_row(seq, len(draft.tokens), len(tokens) - 1)
            self._emit(seq, tokens, [self._logprobs(seq, logits[i, j]) for j in range(len(tokens))], now)

    @staticmethod
    def _logprobs(seq: Sequence, logits: np.ndarray) -> tuple | None:
        n = seq.params.logprobs
        return top_logprobs(logits, n) if n is not None else None

    def _emit(self, seq: Sequence, tokens: list[int], logprob_infos: list, now: float) -> None:
        """Deliver this step's tokens of one row, stopping at the first that ends it."""
        if seq.t_first_token is None:
            seq.t_first_token = now
            self.metrics_.ttft(now - seq.t_submit)
        seq.t_last_token = now
        delta = Delta("", [])
        for token, info in zip(tokens, logprob_infos):
            seq.completion_tokens += 1
            if token in self._eos:
                self._finish(seq, "stop", delta)
                return
            seq.append(token)
            delta.text += seq.text.add(token)
            delta.token_ids.append(token)
            if info is not None:
                entry = self._token_logprob(token, *info)
                delta.logprobs = (delta.logprobs or []) + [entry]
                seq.logprobs.append(entry)
            if seq.text.stopped:
                self._finish(seq, "stop", delta)
                return
            if len(seq.output_ids) >= seq.params.max_tokens or seq.position >= seq.max_len:
                self._finish(seq, "length", delta)
                return
        seq.handle._push(delta)

    def _token_logprob(self, token: int, logprobs: np.ndarray, top_ids: list[int]) -> TokenLogprob:
        decode = self._loaded.tokenizer.decode
        return TokenLogprob(token, decode([token]), float(logprobs[token]),
                            [(t, decode([t]), float(logprobs[t])) for t in top_ids])

    def _finish(self, seq: Sequence, reason: str, delta: Delta) -> None:
        delta.text += seq.text.finish()
        delta.finish_reason = reason
        seq.status = SeqStatus.FINISHED
        seq.finish_reason = reason
        seq.cache = None
        usage = self._usage(seq)
        delta.usage = usage
        name = {"cancelled": "requests_cancelled"}.get(reason, "requests_completed")
        self.metrics_.count(name)
        self.metrics_.count("prompt_tokens", usage.prompt_tokens)
        self.metrics_.count("cached_tokens", usage.cached_tokens)
        completion = Completion(text=seq.text.text, token_ids=list(seq.output_ids),
                                finish_reason=reason, usage=usage, logprobs=seq.logprobs,
                                request_id=seq.request_id)
        seq.handle._push(delta, completion=completion)

    def _fail(self, seq: Sequence, error: Exception) -> None:
        seq.status = SeqStatus.FINISHED
        seq.cache = None
        self.metrics_.count("requests_failed")
        seq.handle._fail(error)

    def _drop_finished(self) -> None:
        was_waiting = len(self.scheduler.waiting)
        keep = self.scheduler.remove_finished()
        with self._waiting_lock:
            self._queued -= was_waiting - len(self.scheduler.waiting)
        if keep is not None:
            self.runner.keep_rows(keep)

    @staticmethod
    def _usage(seq: Sequence) -> Usage:
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


def _on_host(logits: mx.array) -> np.ndarray:
    """Evaluated float32 logits as a numpy view of the same memory (no copy on the CPU).

    Sampling runs on the host: numpy's argmax and exp over a 262k vocabulary are
    ~10x faster than MLX's CPU kernels, and one keyed draw per row needs no device work.
    """
    logits = logits.astype(mx.float32)
    mx.eval(logits)
    return np.asarray(memoryview(logits))
