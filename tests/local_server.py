"""A Label Studio stand-in for tests: an HTTP server on 127.0.0.1 that serves task images (the paths a task's data
names) and can be slow or down. Bounded: it serves only the files it is given and stops with the test."""

from __future__ import annotations

import socket
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import urlsplit


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class LocalMediaServer:
    """``files``: path (with its query, e.g. ``/storage-data/uploaded/?filepath=upload/1/a.png``) -> bytes.
    ``delay_s``: seconds to wait before each answer (a slow Label Studio). ``start()`` / ``stop()`` may be called
    several times (down, then back on the same port)."""

    def __init__(self, files: dict[str, bytes] | None = None, port: int | None = None, delay_s: float = 0.0):
        self.files = dict(files or {})
        self.port = port or free_port()
        self.delay_s = delay_s
        self.requests: list[tuple[str, dict]] = []       # (path, headers) of every request served
        self._server: ThreadingHTTPServer | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def add_upload(self, name: str, content: bytes, project: int = 1) -> str:
        """Serve ``content`` as Label Studio serves an upload; returns the URL a task's data holds."""
        self.files[f"/storage-data/uploaded/?filepath=upload/{project}/{name}"] = content
        self.files[f"/data/upload/{project}/{name}"] = content
        return f"/data/upload/{project}/{name}"

    def start(self) -> "LocalMediaServer":
        owner = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self):  # noqa: N802 - the http.server API
                owner.requests.append((self.path, dict(self.headers)))
                if owner.delay_s:
                    time.sleep(owner.delay_s)
                body = owner.files.get(self.path) or owner.files.get(urlsplit(self.path).path)
                self.send_response(200 if body is not None else 404)
                self.send_header("Content-Length", str(len(body or b"")))
                self.end_headers()
                try:
                    self.wfile.write(body or b"")
                except OSError:
                    pass                     # the client gave up (a timeout under test)

            def log_message(self, *args):
                pass

        self._server = ThreadingHTTPServer(("127.0.0.1", self.port), Handler)
        self._server.daemon_threads = True
        threading.Thread(target=self._server.serve_forever, name="local-media-server", daemon=True).start()
        return self

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None

    def __enter__(self) -> "LocalMediaServer":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()
