"""The corrections worker: every event shape Label Studio sends, provenance, idempotency, retries and poison events."""

from __future__ import annotations

import copy
import io
import time

import numpy as np
import pytest
import requests
from PIL import Image

from backend.learning.corrections import CorrectionWorker, WorkerConfig, image_url, parent_model_version
from backend.learning.datastore import open_datastore
from tests.fakes import TracedPeak, wait_until_idle
from tests.learning import postgres
from tests.payloads import annotation_event, bitmask_data_url, brush_result

LS = "http://ls.test"
W, H = 40, 30


def _png(w=W, h=H, color=(200, 30, 30)) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (w, h), color).save(buf, format="PNG")
    return buf.getvalue()


def _mask(x0=5, y0=5, x1=20, y1=15, w=W, h=H):
    m = np.zeros((h, w), bool)
    m[y0:y1, x0:x1] = True
    return m


class Fetcher:
    """media_fetcher(url, task) backed by requests (tests mock the HTTP side with requests_mock)."""

    def __init__(self):
        self.calls = 0

    def __call__(self, url, task):
        self.calls += 1
        full = url if url.startswith("http") else LS + url
        r = requests.get(full, timeout=5)
        r.raise_for_status()
        return r.content


@pytest.fixture
def store(tmp_path):
    s = open_datastore(None, tmp_path)
    yield s
    s.close()


@pytest.fixture
def media(requests_mock):
    requests_mock.get(f"{LS}/data/upload/1/a.png", content=_png())
    requests_mock.get(f"{LS}/data/upload/1/b.png", content=_png(color=(0, 0, 200)))
    return requests_mock


@pytest.fixture
def worker(store, media):
    return CorrectionWorker(store, Fetcher(), WorkerConfig(backoff_base_s=0.0, max_attempts=3))


def _ev(action="ANNOTATION_CREATED", aid=1, tid=10, sentence="the red square", mask=None, **kw):
    return annotation_event(action, aid, tid, 1, "/data/upload/1/a.png", sentence,
                            _mask() if mask is None else mask, **kw)


def _send(store, worker, payload):
    eid = store.enqueue_event(payload["action"], payload)
    worker.drain()
    return store.get_event(eid)


# ---------------------------------------------------------------------------------------------------------------------
# parsing helpers
# ---------------------------------------------------------------------------------------------------------------------

def test_image_url_from_label_config():
    cfg = ('<View><Image name="img2" value="$photo"/><Image name="image" value="$pic"/>'
           '<BrushLabels name="tag" toName="image"><Label value="x"/></BrushLabels></View>')
    task = {"data": {"photo": "/data/upload/1/p.png", "pic": "/data/upload/1/q.png"}}
    assert image_url(task, "img2", cfg) == "/data/upload/1/p.png"
    assert image_url(task, None, cfg) == "/data/upload/1/q.png"          # the brush control's image
    assert image_url(task, None, "<View>not a brush config") == "/data/upload/1/p.png"   # first URL-like value
    assert image_url({"data": {"whatever": "s3://bucket/k.jpg"}}) == "s3://bucket/k.jpg"
    assert image_url({"data": {"text": "a red car"}}) is None


def test_parent_model_version_sources():
    assert parent_model_version({"prediction": {"model_version": "v9"}}, {}) == "v9"
    assert parent_model_version({"parent_prediction": 5},
                                {"predictions": [{"id": 4, "model_version": "a"}, {"id": 5, "model_version": "b"}]}) \
        == "b"
    assert parent_model_version({}, {}) is None


# ---------------------------------------------------------------------------------------------------------------------
# event shapes
# ---------------------------------------------------------------------------------------------------------------------

