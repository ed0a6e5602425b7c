"""Small HTTP servers on 127.0.0.1 for tests that need real sockets (redirects, slow, hostile or absent servers).

``LocalServer(routes, tls_context=None, port=None)`` serves ``{path: handler}`` (over TLS when given a server
context) in a daemon thread; a handler receives the ``BaseHTTPRequestHandler`` and writes the whole response. Every
request is recorded (path and headers) in ``server.hits``. Sockets time out after a few seconds, so a test can never
hang on it; ``start()``/``stop()`` (or the ``with`` block) may be used several times on the same port, so a test can
take a server down and bring it back.

``LocalMediaServer`` is a Label Studio stand-in built on it: it serves task images under the paths a task's data
names, optionally ``delay_s`` late.
"""

from __future__ import annotations

import socket
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Callable, Optional
from urllib.parse import urlsplit

Handler = Callable[[BaseHTTPRequestHandler], None]


def send_bytes(handler: BaseHTTPRequestHandler, body: bytes, status: int = 200,
               content_type: str = "application/octet-stream", headers: dict | None = None) -> None:
    try:
        handler.send_response(status)
        handler.send_header("Content-Type", content_type)
        handler.send_header("Content-Length", str(len(body)))
        for k, v in (headers or {}).items():
            handler.send_header(k, v)
        handler.end_headers()
        handler.wfile.write(body)
    except OSError:
        pass                                  # the client gave up (a timeout under test)


def redirect(location: str, status: int = 302) -> Handler:
    def handle(h: BaseHTTPRequestHandler) -> None:
        send_bytes(h, b"", status=status, headers={"Location": location})
    return handle


def free_port() -> int:
    """A port on 127.0.0.1 that nothing listens on (bound, then released)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


closed_port = free_port


class LocalServer:
    def __init__(self, routes: dict[str, Handler], tls_context=None, port: Optional[int] = None):
        self.routes = routes
        self.tls_context = tls_context
        self.port = port or free_port()
        self.origin = f"{'https' if tls_context else 'http'}://127.0.0.1:{self.port}"
        self.hits: list[tuple[str, dict]] = []
        self._httpd: Optional[ThreadingHTTPServer] = None
        self._thread: Optional[threading.Thread] = None

    def url(self, path: str = "") -> str:
        return self.origin + path

    def handler_for(self, path: str) -> Optional[Handler]:
        return self.routes.get(urlsplit(path).path)

    def start(self) -> "LocalServer":
        server = self

        class _Handler(BaseHTTPRequestHandler):
            timeout = 10                      # a stuck client never holds a server thread for long

            def do_GET(self):                 # noqa: N802 - http.server's naming
                server.hits.append((self.path, dict(self.headers)))
                handler = server.handler_for(self.path)
                if handler is None:
                    send_bytes(self, b"not found", status=404, content_type="text/plain")
                else:
                    handler(self)

            def log_message(self, *args):     # quiet
                pass

        self._httpd = ThreadingHTTPServer(("127.0.0.1", self.port), _Handler)
        self._httpd.daemon_threads = True
        if self.tls_context is not None:      # HTTPS
            self._httpd.socket = self.tls_context.wrap_socket(self._httpd.socket, server_side=True)
        self._thread = threading.Thread(target=self._httpd.serve_forever, kwargs={"poll_interval": 0.05},
                                        name="local-http-server", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        if self._httpd is not None:
            self._httpd.shutdown()
            self._httpd.server_close()
            self._thread.join(5)
            self._httpd = None

    def __enter__(self) -> "LocalServer":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


class LocalMediaServer(LocalServer):
    """``files``: path (with its query, e.g. ``/storage-data/uploaded/?filepath=upload/1/a.png``, or without) ->
    bytes. ``delay_s``: seconds to wait before each answer (a slow Label Studio). ``token``: when given, a request
    without ``Authorization: Token <token>`` (or ``Bearer <token>``) gets ``401``, as from Label Studio."""

    def __init__(self, files: dict[str, bytes] | None = None, port: Optional[int] = None, delay_s: float = 0.0,
                 token: Optional[str] = None):
        super().__init__({}, port=port)
        self.files = dict(files or {})
        self.delay_s = delay_s
        self.token = token

    def add_upload(self, name: str, content: bytes, project: int = 1) -> str:
        """Serve ``content`` as Label Studio serves an upload; returns the URL a task's data holds."""
        self.files[f"/storage-data/uploaded/?filepath=upload/{project}/{name}"] = content
        self.files[f"/data/upload/{project}/{name}"] = content
        return f"/data/upload/{project}/{name}"

    def handler_for(self, path: str) -> Optional[Handler]:
        body = self.files.get(path) or self.files.get(urlsplit(path).path)

        def answer(h: BaseHTTPRequestHandler) -> None:
            if self.delay_s:
                time.sleep(self.delay_s)
            if self.token and h.headers.get("Authorization") not in (f"Token {self.token}", f"Bearer {self.token}"):
                send_bytes(h, b'{"detail": "Authentication credentials were not provided."}', status=401,
                           content_type="application/json")
            else:
                send_bytes(h, body or b"", status=200 if body is not None else 404,
                           content_type="image/png" if body is not None else "text/plain")
        return answer
