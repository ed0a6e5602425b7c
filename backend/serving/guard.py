"""WSGI middleware in front of the Flask app: slow clients and bad bodies, under plain gunicorn (gthread).

gunicorn's gthread worker serves each request on one of ``THREADS`` pool threads, and a client that sends its body
slowly holds that thread for as long as it likes. This middleware bounds what a client can take:

* **Admission control.** At most ``max_in_flight`` requests (``THREADS - 1``) are inside the app at once, counted
  from the moment they enter (while their body is still arriving) until their response is written. The others get an
  immediate JSON ``503`` with ``Retry-After``. ``GET``/``HEAD`` of ``/`` and ``/health`` are never counted nor
  refused, so one pool thread is always free for Label Studio's 1 s health check.
* **Bodies read under a total deadline.** The whole body must arrive within ``body_timeout_s``: before each read the
  client socket's timeout is set to the time left (a stalled client), and a watchdog shuts the socket's read side at
  the deadline (a client that drips a byte at a time keeps every single read short: gunicorn's ``Body.read`` loops over
  ``recv`` until it has what it was asked for, so per-read timeouts alone never fire). Either way: JSON ``408``. The
  app then gets the buffered body. The same timeout bounds each write of the response (a client that does not read).
* **Size limit on the bytes read.** A ``Content-Length`` over ``max_body_bytes`` is refused before reading; a chunked
  body is counted as it arrives and refused as soon as it passes the limit. Both: JSON ``413``.

A refused request's unread body is never read: the server is asked to close the connection after the answer
(``Connection: close``) and the socket's read side is shut, so neither gunicorn's drain of the rest of the body nor
its lingering close waits on that client. The admission slot is released once the response has been handed to the
socket; a keep-alive client's next request is only read after that. Headers sent slowly (header slowloris) happen before
the app is called and cannot be seen here: a buffering reverse proxy in front is the production answer
(docs/backend.md, "Slow clients and health checks").
"""

from __future__ import annotations

import heapq
import io
import itertools
import json
import logging
import os
import socket
import threading
import time
from http import HTTPStatus
from typing import Callable, Iterable, Optional

logger = logging.getLogger("backend.serving.guard")

OPEN_PATHS = frozenset({"/", "/health"})     # liveness: never counted, never refused
OPEN_METHODS = frozenset({"GET", "HEAD"})
READ_CHUNK = 64 * 1024
RETRY_AFTER_S = 1


class BodyRejected(Exception):
    """The request body cannot be used; ``message`` is safe to show to the client."""

    def __init__(self, status: int, message: str, counter: str):
        super().__init__(message)
        self.status, self.message, self.counter = status, message, counter


# ---------------------------------------------------------------------- deadline watchdog
class Watchdog:
    """One daemon thread that runs a callback when its deadline (``time.monotonic()``) passes, unless disarmed."""

    def __init__(self):
        self._cond = threading.Condition()
        self._heap: list[tuple[float, int]] = []
        self._armed: dict[int, Callable[[], None]] = {}
        self._seq = itertools.count()
        self._pid: Optional[int] = None

    def arm(self, when: float, callback: Callable[[], None]) -> int:
        with self._cond:
            self._start_once()
            token = next(self._seq)
            self._armed[token] = callback
            heapq.heappush(self._heap, (when, token))
            self._cond.notify()
            return token

    def disarm(self, token: int) -> None:
        with self._cond:
            self._armed.pop(token, None)      # its heap entry is dropped when it reaches the top

    def _start_once(self) -> None:
        if self._pid != os.getpid():          # once per process (a forked gunicorn worker starts its own)
            self._pid = os.getpid()
            threading.Thread(target=self._run, name="ssp-sam-body-deadlines", daemon=True).start()

    def _next_due(self) -> Callable[[], None]:
        with self._cond:
            while True:
                while self._heap and self._heap[0][1] not in self._armed:
                    heapq.heappop(self._heap)
                now = time.monotonic()
                if self._heap and self._heap[0][0] <= now:
                    return self._armed.pop(heapq.heappop(self._heap)[1])
                self._cond.wait(self._heap[0][0] - now if self._heap else None)

    def _run(self) -> None:
        while True:
            callback = self._next_due()
            try:
                callback()
            except Exception:
                logger.exception("a body deadline callback failed")


# ---------------------------------------------------------------------- reading the body
def client_socket(environ) -> Optional[socket.socket]:
    """The client connection, where the server exposes it (gunicorn; werkzeug's development server)."""
    sock = environ.get("gunicorn.socket") or environ.get("werkzeug.socket")
    return sock if hasattr(sock, "settimeout") else None