def test_annotation_created_makes_a_sample(store, worker):
    ev = _send(store, worker, _ev(completed_by=7, lead_time=3.5, ground_truth=True))
    assert ev["status"] == "done", ev
    [s] = store.list_samples()
    assert s["sentence"] == "the red square" and s["sentence_source"] == "textarea"
    assert (s["annotation_id"], s["task_id"], s["project_id"], s["region_id"]) == (1, 10, 1, "r1")
    assert (s["width"], s["height"], s["annotator"], s["lead_time"], s["ground_truth"]) == (W, H, 7, 3.5, 1)
    assert s["origin"] == "manual" and s["label"] == "object" and s["image_url"] == "/data/upload/1/a.png"
    image, mask = store.load_sample(s)
    assert image.shape == (H, W, 3) and np.array_equal(mask.astype(bool), _mask())
    assert tuple(image[0, 0]) == (200, 30, 30)


def test_a_bitmask_region_makes_a_sample_too(store, worker):
    """A <BitmaskLabels> project: the region's PNG (as the editor writes it, RGBA black on transparent) is the mask."""
    import base64

    cfg = ('<View><Image name="image" value="$image"/><TextArea name="prompt" toName="image"/>'
           '<BitmaskLabels name="tag" toName="image"><Label value="object"/></BitmaskLabels></View>')
    ev = _ev(label_config=cfg)
    ev["annotation"]["result"] = [r for r in ev["annotation"]["result"] if r["type"] != "brushlabels"]
    region = {"id": "b1", "from_name": "tag", "to_name": "image", "type": "bitmasklabels", "origin": "manual",
              "original_width": W, "original_height": H, "image_rotation": 0,
              "value": {"imageDataURL": bitmask_data_url(_mask(2, 3, 30, 9)), "bitmasklabels": ["object"]}}
    ev["annotation"]["result"].insert(0, region)
    bad = {**region, "id": "b2", "value": {"imageDataURL": "data:image/png;base64," + base64.b64encode(b"x").decode(),
                                          "bitmasklabels": ["object"]}}
    ev["annotation"]["result"].append(bad)
    assert _send(store, worker, ev)["status"] == "done"
    [s] = store.list_samples()
    assert (s["region_id"], s["label"], s["sentence"]) == ("b1", "object", "the red square")
    assert np.array_equal(store.load_sample(s)[1].astype(bool), _mask(2, 3, 30, 9))


def test_redelivery_changes_nothing(store, worker):
    p = _ev()
    _send(store, worker, p)
    before = store.list_samples()
    _send(store, worker, copy.deepcopy(p))  # same webhook again
    p2 = copy.deepcopy(p)
    p2["annotation"]["lead_time"] = 99.0  # same annotation, different envelope: a new event, same sample
    _send(store, worker, p2)
    after = store.list_samples()
    assert len(after) == 1 and after[0]["id"] == before[0]["id"]
    assert after[0]["ingested_at"] == before[0]["ingested_at"]
    assert store.stats()["events"]["redeliveries"] == 1


def test_update_replaces_samples(store, worker):
    _send(store, worker, _ev(updated_at="2026-01-01T00:00:00Z"))
    upd = _ev("ANNOTATION_UPDATED", sentence="the small square", mask=_mask(0, 0, 10, 10), region_id="r9",
              updated_at="2026-01-02T00:00:00Z")
    assert _send(store, worker, upd)["status"] == "done"
    [s] = store.list_samples()
    assert s["region_id"] == "r9" and s["sentence"] == "the small square"
    assert [r["region_id"] for r in store.list_samples(active=False)] == ["r1"]


@pytest.mark.parametrize("action", ["ANNOTATIONS_DELETED", "ANNOTATION_DELETED"])
def test_delete_retracts(store, worker, action):
    _send(store, worker, _ev(aid=5))
    _send(store, worker, _ev(aid=6, tid=11))
    payload = {"action": action, "annotations": [{"id": 5}], "project": {"id": 1}}
    if action == "ANNOTATION_DELETED":
        payload = {"action": action, "annotation": {"id": 5}, "project": {"id": 1}}
    assert _send(store, worker, payload)["status"] == "done"
    assert [s["annotation_id"] for s in store.list_samples()] == [6]


