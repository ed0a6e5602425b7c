"""The request guard in process: admission control through the Flask app, and the body deadline on a real socket
pair (a stalled and a dripping client), bounded by HANG_GUARD_S (a hang guard, never a latency assertion)."""

from __future__ import annotations

import io
import socket
import threading
import time

import pytest

from backend.serving.guard import RequestGuard, Watchdog, read_body, BodyRejected
from tests.fakes import FakePredictor, png_bytes, task
from tests.serving.test_api import predict_body, webhook_payload

HANG_GUARD_S = 30.0


class BlockingPredictor(FakePredictor):
    """predict_batch waits until released: a /predict that stays inside the app as long as the test wants."""

    def __init__(self):
        super().__init__()
        self.entered, self.release = threading.Event(), threading.Event()

    def predict_batch(self, pairs, batch_size=8):
        self.entered.set()
        assert self.release.wait(HANG_GUARD_S)
        return super().predict_batch(pairs, batch_size)


@pytest.mark.reliability
def test_requests_beyond_threads_minus_one_get_503_and_health_still_answers(make_app, ls_media, store,
                                                                             reliability):
    pred = BlockingPredictor()
    app = make_app(predictor_factory=lambda c, k: pred, THREADS="2")           # one request in the app at once
    img = ls_media("a.png", png_bytes())
    held = {}
    t = threading.Thread(target=lambda: held.update(r=app.test_client().post(
        "/predict", json=predict_body([task(1, img, "a circle")]))))
    t.start()
    try:
        assert pred.entered.wait(HANG_GUARD_S)
        c = app.test_client()
        busy = c.post("/webhook", json=webhook_payload("ANNOTATION_CREATED"))
        health = c.get("/health")
        root = c.get("/")
    finally:
        pred.release.set()
        t.join(HANG_GUARD_S)
    assert busy.status_code == 503 and busy.headers["Retry-After"] == "1"
    assert busy.get_json()["status"] == 503 and "busy" in busy.get_json()["error"]
    assert store.events == []                                  # refused before the app: nothing queued
    assert health.status_code == 200 and root.status_code == 200
    assert held["r"].status_code == 200
    assert app.test_client().post("/webhook", json=webhook_payload("ANNOTATION_CREATED")).status_code == 201
    reliability("Slow clients", "a second request while THREADS=2 (1 admitted) is busy with a /predict",
                "POST /webhook, GET /health, GET / during the /predict",
                f"/webhook {busy.status_code} Retry-After {busy.headers['Retry-After']}; /health "
                f"{health.status_code}; / {root.status_code}; the /predict then {held['r'].status_code}")


def test_every_admission_slot_comes_back(make_app, monkeypatch):
    from backend.serving import model as model_mod

    app = make_app(THREADS="3")
    c = app.test_client()
    monkeypatch.setattr(model_mod.SSPSAMBackend, "predict", lambda *a, **k: 1 / 0)
    outcomes = [c.post("/predict", json=predict_body([task(1, "/data/upload/1/a.png", "x")])).status_code,  # 500
                c.get("/nope").status_code, c.post("/webhook", data=b"[" * 1000).status_code,
                c.post("/setup", json={"project": 1}).status_code, c.get("/versions").status_code]
    assert outcomes == [500, 404, 400, 200, 200]
    for _ in range(3):                                   # more requests than slots: none is still held
        assert c.get("/metrics").status_code == 200
    admission = c.get("/metrics").get_json()["serving"]["admission"]
    assert admission == {"in_flight": 1, "max_in_flight": 2}          # only the /metrics request itself


# ---------------------------------------------------------------------- the body deadline on a socket pair
def _environ(server_end: socket.socket, length: int | None):
    env = {"REQUEST_METHOD": "POST", "PATH_INFO": "/webhook", "wsgi.input": server_end.makefile("rb"),
           "gunicorn.socket": server_end}
    if length is None:
        env["HTTP_TRANSFER_ENCODING"] = "chunked"
    else:
        env["CONTENT_LENGTH"] = str(length)
    return env


