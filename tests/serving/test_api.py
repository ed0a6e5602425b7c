"""The HTTP protocol: shapes Label Studio sends and expects, errors, auth, webhook events."""

from __future__ import annotations

import base64
import logging

import numpy as np
import pytest

from backend.learning import versions
from ssp_sam.data.masks import brush_rle_to_mask
from tests.fakes import LABEL_CONFIG, LS_URL, FakePredictor, png_bytes, task

WEBHOOK_ACTIONS = ["ANNOTATION_CREATED", "ANNOTATIONS_CREATED", "ANNOTATION_UPDATED", "ANNOTATIONS_DELETED",
                   "ANNOTATION_DELETED", "START_TRAINING"]


def predict_body(tasks, context=None, label_config=LABEL_CONFIG, project="1.1700000000"):
    return {"tasks": tasks, "project": project, "label_config": label_config,
            "params": {"login": None, "password": None, "context": context}}


def webhook_payload(action):
    project = {"id": 1, "title": "p", "label_config": LABEL_CONFIG}
    if action == "START_TRAINING":
        return {"action": action, "project": project}
    if action in ("ANNOTATIONS_CREATED", "ANNOTATIONS_DELETED"):
        return {"action": action, "project": project, "annotations": [{"id": 7}, {"id": 8}],
                "tasks": [{"id": 3}]}
    return {"action": action, "project": project, "task": {"id": 3, "data": {"image": "/data/upload/1/a.png"}},
            "annotation": {"id": 7, "task": 3, "project": 1, "result": [], "lead_time": 1.5}}


# ---------------------------------------------------------------------- health / setup
def test_health_and_root(client):
    for path in ("/", "/health"):
        r = client.get(path)
        assert r.status_code == 200
        body = r.get_json()
        assert body["status"] == "UP" and body["model_class"] == "SSPSAMBackend"
        assert body["model_loaded"] is False and isinstance(body["model_version"], str)


def test_setup_is_cheap_and_never_loads(make_app):
    calls = []
    app = make_app(predictor_factory=lambda c, ckpt: calls.append(ckpt) or FakePredictor())
    c = app.test_client()
    r = c.post("/setup", json={"project": "1.1700000000", "schema": LABEL_CONFIG, "hostname": LS_URL,
                               "access_token": "abc123456", "extra_params": {"k": 1}})
    assert r.status_code == 200
    assert set(r.get_json()) == {"model_version"}
    assert calls == []                 # the model was not loaded
    assert c.get("/health").get_json()["model_loaded"] is False


def test_setup_rejects_unusable_config(client):
    r = client.post("/setup", json={"project": "1.1", "schema": "<View><Image name='i' value='$i'/></View>"})
    assert r.status_code == 400
    assert "BrushLabels" in r.get_json()["error"]
    r = client.post("/setup", json={"project": "1.1", "schema": "<View><Image"})
    assert r.status_code == 400 and "labeling config" in r.get_json()["error"]


def test_setup_requires_json(client):
    r = client.post("/setup", data="not json", content_type="text/plain")
    assert r.status_code == 400
    assert r.get_json() == {"status": 400,
                            "error": "the request body is not valid JSON: Expecting value at line 1 column 1"}