def test_bulk_created_with_bodies_and_with_ids(store, media):
    a, b = _ev(aid=21, tid=31), _ev(aid=22, tid=32, sentence="blue one")
    b["task"]["data"]["image"] = "/data/upload/1/b.png"
    bodies = {"action": "ANNOTATIONS_CREATED", "annotation": [a["annotation"], b["annotation"]],
              "task": [a["task"], b["task"]], "project": a["project"]}
    w = CorrectionWorker(store, Fetcher(), WorkerConfig(backoff_base_s=0))
    assert _send(store, w, bodies)["status"] == "done"
    assert sorted(s["annotation_id"] for s in store.list_samples()) == [21, 22]

    # ids only: the worker fetches bodies and tasks (through the SDK in production)
    c = _ev(aid=23, tid=33)
    fetched = []
    w2 = CorrectionWorker(store, Fetcher(), WorkerConfig(
        fetch_annotation=lambda i: (fetched.append(i), c["annotation"])[1],
        fetch_task=lambda i: c["task"]))
    ids = {"action": "ANNOTATIONS_CREATED", "annotations": [23], "project": {"id": 1}}
    assert _send(store, w2, ids)["status"] == "done" and fetched == [23]
    assert 23 in {s["annotation_id"] for s in store.list_samples()}

    # ids only and no way to fetch: failed at once (not retried forever), visible in stats
    ev = _send(store, CorrectionWorker(store, Fetcher()), {"action": "ANNOTATIONS_CREATED", "annotation": [99],
                                                           "project": {"id": 1}})
    assert ev["status"] == "failed" and "no body" in ev["last_error"]


def test_cancelled_and_skipped_are_ignored(store, worker):
    ev = _send(store, worker, _ev(aid=40, was_cancelled=True))
    assert ev["status"] == "done" and store.list_samples() == []
    _send(store, worker, _ev(aid=41, updated_at="t1"))
    _send(store, worker, _ev("ANNOTATION_UPDATED", aid=41, was_cancelled=True, updated_at="t2"))
    assert store.list_samples() == []


def test_start_training_and_unknown_actions(store, worker):
    p = {"action": "START_TRAINING", "project": {"id": 1, "title": "p"}}
    assert _send(store, worker, p)["status"] == "done"
    assert len(store.pending_training_requests()) == 1
    assert _send(store, worker, {"action": "PROJECT_UPDATED", "project": {"id": 1}})["status"] == "ignored"
    assert _send(store, worker, {"action": "ANNOTATION_CREATED", "project": {"id": 1}})["status"] == "failed"


def test_defensive_parsing(store, worker):
    p = _ev(aid=50)
    del p["task"]  # task absent, no fetcher: cannot know the image
    ev = _send(store, worker, p)
    assert ev["status"] == "failed" and "task" in ev["last_error"]
    p = _ev(aid=51)
    p["annotation"]["result"].append({"type": "rectanglelabels", "value": {}})  # ignored region type
    p["annotation"]["result"].append("garbage")
    assert _send(store, worker, p)["status"] == "done"
    # a region with a wrong size is rejected on its own; the good one is kept
    p = _ev(aid=52, sentence=None, task_text="task sentence",
            extra_results=[{**brush_result(_mask(w=W + 2), "bad")}])
    ev = _send(store, worker, p)
    assert ev["status"] == "done" and ev["result"]  # result JSON holds the rejection
    s = [s for s in store.list_samples() if s["annotation_id"] == 52]
    assert [x["region_id"] for x in s] == ["r1"] and s[0]["sentence"] == "task sentence"
    assert "bad" in ev["result"]
    # no sentence anywhere: the label value
    p = _ev(aid=53, sentence=None)
    _send(store, worker, p)
    assert [s["sentence"] for s in store.list_samples() if s["annotation_id"] == 53] == ["object"]


# ---------------------------------------------------------------------------------------------------------------------
# provenance: origin, model version, IoU
# ---------------------------------------------------------------------------------------------------------------------

