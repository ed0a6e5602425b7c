"""Per-process runtime: correction worker lifecycle, dev-server CLI."""

from __future__ import annotations

import json
import subprocess
import sys

from backend.serving.app import create_app
from tests.fakes import FakePredictor, FakeStore, make_config


class FakeWorker:
    instances = []

    def __init__(self, store, media, config):
        self.store, self.media, self.config = store, media, config
        self.started = self.stopped = self.notified = 0
        FakeWorker.instances.append(self)

    def notify(self):
        self.notified += 1

    def start(self):
        self.started += 1
        return self

    def stop(self):
        self.stopped += 1


def test_correction_worker_started_once_lazily_and_stopped(tmp_path):
    FakeWorker.instances.clear()
    store = FakeStore()
    app = create_app(make_config(tmp_path), predictor_factory=lambda c, k: FakePredictor(),
                     store_factory=lambda c: store, worker_factory=FakeWorker)
    c = app.test_client()
    c.get("/health")
    assert FakeWorker.instances == []                      # not at import / app creation / health
    for _ in range(3):
        c.post("/webhook", json={"action": "START_TRAINING", "project": {"id": 1}})
    assert len(FakeWorker.instances) == 1
    w = FakeWorker.instances[0]
    assert w.started == 1 and w.store is store and hasattr(w.media, "fetch")
    assert w.notified == 3                                  # every queued event wakes the worker at once
    app.extensions["ssp_sam"].stop()
    assert w.stopped == 1


def test_worker_factory_failure_does_not_break_the_app(tmp_path):
    def boom(store, media, config):
        raise RuntimeError("nope")
    app = create_app(make_config(tmp_path), predictor_factory=lambda c, k: FakePredictor(),
                     store_factory=lambda c: FakeStore(), worker_factory=boom)
    r = app.test_client().post("/webhook", json={"action": "ANNOTATION_CREATED", "project": {"id": 1},
                                                 "annotation": {"id": 1}})
    assert r.status_code == 201


def test_cli_check_prints_redacted_config(tmp_path):
    env = {"MODEL_DIR": str(tmp_path), "LABEL_STUDIO_API_KEY": "secret-token", "PATH": "/usr/bin:/bin"}
    r = subprocess.run([sys.executable, "-m", "backend", "--check", "--port", "9191"], env=env,
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    cfg = json.loads(r.stdout)
    assert cfg["port"] == 9191 and cfg["label_studio_api_key"] == "***"
    r = subprocess.run([sys.executable, "-m", "backend", "--check"], env={**env, "WORKERS": "zero"},
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 2 and "WORKERS" in r.stderr