# ---------------------------------------------------------------------- predict
def test_predict_batch_shapes_and_rle(client, ls_media, store):
    img = ls_media("a.png", png_bytes(64, 48))
    img2 = ls_media("b.png", png_bytes(30, 20))
    v = client.post("/setup", json={"project": "1.1", "schema": LABEL_CONFIG}).get_json()["model_version"]
    r = client.post("/predict", json=predict_body([task(1, img, "the red circle"), task(2, img2, "thing on the left")]))
    assert r.status_code == 200, r.get_json()
    body = r.get_json()
    assert len(body["results"]) == 2
    for res, (w, h) in zip(body["results"], [(64, 48), (30, 20)]):
        assert res["model_version"] == v
        assert 0.0 <= res["score"] <= 1.0
        brush = [x for x in res["result"] if x["type"] == "brushlabels"]
        text = [x for x in res["result"] if x["type"] == "textarea"]
        assert len(brush) == 1 and len(text) == 1
        b = brush[0]
        assert (b["from_name"], b["to_name"]) == ("tag", "image")
        assert (b["original_width"], b["original_height"], b["image_rotation"]) == (w, h, 0)
        assert b["value"]["format"] == "rle" and all(0 <= x <= 255 for x in b["value"]["rle"])
        mask = brush_rle_to_mask(b["value"]["rle"], h, w)
        assert mask.shape == (h, w) and mask.any()
        assert text[0]["from_name"] == "prompt" and text[0]["to_name"] == "image"
    # label from the sentence: "circle" is a label value; else the first label
    assert body["results"][0]["result"][0]["value"]["brushlabels"] == ["circle"]
    assert body["results"][1]["result"][0]["value"]["brushlabels"] == ["object"]
    assert body["results"][0]["result"][1]["value"]["text"] == ["the red circle"]
    # left-half mask for the 'left' sentence: exact pixels survive the RLE round trip
    m = brush_rle_to_mask(body["results"][1]["result"][0]["value"]["rle"], 20, 30)
    assert m[:, :15].all() and not m[:, 15:].any()
    # every region was recorded for the corrections statistics
    assert [(p["task_id"], p["sentence"], p["model_version"]) for p in store.predictions] == [
        (1, "the red circle", v), (2, "thing on the left", v)]
    assert store.predictions[0]["project_id"] == 1


def test_predict_batches_pairs_in_one_call(client, ls_media, predictor):
    img = ls_media("a.png", png_bytes())
    tasks = [task(i, img, f"object {i}") for i in range(5)]
    r = client.post("/predict", json=predict_body(tasks))
    assert r.status_code == 200
    assert len(predictor.calls) == 1 and len(predictor.calls[0]) == 5


def test_predict_runs_the_image_encoders_once_over_the_images_of_a_chunk(make_app, ls_media):
    """With the real predictor (tiny model): the SAM and the CLIP image encoders see every image of a chunk of
    PREDICT_BATCH_SIZE tasks in one call, not in predict_batch's default groups of 8."""
    from ssp_sam.build import ModelConfig, load_model
    from ssp_sam.predictor import SSPSAMPredictor

    real = SSPSAMPredictor(load_model(ModelConfig(variant="tiny", device="cpu")))
    seen = {"encode_image": [], "encode_clip_image": []}
    for name in seen:
        encoder = getattr(real.model, name)
        setattr(real.model, name, lambda x, _e=encoder, _n=name: seen[_n].append(len(x)) or _e(x))
    app = make_app(predictor_factory=lambda c, ckpt: real, PREDICT_BATCH_SIZE="12")
    tasks = [task(i, ls_media(f"{i}.png", png_bytes(40, 30, color=(20 * i, 0, 0))), f"object {i}") for i in range(14)]
    r = app.test_client().post("/predict", json=predict_body(tasks))
    assert r.status_code == 200 and all("result" in x for x in r.get_json()["results"])
    assert seen == {"encode_image": [12, 2], "encode_clip_image": [12, 2]}


def test_one_bad_task_never_fails_the_batch(client, ls_media, requests_mock, make_app):
    good = ls_media("a.png", png_bytes())
    requests_mock.get(f"{LS_URL}/storage-data/uploaded/?filepath=upload/1/missing.png", status_code=404)
    requests_mock.get(f"{LS_URL}/data/upload/1/missing.png", status_code=404)
    broken = ls_media("broken.png", b"this is not an image")
    tasks = [task(1, good, "a circle"), task(2, "/data/upload/1/missing.png", "x"), task(3, broken, "y"),
             {"id": 4, "data": {}}, "not a task", task(6, good, "another circle")]
    r = client.post("/predict", json=predict_body(tasks))
    assert r.status_code == 200
    res = r.get_json()["results"]
    assert len(res) == 6
    assert [bool(x.get("result")) for x in res] == [True, False, False, False, False, True]
    assert set(res[0]) == set(res[5]) == {"result", "score", "model_version"}
    # a failed task carries its reason and no result: Label Studio then stores no prediction for it, and the next
    # "Retrieve predictions" tries it again
    for x, reason in zip(res[1:5], ("HTTP 404", "cannot decode", "no 'image'", "JSON object")):
        assert set(x) == {"score", "model_version", "error"} and reason in x["error"], x