def test_origin_and_model_version_tracking(store, worker):
    pm = _mask()
    store.record_prediction(1, 10, "the red square", "demo-1", pm, 0.9)
    store.record_prediction(1, 11, "the red square", "demo-1", pm, 0.9)
    store.record_prediction(1, 12, "the red square", "demo-1", pm, 0.9)
    _send(store, worker, _ev(aid=60, tid=10, origin="prediction", model_version="demo-1", parent_prediction=1))
    _send(store, worker, _ev(aid=61, tid=11, origin="prediction-changed", mask=_mask(5, 5, 20, 25)))
    _send(store, worker, _ev(aid=62, tid=12, origin="manual", mask=_mask(25, 0, 40, 10)))
    by = {s["annotation_id"]: s for s in store.list_samples()}
    assert [by[i]["origin"] for i in (60, 61, 62)] == ["prediction", "prediction-changed", "manual"]
    assert {by[i]["model_version"] for i in (60, 61, 62)} == {"demo-1"}  # 61/62 from record_prediction
    assert by[60]["prediction_iou"] == pytest.approx(1.0)
    assert by[61]["prediction_iou"] == pytest.approx(150 / 300)
    assert by[62]["prediction_iou"] == pytest.approx(0.0)
    v = store.version_stats()["demo-1"]
    assert (v["predictions"], v["accepted"], v["changed"], v["manual"]) == (3, 1, 1, 1)
    assert v["mean_iou"] == pytest.approx(0.5, abs=1e-3) and v["queued"] == 3


def test_region_drawn_where_the_model_saw_nothing_scores_zero(store, worker):
    store.record_prediction(1, 10, "the red square", "demo-1", np.zeros_like(_mask()), 0.1)  # a no-target answer
    p = _ev(aid=65, tid=10)
    del p["annotation"]["result"][0]["origin"]
    _send(store, worker, p)
    (s,) = store.list_samples()
    assert s["origin"] == "manual" and s["model_version"] == "demo-1" and s["prediction_iou"] == pytest.approx(0.0)
    v = store.version_stats()["demo-1"]
    assert (v["predictions"], v["no_target_predictions"], v["manual"], v["mean_iou"]) == (1, 1, 1, 0.0)


def test_annotation_without_regions_is_a_no_target_sample(store, worker):
    # the model predicted nothing for task 10 and a mask for task 11; both annotators submit no region
    store.record_prediction(1, 10, "the purple star", "demo-1", np.zeros_like(_mask()), 0.1)
    store.record_prediction(1, 11, "the purple star", "demo-1", _mask(), 0.8)
    for aid, tid in ((80, 10), (81, 11)):
        ev = _send(store, worker, annotation_event("ANNOTATION_CREATED", aid, tid, 1, "/data/upload/1/a.png",
                                                   "the purple star", None))
        assert ev["status"] == "done", ev
    by = {s["annotation_id"]: s for s in store.list_samples()}
    assert set(by) == {80, 81}
    for s in by.values():
        assert s["region_id"] == "no-target" and s["mask_area"] == 0 and s["sentence"] == "the purple star"
        assert (s["width"], s["height"]) == (W, H) and s["model_version"] == "demo-1"
    assert (by[80]["origin"], by[80]["prediction_iou"]) == ("prediction", 1.0)        # "nothing here" confirmed
    assert (by[81]["origin"], by[81]["prediction_iou"]) == ("prediction-changed", 0.0)  # the mask was removed
    image, mask = store.load_sample(by[81])                     # what the trainer reads: the image, an empty mask
    assert image.shape[:2] == (H, W) and mask.shape == (H, W) and not mask.any()
    # a later update that draws a region replaces the no-target sample
    _send(store, worker, _ev("ANNOTATION_UPDATED", aid=81, tid=11, sentence="the purple star",
                             updated_at="2026-01-02T00:00:00.000000Z"))
    assert [(s["region_id"], s["mask_area"] > 0) for s in store.list_samples() if s["annotation_id"] == 81] == [
        ("r1", True)]


def test_annotation_without_regions_or_sentence_adds_nothing(store, media):
    w = CorrectionWorker(store, Fetcher(), WorkerConfig(backoff_base_s=0.0))
    _send(store, w, annotation_event("ANNOTATION_CREATED", 82, 12, 1, "/data/upload/1/a.png", None, None))
    assert store.list_samples() == []
    off = CorrectionWorker(store, Fetcher(), WorkerConfig(backoff_base_s=0.0, empty_annotation_is_no_target=False))
    _send(store, off, annotation_event("ANNOTATION_CREATED", 83, 13, 1, "/data/upload/1/a.png", "a star", None))
    assert store.list_samples() == []


