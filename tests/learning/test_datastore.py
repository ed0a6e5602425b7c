"""The corrections datastore, the same tests on SQLite and on the real PostgreSQL server (marker ``postgres``)."""

from __future__ import annotations

import io
import logging
import multiprocessing
import threading
import time

import numpy as np
import pytest
from PIL import Image
from sqlalchemy import text

from backend.learning.blobs import BlobStore
from backend.learning.datastore import ClaimLost, DatastoreURLError, open_datastore
from backend.learning.datastore.engines import resolve_target
from ssp_sam.images import load_image
from tests.learning import postgres


@pytest.fixture
def store(db):
    return db.open()


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
    assert [p.name for p in (tmp_path / "blobs").rglob("*") if p.is_file()] == [sha]  # no temporary file left
    with pytest.raises(KeyError):
        b.get("0" * 64)
    with pytest.raises(ValueError):
        b.path("../etc/passwd")


def test_blob_masks_are_compact_pngs(tmp_path):
    b = BlobStore(tmp_path / "blobs")
    m = np.zeros((480, 640), bool)
    m[100:300, 200:500] = True
    sha = b.put_mask(m)
    assert b.get(sha)[:8] == b"\x89PNG\r\n\x1a\n" and len(b.get(sha)) < 2000
    assert np.array_equal(b.get_mask(sha), m)
    assert b.put_mask(m.astype(np.uint8) * 255) == sha  # same mask, same blob


# ---------------------------------------------------------------------------------------------------------------------
# factory, URLs, engines
# ---------------------------------------------------------------------------------------------------------------------

def test_open_datastore_variants(tmp_path, monkeypatch):
    monkeypatch.delenv("DATASTORE_URL", raising=False)
    s = open_datastore(None, tmp_path)
    assert s.dialect == "sqlite" and s.path == tmp_path / "corrections.db"
    with s.engine.connect() as conn:
        assert conn.exec_driver_sql("PRAGMA journal_mode").scalar() == "wal"
        assert conn.exec_driver_sql("PRAGMA busy_timeout").scalar() == 30000
        assert conn.exec_driver_sql("PRAGMA synchronous").scalar() == 2  # FULL
    s.close()
    s = open_datastore({"model_dir": str(tmp_path / "m")})
    assert s.path == tmp_path / "m" / "corrections.db"
    s.close()
    s = open_datastore(f"sqlite:///{tmp_path}/x.db", tmp_path)
    assert s.path == tmp_path / "x.db" and s.blobs.root == tmp_path / "blobs"
    s.close()
    s = open_datastore(str(tmp_path / "bare.db"), tmp_path)
    assert s.path == tmp_path / "bare.db" and (tmp_path / "bare.db").exists()
    s.close()
    monkeypatch.setenv("DATASTORE_URL", f"sqlite:///{tmp_path}/env.db")
    s = open_datastore(None, tmp_path)
    assert s.path == tmp_path / "env.db"
    s.close()
    monkeypatch.delenv("DATASTORE_URL")

    class Cfg:
        datastore_url = None
        model_dir = str(tmp_path / "cfg")

    s = open_datastore(Cfg())
    assert s.path == tmp_path / "cfg" / "corrections.db"
    s.close()


def test_postgres_urls_resolve_to_psycopg_and_hide_the_password(tmp_path):
    for url in ("postgresql://u:s3cret@db:5432/x?schema=tenant_1&sslmode=require",
                "postgres://u:s3cret@db:5432/x?schema=tenant_1&sslmode=require",
                "postgresql+psycopg://u:s3cret@db:5432/x?schema=tenant_1&sslmode=require"):
        target = resolve_target(url, tmp_path)
        assert target.url.drivername == "postgresql+psycopg" and target.schema == "tenant_1"
        assert dict(target.url.query) == {"sslmode": "require"} and target.url.password == "s3cret"
        assert "s3cret" not in target.display() and "schema=tenant_1" in target.display()
    assert resolve_target("postgresql://db/x?schema=a", tmp_path, schema="b").schema == "b"
    with pytest.raises(DatastoreURLError, match="bad schema name"):
        resolve_target("postgresql://db/x?schema=x;drop", tmp_path)
    with pytest.raises(DatastoreURLError, match="unsupported datastore URL scheme 'mysql'"):
        resolve_target("mysql://u:s3cret@db/x", tmp_path)