def test_predictor_failure_is_isolated_per_task(make_app, ls_media):
    pred = FakePredictor(fail_on="explode")
    app = make_app(predictor_factory=lambda c, ckpt: pred)
    img = ls_media("a.png", png_bytes())
    r = app.test_client().post("/predict", json=predict_body([task(1, img, "a circle"), task(2, img, "explode"),
                                                              task(3, img, "left one")]))
    assert r.status_code == 200
    res = r.get_json()["results"]
    assert [bool(x.get("result")) for x in res] == [True, False, True]
    assert "error" in res[1] and "result" not in res[1]


def test_no_target_gives_no_region(client, ls_media, store):
    img = ls_media("a.png", png_bytes())
    res = client.post("/predict", json=predict_body([task(1, img, "nothing here")])).get_json()["results"]
    assert res[0]["result"] == [] and res[0]["score"] == 0.0
    # still recorded, as an empty mask, so a region drawn later is scored against "nothing here"
    (rec,) = store.predictions
    assert rec["sentence"] == "nothing here" and rec["task_id"] == 1 and not np.asarray(rec["mask"]).any()


def test_several_sentences_give_several_regions(client, ls_media):
    img = ls_media("a.png", png_bytes())
    res = client.post("/predict", json=predict_body([task(1, img, ["a circle", "the left thing", "nothing"])]))
    regions = res.get_json()["results"][0]["result"]
    assert [x["type"] for x in regions] == ["brushlabels", "brushlabels", "textarea"]
    assert regions[2]["value"]["text"] == ["a circle", "the left thing"]


def test_prompt_fields_order(client, ls_media):
    img = ls_media("a.png", png_bytes())
    t = task(1, img, None, caption="left caption", expression="ignored")
    res = client.post("/predict", json=predict_body([t])).get_json()["results"][0]["result"]
    assert res[-1]["value"]["text"] == ["left caption"]


def test_class_level_prelabeling_from_labels(client, ls_media, predictor):
    cfg = ('<View><Image name="img" value="$pic"/><BrushLabels name="b" toName="img">'
           '<Label value="cat" predicted_values="the cat, a kitten"/><Label value="dog" hint="the dog on the left"/>'
           '<Label value="sky"/></BrushLabels></View>')
    img = ls_media("a.png", png_bytes())
    r = client.post("/predict", json=predict_body([{"id": 1, "data": {"pic": img}}], label_config=cfg))
    regions = r.get_json()["results"][0]["result"]
    assert predictor.calls[-1] == ["the cat", "a kitten", "the dog on the left", "sky"]
    assert [x["value"]["brushlabels"] for x in regions] == [["cat"], ["cat"], ["dog"], ["sky"]]
    assert all(x["type"] == "brushlabels" and x["from_name"] == "b" and x["to_name"] == "img" for x in regions)


def test_interactive_context_textarea(client, ls_media):
    img = ls_media("a.png", png_bytes())
    ctx = {"result": [
        {"type": "keypointlabels", "from_name": "kp", "to_name": "image", "value": {"x": 1, "y": 1}},
        {"type": "textarea", "from_name": "other", "to_name": "image", "value": {"text": ["wrong area"]}},
        {"type": "textarea", "from_name": "prompt", "to_name": "image", "value": {"text": ["the thing on the left"]}},
    ]}
    r = client.post("/predict", json=predict_body([task(1, img, "task text loses")], context=ctx))
    res = r.get_json()["results"]
    assert len(res) == 1
    text = [x for x in res[0]["result"] if x["type"] == "textarea"]
    assert text[0]["value"]["text"] == ["the thing on the left"]


def test_interactive_no_target_returns_one_empty_result_with_message(client, ls_media):
    img = ls_media("a.png", png_bytes())
    ctx = {"result": [{"type": "textarea", "from_name": "prompt", "to_name": "image",
                       "value": {"text": ["nothing at all"]}}]}
    body = client.post("/predict", json=predict_body([task(1, img)], context=ctx)).get_json()
    assert len(body["results"]) == 1
    assert body["results"][0]["result"] == []
    assert "nothing at all" in body["results"][0]["message"]
    assert body["message"]


@pytest.mark.parametrize("body,fragment", [
    ({}, "'tasks'"),
    ({"tasks": "x", "label_config": LABEL_CONFIG}, "'tasks'"),
    ({"tasks": [{"id": 1, "data": {}}]}, "label_config"),
    ({"tasks": [], "label_config": "<View><Text name='t' value='$t'/></View>"}, "BrushLabels"),
    ({"tasks": [], "label_config": LABEL_CONFIG, "params": "x"}, "params"),
    ({"tasks": [], "label_config": LABEL_CONFIG, "params": {"context": [1]}}, "context"),
])
def test_predict_bad_input(client, body, fragment):
    r = client.post("/predict", json=body)
    assert r.status_code == 400
    j = r.get_json()
    assert j["status"] == 400 and fragment in j["error"]


