"""Serving counters for ``/metrics`` (per worker process; each gunicorn worker keeps its own)."""

from __future__ import annotations

import os
import threading
import time
from collections import defaultdict, deque


class ServingMetrics:
    def __init__(self, window: int = 1000):
        self._lock = threading.Lock()
        self.started_at = time.time()
        self.requests = defaultdict(int)           # endpoint -> count
        self.errors = defaultdict(int)             # endpoint -> responses with status >= 400
        self.status = defaultdict(int)             # status code -> count
        self.latency_sum = defaultdict(float)
        self.latency_max = defaultdict(float)
        self.latency_window = defaultdict(lambda: deque(maxlen=window))
        self.counters = defaultdict(int)           # tasks, regions, task_errors, no_target, events, ...

    def observe_request(self, endpoint: str, status: int, seconds: float) -> None:
        with self._lock:
            self.requests[endpoint] += 1
            self.status[str(status)] += 1
            if status >= 400:
                self.errors[endpoint] += 1
            self.latency_sum[endpoint] += seconds
            self.latency_max[endpoint] = max(self.latency_max[endpoint], seconds)
            self.latency_window[endpoint].append(seconds)

    def inc(self, name: str, n: int = 1) -> None:
        with self._lock:
            self.counters[name] += n

    @staticmethod
    def _pct(values, q):
        if not values:
            return None
        s = sorted(values)
        return s[min(len(s) - 1, int(round(q * (len(s) - 1))))]

    def snapshot(self) -> dict:
        with self._lock:
            latency = {}
            for ep, n in self.requests.items():
                window = list(self.latency_window[ep])
                latency[ep] = {
                    "count": n,
                    "mean_s": self.latency_sum[ep] / n if n else None,
                    "p50_s": self._pct(window, 0.50),
                    "p95_s": self._pct(window, 0.95),
                    "max_s": self.latency_max[ep],
                }
            return {
                "pid": os.getpid(),
                "uptime_s": time.time() - self.started_at,
                "requests": dict(self.requests),
                "errors": dict(self.errors),
                "status_codes": dict(self.status),
                "latency": latency,
                "counters": dict(self.counters),
            }