def declared_length(environ) -> Optional[int]:
    """``Content-Length`` as an int; None for a chunked body (or none at all); BodyRejected when malformed."""
    raw = (environ.get("CONTENT_LENGTH") or "").strip()
    if not raw:
        return None
    if not raw.isdigit():
        raise BodyRejected(400, f"invalid Content-Length header {raw[:30]!r}", "bodies_unreadable")
    return int(raw)


def has_body(environ) -> bool:
    """Whether the request announces a body (a malformed ``Content-Length`` counts as one)."""
    try:
        length = declared_length(environ)
    except BodyRejected:
        return True
    return bool(length) or (length is None and "chunked" in environ.get("HTTP_TRANSFER_ENCODING", "").lower())


def stop_reading(sock: Optional[socket.socket]) -> None:
    """Shut the read side: what the client still sends is never waited for (a pending read returns at once)."""
    if sock is not None:
        try:
            sock.shutdown(socket.SHUT_RD)
        except OSError:
            pass


def abandon_body(environ, start_response) -> None:
    """The rest of this request's body will not be read: close the connection after the response.

    The server is asked to close (gunicorn's response object, the owner of ``start_response``, has ``force_close``:
    it then answers ``Connection: close``, so a keep-alive client does not send its next request into a connection
    that is going away) and the socket's read side is shut, so neither gunicorn's drain of the body nor its lingering
    close waits on the client."""
    server_response = getattr(start_response, "__self__", None)
    if callable(getattr(server_response, "force_close", None)):
        server_response.force_close()
    stop_reading(client_socket(environ))


def read_body(environ, timeout_s: float, max_bytes: int, watchdog: Watchdog) -> bytes:
    """The whole request body, read under a total deadline and a size limit (BodyRejected otherwise)."""
    if not has_body(environ):
        return b""
    length = declared_length(environ)
    if length is not None and length > max_bytes:
        raise _too_large(max_bytes, f"Content-Length {length}")
    sock = client_socket(environ)
    deadline = time.monotonic() + timeout_s
    expired = threading.Event()
    token = watchdog.arm(deadline, lambda: (expired.set(), stop_reading(sock))) if sock is not None else None
    try:
        return _read_until_done(environ["wsgi.input"], sock, deadline, length, max_bytes, expired, timeout_s)
    finally:
        if token is not None:
            watchdog.disarm(token)


def _read_until_done(stream, sock, deadline: float, length: Optional[int], max_bytes: int,
                     expired: threading.Event, timeout_s: float) -> bytes:
    chunks, total = [], 0
    while length is None or total < length:
        remaining = deadline - time.monotonic()
        if remaining <= 0 or expired.is_set():
            raise _timed_out(timeout_s, total)
        if sock is not None:
            sock.settimeout(remaining)
        want = READ_CHUNK if length is None else min(READ_CHUNK, length - total)
        try:
            data = stream.read(want)
        except (socket.timeout, TimeoutError):
            raise _timed_out(timeout_s, total) from None
        except Exception as exc:               # the client went away, or a malformed chunked encoding
            if expired.is_set():
                raise _timed_out(timeout_s, total) from None
            raise BodyRejected(400, f"the request body could not be read ({type(exc).__name__})",
                               "bodies_unreadable") from None
        if not data:
            if expired.is_set():
                raise _timed_out(timeout_s, total)
            if length is None:
                break
            raise BodyRejected(400, f"the request body ended after {total} of {length} bytes", "bodies_unreadable")
        total += len(data)
        if total > max_bytes:
            raise _too_large(max_bytes, f"more than {max_bytes} bytes (chunked)")
        chunks.append(data)
    return b"".join(chunks)


def _timed_out(timeout_s: float, received: int) -> BodyRejected:
    return BodyRejected(408, f"the request body did not arrive within {timeout_s:g} s (REQUEST_BODY_TIMEOUT_S); "
                             f"{received} bytes received", "body_timeouts")


def _too_large(max_bytes: int, what: str) -> BodyRejected:
    return BodyRejected(413, f"request body too large: {what}; the limit is {max_bytes} bytes "
                             f"(MAX_REQUEST_BODY_MB)", "bodies_too_large")


def hand_over(environ, body: bytes) -> None:
    """Give the app the buffered body as an ordinary ``Content-Length`` request."""
    environ["wsgi.input"] = io.BytesIO(body)
    environ["CONTENT_LENGTH"] = str(len(body))
    environ.pop("HTTP_TRANSFER_ENCODING", None)


