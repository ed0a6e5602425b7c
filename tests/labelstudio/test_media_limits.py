"""Memory and time bombs: a pixel bound checked from the header, a byte bound on the decoded stream, one total deadline
per fetch. Real sockets on 127.0.0.1 (the servers below stop on their own after a few seconds)."""

from __future__ import annotations

import os
import shutil
import socket
import ssl
import struct
import subprocess
import threading
import time
import zlib

import numpy as np
import pytest

from backend.labelstudio.media import MediaError, MediaFetcher
from backend.learning.corrections import CorrectionWorker, WorkerConfig
from backend.learning.datastore import open_datastore
from tests.fakes import TracedPeak, make_config, png_bytes
from tests.local_http import LocalServer, send_bytes
from tests.payloads import annotation_event

pytestmark = pytest.mark.reliability

AREA = "Media limits"
GIB = 2**30


def fetcher(tmp_path, **env):
    env.setdefault("MEDIA_ALLOW_PRIVATE_NETWORKS", "true")       # the test servers are on 127.0.0.1
    return MediaFetcher(make_config(tmp_path, **env))


def huge_png(width=19000, height=19000) -> bytes:
    """A valid 1-bit grayscale PNG of width x height (361 MP for the default) in about 70 kB."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)
    row = b"\x00" + b"\xff" * ((width + 7) // 8)
    comp = zlib.compressobj(9)
    idat = b"".join(comp.compress(row * 500) for _ in range(height // 500)) + comp.compress(row * (height % 500))
    idat += comp.flush()
    ihdr = struct.pack(">IIBBBBB", width, height, 1, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", idat) + chunk(b"IEND", b"")


def gzip_bomb(decoded_bytes: int):
    """A handler streaming a gzip body that expands to ``decoded_bytes`` zeros, compressed chunk by chunk as it is
    sent (nothing big is ever held in memory or written to disk)."""
    def handle(h):
        h.send_response(200)
        h.send_header("Content-Type", "image/png")
        h.send_header("Content-Encoding", "gzip")
        h.end_headers()
        comp = zlib.compressobj(6, zlib.DEFLATED, 31)
        block = bytes(2**20)
        try:
            for _ in range(decoded_bytes // len(block)):
                h.wfile.write(comp.compress(block))
            h.wfile.write(comp.flush())
        except OSError:
            pass                                      # the client hung up: exactly what it should do
    return handle


class Drip:
    """Declares 1000 bytes and sends one every 0.1 s, for at most 4 s; notes when the client hangs up."""

    def __init__(self):
        self.sent = 0
        self.client_gone = threading.Event()
        self.done = threading.Event()

    def __call__(self, h):
        h.send_response(200)
        h.send_header("Content-Type", "image/png")
        h.send_header("Content-Length", "1000")
        h.end_headers()
        try:
            for _ in range(40):
                h.wfile.write(b"\x89")
                h.wfile.flush()
                self.sent += 1
                time.sleep(0.1)
        except OSError:
            self.client_gone.set()
        finally:
            self.done.set()


def test_gzip_bomb_stops_at_the_decoded_size_bound(tmp_path, reliability):
    with LocalServer({"/bomb.png": gzip_bomb(GIB)}) as srv:
        f = fetcher(tmp_path, MAX_DOWNLOAD_MB="2")
        with TracedPeak() as mem, pytest.raises(MediaError, match="MAX_DOWNLOAD_MB") as ei:
            f.load_image(srv.url("/bomb.png"), task_id=7)
    assert mem.mib < 64, f"peak {mem.mib:.0f} MiB"            # a 1 GiB body never gets near memory
    assert not [n for n in os.listdir(f.cache_dir) if not n.startswith(".")]   # nothing partial cached
    reliability(AREA, "gzip bomb (1 GiB of zeros in about 1 MB, Content-Encoding: gzip)",
                "an image URL on a test server, MAX_DOWNLOAD_MB=2",
                f"{ei.value}; traced peak memory {mem.mib:.0f} MiB; nothing cached")


def test_content_length_over_the_bound_is_refused_before_reading(tmp_path, reliability):
    big = os.urandom(3 * 2**20)
    with LocalServer({"/big.png": lambda h: send_bytes(h, big, content_type="image/png")}) as srv:
        with pytest.raises(MediaError, match="MAX_DOWNLOAD_MB") as ei:
            fetcher(tmp_path, MAX_DOWNLOAD_MB="2").fetch(srv.url("/big.png"), task_id=7)
    reliability(AREA, "a 3 MB download with MAX_DOWNLOAD_MB=2", "an image URL on a test server", str(ei.value))


def test_slow_drip_is_stopped_at_the_total_deadline(tmp_path, reliability):
    drip = Drip()
    with LocalServer({"/drip.png": drip}) as srv:
        f = fetcher(tmp_path, MEDIA_TIMEOUT_S="1")
        with pytest.raises(MediaError, match="MEDIA_TIMEOUT_S") as ei:
            f.load_image(srv.url("/drip.png"), task_id=7)
        assert drip.done.wait(10)                      # hang guard: the server gives up after 4 s anyway
    assert drip.client_gone.is_set() and drip.sent < 40
    assert not [n for n in os.listdir(f.cache_dir) if not n.startswith(".")]
    reliability(AREA, "a server dripping one byte every 0.1 s (1000 bytes declared)",
                "an image URL on a test server, MEDIA_TIMEOUT_S=1",
                f"{ei.value}; the backend hung up after {drip.sent} of 1000 bytes; nothing cached")


def test_headers_dripping_are_stopped_at_the_total_deadline(tmp_path, reliability):
    state = {"gone": threading.Event(), "lines": 0}

    def slow_headers(h):
        h.send_response(200)
        h.flush_headers()
        try:
            for i in range(40):                       # one header line every 0.1 s, never ending the header block
                h.wfile.write(f"X-Slow-{i}: 1\r\n".encode())
                h.wfile.flush()
                state["lines"] += 1
                time.sleep(0.1)
        except OSError:
            state["gone"].set()
    with LocalServer({"/slow.png": slow_headers}) as srv:
        with pytest.raises(MediaError, match="MEDIA_TIMEOUT_S") as ei:
            fetcher(tmp_path, MEDIA_TIMEOUT_S="1").fetch(srv.url("/slow.png"), task_id=7)
        assert state["gone"].wait(10)
    reliability(AREA, "a server sending one header line every 0.1 s, forever",
                "an image URL on a test server, MEDIA_TIMEOUT_S=1",
                f"{ei.value}; the backend hung up after {state['lines']} header lines")


def test_oversize_image_header_is_refused_before_decoding(tmp_path, reliability):
    data = huge_png()
    assert len(data) < 200_000
    with LocalServer({"/huge.png": lambda h: send_bytes(h, data, content_type="image/png")}) as srv:
        f = fetcher(tmp_path)
        with TracedPeak() as mem, pytest.raises(MediaError, match="MAX_IMAGE_PIXELS") as ei:
            f.load_image(srv.url("/huge.png"), task_id=7)
    assert "task 7" in str(ei.value)
    assert mem.mib < 64
    reliability(AREA, f"a 19000x19000 PNG of {len(data) // 1000} kB (361 MP)",
                "an image URL on a test server, MAX_IMAGE_PIXELS default (50 MP)", str(ei.value))


def test_pixel_bound_is_a_setting(tmp_path, reliability):
    with LocalServer({"/a.png": lambda h: send_bytes(h, png_bytes(64, 48), content_type="image/png")}) as srv:
        with pytest.raises(MediaError, match="MAX_IMAGE_PIXELS") as ei:
            fetcher(tmp_path, MAX_IMAGE_PIXELS="3000").load_image(srv.url("/a.png"), task_id=1)
        assert fetcher(tmp_path, MAX_IMAGE_PIXELS="3072").load_image(srv.url("/a.png")).shape == (48, 64, 3)
    reliability(AREA, "a 64x48 image (3072 pixels) against MAX_IMAGE_PIXELS=3000 and =3072",
                "an image URL on a test server", f"{ei.value}; with 3072 it loads")


def test_correction_worker_refuses_an_oversize_image(tmp_path, reliability):
    cfg = make_config(tmp_path)
    store = open_datastore(None, tmp_path)
    try:
        worker = CorrectionWorker(store, lambda url, task: huge_png(),
                                  WorkerConfig.from_backend(cfg, backoff_base_s=0.0, max_attempts=3))
        mask = np.zeros((30, 40), bool)
        mask[5:10, 5:10] = True
        payload = annotation_event("ANNOTATION_CREATED", 1, 10, 1, "/data/upload/1/huge.png", "a thing", mask)
        eid = store.enqueue_event(payload["action"], payload)
        worker.drain()
        ev = store.get_event(eid)
    finally:
        store.close()
    assert ev["status"] == "failed" and "MAX_IMAGE_PIXELS" in ev["last_error"]
    reliability(AREA, "an annotation on a 19000x19000 image", "ANNOTATION_CREATED webhook",
                f"the event fails at once: {ev['last_error']}")


def test_tls_downloads_are_pinned_verified_and_cut_at_the_deadline(tmp_path, monkeypatch, reliability):
    """HTTPS through the pinned connection: the certificate is checked for the URL's name (not the address), and
    the deadline's watchdog also stops a TLS stream."""
    if not shutil.which("openssl"):
        pytest.skip("needs the openssl command to make a test certificate")
    cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"
    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", str(key), "-out",
                    str(cert), "-days", "1", "-subj", "/CN=localhost", "-addext", "subjectAltName=DNS:localhost"],
                   check=True, capture_output=True, timeout=60)
    real_getaddrinfo = socket.getaddrinfo
    monkeypatch.setattr(socket, "getaddrinfo", lambda host, *a, **k: real_getaddrinfo(
        "127.0.0.1" if host == "localhost" else host, *a, **k))
    monkeypatch.setenv("REQUESTS_CA_BUNDLE", str(cert))          # trust the test certificate
    drip = Drip()
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.load_cert_chain(str(cert), str(key))
    with LocalServer({"/a.png": lambda h: send_bytes(h, png_bytes(8, 6)), "/drip.png": drip}, ctx) as srv:
        f = fetcher(tmp_path, MEDIA_TIMEOUT_S="1")
        assert f.load_image(f"https://localhost:{srv.port}/a.png").shape == (6, 8, 3)
        with pytest.raises(MediaError):                               # the name the certificate does not carry
            f.load_image(f"https://127.0.0.1:{srv.port}/a.png", task_id=7)
        with pytest.raises(MediaError, match="MEDIA_TIMEOUT_S") as ei:
            f.load_image(f"https://localhost:{srv.port}/drip.png", task_id=7)
        assert drip.done.wait(10)
    assert drip.client_gone.is_set() and drip.sent < 40
    reliability(AREA, "a server dripping one byte every 0.1 s over TLS", "an https image URL, MEDIA_TIMEOUT_S=1",
                f"{ei.value}; the backend hung up after {drip.sent} of 1000 bytes")