def test_predict_empty_task_list(client):
    r = client.post("/predict", json=predict_body([]))
    assert r.status_code == 200 and r.get_json()["results"] == []


def test_model_load_failure_is_503_without_traceback(make_app, ls_media):
    def broken(config, ckpt):
        raise RuntimeError("secret internal path /root/weights.pt is corrupt")
    app = make_app(predictor_factory=broken)
    img = ls_media("a.png", png_bytes())
    r = app.test_client().post("/predict", json=predict_body([task(1, img, "x")]))
    assert r.status_code == 503
    text = r.get_data(as_text=True)
    assert "Traceback" not in text and "/root/weights.pt" not in text


def test_unhandled_error_is_json_500_without_traceback(client, monkeypatch, ls_media):
    from backend.serving import model as model_mod

    def explode(self, tasks, context=None, **kw):
        raise KeyError("internal detail")
    monkeypatch.setattr(model_mod.SSPSAMBackend, "predict", explode)
    r = client.post("/predict", json=predict_body([task(1, "/data/upload/1/a.png", "x")]))
    assert r.status_code == 500
    j = r.get_json()
    assert j["status"] == 500 and "Traceback" not in r.get_data(as_text=True) and "KeyError" in j["error"]


def test_unknown_route_and_method_are_json(client):
    r = client.get("/nope")
    assert r.status_code == 404 and r.get_json()["status"] == 404
    r = client.get("/predict")
    assert r.status_code == 405 and r.get_json()["status"] == 405


def test_record_prediction_failure_never_fails_prediction(client, ls_media, store):
    store.fail_record = True
    img = ls_media("a.png", png_bytes())
    r = client.post("/predict", json=predict_body([task(1, img, "a circle")]))
    assert r.status_code == 200 and r.get_json()["results"][0]["result"]


def test_datastore_unavailable_does_not_fail_predictions(make_app, ls_media):
    def no_store(config):
        raise RuntimeError("cannot open")
    app = make_app(store_factory=no_store)
    c = app.test_client()
    img = ls_media("a.png", png_bytes())
    assert c.post("/predict", json=predict_body([task(1, img, "a circle")])).status_code == 200
    r = c.post("/webhook", json=webhook_payload("ANNOTATION_CREATED"))
    assert r.status_code == 503 and "datastore" in r.get_json()["error"]
    m = c.get("/metrics").get_json()
    assert "datastore_error" in m and "serving" in m


def test_rle_never_logged_at_info(client, ls_media, caplog):
    img = ls_media("a.png", png_bytes())
    with caplog.at_level(logging.INFO):
        r = client.post("/predict", json=predict_body([task(1, img, "a circle")]))
    rle = r.get_json()["results"][0]["result"][0]["value"]["rle"]
    needle = ", ".join(str(x) for x in rle[:12])
    for rec in caplog.records:
        msg = rec.getMessage()
        assert '"rle"' not in msg and needle not in msg
    assert any("task 1/1" in rec.getMessage() for rec in caplog.records)


def test_exif_rotated_jpeg_gives_masks_at_natural_size(client, ls_media):
    img = ls_media("rot.jpg", png_bytes(64, 48, exif_orientation=6))     # stored 64x48, displayed 48x64
    res = client.post("/predict", json=predict_body([task(1, img, "thing on the left")])).get_json()
    b = res["results"][0]["result"][0]
    assert (b["original_width"], b["original_height"]) == (48, 64)
    m = brush_rle_to_mask(b["value"]["rle"], 64, 48)
    assert m[:, :24].all() and not m[:, 24:].any()


# ---------------------------------------------------------------------- model_version
def test_model_version_identical_in_setup_and_predictions(client, ls_media):
    img = ls_media("a.png", png_bytes())
    v1 = client.post("/setup", json={"project": "1.1", "schema": LABEL_CONFIG}).get_json()["model_version"]
    body = client.post("/predict", json=predict_body([task(1, img, "a"), task(2, img, "nothing")])).get_json()
    v2 = client.post("/setup", json={"project": "1.1", "schema": LABEL_CONFIG}).get_json()["model_version"]
    assert v1 == v2 == body["model_version"]
    assert {r["model_version"] for r in body["results"]} == {v1}
    assert client.get("/health").get_json()["model_version"] == v1
    assert client.get("/versions").get_json()["model_version"] == v1


