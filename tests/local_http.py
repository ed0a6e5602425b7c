"""A small HTTP server on 127.0.0.1 for tests that need real sockets (redirects, slow or hostile servers).

``LocalServer(routes, tls_context=None)`` serves ``{path: handler}`` (over TLS when given a server context) in a
daemon thread; a handler receives the ``BaseHTTPRequestHandler`` and writes the whole response. Every request is
recorded (path and headers) in ``server.hits``. Sockets time out after a few seconds, so a test can never hang on
it; leaving the ``with`` block stops the server.
"""

from __future__ import annotations

import socket
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Callable

Handler = Callable[[BaseHTTPRequestHandler], None]


def send_bytes(handler: BaseHTTPRequestHandler, body: bytes, status: int = 200,
               content_type: str = "application/octet-stream", headers: dict | None = None) -> None:
    handler.send_response(status)
    handler.send_header("Content-Type", content_type)
    handler.send_header("Content-Length", str(len(body)))
    for k, v in (headers or {}).items():
        handler.send_header(k, v)
    handler.end_headers()
    handler.wfile.write(body)


def redirect(location: str, status: int = 302) -> Handler:
    def handle(h: BaseHTTPRequestHandler) -> None:
        send_bytes(h, b"", status=status, headers={"Location": location})
    return handle


def closed_port() -> int:
    """A port on 127.0.0.1 that nothing listens on (bound, then released)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class LocalServer:
    def __init__(self, routes: dict[str, Handler], tls_context=None):
        self.routes = routes
        self.hits: list[tuple[str, dict]] = []
        server = self

        class _Handler(BaseHTTPRequestHandler):
            timeout = 10                      # a stuck client never holds a server thread for long

            def do_GET(self):                 # noqa: N802 - http.server's naming
                server.hits.append((self.path, dict(self.headers)))
                handler = server.routes.get(self.path.split("?", 1)[0])
                if handler is None:
                    send_bytes(self, b"not found", status=404, content_type="text/plain")
                else:
                    handler(self)

            def log_message(self, *args):     # quiet
                pass

        self._httpd = ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
        self._httpd.daemon_threads = True
        if tls_context is not None:          # HTTPS
            self._httpd.socket = tls_context.wrap_socket(self._httpd.socket, server_side=True)
        self.port = self._httpd.server_address[1]
        self.origin = f"{'https' if tls_context else 'http'}://127.0.0.1:{self.port}"
        self._thread = threading.Thread(target=self._httpd.serve_forever, kwargs={"poll_interval": 0.05},
                                        daemon=True)

    def url(self, path: str) -> str:
        return self.origin + path


    def __enter__(self) -> "LocalServer":
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._httpd.shutdown()
        self._httpd.server_close()
        self._thread.join(5)