def _drip(client_end: socket.socket, every_s: float | None, stop: threading.Event) -> None:
    end = time.monotonic() + HANG_GUARD_S
    while not stop.is_set() and time.monotonic() < end:
        if every_s is not None:
            try:
                client_end.send(b" ")
            except OSError:
                return
        stop.wait(every_s or 0.05)


@pytest.mark.reliability
@pytest.mark.parametrize("every_s", [None, 0.05], ids=["stalled", "dripping"])
def test_the_body_deadline_is_total_not_per_read(every_s, reliability):
    server_end, client_end = socket.socketpair()
    stop = threading.Event()
    dripper = threading.Thread(target=_drip, args=(client_end, every_s, stop), daemon=True)
    client_end.send(b"{")
    dripper.start()
    try:
        with pytest.raises(BodyRejected) as info:
            # one read of 64 KiB loops over recv() until it has them: a per-read timeout alone would wait until
            # the client stops (here after HANG_GUARD_S)
            read_body(_environ(server_end, 10_000), timeout_s=0.5, max_bytes=2**20, watchdog=Watchdog())
        client_still_sending = dripper.is_alive()
    finally:
        stop.set()
        dripper.join(HANG_GUARD_S)
        server_end.close()
        client_end.close()
    assert info.value.status == 408 and "0.5 s" in info.value.message
    assert client_still_sending                   # cut by the deadline, not by the client giving up
    reliability("Slow clients", f"body {'stalls' if every_s is None else 'drips a byte every 50 ms'} "
                "(socket pair, buffered reader)", "Content-Length 10000, REQUEST_BODY_TIMEOUT_S=0.5",
                f"{info.value.status} {info.value.message!r}")


def test_a_body_that_arrives_in_time_is_handed_over_whole():
    server_end, client_end = socket.socketpair()
    payload = b'{"action": "START_TRAINING", "project": 1}' * 5000
    sender = threading.Thread(target=client_end.sendall, args=(payload,), daemon=True)
    sender.start()
    try:
        got = read_body(_environ(server_end, len(payload)), timeout_s=HANG_GUARD_S, max_bytes=2**20,
                        watchdog=Watchdog())
    finally:
        sender.join(HANG_GUARD_S)
        server_end.close()
        client_end.close()
    assert got == payload


def test_body_size_limit_counts_the_bytes_read():
    env = {"REQUEST_METHOD": "POST", "PATH_INFO": "/predict", "HTTP_TRANSFER_ENCODING": "chunked",
           "wsgi.input": io.BytesIO(b"x" * 5000)}
    with pytest.raises(BodyRejected) as info:
        read_body(env, timeout_s=5, max_bytes=4096, watchdog=Watchdog())
    assert info.value.status == 413
    env["wsgi.input"] = io.BytesIO(b"x" * 4096)
    assert read_body(env, timeout_s=5, max_bytes=4096, watchdog=Watchdog()) == b"x" * 4096


@pytest.mark.parametrize("length,status", [("12x", 400), ("-5", 400), (str(2**40), 413)])
def test_bad_or_huge_content_length(length, status):
    calls = []
    guard = RequestGuard(lambda env, sr: calls.append(1) or [b""], max_in_flight=2, body_timeout_s=5,
                         max_body_bytes=1024)
    seen = {}
    body = guard({"REQUEST_METHOD": "POST", "PATH_INFO": "/predict", "CONTENT_LENGTH": length,
                  "wsgi.input": io.BytesIO(b"")}, lambda s, h: seen.update(status=s, headers=dict(h)))
    assert seen["status"].startswith(str(status)) and calls == []
    assert b'"status": %d' % status in b"".join(body)
    assert guard.stats()["in_flight"] == 0


def test_the_watchdog_fires_only_what_is_still_armed():
    dog, fired = Watchdog(), []
    done = threading.Event()
    keep = dog.arm(time.monotonic() + 0.05, lambda: (fired.append("kept"), done.set()))
    dropped = dog.arm(time.monotonic() + 0.01, lambda: fired.append("dropped"))
    dog.disarm(dropped)
    assert done.wait(HANG_GUARD_S)
    assert fired == ["kept"] and keep != dropped
