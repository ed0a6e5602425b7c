"""Label Studio down or slow: predictions fail per task with a reason (and no stored empty prediction), the
corrections queue stays intact, and the backend recovers by itself when Label Studio is back."""

from __future__ import annotations

import time

import numpy as np
import pytest

from backend.learning.corrections import CorrectionWorker, WorkerConfig
from backend.learning.datastore import open_datastore
from backend.serving.app import create_app
from tests.fakes import LABEL_CONFIG, FakePredictor, make_config, png_bytes, task
from tests.local_http import LocalMediaServer
from tests.payloads import annotation_event

pytestmark = pytest.mark.reliability
TOKEN = "legacy0123456789abcdef"


def _app(tmp_path, ls: LocalMediaServer, **env):
    cfg = make_config(tmp_path, LABEL_STUDIO_URL=ls.origin, LABEL_STUDIO_API_KEY=TOKEN, **env)
    store = open_datastore(cfg)

    def worker(store_, media, config):       # the real worker, retrying fast for the test
        return CorrectionWorker(store_, media, WorkerConfig.from_backend(config, backoff_base_s=0.2,
                                                                         backoff_max_s=0.5, poll_interval_s=0.05,
                                                                         max_attempts=100))
    app = create_app(cfg, predictor_factory=lambda c, k: FakePredictor(), store_factory=lambda c: store,
                     worker_factory=worker)
    return app, store


def _predict(client, tasks):
    r = client.post("/predict", json={"tasks": tasks, "label_config": LABEL_CONFIG, "project": "1.1"})
    assert r.status_code == 200, r.get_json()
    return r.get_json()["results"]


def test_label_studio_down_then_back(tmp_path, reliability):
    ls = LocalMediaServer()                                   # not started: Label Studio is down
    image = ls.add_upload("a.png", png_bytes(40, 30))
    app, store = _app(tmp_path, ls)
    client = app.test_client()
    try:
        down = _predict(client, [task(1, image, "a circle"), task(2, image, "left one")])
        assert [("result" in r, bool(r.get("error"))) for r in down] == [(False, True), (False, True)]
        mask = np.zeros((30, 40), bool)
        mask[5:20, 5:25] = True
        r = client.post("/webhook", json=annotation_event("ANNOTATION_CREATED", 11, 1, 1, image, "the box", mask))
        assert r.status_code == 201                             # queued although Label Studio is down
        event_id = r.get_json()["event_id"]
        deadline = time.monotonic() + 30
        while store.get_event(event_id)["attempts"] < 2 and time.monotonic() < deadline:
            time.sleep(0.05)
        waiting = store.get_event(event_id)
        assert waiting["status"] in ("pending", "processing") and waiting["attempts"] >= 2 and waiting["last_error"]
        ls.start()                                              # Label Studio is back: no restart of the backend
        while store.get_event(event_id)["status"] != "done" and time.monotonic() < deadline:
            time.sleep(0.05)
        assert store.get_event(event_id)["status"] == "done" and len(store.list_samples()) == 1
        back = _predict(client, [task(1, image, "a circle"), task(2, image, "left one")])
        assert all(r["result"] for r in back)
    finally:
        app.extensions["ssp_sam"].stop()
        ls.stop()
        store.close()
    reliability("Label Studio down or slow", "Label Studio down, then back",
                "/predict of 2 tasks and an ANNOTATION_CREATED webhook while nothing answers at the LS URL; then "
                "LS starts on that URL",
                f"both tasks fail with a reason and no result ({down[0]['error']!r}), so LS stores no prediction; "
                f"the webhook is queued (201) and retried ({waiting['attempts']} attempts); once LS is back the "
                "event is processed and /predict answers, without a restart")


def test_label_studio_slow(tmp_path, reliability):
    with LocalMediaServer(delay_s=3.0) as ls:                 # every answer 3 s late; the backend waits 1 s
        image = ls.add_upload("b.png", png_bytes(40, 30))
        app, store = _app(tmp_path, ls, MEDIA_TIMEOUT_S="1")
        try:
            slow = _predict(app.test_client(), [task(1, image, "a circle")])
        finally:
            app.extensions["ssp_sam"].stop()
            store.close()
    assert "result" not in slow[0] and slow[0]["error"]
    reliability("Label Studio down or slow", "Label Studio answering after 3 s, MEDIA_TIMEOUT_S=1",
                "/predict of 1 task whose image Label Studio serves 3 s late",
                f"the task fails with a reason and no result ({slow[0]['error']!r}); the request still answers")
