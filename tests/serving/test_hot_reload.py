"""model_version without loading, and hot reload of a published version (pointer file)."""

from __future__ import annotations

import json
import os
import threading
import time

import pytest

from backend.serving.model_manager import ModelManager
from ssp_sam.versioning import file_digest
from tests.fakes import LABEL_CONFIG, FakePredictor, make_config, png_bytes, task


def publish(cfg, version, content=b"weights", tmpname=None):
    vdir = os.path.join(cfg.versions_dir, version)
    os.makedirs(vdir, exist_ok=True)
    path = os.path.join(vdir, "model.pt")
    with open(path, "wb") as f:
        f.write(content + version.encode())
    tmp = cfg.version_pointer + ".tmp"
    with open(tmp, "w") as f:
        json.dump({"version": version, "path": path, "created_at": time.time(), "metrics": {}}, f)
    os.replace(tmp, cfg.version_pointer)
    return path


class Factory:
    """Records which checkpoint each load got; optionally blocks or fails."""

    def __init__(self):
        self.loads = []
        self.gate = None
        self.fail = set()

    def __call__(self, config, ckpt):
        self.loads.append(ckpt)
        if self.gate is not None:
            assert self.gate.wait(10)
        if ckpt and any(f in ckpt for f in self.fail):
            raise RuntimeError("corrupt checkpoint")
        return FakePredictor(version=os.path.basename(os.path.dirname(ckpt)) if ckpt else "base")


def test_version_from_checkpoint_hash_without_loading(tmp_path):
    ckpt = tmp_path / "w.pt"
    ckpt.write_bytes(b"abc")
    cfg = make_config(tmp_path, SSP_SAM_VARIANT="tiny", SSP_SAM_CHECKPOINT=str(ckpt))
    f = Factory()
    m = ModelManager(cfg, predictor_factory=f)
    assert m.version == f"tiny-{file_digest(str(ckpt))}"
    assert file_digest(str(ckpt)) == "ba7816bf"            # sha256("abc")
    assert f.loads == [] and not m.loaded
    assert m.get().version == m.version and f.loads == [str(ckpt)]


def test_random_variant_version(tmp_path):
    m = ModelManager(make_config(tmp_path, SSP_SAM_VARIANT="tiny"), predictor_factory=Factory())
    assert m.version == "tiny-random"


def test_missing_checkpoint_is_reported(tmp_path):
    m = ModelManager(make_config(tmp_path, SSP_SAM_CHECKPOINT=str(tmp_path / "nope.pt")), predictor_factory=Factory())
    with pytest.raises(FileNotFoundError):
        m.version


def test_pointer_at_start_is_served(tmp_path):
    cfg = make_config(tmp_path)
    path = publish(cfg, "ft-001")
    f = Factory()
    m = ModelManager(cfg, predictor_factory=f)
    assert m.version == "ft-001"
    assert m.get().version == "ft-001" and f.loads == [path]


def test_new_pointer_before_first_load_switches_without_loading(tmp_path):
    cfg = make_config(tmp_path)
    f = Factory()
    m = ModelManager(cfg, predictor_factory=f)
    v0 = m.version
    publish(cfg, "ft-002")
    assert m.version == "ft-002" != v0
    assert f.loads == []


def test_hot_reload_swaps_in_background(tmp_path):
    cfg = make_config(tmp_path)
    f = Factory()
    m = ModelManager(cfg, predictor_factory=f)
    first = m.get()
    v0 = first.version
    f.gate = threading.Event()                # the next load blocks until released
    publish(cfg, "ft-003")
    assert m.check_for_update() is True
    # while the new version loads, requests keep the old predictor and the old version
    assert m.get() is first and m.version == v0 and m.loading
    f.gate.set()
    assert m.wait_for_reload(10)
    assert m.version == "ft-003" and m.get().version == "ft-003" and m.reloads == 1


