"""The per-task fast path through the Flask app with a real (tiny) predictor: stage timings in /metrics and the
Server-Timing header, a cached picture never decoded again, and the prewarm of an interactive call that comes before
any sentence."""

from __future__ import annotations

import io
import threading
import time

import numpy as np
import pytest
import torch
from PIL import Image

from backend.serving.prewarm import Prewarmer
from ssp_sam import images as images_mod
from ssp_sam.build import LoadedModel, build_model
from ssp_sam.predictor import SSPSAMPredictor
from ssp_sam.tokenizer import load_tokenizer
from tests.fakes import LABEL_CONFIG, png_bytes, task


def _png(seed: int, w: int = 48, h: int = 40) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(np.random.RandomState(seed).randint(0, 255, (h, w, 3)).astype(np.uint8)).save(buf, "PNG")
    return buf.getvalue()


class CountingPredictor(SSPSAMPredictor):
    """The real predictor on the tiny model, counting image encodes."""

    def __init__(self):
        model = build_model("tiny", seed=0)
        super().__init__(LoadedModel(model, load_tokenizer(model.spec), model.spec, "tiny-test",
                                     torch.device("cpu"), torch.float32))
        self.encodes = 0
        real = self.model.encode_image

        def counted(x):
            self.encodes += x.shape[0]
            return real(x)
        self.model.encode_image = counted


@pytest.fixture
def real(make_app):
    pred = CountingPredictor()
    app = make_app(predictor_factory=lambda c, ckpt: pred, SERVER_TIMING="true")
    return app, app.test_client(), pred


def _interactive(tid, image, sentence=None):
    result = [] if sentence is None else [{"type": "textarea", "from_name": "prompt", "to_name": "image",
                                           "value": {"text": [sentence]}}]
    return {"tasks": [{"id": tid, "project": 1, "data": {"image": image}}], "project": "1.1",
            "label_config": LABEL_CONFIG, "params": {"context": {"result": result}}}


def _stages(response) -> dict:
    """The Server-Timing header as {stage: ms}."""
    return {name: float(ms) for name, ms in (p.split(";dur=") for p in response.headers["Server-Timing"].split(", "))}


def _decodes(monkeypatch):
    calls = []
    real = images_mod.load_image

    def counting(src, max_pixels=None):
        calls.append(src)
        return real(src, max_pixels=max_pixels)
    monkeypatch.setattr("backend.labelstudio.media.load_image", counting)
    return calls


def test_server_timing_header_and_metrics_stages(real, ls_media):
    app, client, pred = real
    img = ls_media("a.png", _png(0))
    r = client.post("/predict", json=_interactive(1, img, "the red circle"))
    assert r.status_code == 200
    timing = _stages(r)
    for stage in ("fetch", "key", "decode", "preprocess", "sam_encoder", "clip_vision", "clip_text", "decoder",
                  "upsample", "json", "total"):
        assert stage in timing and float(timing[stage]) >= 0, stage
    assert "record" not in timing                          # written after the response was sent
    stages = client.get("/metrics").get_json()["serving"]["stages"]
    assert stages["sam_encoder"]["count"] == 1 and stages["decoder"]["count"] == 1
    assert stages["record"]["count"] == 1 and app.extensions["ssp_sam"].store().predictions
    assert 0 < stages["decoder"]["p50_s"] <= stages["decoder"]["max_s"]


def test_no_server_timing_header_unless_asked(make_app, ls_media):
    client = make_app().test_client()
    r = client.post("/predict", json=_interactive(1, ls_media("a.png", png_bytes()), "a circle"))
    assert r.status_code == 200 and "Server-Timing" not in r.headers
    assert client.get("/metrics").get_json()["serving"]["stages"]["json"]["count"] == 1


