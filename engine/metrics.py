"""Counters and rates the engine thread updates and any thread can snapshot."""

from __future__ import annotations

import threading
import time
from collections import deque

WINDOW_S = 5.0  # "now" rates are averaged over this many seconds


def _percentile(values: list[float], q: float) -> float:
    if not values:
        return 0.0
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


class EngineMetrics:
    def __init__(self):
        self._lock = threading.Lock()
        self.counters = dict.fromkeys(
            ("requests_submitted", "requests_completed", "requests_cancelled", "requests_failed",
             "requests_rejected", "prompt_tokens", "cached_tokens", "prefill_tokens", "cache_fill_tokens",
             "generated_tokens", "steps"), 0)
        self._events: deque[tuple[float, int, int, int]] = deque()  # (t, decode, prefill, rows)
        self._ttft: deque[float] = deque(maxlen=1024)

    def count(self, name: str, n: int = 1) -> None:
        with self._lock:
            self.counters[name] += n

    def step(self, decoded: int, prefilled: int, rows: int) -> None:
        now = time.perf_counter()
        with self._lock:
            self.counters["steps"] += 1
            self.counters["generated_tokens"] += decoded
            self.counters["prefill_tokens"] += prefilled
            self._events.append((now, decoded, prefilled, rows))
            while self._events and self._events[0][0] < now - WINDOW_S:
                self._events.popleft()

    def ttft(self, seconds: float) -> None:
        with self._lock:
            self._ttft.append(seconds)

    def snapshot(self) -> dict:
        now = time.perf_counter()
        with self._lock:
            events = [e for e in self._events if e[0] >= now - WINDOW_S]
            ttft = list(self._ttft)
            out = dict(self.counters)
        span = max(now - events[0][0], 1e-3) if len(events) > 1 else WINDOW_S
        out["decode_tps"] = sum(e[1] for e in events) / span if events else 0.0
        out["prefill_tps"] = sum(e[2] for e in events) / span if events else 0.0
        out["mean_batch_rows"] = sum(e[3] for e in events) / len(events) if events else 0.0
        out["ttft_p50_s"] = _percentile(ttft, 0.50)
        out["ttft_p99_s"] = _percentile(ttft, 0.99)
        return out


class PoolingMetrics:
    """An embedding or reranking model's counters: requests, texts, tokens, and the
    texts per second of its recent batches."""

    def __init__(self):
        self._lock = threading.Lock()
        self.counters = dict.fromkeys(("requests_submitted", "requests_completed", "requests_failed",
                                       "texts", "tokens", "batches"), 0)
        self._events: deque[tuple[float, int, float]] = deque()  # (t, texts, seconds)

    def count(self, name: str, n: int = 1) -> None:
        with self._lock:
            self.counters[name] += n

    def batch(self, texts: int, tokens: int, seconds: float) -> None:
        now = time.perf_counter()
        with self._lock:
            self.counters["texts"] += texts
            self.counters["tokens"] += tokens
            self.counters["batches"] += 1
            self._events.append((now, texts, seconds))
            while self._events and self._events[0][0] < now - WINDOW_S:
                self._events.popleft()

    def snapshot(self) -> dict:
        now = time.perf_counter()
        with self._lock:
            events = [e for e in self._events if e[0] >= now - WINDOW_S]
            out = dict(self.counters)
        span = max(now - events[0][0] + events[0][2], 1e-3) if events else WINDOW_S
        out["texts_per_s"] = sum(e[1] for e in events) / span if events else 0.0
        return out