def test_failed_reload_keeps_serving_old_version(tmp_path):
    cfg = make_config(tmp_path)
    f = Factory()
    f.fail.add("ft-bad")
    m = ModelManager(cfg, predictor_factory=f)
    v0 = m.get().version
    publish(cfg, "ft-bad")
    m.check_for_update()
    assert m.wait_for_reload(10)
    assert m.version == v0 and "ft-bad" in m.last_error
    # a later good version still gets loaded
    publish(cfg, "ft-good")
    m.check_for_update()
    assert m.wait_for_reload(10)
    assert m.version == "ft-good"


def test_pointer_checked_at_most_every_interval(tmp_path):
    now = [100.0]
    cfg = make_config(tmp_path, RELOAD_INTERVAL_S="2")
    m = ModelManager(cfg, predictor_factory=Factory(), clock=lambda: now[0])
    v0 = m.version
    publish(cfg, "ft-004")
    now[0] += 1.0
    assert m.version == v0                     # not checked yet
    now[0] += 1.5
    assert m.version == "ft-004"


def test_unusable_pointer_is_ignored(tmp_path):
    cfg = make_config(tmp_path)
    m = ModelManager(cfg, predictor_factory=Factory())
    v0 = m.version
    os.makedirs(cfg.versions_dir, exist_ok=True)
    with open(cfg.version_pointer, "w") as f:
        f.write("{not json")
    assert m.version == v0
    with open(cfg.version_pointer, "w") as f:
        json.dump({"version": "ft-x", "path": str(tmp_path / "missing.pt")}, f)
    assert m.version == v0


def test_app_reports_new_version_after_publish(make_app, ls_media, tmp_path):
    f = Factory()
    app = make_app(predictor_factory=f)
    c = app.test_client()
    rt = app.extensions["ssp_sam"]
    img = ls_media("a.png", png_bytes())
    body = {"tasks": [task(1, img, "a circle")], "label_config": LABEL_CONFIG, "project": "1.1"}
    v0 = c.post("/setup", json={"project": "1.1"}).get_json()["model_version"]
    assert c.post("/predict", json=body).get_json()["results"][0]["model_version"] == v0
    publish(rt.config, "ft-005")
    deadline = time.monotonic() + 15
    version = None
    while time.monotonic() < deadline and version != "ft-005":
        c.post("/setup", json={"project": "1.1"})    # notices the pointer, starts the background load
        assert rt.manager.wait_for_reload(10)
        version = c.post("/setup", json={"project": "1.1"}).get_json()["model_version"]
        if version != "ft-005":
            time.sleep(0.1)
    assert version == "ft-005", (version, f.loads)
    res = c.post("/predict", json=body).get_json()
    assert res["results"][0]["model_version"] == "ft-005" == res["model_version"]
    assert c.get("/health").get_json()["model_version"] == "ft-005"


def test_concurrent_predictions_during_reload_never_fail(make_app, ls_media):
    f = Factory()
    app = make_app(predictor_factory=f)
    rt = app.extensions["ssp_sam"]
    img = ls_media("a.png", png_bytes())
    body = {"tasks": [task(1, img, "a circle")], "label_config": LABEL_CONFIG, "project": "1.1"}
    c = app.test_client()
    assert c.post("/predict", json=body).status_code == 200
    errors, versions = [], set()

    def worker():
        cl = app.test_client()
        for _ in range(15):
            r = cl.post("/predict", json=body)
            if r.status_code != 200 or not r.get_json()["results"][0]["result"]:
                errors.append(r.status_code)
            versions.add(r.get_json()["results"][0]["model_version"])
    threads = [threading.Thread(target=worker) for _ in range(3)]
    for t in threads:
        t.start()
    publish(rt.config, "ft-006")
    for t in threads:
        t.join()
    assert rt.manager.wait_for_reload(10)
    assert errors == []
    assert rt.manager.version == "ft-006"