# ---------------------------------------------------------------------- the middleware
class _ReleaseWhenDone:
    """The app's response iterable; runs ``release`` once: after its last item or on ``close()``."""

    def __init__(self, app_iter: Iterable[bytes], release: Callable[[], None]):
        self._app_iter, self._it, self._release = app_iter, iter(app_iter), release

    def __iter__(self):
        return self

    def __next__(self) -> bytes:
        try:
            return next(self._it)
        except BaseException:                  # StopIteration included: the whole response has been written
            self._release()
            raise

    def close(self) -> None:
        try:
            close = getattr(self._app_iter, "close", None)
            if close is not None:
                close()
        finally:
            self._release()


class RequestGuard:
    """``app.wsgi_app = RequestGuard(app.wsgi_app, ...)``: admission control, body deadline, body size limit."""

    def __init__(self, app, *, max_in_flight: int, body_timeout_s: float, max_body_bytes: int,
                 count: Callable[[str], None] = lambda name: None):
        self.app = app
        self.max_in_flight = max(1, int(max_in_flight))
        self.body_timeout_s = float(body_timeout_s)
        self.max_body_bytes = int(max_body_bytes)
        self._count = count
        self._lock = threading.Lock()
        self._in_flight = 0
        self._watchdog = Watchdog()

    def stats(self) -> dict:
        with self._lock:
            return {"in_flight": self._in_flight, "max_in_flight": self.max_in_flight}

    def __call__(self, environ, start_response):
        sock = client_socket(environ)
        if environ.get("PATH_INFO") in OPEN_PATHS and environ.get("REQUEST_METHOD") in OPEN_METHODS:
            self._bound_writes(sock)
            if has_body(environ):
                abandon_body(environ, start_response)     # a liveness probe with a body: the body is never read
            return self.app(environ, start_response)
        if not self._enter():
            self._count("rejected_busy")
            return self._refuse(environ, start_response, 503, f"the server is busy ({self.max_in_flight} requests "
                                f"in progress); retry in {RETRY_AFTER_S} s", {"Retry-After": str(RETRY_AFTER_S)},
                                log_level=logging.INFO)
        return self._serve_admitted(environ, start_response, sock, _Once(self._leave))

    def _serve_admitted(self, environ, start_response, sock, release: "_Once"):
        try:
            body = read_body(environ, self.body_timeout_s, self.max_body_bytes, self._watchdog)
        except BodyRejected as exc:
            release()
            self._count(exc.counter)
            return self._refuse(environ, start_response, exc.status, exc.message)
        except BaseException:
            release()
            raise
        hand_over(environ, body)
        self._bound_writes(sock)
        try:
            return _ReleaseWhenDone(self.app(environ, start_response), release)
        except BaseException:
            release()
            raise

    def _enter(self) -> bool:
        with self._lock:
            if self._in_flight >= self.max_in_flight:
                return False
            self._in_flight += 1
            return True

    def _leave(self) -> None:
        with self._lock:
            self._in_flight -= 1

    def _bound_writes(self, sock) -> None:
        """Each write of the response must finish within the body timeout (a client that does not read)."""
        if sock is not None:
            try:
                sock.settimeout(self.body_timeout_s)
            except OSError:
                pass

    def _refuse(self, environ, start_response, status: int, message: str, headers: Optional[dict] = None,
                log_level: int = logging.WARNING):
        """Answer ``{"status", "error"}`` without calling the app (a busy refusal is logged at INFO: /metrics counts
        them, and under overload a warning per request would flood the log)."""
        if has_body(environ):
            abandon_body(environ, start_response)
        self._bound_writes(client_socket(environ))
        logger.log(log_level, "%s %s -> %d: %s", environ.get("REQUEST_METHOD"), environ.get("PATH_INFO"), status,
                   message)
        body = json.dumps({"status": status, "error": message}).encode()
        start_response(f"{status} {HTTPStatus(status).phrase}",
                       [("Content-Type", "application/json"), ("Content-Length", str(len(body))),
                        *(headers or {}).items()])
        return [body]


class _Once:
    """A callable that runs ``fn`` on its first call only (thread-safe)."""

    def __init__(self, fn: Callable[[], None]):
        self._fn, self._lock, self._done = fn, threading.Lock(), False

    def __call__(self) -> None:
        with self._lock:
            if self._done:
                return
            self._done = True
        self._fn()


__all__ = ["RequestGuard", "BodyRejected", "Watchdog", "read_body", "OPEN_PATHS"]
