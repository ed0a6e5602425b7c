"""Slow clients and oversize bodies against the real server (``ssp-sam serve``, gunicorn gthread, THREADS=4) on
127.0.0.1: a body that stalls or drips is cut at ``REQUEST_BODY_TIMEOUT_S`` with a JSON 408, requests beyond
``THREADS - 1`` get an immediate JSON 503, ``/health`` keeps answering, and a body over ``MAX_REQUEST_BODY_MB`` gets
413 whether it is announced (``Content-Length``) or chunked.

Every wait is bounded: HANG_GUARD_S is a guard against a hang, never a latency assertion."""

from __future__ import annotations

import http.client
import json
import select
import threading
import time

import pytest
import requests

from tests.payloads import annotation_event
from tests.serving.server_process import running_server

HANG_GUARD_S = 30.0
BODY_TIMEOUT_S = 2.0
THREADS = 4
LIMIT_MB = 1


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("slow")
    with running_server(tmp, THREADS=str(THREADS), REQUEST_BODY_TIMEOUT_S=str(BODY_TIMEOUT_S),
                        MAX_REQUEST_BODY_MB=str(LIMIT_MB)) as srv:
        yield srv


class SlowClient:
    """One request on its own connection whose body comes slowly: a byte every ``drip_s`` seconds, or after the first
    byte nothing at all (``drip_s=None``). A bounded thread sends until the server answers or ``HANG_GUARD_S``."""

    def __init__(self, port: int, path: str, declared: int = 4096, drip_s: float | None = 0.2):
        self.conn = http.client.HTTPConnection("127.0.0.1", port, timeout=HANG_GUARD_S)
        self.conn.putrequest("POST", path)
        self.conn.putheader("Content-Type", "application/json")
        self.conn.putheader("Content-Length", str(declared))
        self.conn.endheaders(b"{")
        self.declared, self.drip_s, self.sent = declared, drip_s, 1
        self.thread = threading.Thread(target=self._drip, daemon=True)
        self.thread.start()

    def _drip(self) -> None:
        end = time.monotonic() + HANG_GUARD_S
        while time.monotonic() < end and self.sent < self.declared:
            readable, _, _ = select.select([self.conn.sock], [], [], self.drip_s or 0.2)
            if readable:                        # the server answered (or closed): stop sending
                return
            if self.drip_s is not None:
                try:
                    self.conn.sock.send(b" ")
                except OSError:
                    return
                self.sent += 1

    def finish(self) -> tuple[int, dict, dict]:
        """(status, headers, JSON body) of the server's answer."""
        self.thread.join(HANG_GUARD_S)
        try:
            resp = self.conn.getresponse()
            return resp.status, dict(resp.getheaders()), json.loads(resp.read())
        finally:
            self.conn.close()


def _assert_json_error(status: int, body: dict) -> None:
    assert body["status"] == status and isinstance(body["error"], str) and body["error"]


@pytest.mark.reliability
def test_stalled_and_dripping_bodies_are_cut_with_408(server, reliability):
    stalled = SlowClient(server.port, "/webhook", drip_s=None)
    dripping = SlowClient(server.port, "/predict", drip_s=0.2)
    for client, case in ((stalled, "body stalls after its first byte"),
                         (dripping, "body drips one byte every 0.2 s (4096 bytes announced)")):
        status, _, body = client.finish()
        assert status == 408, body
        _assert_json_error(408, body)
        assert str(BODY_TIMEOUT_S).rstrip("0").rstrip(".") in body["error"]
        reliability("Slow clients", case, f"POST with Content-Length 4096, REQUEST_BODY_TIMEOUT_S={BODY_TIMEOUT_S}",
                    f"{status} {body['error']!r} after {client.sent} bytes")


@pytest.mark.reliability
def test_slow_body_clients_cannot_starve_health(server, reliability):
    clients = [SlowClient(server.port, "/webhook" if i % 2 else "/predict", drip_s=0.2 if i < 3 else None)
               for i in range(6)]
    health = []
    for _ in range(3):
        time.sleep(0.5)   # ordering only: the slow clients are in (or being answered) when /health is asked
        r = requests.get(server.base + "/health", timeout=HANG_GUARD_S)
        health.append(r.status_code)
    results = [c.finish() for c in clients]
    statuses = [s for s, _, _ in results]
    assert health == [200, 200, 200]
    assert set(statuses) <= {408, 503}, statuses
    assert 408 in statuses and statuses.count(408) <= THREADS - 1, statuses
    for status, headers, body in results:
        _assert_json_error(status, body)
        if status == 503:
            assert headers.get("Retry-After") == "1"
    reliability("Slow clients", f"6 slow-body clients (3 dripping, 3 stalled) on THREADS={THREADS}, then /health x3",
                "raw sockets, Content-Length 4096, one byte every 0.2 s or none",
                f"/health {health}; slow clients {sorted(statuses)} (408 = deadline, 503 = over THREADS-1 in flight)")