@pytest.mark.postgres
def test_open_datastore_postgres_from_env(tmp_path, monkeypatch):
    url, schema = postgres.require_postgres(), postgres.new_schema_name()
    monkeypatch.setenv("DATASTORE_URL", f"{url}?schema={schema}")
    try:
        with open_datastore(None, tmp_path) as s:
            assert s.dialect == "postgresql" and s.schema == schema
            assert s.enqueue_event("START_TRAINING", {"action": "START_TRAINING", "project": {"id": 1}}) == 1
            with s.engine.connect() as conn:
                tables = conn.execute(text("SELECT table_name FROM information_schema.tables WHERE table_schema = :s"),
                                      {"s": schema}).scalars().all()
        assert {"events", "samples", "alembic_version"} <= set(tables) and "meta" not in tables
    finally:
        postgres.drop_schema(url, schema)


@pytest.mark.postgres
def test_the_password_of_a_postgres_url_is_never_shown(tmp_path, caplog):
    url, schema = postgres.require_postgres(), postgres.new_schema_name()
    with_password = url.replace("://postgres@", "://postgres:pw-never-shown@")
    assert "pw-never-shown" in with_password
    caplog.set_level(logging.DEBUG)
    try:
        with open_datastore(with_password, tmp_path, schema=schema) as s:  # trust auth ignores the password
            assert "pw-never-shown" not in repr(s) and "pw-never-shown" not in s.where
            assert schema in s.where
        assert caplog.records and not [r for r in caplog.records if "pw-never-shown" in r.getMessage()]
    finally:
        postgres.drop_schema(url, schema)


# ---------------------------------------------------------------------------------------------------------------------
# inbox
# ---------------------------------------------------------------------------------------------------------------------

def test_enqueue_is_idempotent(store):
    p = {"action": "ANNOTATION_CREATED", "annotation": {"id": 1}, "project": {"id": 3}}
    a = store.enqueue_event("ANNOTATION_CREATED", p)
    b = store.enqueue_event("ANNOTATION_CREATED", dict(p))
    assert a == b
    st = store.stats()["events"]
    assert st["pending"] == 1 and st["redeliveries"] == 1
    ids = {store.enqueue_event("ANNOTATION_CREATED", {"annotation": {"id": 100 + i}}) for i in range(30)}
    assert len(ids) == 30 and a not in ids
    assert store.pending_event_count() == 31
    assert store.get_event(a)["project_id"] == 3


def test_list_events_newest_first_by_action_and_status(store):
    a = store.enqueue_event("ANNOTATION_CREATED", {"annotation": {"id": 1}})
    b = store.enqueue_event("START_TRAINING", {"project": {"id": 1}})
    c = store.enqueue_event("ANNOTATION_CREATED", {"annotation": {"id": 2}})
    store.mark_event_done(a, {"ok": 1})
    assert [e["id"] for e in store.list_events()] == [c, b, a]
    assert [e["payload"]["annotation"]["id"] for e in store.list_events(action="ANNOTATION_CREATED")] == [2, 1]
    assert [e["id"] for e in store.list_events(status="done")] == [a]
    assert [e["id"] for e in store.list_events(limit=1)] == [c]


def test_start_training_is_deduplicated_only_briefly(store, monkeypatch):
    import backend.learning.datastore.store as ds

    p = {"action": "START_TRAINING", "project": {"id": 1}}
    t = [1_000_000.0]
    monkeypatch.setattr(ds, "_now", lambda: t[0])
    a = store.enqueue_event("START_TRAINING", p)
    assert store.enqueue_event("START_TRAINING", p) == a  # LS retrying the same delivery
    t[0] += 120  # the same button clicked again later is a new request
    assert store.enqueue_event("START_TRAINING", p) != a


def test_secrets_are_not_kept_in_the_inbox(store):
    eid = store.enqueue_event("X", {"project": {"id": 2, "token": "invite-token", "title": "p"}})
    assert store.get_event(eid)["payload"]["project"] == {"id": 2, "title": "p"}


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


def test_retrying_events_wait_for_their_time(store):
    eid = store.enqueue_event("X", {"a": 3})
    store.claim_events("w1")
    store.mark_event_retry(eid, "later", delay_seconds=3600)
    assert store.claim_events("w2") == []
    assert [e["id"] for e in store.stats()["events"]["retrying"]] == [eid]
    store.mark_event_failed(eid, "gave up")
    assert store.requeue_failed([]) == 0 and store.requeue_failed([eid + 1]) == 0
    assert store.requeue_failed([eid]) == 1


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


def test_claim_events_takes_them_in_order_up_to_the_limit(store):
    ids = [store.enqueue_event("X", {"i": i}) for i in range(5)]
    first = store.claim_events("w1", limit=3)
    second = store.claim_events("w2", limit=3)
    assert [e["id"] for e in first] == ids[:3] and [e["id"] for e in second] == ids[3:]
    assert {e["lease_owner"] for e in second} == {"w2"}


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


