"""The corrections datastore: the contract between the backend (infer side) and the trainer (train side).

One store, two engines with the same schema and behaviour:

* SQLite (default): ``MODEL_DIR/corrections.db``, WAL journal, busy timeout, explicit ``BEGIN IMMEDIATE``
  transactions, one connection per thread.
* PostgreSQL when ``DATASTORE_URL=postgresql://...`` (psycopg 3); claims use ``FOR UPDATE SKIP LOCKED``. A
  ``schema=<name>`` query parameter (or ``open_datastore(..., schema=...)``) puts every table in that schema.

Blobs (image snapshots, masks) live in the content-addressed :class:`backend.learning.blobs.BlobStore` under
``MODEL_DIR/blobs``; rows only hold their SHA-256.

Tables (see docs/corrections.md for every column):

``events``            the webhook inbox: raw payloads, de-duplicated by a hash, processed by
                      :class:`backend.learning.corrections.CorrectionWorker` with leases, retries with backoff, and a
                      ``failed`` state for poison events.
``predictions``       every mask the server predicted (``record_prediction``), for IoU(prediction, submission).
``annotations``       one row per Label Studio annotation seen: its ``updated_at`` (stale events are ignored) and
                      a tombstone when deleted.
``samples``           one per brush region of a submitted annotation: sentence, mask/image blobs, ids, annotator,
                      origin, model version of the parent prediction, active/retracted, claim and consumption.
``claims``            a trainer's exclusive hold on new samples, with a lease that expires if the trainer dies.
``training_requests`` START_TRAINING events.
``runs``              every fine-tuning run and its decision (published or not, and why).
``versions``          published model versions.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import logging
import os
import re
import sqlite3
import threading
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Iterator, Mapping
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

import numpy as np

from backend.learning.blobs import BlobStore

log = logging.getLogger(__name__)

ORIGINS = ("prediction", "prediction-changed", "manual")
EVENT_PENDING, EVENT_PROCESSING, EVENT_DONE, EVENT_FAILED, EVENT_IGNORED = (
    "pending", "processing", "done", "failed", "ignored")


def _now() -> float:
    return time.time()


def _iso(ts: float | None) -> str | None:
    if ts is None:
        return None
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(ts)) + f".{int((ts % 1) * 1000):03d}Z"


def canonical_json(obj: Any) -> str:
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), default=str)


# Redeliveries are de-duplicated within a time bucket. Annotation events are idempotent anyway (samples are keyed by
# annotation and region), so the bucket only saves work; START_TRAINING payloads carry no ids and the same click
# repeated later must count again, hence a short bucket.
DEDUP_BUCKET_S = {"START_TRAINING": 60.0}
DEFAULT_DEDUP_BUCKET_S = 86400.0


def event_dedup_key(action: str, payload: Mapping, now: float | None = None) -> str:
    """Hash of the action, the canonical payload and a time bucket: a redelivered webhook maps to the same row."""
    bucket = DEDUP_BUCKET_S.get(str(action), DEFAULT_DEDUP_BUCKET_S)
    slot = int((time.time() if now is None else now) // bucket)
    return hashlib.sha256(f"{action}\n{slot}\n{canonical_json(payload)}".encode()).hexdigest()


_SECRET_PROJECT_FIELDS = ("token", "task_data_login", "task_data_password")


def redact_payload(payload: Mapping) -> Mapping:
    """Drop secrets Label Studio puts in webhook payloads (the project's invite token, task data credentials)."""
    project = payload.get("project")
    if isinstance(project, Mapping) and any(project.get(k) for k in _SECRET_PROJECT_FIELDS):
        payload = dict(payload)
        payload["project"] = {k: v for k, v in project.items() if k not in _SECRET_PROJECT_FIELDS}
    return payload


def mask_iou(a: np.ndarray, b: np.ndarray) -> float:
    a = np.asarray(a, dtype=bool)
    b = np.asarray(b, dtype=bool)
    if a.shape != b.shape:
        raise ValueError(f"mask shapes differ: {a.shape} vs {b.shape}")
    union = np.logical_or(a, b).sum()
    if union == 0:
        return 1.0
    return float(np.logical_and(a, b).sum() / union)


# ---------------------------------------------------------------------------------------------------------------------
# schema
# ---------------------------------------------------------------------------------------------------------------------

_TABLES = ("events", "predictions", "annotations", "samples", "claims", "training_requests", "runs", "versions",
           "meta")

_SCHEMA = """
CREATE TABLE IF NOT EXISTS {meta} (
    key TEXT PRIMARY KEY,
    value TEXT
);
CREATE TABLE IF NOT EXISTS {events} (
    id {pk},
    dedup_key TEXT NOT NULL UNIQUE,
    action TEXT NOT NULL,
    payload TEXT NOT NULL,
    project_id BIGINT,
    received_at DOUBLE PRECISION NOT NULL,
    status TEXT NOT NULL DEFAULT 'pending',
    attempts INTEGER NOT NULL DEFAULT 0,
    next_attempt_at DOUBLE PRECISION NOT NULL,
    lease_owner TEXT,
    lease_until DOUBLE PRECISION,
    last_error TEXT,
    processed_at DOUBLE PRECISION,
    result TEXT,
    redeliveries INTEGER NOT NULL DEFAULT 0
);
CREATE INDEX IF NOT EXISTS {events}_due ON {events} (status, next_attempt_at);
CREATE TABLE IF NOT EXISTS {predictions} (
    id {pk},
    project_id BIGINT,
    task_id BIGINT,
    sentence TEXT,
    model_version TEXT,
    mask_blob TEXT,
    width INTEGER,
    height INTEGER,
    mask_area BIGINT,
    score DOUBLE PRECISION,
    created_at DOUBLE PRECISION NOT NULL
);
CREATE INDEX IF NOT EXISTS {predictions}_task ON {predictions} (task_id, model_version);
CREATE INDEX IF NOT EXISTS {predictions}_version ON {predictions} (model_version);
CREATE TABLE IF NOT EXISTS {annotations} (
    annotation_id BIGINT PRIMARY KEY,
    project_id BIGINT,
    task_id BIGINT,
    state TEXT NOT NULL,
    ls_updated_at TEXT,
    event_id BIGINT,
    n_samples INTEGER NOT NULL DEFAULT 0,
    seen_at DOUBLE PRECISION NOT NULL
);
CREATE TABLE IF NOT EXISTS {samples} (
    id {pk},
    sample_key TEXT NOT NULL UNIQUE,
    project_id BIGINT,
    task_id BIGINT,
    annotation_id BIGINT NOT NULL,
    region_id TEXT NOT NULL,
    sentence TEXT NOT NULL,
    sentence_source TEXT,
    label TEXT,
    mask_blob TEXT NOT NULL,
    image_blob TEXT NOT NULL,
    image_url TEXT,
    width INTEGER NOT NULL,
    height INTEGER NOT NULL,
    mask_area BIGINT,
    annotator BIGINT,
    lead_time DOUBLE PRECISION,
    ground_truth INTEGER NOT NULL DEFAULT 0,
    origin TEXT NOT NULL,
    model_version TEXT,
    prediction_id BIGINT,
    prediction_iou DOUBLE PRECISION,
    content_hash TEXT NOT NULL,
    ls_created_at TEXT,
    ls_updated_at TEXT,
    ingested_at DOUBLE PRECISION NOT NULL,
    event_id BIGINT,
    active INTEGER NOT NULL DEFAULT 1,
    retracted_at DOUBLE PRECISION,
    retract_reason TEXT,
    claim_id TEXT,
    consumed_at DOUBLE PRECISION,
    consumed_by TEXT
);
CREATE INDEX IF NOT EXISTS {samples}_annotation ON {samples} (annotation_id);
CREATE INDEX IF NOT EXISTS {samples}_queue ON {samples} (active, consumed_at, claim_id);
CREATE INDEX IF NOT EXISTS {samples}_version ON {samples} (model_version);
CREATE TABLE IF NOT EXISTS {claims} (
    claim_id TEXT PRIMARY KEY,
    trainer_id TEXT NOT NULL,
    created_at DOUBLE PRECISION NOT NULL,
    lease_until DOUBLE PRECISION NOT NULL,
    status TEXT NOT NULL,
    n_samples INTEGER NOT NULL DEFAULT 0,
    finished_at DOUBLE PRECISION,
    note TEXT
);
CREATE TABLE IF NOT EXISTS {training_requests} (
    id {pk},
    project_id BIGINT,
    event_id BIGINT UNIQUE,
    requested_at DOUBLE PRECISION NOT NULL,
    status TEXT NOT NULL DEFAULT 'pending',
    run_id TEXT,
    handled_at DOUBLE PRECISION
);
CREATE TABLE IF NOT EXISTS {runs} (
    run_id TEXT PRIMARY KEY,
    trainer_id TEXT,
    claim_id TEXT,
    started_at DOUBLE PRECISION NOT NULL,
    finished_at DOUBLE PRECISION,
    status TEXT NOT NULL,
    published INTEGER NOT NULL DEFAULT 0,
    version TEXT,
    parent TEXT,
    reason TEXT,
    metrics TEXT,
    report_path TEXT
);
CREATE TABLE IF NOT EXISTS {versions} (
    version TEXT PRIMARY KEY,
    path TEXT NOT NULL,
    parent TEXT,
    created_at DOUBLE PRECISION NOT NULL,
    run_id TEXT,
    metrics TEXT,
    n_train INTEGER,
    n_heldout INTEGER
);
"""

SCHEMA_VERSION = "1"


@dataclass
class Claim:
    claim_id: str
    trainer_id: str
    lease_until: float
    samples: list[dict] = field(default_factory=list)

    @property
    def sample_ids(self) -> list[int]:
        return [s["id"] for s in self.samples]

    def __len__(self) -> int:
        return len(self.samples)


class ClaimLost(RuntimeError):
    """The claim's lease expired and its samples were taken by another trainer (or it was released)."""


# ---------------------------------------------------------------------------------------------------------------------
# the store
# ---------------------------------------------------------------------------------------------------------------------

class Datastore:
    """Engine-neutral corrections store. Use :func:`open_datastore` to make one."""

    engine = "base"

    def __init__(self, model_dir: str | os.PathLike, blobs: BlobStore | None = None, prefix: str = ""):
        self.model_dir = Path(model_dir)
        self.model_dir.mkdir(parents=True, exist_ok=True)
        self.blobs = blobs or BlobStore(self.model_dir / "blobs")
        if prefix and not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", prefix):
            raise ValueError(f"bad table prefix {prefix!r}")
        self.prefix = prefix
        self._local = threading.local()
        self._conns: list[Any] = []
        self._conns_lock = threading.Lock()
        self._names = {t: self._table(t) for t in _TABLES}

    # -- engine hooks -------------------------------------------------------------------------------------------------
    def _table(self, name: str) -> str:
        return f"{self.prefix}{name}"

    def _connect(self):  # pragma: no cover - abstract
        raise NotImplementedError

    def _sql(self, sql: str) -> str:
        return sql.format(**self._names)

    @contextlib.contextmanager
    def _tx(self, write: bool = True) -> Iterator[Any]:  # pragma: no cover - abstract
        raise NotImplementedError
        yield

    def _lock_clause(self, skip_locked: bool = False, of: str | None = None) -> str:
        return ""

    def _serialize_claims(self, c) -> None:
        """Make concurrent ``claim_samples`` transactions run one after the other (SQLite: BEGIN IMMEDIATE does)."""

    # -- connections --------------------------------------------------------------------------------------------------
    def _conn(self):
        conn = getattr(self._local, "conn", None)
        if conn is None:
            conn = self._connect()
            self._local.conn = conn
            with self._conns_lock:
                self._conns.append(conn)
        return conn

    def close(self) -> None:
        with self._conns_lock:
            for conn in self._conns:
                with contextlib.suppress(Exception):
                    conn.close()
            self._conns.clear()
        self._local = threading.local()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def _rows(self, cur) -> list[dict]:
        return [dict(r) for r in cur.fetchall()]

    def _one(self, cur) -> dict | None:
        r = cur.fetchone()
        return dict(r) if r is not None else None

    def _exec(self, c, sql: str, params: Iterable = ()):  # c: a cursor from _tx
        return c.execute(self._sql(sql), tuple(params))

    def init_schema(self) -> None:
        raise NotImplementedError

    # =================================================================================================================
    # server side (called from request handlers: must stay fast)
    # =================================================================================================================
    def enqueue_event(self, action: str, payload: Mapping) -> int:
        """Durably insert a webhook event into the inbox and return its id.

        A redelivery of the same payload (same action and canonical JSON) returns the existing id and counts the
        redelivery; nothing else changes.
        """
        action = str(action or payload.get("action") or "UNKNOWN")
        payload = redact_payload(payload)
        now = _now()
        key = event_dedup_key(action, payload, now)
        body = canonical_json(payload)
        project = payload.get("project")
        project_id = as_int(project.get("id") if isinstance(project, Mapping) else project)
        with self._tx() as c:
            cur = self._exec(c, "INSERT INTO {events} (dedup_key, action, payload, project_id, received_at, status,"
                                " attempts, next_attempt_at) VALUES (?, ?, ?, ?, ?, 'pending', 0, ?)"
                                " ON CONFLICT (dedup_key) DO NOTHING RETURNING id",
                             (key, action, body, project_id, now, now))
            row = cur.fetchone()
            if row is not None:
                return int(_first(row))
            self._exec(c, "UPDATE {events} SET redeliveries = redeliveries + 1 WHERE dedup_key = ?", (key,))
            cur = self._exec(c, "SELECT id FROM {events} WHERE dedup_key = ?", (key,))
            return int(_first(cur.fetchone()))

    def record_prediction(self, project_id, task_id, sentence: str, model_version: str, mask: np.ndarray,
                          score: float | None = None) -> int:
        """Remember a predicted mask (as a 1-bit PNG blob) to compare later with what the annotator submits."""
        mask = np.asarray(mask)
        if mask.ndim != 2:
            raise ValueError(f"mask must be (H, W), got {mask.shape}")
        sha = self.blobs.put_mask(mask)
        h, w = mask.shape
        with self._tx() as c:
            cur = self._exec(c, "INSERT INTO {predictions} (project_id, task_id, sentence, model_version, mask_blob,"
                                " width, height, mask_area, score, created_at) VALUES (?,?,?,?,?,?,?,?,?,?)"
                                " RETURNING id",
                             (as_int(project_id), as_int(task_id), sentence, str(model_version), sha, int(w),
                              int(h), int(np.count_nonzero(mask)), None if score is None else float(score), _now()))
            return int(_first(cur.fetchone()))

    def find_prediction(self, task_id, model_version: str | None = None, sentence: str | None = None) -> dict | None:
        """The latest recorded prediction for a task (preferring the same sentence, then the same version)."""
        with self._tx(write=False) as c:
            rows = self._rows(self._exec(c, "SELECT * FROM {predictions} WHERE task_id = ? ORDER BY id DESC",
                                         (as_int(task_id),)))
        if model_version is not None:
            rows = [r for r in rows if r["model_version"] == str(model_version)] or []
        if sentence is not None:
            same = [r for r in rows if (r["sentence"] or "").strip().lower() == sentence.strip().lower()]
            if same:
                return same[0]
        return rows[0] if rows else None

    def prediction_mask(self, prediction: Mapping) -> np.ndarray:
        return self.blobs.get_mask(prediction["mask_blob"])

    # =================================================================================================================
    # worker side: the inbox
    # =================================================================================================================
    def claim_events(self, worker_id: str, limit: int = 16, lease_seconds: float = 120.0) -> list[dict]:
        """Take up to ``limit`` due events (pending and due, or processing with an expired lease)."""
        now = _now()
        with self._tx() as c:
            rows = self._rows(self._exec(
                c, "SELECT id FROM {events} WHERE (status = 'pending' AND next_attempt_at <= ?)"
                   " OR (status = 'processing' AND lease_until < ?) ORDER BY id LIMIT ?" + self._lock_clause(skip_locked=True),
                (now, now, int(limit))))
            ids = [r["id"] for r in rows]
            if not ids:
                return []
            marks = ",".join("?" * len(ids))
            self._exec(c, f"UPDATE {{events}} SET status = 'processing', lease_owner = ?, lease_until = ?,"
                          f" attempts = attempts + 1 WHERE id IN ({marks})",
                       (worker_id, now + lease_seconds, *ids))
            out = self._rows(self._exec(c, f"SELECT * FROM {{events}} WHERE id IN ({marks}) ORDER BY id", ids))
        for r in out:
            r["payload"] = json.loads(r["payload"])
        return out

    def mark_event_done(self, event_id: int, result: Mapping | None = None, status: str = EVENT_DONE) -> None:
        with self._tx() as c:
            self._exec(c, "UPDATE {events} SET status = ?, processed_at = ?, lease_owner = NULL, lease_until = NULL,"
                          " result = ?, last_error = NULL WHERE id = ?",
                       (status, _now(), canonical_json(result or {}), int(event_id)))

    def mark_event_retry(self, event_id: int, error: str, delay_seconds: float) -> None:
        with self._tx() as c:
            self._exec(c, "UPDATE {events} SET status = 'pending', next_attempt_at = ?, lease_owner = NULL,"
                          " lease_until = NULL, last_error = ? WHERE id = ?",
                       (_now() + float(delay_seconds), str(error)[:4000], int(event_id)))

    def mark_event_failed(self, event_id: int, error: str) -> None:
        with self._tx() as c:
            self._exec(c, "UPDATE {events} SET status = 'failed', processed_at = ?, lease_owner = NULL,"
                          " lease_until = NULL, last_error = ? WHERE id = ?",
                       (_now(), str(error)[:4000], int(event_id)))

    def requeue_failed(self, event_ids: Iterable[int] | None = None) -> int:
        """Give failed events another round of attempts (an operator's action after fixing the cause)."""
        with self._tx() as c:
            if event_ids is None:
                cur = self._exec(c, "UPDATE {events} SET status = 'pending', attempts = 0, next_attempt_at = ?"
                                    " WHERE status = 'failed'", (_now(),))
            else:
                ids = [int(i) for i in event_ids]
                if not ids:
                    return 0
                cur = self._exec(c, f"UPDATE {{events}} SET status = 'pending', attempts = 0, next_attempt_at = ?"
                                    f" WHERE status = 'failed' AND id IN ({','.join('?' * len(ids))})",
                                 (_now(), *ids))
            return cur.rowcount

    def purge_events(self, older_than_s: float = 30 * 86400, statuses: Iterable[str] = (EVENT_DONE, EVENT_IGNORED)
                     ) -> int:
        """Delete processed inbox rows older than ``older_than_s`` (samples keep everything they need)."""
        sts = [str(x) for x in statuses]
        with self._tx() as c:
            cur = self._exec(c, f"DELETE FROM {{events}} WHERE processed_at < ? AND status IN"
                                f" ({','.join('?' * len(sts))})", (_now() - float(older_than_s), *sts))
            return cur.rowcount

    def get_event(self, event_id: int) -> dict | None:
        with self._tx(write=False) as c:
            r = self._one(self._exec(c, "SELECT * FROM {events} WHERE id = ?", (int(event_id),)))
        if r:
            r["payload"] = json.loads(r["payload"])
        return r

    def pending_event_count(self) -> int:
        with self._tx(write=False) as c:
            r = self._exec(c, "SELECT COUNT(*) AS n FROM {events} WHERE status IN ('pending', 'processing')").fetchone()
        return int(_first(r))

    # =================================================================================================================
    # worker side: annotations and samples
    # =================================================================================================================
    def get_annotation_state(self, annotation_id) -> dict | None:
        with self._tx(write=False) as c:
            return self._one(self._exec(c, "SELECT * FROM {annotations} WHERE annotation_id = ?",
                                        (int(annotation_id),)))

    def apply_annotation(self, annotation_id, project_id, task_id, ls_updated_at: str | None,
                         samples: list[Mapping], event_id: int | None = None, state: str = "active") -> dict:
        """Replace the samples of one annotation by ``samples`` (idempotent; stale or post-delete events ignored).

        ``samples``: dicts with the columns of the samples table (``region_id``, ``sentence``, ``mask_blob``,
        ``image_blob``, ``width``, ``height``, ``origin``...). Samples of the annotation missing from ``samples`` are
        retracted; a sample whose content changed becomes new again (unconsumed); identical ones keep their state.
        ``state="cancelled"`` retracts everything and records the annotation as cancelled.
        Returns ``{"applied": bool, "reason": ..., "inserted", "updated", "unchanged", "retracted"}``.
        """
        aid = int(annotation_id)
        now = _now()
        out = {"applied": False, "reason": "", "inserted": 0, "updated": 0, "unchanged": 0, "retracted": 0}
        with self._tx() as c:
            prev = self._one(self._exec(c, "SELECT * FROM {annotations} WHERE annotation_id = ?" + self._lock_clause(),
                                        (aid,)))
            if prev is not None:
                if prev["state"] == "deleted":
                    out["reason"] = "annotation was deleted"
                    return out
                if ls_updated_at and prev["ls_updated_at"] and str(ls_updated_at) < str(prev["ls_updated_at"]):
                    out["reason"] = "stale event (older updated_at)"
                    return out
                self._exec(c, "UPDATE {annotations} SET project_id = ?, task_id = ?, state = ?, ls_updated_at = ?,"
                              " event_id = ?, n_samples = ?, seen_at = ? WHERE annotation_id = ?",
                           (as_int(project_id), as_int(task_id), state, ls_updated_at, event_id,
                            len(samples) if state == "active" else 0, now, aid))
            else:
                self._exec(c, "INSERT INTO {annotations} (annotation_id, project_id, task_id, state, ls_updated_at,"
                              " event_id, n_samples, seen_at) VALUES (?,?,?,?,?,?,?,?)",
                           (aid, as_int(project_id), as_int(task_id), state, ls_updated_at, event_id,
                            len(samples) if state == "active" else 0, now))
            existing = {r["sample_key"]: r for r in self._rows(self._exec(
                c, "SELECT id, sample_key, content_hash, active FROM {samples} WHERE annotation_id = ?", (aid,)))}
            keep: set[str] = set()
            if state == "active":
                for s in samples:
                    key = sample_key(aid, s["region_id"])
                    keep.add(key)
                    content = _content_hash(s)
                    cols = dict(s)
                    cols.update(sample_key=key, annotation_id=aid, project_id=as_int(project_id),
                                task_id=as_int(task_id), content_hash=content, event_id=event_id,
                                ls_updated_at=ls_updated_at)
                    cols = {k: v for k, v in cols.items() if k in _SAMPLE_COLUMNS}
                    prev_s = existing.get(key)
                    if prev_s is None:
                        cols.update(ingested_at=now, active=1)
                        names = list(cols)
                        self._exec(c, f"INSERT INTO {{samples}} ({', '.join(names)}) VALUES"
                                      f" ({', '.join('?' * len(names))})", [cols[n] for n in names])
                        out["inserted"] += 1
                    elif prev_s["content_hash"] == content and prev_s["active"]:
                        # metadata-only refresh (ids, timestamps); training state is kept
                        upd = {k: cols[k] for k in ("event_id", "ls_updated_at", "lead_time", "ground_truth",
                                                    "annotator") if k in cols}
                        if upd:
                            self._exec(c, "UPDATE {samples} SET " + ", ".join(f"{k} = ?" for k in upd)
                                          + " WHERE id = ?", [*upd.values(), prev_s["id"]])
                        out["unchanged"] += 1
                    else:
                        cols.update(ingested_at=now, active=1, retracted_at=None, retract_reason=None,
                                    claim_id=None, consumed_at=None, consumed_by=None)
                        self._exec(c, "UPDATE {samples} SET " + ", ".join(f"{k} = ?" for k in cols)
                                      + " WHERE id = ?", [*cols.values(), prev_s["id"]])
                        out["updated"] += 1
            for key, r in existing.items():
                if key not in keep and r["active"]:
                    self._exec(c, "UPDATE {samples} SET active = 0, retracted_at = ?, retract_reason = ?"
                                  " WHERE id = ?", (now, "cancelled" if state == "cancelled" else "updated", r["id"]))
                    out["retracted"] += 1
        out["applied"] = True
        return out

    def retract_annotation(self, annotation_id, reason: str = "deleted", event_id: int | None = None,
                           project_id=None) -> int:
        """Retract every sample of an annotation and leave a tombstone (a late CREATED event cannot revive it)."""
        aid = int(annotation_id)
        now = _now()
        with self._tx() as c:
            prev = self._one(self._exec(c, "SELECT annotation_id FROM {annotations} WHERE annotation_id = ?"
                                        + self._lock_clause(), (aid,)))
            if prev is None:
                self._exec(c, "INSERT INTO {annotations} (annotation_id, project_id, state, event_id, n_samples,"
                              " seen_at) VALUES (?, ?, 'deleted', ?, 0, ?)", (aid, as_int(project_id), event_id, now))
            else:
                self._exec(c, "UPDATE {annotations} SET state = 'deleted', event_id = ?, n_samples = 0, seen_at = ?"
                              " WHERE annotation_id = ?", (event_id, now, aid))
            cur = self._exec(c, "UPDATE {samples} SET active = 0, retracted_at = ?, retract_reason = ?"
                                " WHERE annotation_id = ? AND active = 1", (now, reason, aid))
            return cur.rowcount

    def list_samples(self, active: bool | None = True, annotation_id=None, model_version: str | None = None,
                     project_id=None) -> list[dict]:
        where, params = [], []
        if active is not None:
            where.append("active = ?")
            params.append(1 if active else 0)
        if annotation_id is not None:
            where.append("annotation_id = ?")
            params.append(int(annotation_id))
        if model_version is not None:
            where.append("model_version = ?")
            params.append(str(model_version))
        if project_id is not None:
            where.append("project_id = ?")
            params.append(int(project_id))
        sql = "SELECT * FROM {samples}" + (" WHERE " + " AND ".join(where) if where else "") + " ORDER BY id"
        with self._tx(write=False) as c:
            return self._rows(self._exec(c, sql, params))

    def load_sample(self, sample: Mapping) -> tuple[np.ndarray, np.ndarray]:
        """(image uint8 (H, W, 3) EXIF-transposed, mask uint8 (H, W) {0,1}) for a sample row."""
        from PIL import Image, ImageOps

        with Image.open(io.BytesIO(self.blobs.get(sample["image_blob"]))) as im:
            image = np.asarray(ImageOps.exif_transpose(im).convert("RGB"))
        mask = self.blobs.get_mask(sample["mask_blob"]).astype(np.uint8)
        if mask.shape != image.shape[:2]:
            raise ValueError(f"sample {sample.get('id')}: mask {mask.shape} vs image {image.shape[:2]}")
        return image, mask

    def count_new_samples(self) -> int:
        """Active samples that no trainer has consumed or currently holds (expired claims count as free)."""
        now = _now()
        with self._tx(write=False) as c:
            r = self._exec(c, "SELECT COUNT(*) AS n FROM {samples} s LEFT JOIN {claims} c ON s.claim_id = c.claim_id"
                              " WHERE s.active = 1 AND s.consumed_at IS NULL AND (s.claim_id IS NULL OR"
                              " c.status <> 'active' OR c.lease_until < ?)", (now,)).fetchone()
        return int(_first(r))

    # =================================================================================================================
    # trainer side: claims with leases
    # =================================================================================================================
    def claim_samples(self, trainer_id: str, lease_seconds: float = 1800.0, limit: int | None = None) -> Claim:
        """Claim the new samples (active, unconsumed, not held by a live claim) for one training round.

        Two trainers never get the same sample; a dead trainer's claim expires after ``lease_seconds`` and its
        samples become claimable again. An empty claim is returned (and not stored) when nothing is new.
        """
        now = _now()
        claim_id = f"claim-{uuid.uuid4().hex[:16]}"
        with self._tx() as c:
            self._serialize_claims(c)
            # expire dead claims first so their samples are visible as free
            self._exec(c, "UPDATE {claims} SET status = 'expired', finished_at = ? WHERE status = 'active'"
                          " AND lease_until < ?", (now, now))
            sql = ("SELECT s.id FROM {samples} s WHERE s.active = 1 AND s.consumed_at IS NULL AND (s.claim_id IS NULL"
                   " OR s.claim_id NOT IN (SELECT claim_id FROM {claims} WHERE status = 'active')) ORDER BY s.id")
            params: list = []
            if limit is not None:
                sql += " LIMIT ?"
                params.append(int(limit))
            ids = [r["id"] for r in self._rows(self._exec(c, sql + self._lock_clause(skip_locked=True, of="s"),
                                                          params))]
            if not ids:
                return Claim(claim_id="", trainer_id=trainer_id, lease_until=now, samples=[])
            self._exec(c, "INSERT INTO {claims} (claim_id, trainer_id, created_at, lease_until, status, n_samples)"
                          " VALUES (?, ?, ?, ?, 'active', ?)", (claim_id, trainer_id, now, now + lease_seconds,
                                                                 len(ids)))
            for chunk in _chunks(ids, 500):
                self._exec(c, f"UPDATE {{samples}} SET claim_id = ? WHERE id IN ({','.join('?' * len(chunk))})",
                           (claim_id, *chunk))
            rows = []
            for chunk in _chunks(ids, 500):
                rows += self._rows(self._exec(c, f"SELECT * FROM {{samples}} WHERE id IN"
                                                 f" ({','.join('?' * len(chunk))}) ORDER BY id", chunk))
        return Claim(claim_id=claim_id, trainer_id=trainer_id, lease_until=now + lease_seconds, samples=rows)

    def renew_claim(self, claim_id: str, lease_seconds: float = 1800.0) -> float:
        """Extend a live claim's lease (a heartbeat during long runs). Raises :class:`ClaimLost` if it is gone."""
        now = _now()
        with self._tx() as c:
            cur = self._exec(c, "UPDATE {claims} SET lease_until = ? WHERE claim_id = ? AND status = 'active'"
                                " AND lease_until >= ?", (now + lease_seconds, claim_id, now))
            if cur.rowcount != 1:
                raise ClaimLost(claim_id)
        return now + lease_seconds

    def complete_claim(self, claim_id: str, consumed_by: str | None = None, note: str | None = None) -> int:
        """Mark the claim's samples consumed (by a run or version id). Returns how many samples it still held.

        Raises :class:`ClaimLost` when the claim expired and another trainer took its samples meanwhile.
        """
        if not claim_id:
            return 0
        now = _now()
        with self._tx() as c:
            cl = self._one(self._exec(c, "SELECT * FROM {claims} WHERE claim_id = ?" + self._lock_clause(),
                                      (claim_id,)))
            if cl is None:
                raise ClaimLost(claim_id)
            if cl["status"] not in ("active", "expired"):
                raise ClaimLost(f"{claim_id} is {cl['status']}")
            cur = self._exec(c, "UPDATE {samples} SET consumed_at = ?, consumed_by = ? WHERE claim_id = ?"
                                " AND consumed_at IS NULL", (now, consumed_by or claim_id, claim_id))
            n = cur.rowcount
            if cl["status"] == "expired" and n == 0 and cl["n_samples"]:
                raise ClaimLost(f"{claim_id} expired and its samples were re-claimed")
            self._exec(c, "UPDATE {claims} SET status = 'completed', finished_at = ?, note = ? WHERE claim_id = ?",
                       (now, note, claim_id))
            return n

    def release_claim(self, claim_id: str, note: str | None = None) -> int:
        """Give the claim's samples back unconsumed (a trainer that fails or is interrupted)."""
        if not claim_id:
            return 0
        now = _now()
        with self._tx() as c:
            cur = self._exec(c, "UPDATE {samples} SET claim_id = NULL WHERE claim_id = ? AND consumed_at IS NULL",
                             (claim_id,))
            self._exec(c, "UPDATE {claims} SET status = 'released', finished_at = ?, note = ? WHERE claim_id = ?"
                          " AND status IN ('active', 'expired')", (now, note, claim_id))
            return cur.rowcount

    def get_claim(self, claim_id: str) -> dict | None:
        with self._tx(write=False) as c:
            return self._one(self._exec(c, "SELECT * FROM {claims} WHERE claim_id = ?", (claim_id,)))

    # =================================================================================================================
    # training requests, runs, versions
    # =================================================================================================================
    def add_training_request(self, project_id=None, event_id: int | None = None) -> int:
        with self._tx() as c:
            cur = self._exec(c, "INSERT INTO {training_requests} (project_id, event_id, requested_at, status)"
                                " VALUES (?, ?, ?, 'pending') ON CONFLICT (event_id) DO NOTHING RETURNING id",
                             (as_int(project_id), event_id, _now()))
            row = cur.fetchone()
            if row is not None:
                return int(_first(row))
            return int(_first(self._exec(c, "SELECT id FROM {training_requests} WHERE event_id = ?",
                                         (event_id,)).fetchone()))

    def pending_training_requests(self) -> list[dict]:
        with self._tx(write=False) as c:
            return self._rows(self._exec(c, "SELECT * FROM {training_requests} WHERE status = 'pending' ORDER BY id"))

    def mark_training_requests_handled(self, ids: Iterable[int], run_id: str) -> int:
        ids = [int(i) for i in ids]
        if not ids:
            return 0
        with self._tx() as c:
            cur = self._exec(c, f"UPDATE {{training_requests}} SET status = 'handled', run_id = ?, handled_at = ?"
                                f" WHERE status = 'pending' AND id IN ({','.join('?' * len(ids))})",
                             (run_id, _now(), *ids))
            return cur.rowcount

    def start_run(self, run_id: str, trainer_id: str, claim_id: str | None = None, parent: str | None = None) -> None:
        with self._tx() as c:
            self._exec(c, "INSERT INTO {runs} (run_id, trainer_id, claim_id, started_at, status, parent)"
                          " VALUES (?, ?, ?, ?, 'running', ?)", (run_id, trainer_id, claim_id, _now(), parent))

    def finish_run(self, run_id: str, status: str, published: bool, version: str | None, reason: str,
                   metrics: Mapping | None = None, report_path: str | None = None) -> None:
        with self._tx() as c:
            self._exec(c, "UPDATE {runs} SET finished_at = ?, status = ?, published = ?, version = ?, reason = ?,"
                          " metrics = ?, report_path = ? WHERE run_id = ?",
                       (_now(), status, 1 if published else 0, version, reason, canonical_json(metrics or {}),
                        report_path, run_id))

    def list_runs(self) -> list[dict]:
        with self._tx(write=False) as c:
            rows = self._rows(self._exec(c, "SELECT * FROM {runs} ORDER BY started_at"))
        for r in rows:
            r["metrics"] = json.loads(r["metrics"]) if r.get("metrics") else {}
        return rows

    def record_version(self, version: str, path: str, parent: str | None, metrics: Mapping | None = None,
                       run_id: str | None = None, n_train: int | None = None, n_heldout: int | None = None) -> None:
        with self._tx() as c:
            self._exec(c, "INSERT INTO {versions} (version, path, parent, created_at, run_id, metrics, n_train,"
                          " n_heldout) VALUES (?,?,?,?,?,?,?,?)",
                       (version, str(path), parent, _now(), run_id, canonical_json(metrics or {}), n_train, n_heldout))

    def list_versions(self) -> list[dict]:
        with self._tx(write=False) as c:
            rows = self._rows(self._exec(c, "SELECT * FROM {versions} ORDER BY created_at"))
        for r in rows:
            r["metrics"] = json.loads(r["metrics"]) if r.get("metrics") else {}
        return rows

    # =================================================================================================================
    # stats
    # =================================================================================================================
    def version_stats(self) -> dict:
        """Per model version: how its pre-annotations fared with annotators.

        ``{version: {"predictions", "no_target_predictions", "regions", "accepted", "changed", "manual",
        "acceptance_rate", "mean_iou", "iou_samples", "mean_lead_time", "queued"}}``; ``predictions`` counts every
        recorded sentence, ``no_target_predictions`` those the model answered with an empty mask;
        ``accepted``/``changed``/``manual`` count active regions by ``origin`` in annotations whose parent
        prediction came from that version; ``mean_iou`` is the mean IoU between the recorded prediction and the
        submitted mask; ``queued`` counts active samples not yet consumed by a training run. Samples whose version is unknown are reported under ``"unknown"``.
        """
        out: dict[str, dict] = {}

        def entry(v):
            v = v if v is not None else "unknown"
            return out.setdefault(v, {"predictions": 0, "no_target_predictions": 0, "regions": 0, "accepted": 0,
                                      "changed": 0, "manual": 0, "acceptance_rate": None, "mean_iou": None,
                                      "iou_samples": 0, "mean_lead_time": None, "queued": 0})

        with self._tx(write=False) as c:
            for r in self._rows(self._exec(c, "SELECT model_version, COUNT(*) AS n,"
                                              " SUM(CASE WHEN mask_area = 0 THEN 1 ELSE 0 END) AS empty"
                                              " FROM {predictions} GROUP BY model_version")):
                e = entry(r["model_version"])
                e["predictions"] = int(r["n"])
                e["no_target_predictions"] = int(r["empty"] or 0)
            for r in self._rows(self._exec(c, "SELECT model_version, origin, COUNT(*) AS n FROM {samples}"
                                              " WHERE active = 1 GROUP BY model_version, origin")):
                e = entry(r["model_version"])
                key = {"prediction": "accepted", "prediction-changed": "changed"}.get(r["origin"], "manual")
                e[key] += int(r["n"])
                e["regions"] += int(r["n"])
            for r in self._rows(self._exec(c, "SELECT model_version, AVG(prediction_iou) AS iou,"
                                              " COUNT(prediction_iou) AS n, AVG(lead_time) AS lt,"
                                              " SUM(CASE WHEN consumed_at IS NULL THEN 1 ELSE 0 END) AS q"
                                              " FROM {samples} WHERE active = 1 GROUP BY model_version")):
                e = entry(r["model_version"])
                e["mean_iou"] = None if r["iou"] is None else round(float(r["iou"]), 4)
                e["iou_samples"] = int(r["n"] or 0)
                e["mean_lead_time"] = None if r["lt"] is None else round(float(r["lt"]), 3)
                e["queued"] = int(r["q"] or 0)
        for e in out.values():
            if e["regions"]:
                e["acceptance_rate"] = round(e["accepted"] / e["regions"], 4)
        return out

    def stats(self) -> dict:
        """Everything an operator wants on one page: inbox, samples, claims, runs, versions, per-version stats."""
        with self._tx(write=False) as c:
            events = {r["status"]: int(r["n"]) for r in self._rows(self._exec(
                c, "SELECT status, COUNT(*) AS n FROM {events} GROUP BY status"))}
            redeliveries = int(_first(self._exec(c, "SELECT COALESCE(SUM(redeliveries), 0) AS n FROM {events}")
                                      .fetchone()))
            failed = self._rows(self._exec(c, "SELECT id, action, attempts, last_error, processed_at FROM {events}"
                                              " WHERE status = 'failed' ORDER BY id DESC LIMIT 20"))
            retrying = self._rows(self._exec(c, "SELECT id, action, attempts, last_error, next_attempt_at FROM"
                                                " {events} WHERE status = 'pending' AND attempts > 0 ORDER BY id"
                                                " LIMIT 20"))
            samples = self._one(self._exec(c, "SELECT COUNT(*) AS total, SUM(active) AS active,"
                                              " SUM(CASE WHEN active = 1 AND consumed_at IS NULL THEN 1 ELSE 0 END)"
                                              " AS queued FROM {samples}"))
            claims = {r["status"]: int(r["n"]) for r in self._rows(self._exec(
                c, "SELECT status, COUNT(*) AS n FROM {claims} GROUP BY status"))}
            requests = int(_first(self._exec(c, "SELECT COUNT(*) AS n FROM {training_requests}"
                                                " WHERE status = 'pending'").fetchone()))
            n_versions = int(_first(self._exec(c, "SELECT COUNT(*) AS n FROM {versions}").fetchone()))
        return {
            "engine": self.engine,
            "events": {**{s: events.get(s, 0) for s in (EVENT_PENDING, EVENT_PROCESSING, EVENT_DONE, EVENT_FAILED,
                                                        EVENT_IGNORED)}, "redeliveries": redeliveries,
                       "failed_recent": failed, "retrying": retrying},
            "samples": {k: int(samples.get(k) or 0) for k in ("total", "active", "queued")},
            "claims": claims,
            "training_requests_pending": requests,
            "versions_published": n_versions,
            "by_version": self.version_stats(),
        }


_SAMPLE_COLUMNS = {
    "sample_key", "project_id", "task_id", "annotation_id", "region_id", "sentence", "sentence_source", "label",
    "mask_blob", "image_blob", "image_url", "width", "height", "mask_area", "annotator", "lead_time", "ground_truth",
    "origin", "model_version", "prediction_id", "prediction_iou", "content_hash", "ls_created_at", "ls_updated_at",
    "ingested_at", "event_id", "active", "retracted_at", "retract_reason", "claim_id", "consumed_at", "consumed_by",
}
_CONTENT_FIELDS = ("sentence", "mask_blob", "image_blob", "width", "height", "origin", "model_version")


def sample_key(annotation_id, region_id) -> str:
    return f"{int(annotation_id)}:{region_id}"


def _content_hash(s: Mapping) -> str:
    return hashlib.sha256(canonical_json({k: s.get(k) for k in _CONTENT_FIELDS}).encode()).hexdigest()[:32]


def _first(row):
    if row is None:
        return None
    if isinstance(row, Mapping):
        return next(iter(row.values()))
    try:
        return row[0]
    except (KeyError, IndexError, TypeError):
        return next(iter(dict(row).values()))


def as_int(v) -> int | None:
    """``int(v)``, or None for None, booleans and values that are not integers (shared with the worker)."""
    if v is None or isinstance(v, bool):
        return None
    try:
        return int(v)
    except (TypeError, ValueError):
        return None


def _chunks(seq: list, n: int):
    for i in range(0, len(seq), n):
        yield seq[i:i + n]


# ---------------------------------------------------------------------------------------------------------------------
# SQLite
# ---------------------------------------------------------------------------------------------------------------------

class SQLiteDatastore(Datastore):
    engine = "sqlite"

    def __init__(self, path: str | os.PathLike, model_dir: str | os.PathLike | None = None,
                 busy_timeout_s: float = 30.0, synchronous: str = "FULL", prefix: str = "",
                 blobs: BlobStore | None = None):
        self.path = Path(path)
        super().__init__(model_dir or self.path.parent, blobs=blobs, prefix=prefix)
        self.busy_timeout_s = busy_timeout_s
        self.synchronous = synchronous
        self.init_schema()

    def _connect(self):
        self.path.parent.mkdir(parents=True, exist_ok=True)
        conn = sqlite3.connect(str(self.path), timeout=self.busy_timeout_s, isolation_level=None,
                               check_same_thread=False)
        conn.row_factory = sqlite3.Row
        conn.execute("PRAGMA journal_mode=WAL")
        conn.execute(f"PRAGMA busy_timeout={int(self.busy_timeout_s * 1000)}")
        conn.execute(f"PRAGMA synchronous={self.synchronous}")
        conn.execute("PRAGMA foreign_keys=ON")
        return conn

    @contextlib.contextmanager
    def _tx(self, write: bool = True):
        conn = self._conn()
        if getattr(self._local, "depth", 0):
            self._local.depth += 1
            try:
                yield conn
            finally:
                self._local.depth -= 1
            return
        conn.execute("BEGIN IMMEDIATE" if write else "BEGIN")
        self._local.depth = 1
        try:
            yield conn
        except BaseException:
            self._local.depth = 0
            conn.execute("ROLLBACK")
            raise
        else:
            self._local.depth = 0
            conn.execute("COMMIT")

    def _lock_clause(self, skip_locked: bool = False, of: str | None = None) -> str:
        return ""  # BEGIN IMMEDIATE already serialises writers

    def init_schema(self) -> None:
        ddl = _SCHEMA.format(pk="INTEGER PRIMARY KEY AUTOINCREMENT", **self._names).replace("DOUBLE PRECISION",
                                                                                              "REAL")
        conn = self._conn()
        conn.executescript(ddl)
        conn.execute(self._sql("INSERT OR IGNORE INTO {meta} (key, value) VALUES ('schema_version', ?)"),
                     (SCHEMA_VERSION,))


# ---------------------------------------------------------------------------------------------------------------------
# PostgreSQL
# ---------------------------------------------------------------------------------------------------------------------

class PostgresDatastore(Datastore):
    engine = "postgresql"

    def __init__(self, url: str, model_dir: str | os.PathLike, schema: str | None = None, prefix: str = "",
                 blobs: BlobStore | None = None, connect_timeout: int = 10):
        url, url_schema = _split_schema(url)
        self.url = url
        self.schema = schema or url_schema
        if self.schema and not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", self.schema):
            raise ValueError(f"bad schema name {self.schema!r}")
        self.connect_timeout = connect_timeout
        super().__init__(model_dir, blobs=blobs, prefix=prefix)
        self.init_schema()

    def _table(self, name: str) -> str:
        t = f"{self.prefix}{name}"
        return f"{self.schema}.{t}" if getattr(self, "schema", None) else t

    def _sql(self, sql: str) -> str:
        return sql.format(**self._names).replace("?", "%s")

    def _connect(self):
        import psycopg
        from psycopg.rows import dict_row

        return psycopg.connect(self.url, autocommit=True, row_factory=dict_row, connect_timeout=self.connect_timeout)

    @contextlib.contextmanager
    def _tx(self, write: bool = True):
        conn = self._conn()
        with conn.transaction():
            yield conn

    def _exec(self, c, sql: str, params: Iterable = ()):
        return c.execute(self._sql(sql), tuple(params))  # a fresh cursor per statement (rowcount stays right)

    def _lock_clause(self, skip_locked: bool = False, of: str | None = None) -> str:
        clause = " FOR UPDATE" + (f" OF {of}" if of else "")
        return clause + (" SKIP LOCKED" if skip_locked else "")

    def _serialize_claims(self, c) -> None:
        # Row locks alone are not enough under READ COMMITTED: a sample another trainer just claimed is re-checked
        # against its new claim_id, but the "claim is active" sub-query still uses this statement's older snapshot,
        # where that claim does not exist yet, so the sample could be claimed twice (seen: 43 of 40 under two
        # trainers). A transaction-scoped advisory lock serialises claims; the SELECT after it sees every commit.
        c.execute("SELECT pg_advisory_xact_lock(hashtext(%s))",
                  (f"ssp-sam-claims:{self.schema or ''}:{self.prefix}",))

    def init_schema(self) -> None:
        conn = self._conn()
        with conn.transaction():
            cur = conn.cursor()
            # serialise concurrent initialisations (CREATE ... IF NOT EXISTS races on the catalog)
            cur.execute("SELECT pg_advisory_xact_lock(hashtext(%s))", (f"ssp-sam-datastore:{self.schema or ''}",))
            if self.schema:
                cur.execute(f"CREATE SCHEMA IF NOT EXISTS {self.schema}")
            names = dict(self._names)
            ddl = _SCHEMA.format(pk="BIGSERIAL PRIMARY KEY", **names)
            # index names may not be schema-qualified in PostgreSQL
            ddl = re.sub(r"CREATE INDEX IF NOT EXISTS (\S+?)_(\w+) ON",
                         lambda m: f"CREATE INDEX IF NOT EXISTS {m.group(1).split('.')[-1]}_{m.group(2)} ON", ddl)
            for stmt in filter(None, (s.strip() for s in ddl.split(";"))):
                cur.execute(stmt)
            cur.execute(self._sql("INSERT INTO {meta} (key, value) VALUES ('schema_version', %s)"
                                  " ON CONFLICT (key) DO NOTHING"), (SCHEMA_VERSION,))

    def drop_schema(self) -> None:
        """Drop every table of this store (tests)."""
        conn = self._conn()
        with conn.transaction():
            if self.schema:
                conn.execute(f"DROP SCHEMA IF EXISTS {self.schema} CASCADE")
            else:
                for t in _TABLES:
                    conn.execute(f"DROP TABLE IF EXISTS {self._table(t)} CASCADE")


def _split_schema(url: str) -> tuple[str, str | None]:
    parts = urlsplit(url)
    q = parse_qsl(parts.query, keep_blank_values=True)
    schema = None
    rest = []
    for k, v in q:
        if k == "schema":
            schema = v
        else:
            rest.append((k, v))
    return urlunsplit(parts._replace(query=urlencode(rest))), schema


# ---------------------------------------------------------------------------------------------------------------------
# factory
# ---------------------------------------------------------------------------------------------------------------------

def _cfg_get(cfg: Any, *names: str, default=None):
    for n in names:
        if isinstance(cfg, Mapping):
            if cfg.get(n) is not None:
                return cfg[n]
        elif getattr(cfg, n, None) is not None:
            return getattr(cfg, n)
    return default


def open_datastore(config_or_url: Any = None, model_dir: str | os.PathLike | None = None, *,
                   schema: str | None = None, prefix: str = "", **kwargs) -> Datastore:
    """Open the corrections datastore.

    ``config_or_url``: a URL string (``postgresql://...``, ``sqlite:///path.db``, a bare ``.db`` path), a config
    object or mapping with ``datastore_url`` / ``model_dir``, or None (``$DATASTORE_URL``, else SQLite
    ``MODEL_DIR/corrections.db``). ``model_dir`` holds ``corrections.db`` and ``blobs/``.
    """
    url = None
    if isinstance(config_or_url, (str, os.PathLike)):
        url = str(config_or_url)
    elif config_or_url is not None:
        url = _cfg_get(config_or_url, "datastore_url", "DATASTORE_URL")
        if model_dir is None:
            model_dir = _cfg_get(config_or_url, "model_dir", "MODEL_DIR")
    if not url:
        url = os.environ.get("DATASTORE_URL") or None
    if model_dir is None:
        model_dir = os.environ.get("MODEL_DIR") or "./model_dir"
    model_dir = Path(model_dir)
    if url and url.startswith(("postgresql://", "postgres://", "postgresql+psycopg://")):
        url = url.replace("postgresql+psycopg://", "postgresql://", 1)
        return PostgresDatastore(url, model_dir, schema=schema, prefix=prefix, **kwargs)
    if url and url.startswith("sqlite://"):
        # SQLAlchemy convention: sqlite:///relative.db, sqlite:////absolute/path.db
        path = url[len("sqlite:///"):] if url.startswith("sqlite:///") else url[len("sqlite://"):]
        path = path or str(model_dir / "corrections.db")
        return SQLiteDatastore(path, model_dir, prefix=prefix, **kwargs)
    if url:
        return SQLiteDatastore(url, model_dir, prefix=prefix, **kwargs)
    return SQLiteDatastore(model_dir / "corrections.db", model_dir, prefix=prefix, **kwargs)