# ---------------------------------------------------------------------- webhook
@pytest.mark.parametrize("action", WEBHOOK_ACTIONS)
def test_webhook_known_actions_are_enqueued(client, store, action):
    payload = webhook_payload(action)
    r = client.post("/webhook", json=payload)
    assert r.status_code == 201
    j = r.get_json()
    assert j["status"] == "ok" and isinstance(j["event_id"], int)
    assert store.events[-1] == (action, payload)


@pytest.mark.parametrize("action", ["TASKS_CREATED", "PROJECT_UPDATED", "TASKS_DELETED", "SOMETHING_NEW"])
def test_webhook_unknown_actions(client, store, action):
    r = client.post("/webhook", json={"action": action, "project": {"id": 1}})
    assert r.status_code == 200 and r.get_json() == {"status": "Unknown event"}
    assert store.events == []


def test_webhook_bad_payloads(client):
    assert client.post("/webhook", json={"project": {}}).status_code == 400
    assert client.post("/webhook", json=[1, 2]).status_code == 400
    assert client.post("/webhook", data="{", content_type="application/json").status_code == 400


def test_webhook_secret(make_app, store):
    app = make_app(WEBHOOK_SECRET="s3cret")
    c = app.test_client()
    assert c.post("/webhook", json=webhook_payload("ANNOTATION_CREATED")).status_code == 401
    assert c.post("/webhook", json=webhook_payload("ANNOTATION_CREATED"),
                  headers={"X-Webhook-Secret": "wrong"}).status_code == 401
    r = c.post("/webhook", json=webhook_payload("ANNOTATION_CREATED"), headers={"X-Webhook-Secret": "s3cret"})
    assert r.status_code == 201


# ---------------------------------------------------------------------- basic auth
def _basic(user, pw):
    return {"Authorization": "Basic " + base64.b64encode(f"{user}:{pw}".encode()).decode()}


def test_basic_auth(make_app, store):
    app = make_app(BASIC_AUTH_USER="ann", BASIC_AUTH_PASS="pw")
    c = app.test_client()
    for method, path, body in [("post", "/setup", {"project": "1.1"}), ("post", "/predict", predict_body([])),
                               ("get", "/metrics", None), ("get", "/versions", None)]:
        r = getattr(c, method)(path, json=body)
        assert r.status_code == 401, path
        assert r.headers["WWW-Authenticate"].startswith("Basic")
        assert getattr(c, method)(path, json=body, headers=_basic("ann", "bad")).status_code == 401
        assert getattr(c, method)(path, json=body, headers=_basic("ann", "pw")).status_code == 200, path
    assert c.get("/health").status_code == 200                     # liveness stays open
    # LS's auto-created webhook carries no auth: basic auth must not block it
    assert c.post("/webhook", json=webhook_payload("ANNOTATION_CREATED")).status_code == 201


# ---------------------------------------------------------------------- metrics / versions
def test_metrics_merge_store_stats_and_serving(client, ls_media):
    img = ls_media("a.png", png_bytes())
    v = client.post("/setup", json={"project": "1.1"}).get_json()["model_version"]
    client.post("/predict", json=predict_body([task(1, img, "a circle")]))
    client.post("/predict", json=predict_body([task(2, img, "a circle")]))
    client.post("/webhook", json=webhook_payload("ANNOTATION_CREATED"))
    m = client.get("/metrics").get_json()
    assert m[v] == {"predictions": 2}                    # store.version_stats() merged at the top level
    s = m["serving"]
    assert s["requests"]["/predict"] == 2 and s["requests"]["/webhook"] == 1
    lat = s["latency"]["/predict"]
    assert lat["count"] == 2 and 0 < lat["p50_s"] <= lat["p95_s"] <= lat["max_s"]
    assert s["counters"]["tasks"] == 2 and s["counters"]["regions"] == 2
    assert s["media_cache"]["hits"] == 1 and s["media_cache"]["misses"] == 1 and s["media_cache"]["hit_rate"] == 0.5
    assert s["embedding_cache"]["hit_rate"] == pytest.approx(1 / 3)
    assert s["model"]["model_loaded"] is True
    assert s["pending_events"] == 1