def test_metadata_refresh_keeps_the_training_state(store):
    store.apply_annotation(15, 1, 105, "t1", [_sample("r1", lead_time=1.0)])
    first = store.list_samples()[0]
    r = store.apply_annotation(15, 1, 105, "t2", [_sample("r1", lead_time=9.0, unknown_key="dropped")])
    assert r["unchanged"] == 1
    (again,) = store.list_samples()
    assert again["id"] == first["id"] and again["ingested_at"] == first["ingested_at"]
    assert again["lead_time"] == 9.0 and again["ls_updated_at"] == "t2"


def test_list_samples_filters(store):
    store.apply_annotation(16, 1, 106, "t", [_sample("r1", model_version="v1")])
    store.apply_annotation(17, 2, 107, "t", [_sample("r1", model_version="v2")])
    assert [s["annotation_id"] for s in store.list_samples(model_version="v2")] == [17]
    assert [s["annotation_id"] for s in store.list_samples(project_id=1)] == [16]
    assert [s["annotation_id"] for s in store.list_samples(annotation_id=17)] == [17]
    store.retract_annotation(17)
    assert [s["annotation_id"] for s in store.list_samples(active=None)] == [16, 17]


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
    assert store.get_annotation_state(12)["state"] == "deleted"


def test_cancelled_update_retracts(store):
    store.apply_annotation(13, 1, 103, "t1", [_sample("r1")])
    store.apply_annotation(13, 1, 103, "t2", [], state="cancelled")
    assert store.list_samples() == []
    assert store.list_samples(active=False)[0]["retract_reason"] == "cancelled"
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


def test_load_sample_reads_image_and_mask_blobs(store):
    rgb = np.zeros((6, 8, 3), np.uint8)
    rgb[..., 0] = 200
    buf = io.BytesIO()
    Image.fromarray(rgb).save(buf, format="PNG")
    mask = np.zeros((6, 8), bool)
    mask[1:3, 2:5] = True
    s = _sample("r1", mask_blob=store.blobs.put_mask(mask), image_blob=store.blobs.put(buf.getvalue()))
    store.apply_annotation(18, 1, 108, "t", [s])
    image, m = store.load_sample(store.list_samples()[0])
    assert np.array_equal(image, load_image(buf.getvalue())) and m.dtype == np.uint8
    assert np.array_equal(m, mask.astype(np.uint8))
    bad = _sample("r2", mask_blob=store.blobs.put_mask(np.zeros((3, 3), bool)), image_blob=s["image_blob"])
    store.apply_annotation(19, 1, 109, "t", [bad])
    with pytest.raises(ValueError, match="mask"):
        store.load_sample(store.list_samples(annotation_id=19)[0])


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
    assert store.get_claim(a.claim_id)["status"] == "completed" and store.get_claim(b.claim_id)["status"] == "released"


def test_renewed_lease_keeps_the_claim(store):
    store.apply_annotation(26, 1, 206, "t", [_sample("r1")])
    cl = store.claim_samples("A", lease_seconds=60)
    until = store.renew_claim(cl.claim_id, 600)
    assert store.get_claim(cl.claim_id)["lease_until"] == pytest.approx(until)
    with pytest.raises(ClaimLost):
        store.renew_claim("claim-unknown", 60)
    assert store.complete_claim("") == 0 and store.release_claim("") == 0


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


# One sample per claim and enough samples for many claim transactions: without the advisory lock on PostgreSQL, the
# double claim it prevents shows up in about half the runs of these tests.
N_CONCURRENT = 120


def _fill(store, n=N_CONCURRENT) -> list[int]:
    for i in range(n):
        store.apply_annotation(1000 + i, 1, 5000 + i, "t", [_sample("r1")])
    return [s["id"] for s in store.list_samples()]


def _claim_until_empty(store, name: str, got: dict, start: threading.Barrier) -> None:
    ids = []
    start.wait()
    for _ in range(N_CONCURRENT):  # bounded: at most one round per sample
        cl = store.claim_samples(name, 60, limit=1)
        if not len(cl):
            break
        ids += cl.sample_ids
        store.complete_claim(cl.claim_id, name)
    got[name] = ids