def test_missing_origin_is_inferred_from_the_prediction(store, worker):
    store.record_prediction(1, 10, "the red square", "demo-1", _mask(), 0.9)
    p = _ev(aid=70)
    del p["annotation"]["result"][0]["origin"]
    _send(store, worker, p)
    assert store.list_samples()[0]["origin"] == "prediction"


# ---------------------------------------------------------------------------------------------------------------------
# failures
# ---------------------------------------------------------------------------------------------------------------------

def test_unreachable_image_is_retried_then_succeeds(store, requests_mock):
    requests_mock.get(f"{LS}/data/upload/1/a.png", [{"status_code": 503}, {"exc": requests.ConnectionError},
                                                    {"content": _png()}])
    w = CorrectionWorker(store, Fetcher(), WorkerConfig(backoff_base_s=0.0, max_attempts=5))
    eid = store.enqueue_event("ANNOTATION_CREATED", _ev(aid=80))
    w.process_pending()
    ev = store.get_event(eid)
    assert ev["status"] == "pending" and ev["attempts"] == 1 and "HTTPError" in ev["last_error"]
    w.process_pending()
    assert "ConnectionError" in store.get_event(eid)["last_error"]
    w.process_pending()
    assert store.get_event(eid)["status"] == "done" and len(store.list_samples()) == 1


def test_backoff_delays_the_retry(store, requests_mock):
    requests_mock.get(f"{LS}/data/upload/1/a.png", status_code=404)
    w = CorrectionWorker(store, Fetcher(), WorkerConfig(backoff_base_s=60.0, max_attempts=5))
    eid = store.enqueue_event("ANNOTATION_CREATED", _ev(aid=81))
    w.process_pending()
    ev = store.get_event(eid)
    assert ev["next_attempt_at"] - time.time() > 50
    assert w.process_pending() == 0  # not due yet


def test_poison_event_is_marked_failed_after_n_tries(store, requests_mock):
    requests_mock.get(f"{LS}/data/upload/1/a.png", status_code=500)
    w = CorrectionWorker(store, Fetcher(), WorkerConfig(backoff_base_s=0.0, max_attempts=3))
    eid = store.enqueue_event("ANNOTATION_CREATED", _ev(aid=82))
    for _ in range(5):
        w.process_pending()
    ev = store.get_event(eid)
    assert ev["status"] == "failed" and ev["attempts"] == 3 and "after 3 attempts" in ev["last_error"]
    st = store.stats()["events"]
    assert st["failed"] == 1 and st["failed_recent"][0]["id"] == eid
    # the event is not lost: an operator can requeue it once the media is back
    requests_mock.get(f"{LS}/data/upload/1/a.png", content=_png())
    store.requeue_failed([eid])
    w.drain()
    assert store.get_event(eid)["status"] == "done"


def test_background_thread_drains_the_inbox(store, media):
    w = CorrectionWorker(store, Fetcher(), WorkerConfig(poll_interval_s=0.05)).start()
    try:
        for i in range(5):
            store.enqueue_event("ANNOTATION_CREATED", _ev(aid=90 + i, tid=190 + i))
        w.notify()
        assert wait_until_idle(store, timeout=20)
    finally:
        w.stop()
    assert not w.running
    assert len(store.list_samples()) == 5


@pytest.mark.postgres
def test_worker_end_to_end_on_postgres(tmp_path, media):
    s = open_datastore(postgres.require_postgres(), tmp_path, schema=postgres.new_schema_name())
    try:
        w = CorrectionWorker(s, Fetcher(), WorkerConfig(backoff_base_s=0))
        s.record_prediction(1, 10, "the red square", "demo-1", _mask(), 0.9)
        _send(s, w, _ev(aid=1, origin="prediction"))
        _send(s, w, _ev("ANNOTATION_UPDATED", aid=1, origin="prediction-changed", mask=_mask(0, 0, 20, 15),
                        updated_at="2026-02-01T00:00:00Z"))
        _send(s, w, _ev(aid=2, tid=11))
        _send(s, w, {"action": "ANNOTATIONS_DELETED", "annotations": [{"id": 2}], "project": {"id": 1}})
        [x] = s.list_samples()
        assert x["origin"] == "prediction-changed" and x["model_version"] == "demo-1"
        assert s.version_stats()["demo-1"]["changed"] == 1
    finally:
        s.drop_schema()
        s.close()