def _send_chunked(port: int, path: str, total: int, chunk: int = 64 * 1024) -> tuple[int, dict]:
    """POST ``total`` bytes in chunked transfer encoding from a thread while this one reads the answer."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=HANG_GUARD_S)
    conn.putrequest("POST", path)
    conn.putheader("Content-Type", "application/json")
    conn.putheader("Transfer-Encoding", "chunked")
    conn.endheaders()

    def send():
        try:
            left = total
            while left > 0:
                n = min(chunk, left)
                conn.sock.sendall(b"%x\r\n" % n + b" " * n + b"\r\n")
                left -= n
            conn.sock.sendall(b"0\r\n\r\n")
        except OSError:
            pass                                  # the server stopped reading: its answer is already there
    sender = threading.Thread(target=send, daemon=True)
    sender.start()
    try:
        resp = conn.getresponse()
        return resp.status, json.loads(resp.read())
    finally:
        sender.join(HANG_GUARD_S)
        conn.close()


@pytest.mark.reliability
def test_chunked_body_over_the_limit_gets_413(server, reliability):
    total = LIMIT_MB * 2**20 + 64 * 1024
    status, body = _send_chunked(server.port, "/predict", total)
    assert status == 413, body
    _assert_json_error(413, body)
    reliability("Oversize bodies", "chunked body over MAX_REQUEST_BODY_MB (no Content-Length)",
                f"{total} bytes chunked, MAX_REQUEST_BODY_MB={LIMIT_MB}", f"{status} {body['error']!r}")


@pytest.mark.reliability
def test_announced_body_over_the_limit_gets_413_without_being_read(server, reliability):
    conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=HANG_GUARD_S)
    try:
        conn.putrequest("POST", "/webhook")
        conn.putheader("Content-Type", "application/json")
        conn.putheader("Content-Length", str(50 * 2**20))
        conn.endheaders(b"{")                    # 1 byte of the 50 MiB announced: the answer must not wait for more
        resp = conn.getresponse()
        body = json.loads(resp.read())
    finally:
        conn.close()
    assert resp.status == 413, body
    _assert_json_error(413, body)
    reliability("Oversize bodies", "Content-Length over MAX_REQUEST_BODY_MB, body never sent",
                f"Content-Length {50 * 2**20}, 1 byte sent", f"{resp.status} {body['error']!r}")


def test_chunked_and_plain_bodies_still_reach_the_app(server):
    payload = annotation_event("ANNOTATION_CREATED", 7, 3, 1, "/data/upload/1/a.png", "a circle")
    raw = json.dumps(payload).encode()
    r = requests.post(server.base + "/webhook", data=iter([raw[:100], raw[100:]]),
                      headers={"Content-Type": "application/json"}, timeout=HANG_GUARD_S)   # chunked
    assert r.status_code == 201, r.text
    r = requests.post(server.base + "/webhook", json={**payload, "annotation": {**payload["annotation"], "id": 8}},
                      timeout=HANG_GUARD_S)
    assert r.status_code == 201, r.text
    r = requests.post(server.base + "/setup", json={"project": "1.1"}, timeout=HANG_GUARD_S)
    assert r.status_code == 200 and r.json()["model_version"]


@pytest.mark.reliability
def test_a_refused_keep_alive_client_is_told_to_reconnect(server, reliability):
    """A 503 leaves the body unread: the answer says ``Connection: close``, so a keep-alive client opens a new
    connection for its next request instead of sending it into one that is going away (ConnectionError)."""
    holders = [SlowClient(server.port, "/webhook", drip_s=None) for _ in range(THREADS - 1)]
    time.sleep(0.5)                   # ordering only: the holders are admitted before the session asks
    payload = annotation_event("ANNOTATION_CREATED", 70, 3, 1, "/data/upload/1/a.png", "a circle")
    with requests.Session() as session:
        busy = session.post(server.base + "/webhook", json=payload, timeout=HANG_GUARD_S)
        held = [c.finish()[0] for c in holders]
        again = session.post(server.base + "/webhook", json=payload, timeout=HANG_GUARD_S)
    assert busy.status_code == 503 and busy.headers.get("Connection", "").lower() == "close", busy.headers
    assert held == [408] * (THREADS - 1)
    assert again.status_code == 201, again.text
    reliability("Slow clients", "keep-alive client refused while THREADS-1 slow bodies hold the slots",
                "requests.Session: POST /webhook, then again once the slow bodies are cut",
                f"{busy.status_code} with Connection: {busy.headers.get('Connection')}; slow bodies {held}; "
                f"the same session then {again.status_code}")
