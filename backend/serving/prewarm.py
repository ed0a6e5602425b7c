"""Prewarm: compute a task image's embedding in the background, before the annotator types a sentence.

An interactive ``/predict`` that comes before any sentence (``SSPSAMBackend._awaiting_sentence``) is answered at
once; its picture is queued here. One daemon thread per worker process takes the queue in order: it fetches the
picture (``MediaFetcher.open_image``: downloaded once, identified by content) and asks the served predictor to
``prewarm`` it, which computes and caches its SAM and CLIP image features. The sentence typed next on that picture
then runs only the text tower, the prompt encoder and the mask decoder; if it comes while the prewarm is still
running, the predictor waits for that computation instead of starting a second one.

The queue is bounded (``max_pending``): when it is full the oldest waiting picture is dropped (the annotator has moved
on), and a picture already waiting is not queued twice. Failures are logged on one line and counted; they never reach
a client. Counters in ``/metrics`` (``serving.counters``): ``prewarm_queued``, ``prewarm_computed``,
``prewarm_cached`` (already there), ``prewarm_dropped``, ``prewarm_errors``.
"""

from __future__ import annotations

import logging
import os
import threading
from collections import OrderedDict
from typing import Callable, Optional

from backend.logs import loggable

logger = logging.getLogger(__name__)


class Prewarmer:
    def __init__(self, manager, media, count: Callable[[str], None], max_pending: int = 8):
        self.manager = manager
        self.media = media
        self._count = count
        self.max_pending = max(1, int(max_pending))
        self._pending: OrderedDict = OrderedDict()      # url -> (task_id, project_id)
        self._cond = threading.Condition()
        self._busy = False
        self._thread: Optional[threading.Thread] = None
        self._pid: Optional[int] = None
        self._stopped = False

    def submit(self, url: str, task_id=None, project_id=None) -> bool:
        """Queue a picture; False when it is already waiting. Never blocks."""
        with self._cond:
            if url in self._pending:
                return False
            if len(self._pending) >= self.max_pending:
                self._pending.popitem(last=False)
                self._count("prewarm_dropped")
            self._pending[url] = (task_id, project_id)
            self._count("prewarm_queued")
            self._ensure_thread()
            self._cond.notify()
        return True

    def _ensure_thread(self) -> None:
        """Start the thread in this process (lazily: a gunicorn worker forked from the master gets its own)."""
        if self._pid != os.getpid() or self._thread is None or not self._thread.is_alive():
            self._pid = os.getpid()
            self._stopped = False
            self._thread = threading.Thread(target=self._loop, name="ssp-sam-prewarm", daemon=True)
            self._thread.start()

    def _loop(self) -> None:
        while True:
            with self._cond:
                while not self._pending and not self._stopped:
                    self._cond.wait()
                if self._stopped:
                    return
                url, (task_id, project_id) = self._pending.popitem(last=False)
                self._busy = True
            try:
                self._prewarm(url, task_id, project_id)
            finally:
                with self._cond:
                    self._busy = False
                    self._cond.notify_all()

    def _prewarm(self, url: str, task_id, project_id) -> None:
        try:
            predictor = self.manager.get().predictor
            prewarm = getattr(predictor, "prewarm", None)
            if not callable(prewarm):
                return
            computed = prewarm(self.media.open_image(url, task_id=task_id, project_id=project_id))
            self._count("prewarm_computed" if computed else "prewarm_cached")
        except Exception as exc:
            self._count("prewarm_errors")
            logger.warning("prewarm of the image of task %s failed: %s: %s", loggable(task_id, limit=40),
                           type(exc).__name__, loggable(exc))

    def wait_idle(self, timeout: float = 30.0) -> bool:
        """Wait until nothing is queued or running (tests, benchmarks)."""
        with self._cond:
            return self._cond.wait_for(lambda: not self._pending and not self._busy, timeout)

    def stop(self) -> None:
        with self._cond:
            self._stopped = True
            self._pending.clear()
            self._cond.notify_all()


__all__ = ["Prewarmer"]