def test_versions_lists_published(client, app):
    cfg = app.extensions["ssp_sam"].config
    bundle = versions.bundle_path(cfg.model_dir, "ft-001")
    bundle.parent.mkdir(parents=True)
    bundle.write_bytes(b"weights")
    versions.bundle_path(cfg.model_dir, "no-bundle").parent.mkdir()     # a folder without a bundle is not listed
    body = client.get("/versions").get_json()
    assert "no-bundle" not in body["versions"]
    assert "ft-001" in body["versions"] and body["model_version"] in body["versions"]


def test_embedding_cache_hit_rate_is_derived(make_app):
    from backend.serving.model_manager import _with_hit_rates
    assert _with_hit_rates({"image_cache": {"hits": 3, "misses": 1}, "n": 2}) == {
        "image_cache": {"hits": 3, "misses": 1, "hit_rate": 0.75}, "n": 2}


def test_too_large_body_is_json_413(make_app):
    app = make_app()
    app.config["MAX_CONTENT_LENGTH"] = 100
    r = app.test_client().post("/predict", data=b"x" * 1000, content_type="application/json")
    assert r.status_code == 413 and r.get_json()["status"] == 413


def test_missing_checkpoint_gives_clear_503(make_app, tmp_path):
    app = make_app(SSP_SAM_CHECKPOINT=str(tmp_path / "nope.pt"))
    c = app.test_client()
    h = c.get("/health")
    assert h.status_code == 200 and "nope.pt" in h.get_json()["last_error"]
    r = c.post("/setup", json={"project": "1.1"})
    assert r.status_code == 503 and "nope.pt" in r.get_json()["error"]


FIXTURES = sorted((__import__("pathlib").Path(__file__).parents[1] / "fixtures" / "webhooks").glob("*.json"))


@pytest.mark.parametrize("path", FIXTURES, ids=[p.stem for p in FIXTURES])
def test_real_label_studio_webhook_payloads(client, store, path):
    """Payloads recorded from Label Studio 1.23.2 by scripts/capture_ls_webhooks.py."""
    import json
    payload = json.loads(path.read_text())
    r = client.post("/webhook", json=payload)
    if payload["action"] in WEBHOOK_ACTIONS:
        assert r.status_code == 201 and r.get_json()["status"] == "ok"
        assert store.events[-1] == (payload["action"], payload)
    else:
        assert r.status_code == 200 and r.get_json() == {"status": "Unknown event"}


def test_recorded_fixtures_exist():
    assert {p.stem for p in FIXTURES} >= {"ANNOTATION_CREATED", "ANNOTATION_UPDATED", "ANNOTATIONS_DELETED",
                                          "START_TRAINING"}


def test_datastore_open_failure_is_retried_with_backoff(make_app, monkeypatch):
    import backend.serving.app as app_mod
    calls = []

    def flaky(config):
        calls.append(1)
        if len(calls) == 1:
            raise RuntimeError("connection refused")
        return __import__("tests.fakes", fromlist=["FakeStore"]).FakeStore()
    app = make_app(store_factory=flaky)
    c = app.test_client()
    assert c.post("/webhook", json=webhook_payload("START_TRAINING")).status_code == 503
    assert c.post("/webhook", json=webhook_payload("START_TRAINING")).status_code == 503   # within the backoff
    assert len(calls) == 1
    monkeypatch.setattr(app_mod, "STORE_RETRY_S", 0.0)
    assert c.post("/webhook", json=webhook_payload("START_TRAINING")).status_code == 201


def test_latency_percentiles_of_the_serving_metrics():
    from backend.serving.metrics import ServingMetrics

    m = ServingMetrics(window=10)
    for k in range(1, 21):                                   # only the last 10 stay in the window: 1.1 .. 2.0
        m.observe_request("/predict", 200 if k % 5 else 500, k / 10)
    lat = m.snapshot()["latency"]["/predict"]
    assert (lat["count"], lat["p50_s"], lat["p95_s"], lat["max_s"]) == (20, 1.5, 2.0, 2.0)
    assert lat["mean_s"] == pytest.approx(1.05)
    assert m.snapshot()["errors"] == {"/predict": 4} and m.snapshot()["status_codes"] == {"200": 16, "500": 4}
