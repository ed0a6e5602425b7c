"""Small HTTP servers on 127.0.0.1 for tests that need real sockets (redirects, slow, hostile or absent servers).

``LocalServer(routes, tls_context=None, port=None)`` serves ``{path: handler}`` (over TLS when given a server
context) in a daemon thread; a handler receives the ``BaseHTTPRequestHandler`` and writes the whole response. Every
request is recorded (path and headers) in ``server.hits``. Sockets time out after a few seconds, so a test can never
hang on it; ``start()``/``stop()`` (or the ``with`` block) may be used several times on the same port, so a test can
take a server down and bring it back.

``LocalMediaServer`` is a Label Studio stand-in built on it: it serves task images under the paths a task's data
names, optionally ``delay_s`` late. ``LocalWeightsServer`` plays the three homes of the official weights (a Hugging Face
endpoint, the SAM and the CLIP download URLs), with the faults a download meets.
"""

from __future__ import annotations

import hashlib
import json
import re
import socket
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Callable, Optional
from urllib.parse import unquote, urlsplit

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
        if handler.command != "HEAD":
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

            do_HEAD = do_GET                  # a handler answers HEAD with send_bytes, which then sends no body

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


def git_blob_id(content: bytes) -> str:
    return hashlib.sha1(b"blob %d\0" % len(content) + content).hexdigest()


class LocalWeightsServer(LocalServer):
    """The homes of the official weights on one local server:

    * a Hugging Face endpoint (``HF_ENDPOINT``), with what huggingface_hub's ``model_info(files_metadata=True)`` and
      ``hf_hub_download`` read: ``GET /api/models/<repo>/revision/<rev>`` (commit, files, sizes, blob ids, LFS
      SHA-256) and ``HEAD``/``GET /<repo>/resolve/<rev>/<path>`` (``ETag``, ``X-Repo-Commit``, and for LFS files
      ``X-Linked-Etag``/``X-Linked-Size``);
    * plain file URLs (the SAM and CLIP bases: ``SAM_WEIGHTS_URL``, ``CLIP_WEIGHTS_URL``).

    Every file answers ``Range: bytes=N-`` with ``206``. Faults, each for one path: ``truncate[path] = n`` sends the
    first n bytes of the next answer (with the whole length announced) and drops the connection; ``gate[path] = Event``
    sends half the body and the rest once the event is set; ``fail[path] = k`` answers the next k requests with 500.
    ``downloads`` lists (path, first byte) of every GET that sent a file's body."""

    COMMIT = "5d0c0ffee5d0c0ffee5d0c0ffee5d0c0ffee5d0c"

    def __init__(self, port: Optional[int] = None):
        super().__init__({}, port=port)
        self.files: dict[str, bytes] = {}
        self.repos: dict[str, dict[str, tuple[bytes, bool]]] = {}
        self.truncate: dict[str, int] = {}
        self.gate: dict[str, threading.Event] = {}
        self.fail: dict[str, int] = {}
        self.downloads: list[tuple[str, int]] = []

    def add_file(self, path: str, content: bytes) -> str:
        self.files[path] = content
        return self.url(path)

    def add_repo_file(self, repo: str, path: str, content: bytes, lfs: bool = True) -> str:
        """Add a file to a repository; returns its URL path (the key of the fault tables)."""
        self.repos.setdefault(repo, {})[path] = (content, lfs)
        return f"/{repo}/resolve/{self.COMMIT}/{path}"

    def handler_for(self, path: str) -> Optional[Handler]:
        path = unquote(urlsplit(path).path)
        return lambda h: self._answer(h, path)

    def _answer(self, h: BaseHTTPRequestHandler, path: str) -> None:
        if self.fail.get(path):
            self.fail[path] -= 1
            send_bytes(h, b"internal error (test)", status=500, content_type="text/plain")
            return
        m = re.fullmatch(r"/api/models/(.+)/revision/([^/]+)", path)
        if m and m.group(1) in self.repos:
            siblings = []
            for name, (content, lfs) in sorted(self.repos[m.group(1)].items()):
                s = {"rfilename": name, "size": len(content), "blobId": git_blob_id(content)}
                if lfs:
                    s["lfs"] = {"size": len(content), "sha256": hashlib.sha256(content).hexdigest(), "pointerSize": 134}
                siblings.append(s)
            body = json.dumps({"id": m.group(1), "sha": self.COMMIT, "siblings": siblings}).encode()
            send_bytes(h, body, content_type="application/json")
            return
        for repo, files in self.repos.items():
            m = re.fullmatch(rf"/{re.escape(repo)}/resolve/([^/]+)/(.+)", path)
            if m and m.group(2) in files:
                content, lfs = files[m.group(2)]
                headers = {"X-Repo-Commit": self.COMMIT, "ETag": f'"{git_blob_id(content)}"'}
                if lfs:
                    headers.update({"X-Linked-Etag": f'"{hashlib.sha256(content).hexdigest()}"',
                                    "X-Linked-Size": str(len(content))})
                key = f"/{repo}/resolve/{self.COMMIT}/{m.group(2)}"
                self._send_file(h, key, content, headers)
                return
        if path in self.files:
            self._send_file(h, path, self.files[path], {})
            return
        send_bytes(h, b"not found", status=404, content_type="text/plain")

    def _send_file(self, h: BaseHTTPRequestHandler, key: str, content: bytes, headers: dict) -> None:
        start = 0
        m = re.fullmatch(r"bytes=(\d+)-", h.headers.get("Range") or "")
        if m:
            start = int(m.group(1))
            if start >= len(content):
                send_bytes(h, b"", status=416, headers={"Content-Range": f"bytes */{len(content)}"})
                return
        headers = {**headers, "Accept-Ranges": "bytes"}
        if start:
            headers["Content-Range"] = f"bytes {start}-{len(content) - 1}/{len(content)}"
        body, status = content[start:], 206 if start else 200
        if h.command == "HEAD":
            send_bytes(h, body, status=status, headers=headers)
            return
        self.downloads.append((key, start))
        cut, gate = self.truncate.pop(key, None), self.gate.get(key)
        if cut is None and gate is None:
            send_bytes(h, body, status=status, headers=headers)
            return
        try:
            h.send_response(status)
            h.send_header("Content-Type", "application/octet-stream")
            h.send_header("Content-Length", str(len(body)))
            for k, v in headers.items():
                h.send_header(k, v)
            h.end_headers()
            first = body[:cut] if cut is not None else body[: len(body) // 2]
            h.wfile.write(first)
            h.wfile.flush()
            if cut is not None:                     # end the connection mid-body (HTTP/1.0: closed after the answer)
                h.close_connection = True
                return
            gate.wait(30)
            h.wfile.write(body[len(first):])
        except OSError:
            pass