def test_a_cached_picture_is_neither_decoded_nor_hashed_again(real, ls_media, monkeypatch):
    app, client, pred = real
    decodes = _decodes(monkeypatch)
    hashed = []
    real_digest = images_mod.file_digest
    monkeypatch.setattr("backend.labelstudio.media.file_digest", lambda p: hashed.append(p) or real_digest(p))
    img = ls_media("a.png", _png(1))
    first = client.post("/predict", json=_interactive(1, img, "the red circle"))
    assert first.status_code == 200 and {"decode", "key", "sam_encoder"} <= set(_stages(first))
    assert len(decodes) == 1 and len(hashed) == 1 and pred.encodes == 1
    second = client.post("/predict", json=_interactive(1, img, "the blue square"))
    assert second.status_code == 200
    assert len(decodes) == 1 and len(hashed) == 1 and pred.encodes == 1
    assert not {"decode", "key", "sam_encoder"} & set(_stages(second))
    # the same answer as a predictor that decodes the picture itself
    mask = [x for x in second.get_json()["results"][0]["result"] if x["type"] == "brushlabels"]
    direct = CountingPredictor().predict(np.asarray(Image.open(io.BytesIO(_png(1))).convert("RGB")),
                                         "the blue square")
    assert bool(mask) == (not direct.no_target)


def test_a_changed_file_is_identified_again(real, ls_media, tmp_path):
    app, client, pred = real
    rt = app.extensions["ssp_sam"]
    img = ls_media("a.png", _png(2))
    ref = rt.media.open_image(img, task_id=1, project_id=1)
    again = rt.media.open_image(img, task_id=1, project_id=1)
    assert again.key == ref.key and ref.shape == (40, 48, 3) and not again.decoded
    path = rt.media.fetch(img, task_id=1, project_id=1)
    with open(path, "wb") as f:                      # another content behind the cached file
        f.write(_png(3, w=30, h=20))
    changed = rt.media.open_image(img, task_id=1, project_id=1)
    assert changed.key != ref.key and changed.shape == (20, 30, 3)


def test_too_many_pixels_is_refused_from_the_header(make_app, ls_media):
    client = make_app(MAX_IMAGE_PIXELS="100").test_client()
    body = client.post("/predict", json=_interactive(1, ls_media("a.png", png_bytes(64, 48)), "x")).get_json()
    assert "MAX_IMAGE_PIXELS" in body["results"][0]["message"]


# ---------------------------------------------------------------------- prewarm
def test_prewarm_before_the_first_sentence(real, ls_media, monkeypatch):
    app, client, pred = real
    rt = app.extensions["ssp_sam"]
    decodes = _decodes(monkeypatch)
    img = ls_media("a.png", _png(4))
    r = client.post("/predict", json=_interactive(7, img))
    body = r.get_json()
    assert r.status_code == 200 and body["results"][0]["result"] == []
    assert "type a sentence" in body["results"][0]["message"] and body["model_version"]
    assert rt.prewarmer.wait_idle(30)
    assert pred.encodes == 1 and len(decodes) == 1
    counters = client.get("/metrics").get_json()["serving"]["counters"]
    assert counters["prewarm_queued"] == 1 and counters["prewarm_computed"] == 1
    assert "tasks" not in counters and "task_errors" not in counters            # not a prediction
    hits = pred.image_cache.hits
    r = client.post("/predict", json=_interactive(7, img, "the red circle"))
    assert r.status_code == 200 and "sam_encoder" not in _stages(r)
    assert pred.encodes == 1 and len(decodes) == 1 and pred.image_cache.hits == hits + 1     # the cache answered


def test_no_prewarm_when_there_is_a_sentence_or_no_prompt_box(real, ls_media):
    app, client, pred = real
    img = ls_media("a.png", _png(5))
    # the task's own sentence: predicted at once, as before
    body = client.post("/predict", json={**_interactive(1, img), "tasks": [task(1, img, "the red circle")]}).get_json()
    assert body["results"][0]["result"] and pred.encodes == 1
    # not interactive (batch "Retrieve predictions"): class-level pre-labeling from the labels
    img2 = ls_media("b.png", _png(6))
    body = client.post("/predict", json={**_interactive(2, img2), "params": {"context": None}}).get_json()
    assert "message" not in body["results"][0] and pred.encodes == 2
    # a config without a prompt TextArea: the labels are the sentences, interactive or not
    cfg = '<View><Image name="image" value="$image"/><BrushLabels name="tag" toName="image"><Label value="cat"/>' \
          '</BrushLabels></View>'
    img3 = ls_media("c.png", _png(7))
    body = client.post("/predict", json={**_interactive(3, img3), "label_config": cfg}).get_json()
    assert "type a sentence" not in body["results"][0].get("message", "") and pred.encodes == 3
    assert app.extensions["ssp_sam"].metrics.snapshot()["counters"].get("prewarm_queued") is None


