"""Stage timings: where the time of one call goes, with ``time.perf_counter`` spans.

Code that does a stage wraps it in ``with stage("sam_encoder"):``. Spans are recorded only while a collector is
active in the current context (``with collect() as timer:``, e.g. around one HTTP request); otherwise ``stage`` costs
one context-variable read. The collector is a ``contextvars.ContextVar``, so concurrent requests on other threads
never mix their spans, and background work (threads that did not enter ``collect``) records nothing.

A span measures wall time on the host. Device work is asynchronous, so a span around GPU work is exact only when it
ends with a synchronising step (a copy to the host); the predictor's spans are drawn that way.
"""

from __future__ import annotations

import contextlib
import time
from contextvars import ContextVar
from typing import Iterator, Optional

# The stages of one prediction, in pipeline order (names used as metric keys and in Server-Timing headers).
STAGES = ("fetch", "decode", "key", "preprocess", "sam_encoder", "clip_vision", "clip_text", "decoder", "upsample",
          "rle", "record", "json")
MODEL_STAGES = ("sam_encoder", "clip_vision", "clip_text", "decoder")


class StageTimer:
    """Seconds per stage name (summed when a stage runs several times) and how often each ran."""

    def __init__(self) -> None:
        self.seconds: dict[str, float] = {}
        self.counts: dict[str, int] = {}
        self.started = time.perf_counter()

    def add(self, name: str, seconds: float) -> None:
        self.seconds[name] = self.seconds.get(name, 0.0) + seconds
        self.counts[name] = self.counts.get(name, 0) + 1

    def elapsed(self) -> float:
        return time.perf_counter() - self.started

    def server_timing(self, total: Optional[float] = None) -> str:
        """The W3C ``Server-Timing`` header value: ``fetch;dur=1.2, decode;dur=20.3, ..., total;dur=250.1`` (ms)."""
        parts = [f"{name};dur={1000 * s:.2f}" for name, s in self.seconds.items()]
        if total is not None:
            parts.append(f"total;dur={1000 * total:.2f}")
        return ", ".join(parts)


_current: ContextVar[Optional[StageTimer]] = ContextVar("ssp_sam_stage_timer", default=None)


@contextlib.contextmanager
def collect() -> Iterator[StageTimer]:
    """Record the spans of this context (this thread's call chain) into a new :class:`StageTimer`."""
    timer = StageTimer()
    token = _current.set(timer)
    try:
        yield timer
    finally:
        _current.reset(token)


def active() -> Optional[StageTimer]:
    """The collector of this context, or None."""
    return _current.get()


class stage:  # noqa: N801 - used like a function: ``with stage("decode"):``
    """``with stage(name):`` adds the block's wall time to the active collector; nothing when none is active.

    A class rather than ``contextlib.contextmanager``: it is entered on every prediction, and a plain ``__enter__``
    costs a fraction of a generator-based context manager.
    """

    __slots__ = ("name", "timer", "t0")

    def __init__(self, name: str) -> None:
        self.name = name

    def __enter__(self) -> "stage":
        self.timer = _current.get()
        if self.timer is not None:
            self.t0 = time.perf_counter()
        return self

    def __exit__(self, *exc) -> None:
        if self.timer is not None:
            self.timer.add(self.name, time.perf_counter() - self.t0)


__all__ = ["STAGES", "MODEL_STAGES", "StageTimer", "collect", "active", "stage"]