@pytest.mark.parametrize("own_stores", [True, False], ids=["own-store-each", "one-shared-store"])
def test_two_concurrent_trainers_never_double_consume(db, own_stores):
    """Two trainer threads, each with its own store object (like two processes) or sharing one."""
    first = db.open()
    expected = _fill(first)
    stores = [first, db.open() if own_stores else first]
    got: dict[str, list[int]] = {}
    barrier = threading.Barrier(2)
    ts = [threading.Thread(target=_claim_until_empty, args=(s, f"T{i}", got, barrier)) for i, s in enumerate(stores)]
    for t in ts:
        t.start()
    for t in ts:
        t.join(120)
    assert not any(t.is_alive() for t in ts) and set(got) == {"T0", "T1"}
    assert not set(got["T0"]) & set(got["T1"])
    assert sorted(got["T0"] + got["T1"]) == expected  # every sample exactly once
    assert first.count_new_samples() == 0
    assert {s["consumed_by"] for s in first.list_samples()} <= {"T0", "T1"}


def _trainer_process(url, model_dir, schema, name, start, results) -> None:
    store = open_datastore(url, model_dir, schema=schema)
    try:
        got: dict[str, list[int]] = {}
        _claim_until_empty(store, name, got, start)
        results.put((name, got[name]))
    finally:
        store.close()


def test_two_trainer_processes_never_double_consume(db):
    expected = _fill(db.open())
    ctx = multiprocessing.get_context("spawn")
    start, results = ctx.Barrier(2), ctx.Queue()
    procs = [ctx.Process(target=_trainer_process, args=(db.url, str(db.model_dir), db.schema, f"P{i}", start, results))
             for i in range(2)]
    for p in procs:
        p.start()
    try:
        got = dict(results.get(timeout=120) for _ in procs)
    finally:
        for p in procs:
            p.join(30)
            if p.is_alive():
                p.kill()
    assert [p.exitcode for p in procs] == [0, 0]
    assert not set(got["P0"]) & set(got["P1"])
    assert sorted(got["P0"] + got["P1"]) == expected


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
    assert p["mask_area"] == 12 and (p["width"], p["height"]) == (8, 6)
    assert store.find_prediction(100, "v2") is None and store.find_prediction(999) is None
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
    assert store.mark_training_requests_handled([], "run-1") == 0
    assert store.pending_training_requests() == []
    store.finish_run("run-1", "done", True, "ft-1", "improved", {"after": {"mIoU": 0.5}})
    store.record_version("ft-1", "versions/ft-1/model.pt", "demo-1", {"mIoU": 0.5}, "run-1", 10, 2)
    runs = store.list_runs()
    assert runs[0]["published"] == 1 and runs[0]["metrics"]["after"]["mIoU"] == 0.5
    v = store.list_versions()
    assert v[0]["version"] == "ft-1" and v[0]["parent"] == "demo-1" and v[0]["metrics"] == {"mIoU": 0.5}
    assert store.stats()["versions_published"] == 1


def test_stats_counts_everything(store):
    store.enqueue_event("X", {"a": 1})
    store.apply_annotation(50, 1, 150, "t", [_sample("r1"), _sample("r2")])
    store.retract_annotation(51)
    store.apply_annotation(52, 1, 152, "t", [_sample("r1")])
    store.retract_annotation(52)
    cl = store.claim_samples("t", 60, limit=1)
    st = store.stats()
    assert st["engine"] == store.dialect and st["events"]["pending"] == 1
    assert st["samples"] == {"total": 3, "active": 2, "queued": 2}
    assert st["claims"] == {"active": 1} and st["training_requests_pending"] == 0
    store.complete_claim(cl.claim_id)
    assert store.stats()["samples"]["queued"] == 1 and store.count_new_samples() == 1


def test_sqlite_store_is_shared_across_processes_and_threads(tmp_path):
    s1 = open_datastore(None, tmp_path)
    s2 = open_datastore(None, tmp_path)  # another "process" (own engine and connections)
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


def test_a_failed_transaction_leaves_nothing_behind(store):
    with pytest.raises(Exception):
        store.apply_annotation(60, 1, 160, "t", [_sample("r1"), _sample("r2", sentence=None)])  # NOT NULL violated
    assert store.get_annotation_state(60) is None and store.list_samples(active=None) == []
    assert store.apply_annotation(60, 1, 160, "t", [_sample("r1")])["inserted"] == 1  # the store still works



def test_unreachable_postgres_skips_and_fails_under_ci(monkeypatch):
    monkeypatch.setenv("TEST_POSTGRES_URL", "postgresql://postgres@127.0.0.1:1/test")  # nothing listens on port 1
    monkeypatch.delenv("CI", raising=False)
    with pytest.raises(pytest.skip.Exception, match="unreachable"):
        postgres.require_postgres()
    monkeypatch.setenv("CI", "true")
    with pytest.raises(pytest.fail.Exception, match="unreachable and CI is set"):
        postgres.require_postgres()
