"""Serving counters for ``/metrics`` (per worker process; each gunicorn worker keeps its own): requests, status
codes, latency per endpoint, named counters, and the time of each stage of ``/predict`` (``ssp_sam.timing``)."""

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
        self.stage_count = defaultdict(int)        # /predict stage -> requests that ran it
        self.stage_sum = defaultdict(float)
        self.stage_max = defaultdict(float)
        self.stage_window = defaultdict(lambda: deque(maxlen=window))

    def observe_request(self, endpoint: str, status: int, seconds: float) -> None:
        with self._lock:
            self.requests[endpoint] += 1
            self.status[str(status)] += 1
            if status >= 400:
                self.errors[endpoint] += 1
            self.latency_sum[endpoint] += seconds
            self.latency_max[endpoint] = max(self.latency_max[endpoint], seconds)
            self.latency_window[endpoint].append(seconds)

    def observe_stages(self, seconds: dict) -> None:
        """One request's seconds per stage (``StageTimer.seconds``)."""
        with self._lock:
            for name, s in seconds.items():
                self.stage_count[name] += 1
                self.stage_sum[name] += s
                self.stage_max[name] = max(self.stage_max[name], s)
                self.stage_window[name].append(s)

    def inc(self, name: str, n: int = 1) -> None:
        with self._lock:
            self.counters[name] += n

    @staticmethod
    def _pct(values, q):
        if not values:
            return None
        s = sorted(values)
        return s[min(len(s) - 1, int(round(q * (len(s) - 1))))]

    @classmethod
    def _summary(cls, n: int, total: float, top: float, window) -> dict:
        window = list(window)
        return {"count": n, "mean_s": total / n if n else None, "p50_s": cls._pct(window, 0.50),
                "p95_s": cls._pct(window, 0.95), "max_s": top}

    def snapshot(self) -> dict:
        with self._lock:
            latency = {ep: self._summary(n, self.latency_sum[ep], self.latency_max[ep], self.latency_window[ep])
                       for ep, n in self.requests.items()}
            stages = {name: self._summary(n, self.stage_sum[name], self.stage_max[name], self.stage_window[name])
                      for name, n in self.stage_count.items()}
            return {
                "pid": os.getpid(),
                "uptime_s": time.time() - self.started_at,
                "requests": dict(self.requests),
                "errors": dict(self.errors),
                "status_codes": dict(self.status),
                "latency": latency,
                "stages": stages,
                "counters": dict(self.counters),
            }