def test_prewarm_failure_stays_in_the_log(real, ls_media, caplog):
    app, client, pred = real
    body = client.post("/predict", json=_interactive(9, "/data/upload/1/missing.png")).get_json()
    assert body["results"][0]["result"] == []
    assert app.extensions["ssp_sam"].prewarmer.wait_idle(30)
    counters = client.get("/metrics").get_json()["serving"]["counters"]
    assert counters["prewarm_errors"] == 1 and pred.encodes == 0
    assert any("prewarm of the image of task 9 failed" in r.getMessage() for r in caplog.records)


class _SlowManager:
    """A model manager whose predictor blocks until released, recording what it prewarmed."""

    def __init__(self):
        self.release = threading.Event()
        self.done = []
        outer = self

        class P:
            def prewarm(self, ref):
                outer.release.wait(10)
                outer.done.append(ref)
                return True

        class S:
            predictor = P()
        self.served = S()

    def get(self):
        return self.served


class _Media:
    def open_image(self, url, task_id=None, project_id=None):
        return url


def test_prewarm_queue_is_bounded_and_keeps_the_newest():
    counts = {}
    manager = _SlowManager()
    pw = Prewarmer(manager, _Media(), lambda name: counts.__setitem__(name, counts.get(name, 0) + 1), max_pending=2)
    assert pw.submit("u0")
    deadline = time.monotonic() + 10
    while not pw._busy and time.monotonic() < deadline:             # u0 is being computed
        time.sleep(0.01)
    assert pw.submit("u1") and pw.submit("u2")
    assert not pw.submit("u2")                                      # already waiting
    assert pw.submit("u3")                                          # full: u1, the oldest waiting, is dropped
    manager.release.set()
    assert pw.wait_idle(10)
    assert manager.done == ["u0", "u2", "u3"]
    assert counts == {"prewarm_queued": 4, "prewarm_dropped": 1, "prewarm_computed": 3}
    pw.stop()


# ---------------------------------------------------------------------- settings and encoders
def test_settings_reach_the_model_config(tmp_path, monkeypatch):
    from backend.config import BackendConfig
    from backend.serving import model_manager

    c = BackendConfig.from_env({})
    assert (c.sdpa, c.torch_compile, c.server_timing) == (True, False, False)
    seen = []

    class Seen(Exception):
        pass

    def fake_load(cfg):
        seen.append(cfg)
        raise Seen
    monkeypatch.setattr("ssp_sam.build.load_model", fake_load)
    cfg = BackendConfig.from_env({"SDPA": "false", "TORCH_COMPILE": "true", "SSP_SAM_VARIANT": "tiny",
                                  "MODEL_DIR": str(tmp_path)})
    with pytest.raises(Seen):
        model_manager.default_predictor_factory(cfg, None)
    assert (seen[0].sdpa, seen[0].compile) == (False, True)


def test_responses_are_encoded_by_ujson_with_a_fallback(app):
    import json

    provider = app.json
    body = {"results": [{"result": [{"value": {"rle": list(range(300)), "text": ["a/b é"]}}], "score": 0.1234567}],
            "model_version": "v/1"}
    fast = provider.dumps(body)
    assert json.loads(fast) == body and "\\/" not in fast and fast.isascii()
    assert "NaN" in provider.dumps({"x": float("nan")})               # ujson refuses it: Flask's own encoder
    assert provider.dumps({"b": 1, "a": 2}, indent=2) == '{\n  "b": 1,\n  "a": 2\n}'


def test_masks_kept_for_after_the_response_are_bounded(make_app, ls_media, store, monkeypatch):
    from backend.serving import app as app_mod

    monkeypatch.setattr(app_mod, "DEFERRED_MASKS_BYTES", 64 * 48 * 2)      # room for two 64x48 masks
    written = []
    real = app_mod.Runtime.write_records
    monkeypatch.setattr(app_mod.Runtime, "write_records", lambda self, records: written.append(len(records)) or
                        real(self, records))
    client = make_app().test_client()
    img = ls_media("a.png", png_bytes(64, 48))
    body = {"tasks": [task(i, img, "a circle") for i in range(1, 5)], "project": "1.1", "label_config": LABEL_CONFIG}
    assert client.post("/predict", json=body).status_code == 200
    assert written == [1, 1, 2] and len(store.predictions) == 4       # two at once, two after the response
