"""The corrections datastore on SQLite and on the real PostgreSQL server (marker ``postgres``)."""

from __future__ import annotations

import threading
import time
import uuid

import numpy as np
import pytest

from backend.learning.blobs import BlobStore, decode_mask_png, encode_mask_png
from backend.learning.datastore import ClaimLost, PostgresDatastore, SQLiteDatastore, open_datastore

PG_URL = "postgresql://postgres@127.0.0.1:5432/test"


def _pg_available() -> bool:
    try:
        import psycopg

        with psycopg.connect(PG_URL, connect_timeout=2):
            return True
    except Exception:
        return False


_PG = _pg_available()


@pytest.fixture(params=["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)])
def store(request, tmp_path):
    if request.param == "sqlite":
        s = open_datastore(None, tmp_path)
        yield s
        s.close()
    else:
        if not _PG:
            pytest.skip("PostgreSQL not reachable on 127.0.0.1:5432")
        schema = f"t_{uuid.uuid4().hex[:12]}"
        s = open_datastore(PG_URL, tmp_path, schema=schema)
        try:
            yield s
        finally:
            s.drop_schema()
            s.close()


def _sample(region_id="r1", sentence="the red circle", mask_blob="a" * 64, image_blob="b" * 64, origin="manual",
            model_version="v1", **kw):
    d = {"region_id": region_id, "sentence": sentence, "mask_blob": mask_blob, "image_blob": image_blob,
         "width": 8, "height": 6, "origin": origin, "model_version": model_version}
    d.update(kw)
    return d


# ---------------------------------------------------------------------------------------------------------------------
# blobs
# ---------------------------------------------------------------------------------------------------------------------

def test_blob_store_is_content_addressed_and_atomic(tmp_path):
    b = BlobStore(tmp_path / "blobs")
    sha = b.put(b"hello")
    assert b.path(sha) == tmp_path / "blobs" / sha[:2] / sha
    assert b.get(sha) == b"hello" and b.verify(sha)
    assert b.put(b"hello") == sha
    assert not list((tmp_path / "blobs").rglob(".tmp-*"))
    with pytest.raises(KeyError):
        b.get("0" * 64)
    with pytest.raises(ValueError):
        b.path("../etc/passwd")


def test_mask_png_roundtrip_is_compact():
    m = np.zeros((480, 640), bool)
    m[100:300, 200:500] = True
    data = encode_mask_png(m)
    assert len(data) < 2000
    assert np.array_equal(decode_mask_png(data), m)


# ---------------------------------------------------------------------------------------------------------------------
# factory
# ---------------------------------------------------------------------------------------------------------------------

def test_open_datastore_variants(tmp_path, monkeypatch):
    monkeypatch.delenv("DATASTORE_URL", raising=False)
    s = open_datastore(None, tmp_path)
    assert isinstance(s, SQLiteDatastore) and s.path == tmp_path / "corrections.db"
    assert s._conn().execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    assert s._conn().execute("PRAGMA busy_timeout").fetchone()[0] > 0
    s.close()
    s = open_datastore({"model_dir": str(tmp_path / "m")})
    assert s.path == tmp_path / "m" / "corrections.db"
    s.close()
    s = open_datastore(f"sqlite:///{tmp_path}/x.db", tmp_path)
    assert s.path == tmp_path / "x.db"
    s.close()

    class Cfg:
        datastore_url = None
        model_dir = str(tmp_path / "cfg")

    s = open_datastore(Cfg())
    assert s.path == tmp_path / "cfg" / "corrections.db"
    s.close()


@pytest.mark.postgres
def test_open_datastore_postgres_from_env(tmp_path, monkeypatch):
    if not _PG:
        pytest.skip("PostgreSQL not reachable")
    schema = f"t_{uuid.uuid4().hex[:12]}"
    monkeypatch.setenv("DATASTORE_URL", f"{PG_URL}?schema={schema}")
    s = open_datastore(None, tmp_path)
    try:
        assert isinstance(s, PostgresDatastore) and s.schema == schema
        assert s.enqueue_event("START_TRAINING", {"action": "START_TRAINING", "project": {"id": 1}}) >= 1
    finally:
        s.drop_schema()
        s.close()


# ---------------------------------------------------------------------------------------------------------------------
# inbox
# ---------------------------------------------------------------------------------------------------------------------

def test_enqueue_is_idempotent_and_fast(store):
    p = {"action": "ANNOTATION_CREATED", "annotation": {"id": 1}, "project": {"id": 3}}
    t0 = time.perf_counter()
    a = store.enqueue_event("ANNOTATION_CREATED", p)
    dt = time.perf_counter() - t0
    b = store.enqueue_event("ANNOTATION_CREATED", dict(p))
    assert a == b
    st = store.stats()["events"]
    assert st["pending"] == 1 and st["redeliveries"] == 1
    assert dt < 0.1
    lat = []
    for i in range(30):
        t0 = time.perf_counter()
        store.enqueue_event("ANNOTATION_CREATED", {"annotation": {"id": 100 + i}})
        lat.append(time.perf_counter() - t0)
    assert float(np.percentile(lat, 95)) < 0.1


def test_start_training_is_deduplicated_only_briefly(store, monkeypatch):
    import backend.learning.datastore as ds

    p = {"action": "START_TRAINING", "project": {"id": 1}}
    t = [1_000_000.0]
    monkeypatch.setattr(ds, "_now", lambda: t[0])
    a = store.enqueue_event("START_TRAINING", p)
    assert store.enqueue_event("START_TRAINING", p) == a  # LS retrying the same delivery
    t[0] += 120  # the same button clicked again later is a new request
    assert store.enqueue_event("START_TRAINING", p) != a


def test_event_claims_retry_and_failure(store):
    eid = store.enqueue_event("X", {"a": 1})
    got = store.claim_events("w1", limit=10, lease_seconds=60)
    assert [e["id"] for e in got] == [eid] and got[0]["attempts"] == 1 and got[0]["payload"] == {"a": 1}
    assert store.claim_events("w2") == []  # leased
    store.mark_event_retry(eid, "boom", delay_seconds=0)
    got = store.claim_events("w2")
    assert got[0]["attempts"] == 2 and got[0]["last_error"] == "boom"
    store.mark_event_failed(eid, "poison")
    assert store.claim_events("w3") == []
    st = store.stats()["events"]
    assert st["failed"] == 1 and st["failed_recent"][0]["last_error"] == "poison"
    assert store.requeue_failed() == 1
    assert store.claim_events("w3")[0]["attempts"] == 1


def test_event_lease_expiry_hands_event_to_another_worker(store):
    eid = store.enqueue_event("X", {"a": 2})
    assert store.claim_events("dead", lease_seconds=0.05)
    time.sleep(0.1)
    got = store.claim_events("alive")
    assert [e["id"] for e in got] == [eid] and got[0]["lease_owner"] == "alive"
    store.mark_event_done(eid, {"ok": True})
    assert store.get_event(eid)["status"] == "done"
    assert store.purge_events(older_than_s=3600) == 0
    assert store.purge_events(older_than_s=-1) == 1 and store.get_event(eid) is None


# ---------------------------------------------------------------------------------------------------------------------
# samples
# ---------------------------------------------------------------------------------------------------------------------

def test_apply_is_idempotent_and_update_replaces(store):
    r = store.apply_annotation(10, 1, 100, "2026-01-01T00:00:00Z", [_sample("r1"), _sample("r2", sentence="blue")])
    assert r["inserted"] == 2
    r = store.apply_annotation(10, 1, 100, "2026-01-01T00:00:00Z", [_sample("r1"), _sample("r2", sentence="blue")])
    assert r["inserted"] == 0 and r["unchanged"] == 2 and r["retracted"] == 0
    assert len(store.list_samples()) == 2
    # update: r1 changed, r2 removed, r3 new
    r = store.apply_annotation(10, 1, 100, "2026-01-02T00:00:00Z",
                               [_sample("r1", sentence="the big red circle"), _sample("r3")])
    assert (r["inserted"], r["updated"], r["retracted"]) == (1, 1, 1)
    active = {s["region_id"]: s for s in store.list_samples()}
    assert set(active) == {"r1", "r3"} and active["r1"]["sentence"] == "the big red circle"
    retracted = store.list_samples(active=False)
    assert [s["region_id"] for s in retracted] == ["r2"] and retracted[0]["retract_reason"] == "updated"
    # a stale (older) event changes nothing
    r = store.apply_annotation(10, 1, 100, "2026-01-01T00:00:00Z", [_sample("r2")])
    assert not r["applied"] and "stale" in r["reason"]
    assert {s["region_id"] for s in store.list_samples()} == {"r1", "r3"}


def test_delete_retracts_and_tombstones(store):
    store.apply_annotation(11, 1, 101, "t1", [_sample("r1")])
    assert store.retract_annotation(11) == 1
    assert store.list_samples() == []
    assert store.retract_annotation(11) == 0  # redelivered delete
    r = store.apply_annotation(11, 1, 101, "t2", [_sample("r1")])  # late CREATED/UPDATED after delete
    assert not r["applied"] and store.list_samples() == []
    # delete before create (out-of-order delivery)
    store.retract_annotation(12)
    assert not store.apply_annotation(12, 1, 102, "t1", [_sample("r1")])["applied"]


def test_cancelled_update_retracts(store):
    store.apply_annotation(13, 1, 103, "t1", [_sample("r1")])
    store.apply_annotation(13, 1, 103, "t2", [], state="cancelled")
    assert store.list_samples() == []
    assert store.get_annotation_state(13)["state"] == "cancelled"


def test_changed_sample_becomes_new_again(store):
    store.apply_annotation(14, 1, 104, "t1", [_sample("r1")])
    cl = store.claim_samples("tr", 60)
    store.complete_claim(cl.claim_id, "v2")
    assert store.count_new_samples() == 0
    store.apply_annotation(14, 1, 104, "t2", [_sample("r1")])  # same content: stays consumed
    assert store.count_new_samples() == 0
    store.apply_annotation(14, 1, 104, "t3", [_sample("r1", mask_blob="c" * 64)])
    assert store.count_new_samples() == 1


# ---------------------------------------------------------------------------------------------------------------------
# claims
# ---------------------------------------------------------------------------------------------------------------------

def test_claims_are_exclusive_and_complete(store):
    for i in range(5):
        store.apply_annotation(20 + i, 1, 200 + i, "t", [_sample("r1")])
    a = store.claim_samples("A", 60, limit=3)
    b = store.claim_samples("B", 60)
    assert len(a) == 3 and len(b) == 2 and not set(a.sample_ids) & set(b.sample_ids)
    assert len(store.claim_samples("C", 60)) == 0
    assert store.complete_claim(a.claim_id, "v-a") == 3
    assert store.release_claim(b.claim_id) == 2
    c = store.claim_samples("C", 60)
    assert sorted(c.sample_ids) == sorted(b.sample_ids)
    with pytest.raises(ClaimLost):
        store.complete_claim(b.claim_id)  # released claims cannot complete
    consumed = [s for s in store.list_samples() if s["consumed_at"] is not None]
    assert {s["consumed_by"] for s in consumed} == {"v-a"}


def test_expired_lease_loses_nothing(store):
    for i in range(3):
        store.apply_annotation(30 + i, 1, 300 + i, "t", [_sample("r1")])
    dead = store.claim_samples("crashed", lease_seconds=0.05)
    assert len(dead) == 3
    assert len(store.claim_samples("other", 60)) == 0  # still leased
    time.sleep(0.1)
    assert store.count_new_samples() == 3
    with pytest.raises(ClaimLost):
        store.renew_claim(dead.claim_id, 60)
    alive = store.claim_samples("other", 60)
    assert sorted(alive.sample_ids) == sorted(dead.sample_ids)
    with pytest.raises(ClaimLost):
        store.complete_claim(dead.claim_id)  # the crashed trainer comes back too late
    assert store.complete_claim(alive.claim_id) == 3
    assert store.get_claim(dead.claim_id)["status"] == "expired"


def test_two_concurrent_trainers_never_double_consume(store):
    n = 40
    for i in range(n):
        store.apply_annotation(1000 + i, 1, 5000 + i, "t", [_sample("r1")])
    got: dict[str, list[int]] = {}
    barrier = threading.Barrier(2)

    def trainer(name):
        ids = []
        barrier.wait()
        for _ in range(20):
            cl = store.claim_samples(name, 60, limit=3)
            if not len(cl):
                break
            ids += cl.sample_ids
            store.complete_claim(cl.claim_id, name)
        got[name] = ids

    ts = [threading.Thread(target=trainer, args=(f"T{i}",)) for i in range(2)]
    for t in ts:
        t.start()
    for t in ts:
        t.join(30)
    all_ids = got["T0"] + got["T1"]
    assert len(all_ids) == n and len(set(all_ids)) == n
    assert store.count_new_samples() == 0


# ---------------------------------------------------------------------------------------------------------------------
# predictions, requests, runs, versions, stats
# ---------------------------------------------------------------------------------------------------------------------

def test_record_prediction_and_version_stats(store):
    m = np.zeros((6, 8), bool)
    m[1:4, 2:6] = True
    pid = store.record_prediction(1, 100, "the red circle", "v1", m, 0.8)
    store.record_prediction(1, 101, "x", "v1", m, 0.7)
    store.record_prediction(1, 102, "y", "v2", m, 0.7)
    p = store.find_prediction(100, "v1", "The red circle")
    assert p["id"] == pid and np.array_equal(store.prediction_mask(p), m)
    store.apply_annotation(40, 1, 100, "t", [_sample("r1", origin="prediction", prediction_iou=1.0, lead_time=2.0)])
    store.apply_annotation(41, 1, 101, "t", [_sample("r1", origin="prediction-changed", prediction_iou=0.5,
                                                     lead_time=4.0),
                                             _sample("r2", origin="manual", prediction_iou=0.0)])
    store.apply_annotation(42, 1, 102, "t", [_sample("r1", origin="manual", model_version=None)])
    vs = store.version_stats()
    v1 = vs["v1"]
    assert (v1["predictions"], v1["accepted"], v1["changed"], v1["manual"], v1["regions"]) == (2, 1, 1, 1, 3)
    assert v1["mean_iou"] == pytest.approx(0.5) and v1["iou_samples"] == 3 and v1["queued"] == 3
    assert v1["acceptance_rate"] == pytest.approx(1 / 3, abs=1e-3) and v1["mean_lead_time"] == pytest.approx(3.0)
    assert vs["v2"]["predictions"] == 1 and vs["v2"]["regions"] == 0
    assert v1["no_target_predictions"] == 0
    store.record_prediction(1, 103, "the purple star", "v2", np.zeros((6, 8), bool), 0.1)  # "nothing here"
    assert store.version_stats()["v2"]["no_target_predictions"] == 1
    assert store.version_stats()["v2"]["predictions"] == 2
    assert vs["unknown"]["manual"] == 1
    cl = store.claim_samples("t", 60)
    store.complete_claim(cl.claim_id)
    assert store.version_stats()["v1"]["queued"] == 0


def test_training_requests_runs_versions(store):
    a = store.add_training_request(1, event_id=7)
    assert store.add_training_request(1, event_id=7) == a  # same event twice
    store.add_training_request(1, event_id=8)
    reqs = store.pending_training_requests()
    assert len(reqs) == 2
    store.start_run("run-1", "tr", None, "demo-1")
    assert store.mark_training_requests_handled([r["id"] for r in reqs], "run-1") == 2
    assert store.pending_training_requests() == []
    store.finish_run("run-1", "done", True, "ft-1", "improved", {"after": {"mIoU": 0.5}})
    store.record_version("ft-1", "/x/model.pt", "demo-1", {"mIoU": 0.5}, "run-1", 10, 2)
    runs = store.list_runs()
    assert runs[0]["published"] == 1 and runs[0]["metrics"]["after"]["mIoU"] == 0.5
    v = store.list_versions()
    assert v[0]["version"] == "ft-1" and v[0]["parent"] == "demo-1"
    assert store.stats()["versions_published"] == 1


def test_sqlite_store_is_shared_across_processes_and_threads(tmp_path):
    s1 = open_datastore(None, tmp_path)
    s2 = open_datastore(None, tmp_path)  # another "process" (own connections)
    ids = []

    def writer(store, k):
        for i in range(20):
            ids.append(store.enqueue_event("X", {"k": k, "i": i}))

    ts = [threading.Thread(target=writer, args=(s, k)) for k, s in enumerate([s1, s2, s1])]
    for t in ts:
        t.start()
    for t in ts:
        t.join()
    assert len(set(ids)) == 60
    assert s2.stats()["events"]["pending"] == 60
    s1.close()
    s2.close()