def test_two_workers_share_the_inbox_without_double_processing(tmp_path, media):
    import threading

    s1 = open_datastore(None, tmp_path)  # two processes' stores on one file (gunicorn workers)
    s2 = open_datastore(None, tmp_path)
    for i in range(20):
        s1.enqueue_event("ANNOTATION_CREATED", _ev(aid=300 + i, tid=400 + i))
    workers = [CorrectionWorker(s, Fetcher(), WorkerConfig(batch_size=3)) for s in (s1, s2)]
    ts = [threading.Thread(target=w.drain) for w in workers]
    for t in ts:
        t.start()
    for t in ts:
        t.join(60)
    assert sum(w.processed for w in workers) == 20
    assert s1.stats()["events"]["done"] == 20 and len(s1.list_samples()) == 20
    s1.close()
    s2.close()


def test_replay_payloads_captured_from_label_studio(store, requests_mock):
    """The payloads Label Studio 1.23.2 really sent (scripts/capture_ls_webhooks.py) go through the worker."""
    import json
    from pathlib import Path

    fx = Path(__file__).parents[1] / "fixtures" / "webhooks"
    load = lambda name: json.loads((fx / f"{name}.json").read_text())  # noqa: E731
    created = load("ANNOTATION_CREATED")
    url = created["task"]["data"]["image"]
    region = next(r for r in created["annotation"]["result"] if r["type"] == "brushlabels")
    requests_mock.get(LS + url, content=_png(region["original_width"], region["original_height"]))
    w = CorrectionWorker(store, Fetcher())
    assert _send(store, w, created)["status"] == "done"
    [s] = store.list_samples()
    assert s["sentence"] == created["annotation"]["result"][1]["value"]["text"][0]
    assert (s["width"], s["height"]) == (region["original_width"], region["original_height"])
    assert s["origin"] == region["origin"] and s["annotator"] == created["annotation"]["completed_by"]
    ev = store.get_event(1)
    assert "token" not in ev["payload"]["project"]  # the project's secret token is not kept in the inbox
    assert _send(store, w, load("ANNOTATION_UPDATED"))["status"] == "done"
    assert len(store.list_samples()) == 1
    assert _send(store, w, load("START_TRAINING"))["status"] == "done"
    assert len(store.pending_training_requests()) == 1
    assert _send(store, w, load("ANNOTATIONS_DELETED"))["status"] == "done"
    assert store.list_samples() == []
    if (fx / "TASKS_CREATED.json").exists():
        assert _send(store, w, load("TASKS_CREATED"))["status"] == "ignored"


@pytest.mark.reliability
def test_a_brush_rle_declaring_four_billion_values_is_refused_before_decoding(store, worker, reliability):
    bomb = brush_result(_mask(), "bomb")
    rle = bomb["value"]["rle"]
    bomb["value"]["rle"] = [255, 255, 255, 255] + rle[4:]        # the header declares 2^32 - 1 values
    p = _ev(aid=60, extra_results=[bomb])
    with TracedPeak() as mem:
        ev = _send(store, worker, p)
    kept = [s["region_id"] for s in store.list_samples() if s["annotation_id"] == 60]
    assert ev["status"] == "done" and kept == ["r1"] and "4294967295" in ev["result"]
    assert mem.mib < 64                                         # decoding it would need 4 GiB
    reliability("Corrections", "a brush RLE whose header declares 2^32 - 1 values",
                "ANNOTATION_CREATED with a good region and a 40x30 region whose RLE header says 4294967295",
                f"the crafted region is rejected before decoding, the good one kept; traced peak memory "
                f"{mem.mib:.1f} MiB")
