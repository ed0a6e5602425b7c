"""The corrections store: every read and write of the datastore, as SQLAlchemy Core statements that run unchanged on
SQLite and PostgreSQL (the few engine differences live in ``engines.py``).

Each public method is one transaction: a write runs in ``BEGIN IMMEDIATE`` on SQLite (writers queue on the busy
timeout) and under READ COMMITTED on PostgreSQL, with row locks (``FOR UPDATE``, ``SKIP LOCKED`` where a worker or
trainer takes rows) and, for claims, an advisory lock. The engine pools connections; a store is thread-safe.
"""

from __future__ import annotations

import contextlib
import json
import os
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Iterator, Mapping

import numpy as np
from sqlalchemy import (Connection, Engine, and_, case, delete, func, insert, inspect, or_, select, text, update)
from sqlalchemy.schema import DropSchema

from backend.learning.blobs import BlobStore
from backend.learning.datastore.engines import WRITE_OPTION, advisory_lock, insert_unless_exists
from backend.labelstudio.protocol import as_int
from backend.learning.datastore.keys import (canonical_json, content_hash, event_dedup_key, redact_payload,
                                             sample_key)
from backend.learning.datastore.schema import (EVENT_DONE, EVENT_FAILED, EVENT_IGNORED, EVENT_PENDING,
                                               EVENT_PROCESSING, SAMPLE_COLUMNS, annotations, claims, events,
                                               metadata, predictions, runs, training_requests, versions)
from backend.learning.datastore.schema import samples as samples_t  # ``samples`` is apply_annotation's argument
from ssp_sam.images import load_image

_CLAIMS_LOCK_KEY = "ssp-sam-claims:{schema}:"  # the key the first datastore's code used: old and new serialise
_ERROR_CHARS = 4000


def _now() -> float:
    return time.time()


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


def _dicts(result) -> list[dict]:
    return [dict(row) for row in result.mappings()]


def _dict(result) -> dict | None:
    row = result.mappings().first()
    return dict(row) if row is not None else None


def _chunks(seq: list, n: int = 500) -> Iterator[list]:
    for i in range(0, len(seq), n):
        yield seq[i:i + n]


def _with_json(row: dict | None, *keys: str) -> dict | None:
    if row is not None:
        for key in keys:
            row[key] = json.loads(row[key]) if row.get(key) else {}
    return row


class Datastore:
    """The corrections store on one database. Make one with :func:`backend.learning.datastore.open_datastore`."""

    def __init__(self, engine: Engine, model_dir: str | os.PathLike, *, schema: str | None = None,
                 path: Path | None = None, where: str = "", blobs: BlobStore | None = None):
        self.engine = engine
        self.dialect = engine.dialect.name        # "sqlite" or "postgresql"
        self.schema = schema                      # PostgreSQL schema holding the tables (None: the default)
        self.path = path                          # the SQLite file (None on PostgreSQL)
        self.where = where or engine.url.render_as_string(hide_password=True)  # for messages: no password
        self.model_dir = Path(model_dir)
        self.model_dir.mkdir(parents=True, exist_ok=True)
        self.blobs = blobs or BlobStore(self.model_dir / "blobs")
        self._reader = engine.execution_options(**{WRITE_OPTION: False})

    # -- transactions -------------------------------------------------------------------------------------------------
    @contextlib.contextmanager
    def _tx(self, write: bool = True) -> Iterator[Connection]:
        """One transaction on a pooled connection; commits when the block succeeds, rolls back otherwise."""
        with (self.engine if write else self._reader).begin() as conn:
            yield conn

    def close(self) -> None:
        self.engine.dispose()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def __repr__(self) -> str:
        return f"Datastore({self.where})"

    def drop_schema(self) -> None:
        """Drop every table of this store, or its PostgreSQL schema (tests and throw-away stores)."""
        with self._tx() as conn:
            if self.schema:
                conn.execute(DropSchema(self.schema, cascade=True, if_exists=True))
                return
            metadata.drop_all(conn)
            if inspect(conn).has_table("alembic_version"):
                conn.execute(text("DROP TABLE alembic_version"))

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
        project = payload.get("project")
        project_id = as_int(project.get("id") if isinstance(project, Mapping) else project)
        with self._tx() as conn:
            new_id = conn.execute(
                insert_unless_exists(conn, events, "dedup_key")
                .values(dedup_key=key, action=action, payload=canonical_json(payload), project_id=project_id,
                        received_at=now, status=EVENT_PENDING, attempts=0, next_attempt_at=now)
                .returning(events.c.id)).scalar()
            if new_id is not None:
                return int(new_id)
            return int(conn.execute(update(events).where(events.c.dedup_key == key)
                                    .values(redeliveries=events.c.redeliveries + 1)
                                    .returning(events.c.id)).scalar_one())

    def record_prediction(self, project_id, task_id, sentence: str, model_version: str, mask: np.ndarray,
                          score: float | None = None) -> int:
        """Remember a predicted mask (as a 1-bit PNG blob) to compare later with what the annotator submits."""
        mask = np.asarray(mask)
        if mask.ndim != 2:
            raise ValueError(f"mask must be (H, W), got {mask.shape}")
        sha = self.blobs.put_mask(mask)
        h, w = mask.shape
        with self._tx() as conn:
            return int(conn.execute(
                insert(predictions).values(project_id=as_int(project_id), task_id=as_int(task_id), sentence=sentence,
                                           model_version=str(model_version), mask_blob=sha, width=int(w),
                                           height=int(h), mask_area=int(np.count_nonzero(mask)),
                                           score=None if score is None else float(score), created_at=_now())
                .returning(predictions.c.id)).scalar_one())

    def find_prediction(self, task_id, model_version: str | None = None, sentence: str | None = None) -> dict | None:
        """The latest recorded prediction for a task (preferring the same sentence, then the same version)."""
        with self._tx(write=False) as conn:
            rows = _dicts(conn.execute(select(predictions).where(predictions.c.task_id == as_int(task_id))
                                       .order_by(predictions.c.id.desc())))
        if model_version is not None:
            rows = [r for r in rows if r["model_version"] == str(model_version)]
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
        due = or_(and_(events.c.status == EVENT_PENDING, events.c.next_attempt_at <= now),
                  and_(events.c.status == EVENT_PROCESSING, events.c.lease_until < now))
        with self._tx() as conn:
            ids = conn.execute(select(events.c.id).where(due).order_by(events.c.id).limit(int(limit))
                               .with_for_update(skip_locked=True)).scalars().all()
            if not ids:
                return []
            rows = _dicts(conn.execute(
                update(events).where(events.c.id.in_(ids))
                .values(status=EVENT_PROCESSING, lease_owner=worker_id, lease_until=now + lease_seconds,
                        attempts=events.c.attempts + 1)
                .returning(*events.c)))
        return [_with_payload(r) for r in sorted(rows, key=lambda r: r["id"])]

    def renew_event_leases(self, worker_id: str, lease_seconds: float) -> int:
        """Extend the leases of every event ``worker_id`` is processing (its heartbeat). Returns how many."""
        with self._tx() as conn:
            return conn.execute(update(events).where(events.c.status == EVENT_PROCESSING,
                                                     events.c.lease_owner == worker_id)
                                .values(lease_until=_now() + float(lease_seconds))).rowcount

    def event_lease_owners(self) -> list[str]:
        """The workers holding events right now."""
        with self._tx(write=False) as conn:
            return [o for o in conn.execute(select(events.c.lease_owner).distinct()
                                            .where(events.c.status == EVENT_PROCESSING)).scalars() if o]

    def release_event_leases(self, owners: Iterable[str]) -> int:
        """Hand the events of workers that are gone back to the inbox at once (their attempt still counts)."""
        owners = [str(o) for o in owners]
        if not owners:
            return 0
        with self._tx() as conn:
            return conn.execute(update(events).where(events.c.status == EVENT_PROCESSING,
                                                     events.c.lease_owner.in_(owners))
                                .values(status=EVENT_PENDING, lease_owner=None, lease_until=None,
                                        next_attempt_at=_now())).rowcount

    def mark_event_done(self, event_id: int, result: Mapping | None = None, status: str = EVENT_DONE) -> None:
        self._set_event(event_id, status=status, processed_at=_now(), result=canonical_json(result or {}),
                        last_error=None)

    def mark_event_retry(self, event_id: int, error: str, delay_seconds: float) -> None:
        self._set_event(event_id, status=EVENT_PENDING, next_attempt_at=_now() + float(delay_seconds),
                        last_error=str(error)[:_ERROR_CHARS])

    def mark_event_failed(self, event_id: int, error: str) -> None:
        self._set_event(event_id, status=EVENT_FAILED, processed_at=_now(), last_error=str(error)[:_ERROR_CHARS])

    def _set_event(self, event_id: int, **values) -> None:
        """Finish an attempt: the lease is dropped, ``values`` set."""
        with self._tx() as conn:
            conn.execute(update(events).where(events.c.id == int(event_id))
                         .values(lease_owner=None, lease_until=None, **values))

    def requeue_failed(self, event_ids: Iterable[int] | None = None) -> int:
        """Give failed events another round of attempts (an operator's action after fixing the cause)."""
        stmt = (update(events).where(events.c.status == EVENT_FAILED)
                .values(status=EVENT_PENDING, attempts=0, next_attempt_at=_now()))
        if event_ids is not None:
            ids = [int(i) for i in event_ids]
            if not ids:
                return 0
            stmt = stmt.where(events.c.id.in_(ids))
        with self._tx() as conn:
            return conn.execute(stmt).rowcount

    def purge_events(self, older_than_s: float = 30 * 86400, statuses: Iterable[str] = (EVENT_DONE, EVENT_IGNORED)
                     ) -> int:
        """Delete processed inbox rows older than ``older_than_s`` (samples keep everything they need)."""
        with self._tx() as conn:
            return conn.execute(delete(events).where(events.c.processed_at < _now() - float(older_than_s),
                                                     events.c.status.in_([str(s) for s in statuses]))).rowcount

    def get_event(self, event_id: int) -> dict | None:
        with self._tx(write=False) as conn:
            row = _dict(conn.execute(select(events).where(events.c.id == int(event_id))))
        return _with_payload(row) if row else None

    def list_events(self, action: str | None = None, status: str | None = None, limit: int = 100) -> list[dict]:
        """The newest inbox events (newest first), optionally of one action and status (operators, tests)."""
        query = select(events).order_by(events.c.id.desc()).limit(int(limit))
        if action is not None:
            query = query.where(events.c.action == str(action))
        if status is not None:
            query = query.where(events.c.status == str(status))
        with self._tx(write=False) as conn:
            return [_with_payload(row) for row in _dicts(conn.execute(query))]

    def pending_event_count(self) -> int:
        with self._tx(write=False) as conn:
            return int(conn.execute(select(func.count()).select_from(events)
                                    .where(events.c.status.in_([EVENT_PENDING, EVENT_PROCESSING]))).scalar_one())

    # =================================================================================================================
    # worker side: annotations and samples
    # =================================================================================================================
    def get_annotation_state(self, annotation_id) -> dict | None:
        with self._tx(write=False) as conn:
            return _dict(conn.execute(select(annotations).where(annotations.c.annotation_id == int(annotation_id))))

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
        row = dict(project_id=as_int(project_id), task_id=as_int(task_id), state=state, ls_updated_at=ls_updated_at,
                   event_id=event_id, n_samples=len(samples) if state == "active" else 0, seen_at=now)
        with self._tx() as conn:
            out["reason"] = self._record_annotation(conn, aid, row)
            if out["reason"]:
                return out
            existing = {r["sample_key"]: r for r in _dicts(conn.execute(
                select(samples_t.c.id, samples_t.c.sample_key, samples_t.c.content_hash, samples_t.c.active)
                .where(samples_t.c.annotation_id == aid)))}
            keep: set[str] = set()
            for s in samples if state == "active" else []:
                cols = _sample_columns(s, aid, row)
                keep.add(cols["sample_key"])
                out[self._put_sample(conn, cols, existing.get(cols["sample_key"]), now)] += 1
            gone = [r["id"] for key, r in existing.items() if key not in keep and r["active"]]
            if gone:
                reason = "cancelled" if state == "cancelled" else "updated"
                conn.execute(update(samples_t).where(samples_t.c.id.in_(gone))
                             .values(active=0, retracted_at=now, retract_reason=reason))
            out["retracted"] = len(gone)
        out["applied"] = True
        return out

    @staticmethod
    def _record_annotation(conn: Connection, aid: int, row: dict) -> str:
        """Insert or update the annotation's row; returns why the event must be ignored ("" when it applies)."""
        prev = _dict(conn.execute(select(annotations).where(annotations.c.annotation_id == aid).with_for_update()))
        if prev is None:
            conn.execute(insert(annotations).values(annotation_id=aid, **row))
            return ""
        if prev["state"] == "deleted":
            return "annotation was deleted"
        if row["ls_updated_at"] and prev["ls_updated_at"] and str(row["ls_updated_at"]) < str(prev["ls_updated_at"]):
            return "stale event (older updated_at)"
        conn.execute(update(annotations).where(annotations.c.annotation_id == aid).values(**row))
        return ""

    @staticmethod
    def _put_sample(conn: Connection, cols: dict, prev: Mapping | None, now: float) -> str:
        """Insert a new sample, refresh an identical one's metadata, or replace a changed one (new again)."""
        if prev is None:
            conn.execute(insert(samples_t).values(**cols, ingested_at=now, active=1))
            return "inserted"
        if prev["content_hash"] == cols["content_hash"] and prev["active"]:
            # metadata-only refresh (ids, timestamps); training state is kept
            meta = {k: cols[k] for k in ("event_id", "ls_updated_at", "lead_time", "ground_truth", "annotator")
                    if k in cols}
            conn.execute(update(samples_t).where(samples_t.c.id == prev["id"]).values(**meta))
            return "unchanged"
        conn.execute(update(samples_t).where(samples_t.c.id == prev["id"])
                     .values(**cols, ingested_at=now, active=1, retracted_at=None, retract_reason=None,
                             claim_id=None, consumed_at=None, consumed_by=None))
        return "updated"

    def retract_annotation(self, annotation_id, reason: str = "deleted", event_id: int | None = None,
                           project_id=None) -> int:
        """Retract every sample of an annotation and leave a tombstone (a late CREATED event cannot revive it)."""
        aid = int(annotation_id)
        now = _now()
        with self._tx() as conn:
            prev = conn.execute(select(annotations.c.annotation_id).where(annotations.c.annotation_id == aid)
                                .with_for_update()).first()
            if prev is None:
                conn.execute(insert(annotations).values(annotation_id=aid, project_id=as_int(project_id),
                                                        state="deleted", event_id=event_id, n_samples=0,
                                                        seen_at=now))
            else:
                conn.execute(update(annotations).where(annotations.c.annotation_id == aid)
                             .values(state="deleted", event_id=event_id, n_samples=0, seen_at=now))
            return conn.execute(update(samples_t).where(samples_t.c.annotation_id == aid, samples_t.c.active == 1)
                                .values(active=0, retracted_at=now, retract_reason=reason)).rowcount

    def list_samples(self, active: bool | None = True, annotation_id=None, model_version: str | None = None,
                     project_id=None) -> list[dict]:
        stmt = select(samples_t).order_by(samples_t.c.id)
        if active is not None:
            stmt = stmt.where(samples_t.c.active == (1 if active else 0))
        if annotation_id is not None:
            stmt = stmt.where(samples_t.c.annotation_id == int(annotation_id))
        if model_version is not None:
            stmt = stmt.where(samples_t.c.model_version == str(model_version))
        if project_id is not None:
            stmt = stmt.where(samples_t.c.project_id == int(project_id))
        with self._tx(write=False) as conn:
            return _dicts(conn.execute(stmt))

    def load_sample(self, sample: Mapping) -> tuple[np.ndarray, np.ndarray]:
        """(image uint8 (H, W, 3) EXIF-transposed, mask uint8 (H, W) {0,1}) for a sample row."""
        image = load_image(self.blobs.get(sample["image_blob"]))
        mask = self.blobs.get_mask(sample["mask_blob"]).astype(np.uint8)
        if mask.shape != image.shape[:2]:
            raise ValueError(f"sample {sample.get('id')}: mask {mask.shape} vs image {image.shape[:2]}")
        return image, mask

    def count_new_samples(self) -> int:
        """Active samples that no trainer has consumed or currently holds (expired claims count as free)."""
        now = _now()
        held = samples_t.outerjoin(claims, samples_t.c.claim_id == claims.c.claim_id)
        with self._tx(write=False) as conn:
            return int(conn.execute(
                select(func.count()).select_from(held)
                .where(samples_t.c.active == 1, samples_t.c.consumed_at.is_(None),
                       or_(samples_t.c.claim_id.is_(None), claims.c.status != "active", claims.c.lease_until < now))
            ).scalar_one())

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
        live = select(claims.c.claim_id).where(claims.c.status == "active")
        free = (select(samples_t.c.id)
                .where(samples_t.c.active == 1, samples_t.c.consumed_at.is_(None),
                       or_(samples_t.c.claim_id.is_(None), samples_t.c.claim_id.not_in(live)))
                .order_by(samples_t.c.id).limit(None if limit is None else int(limit))
                .with_for_update(skip_locked=True, of=samples_t))
        with self._tx() as conn:
            # Row locks alone are not enough under READ COMMITTED: a sample another trainer just claimed is re-checked
            # against its new claim_id, but the "claim is live" sub-query keeps this statement's older snapshot, where
            # that claim does not exist yet, so the sample could be claimed twice. The advisory lock serialises
            # claims; the SELECT after it sees every earlier commit. (SQLite: BEGIN IMMEDIATE already does.)
            advisory_lock(conn, _CLAIMS_LOCK_KEY.format(schema=self.schema or ""))
            # expire dead claims first so their samples are visible as free
            conn.execute(update(claims).where(claims.c.status == "active", claims.c.lease_until < now)
                         .values(status="expired", finished_at=now))
            ids = conn.execute(free).scalars().all()
            if not ids:
                return Claim(claim_id="", trainer_id=trainer_id, lease_until=now, samples=[])
            conn.execute(insert(claims).values(claim_id=claim_id, trainer_id=trainer_id, created_at=now,
                                               lease_until=now + lease_seconds, status="active", n_samples=len(ids)))
            for chunk in _chunks(ids):
                conn.execute(update(samples_t).where(samples_t.c.id.in_(chunk)).values(claim_id=claim_id))
            rows = _dicts(conn.execute(select(samples_t).where(samples_t.c.claim_id == claim_id)
                                       .order_by(samples_t.c.id)))
        return Claim(claim_id=claim_id, trainer_id=trainer_id, lease_until=now + lease_seconds, samples=rows)

    def active_claims(self) -> list[dict]:
        """The claims trainers hold right now (``claim_id``, ``trainer_id``, ``lease_until``, ``n_samples``)."""
        with self._tx(write=False) as conn:
            return _dicts(conn.execute(select(claims.c.claim_id, claims.c.trainer_id, claims.c.lease_until,
                                              claims.c.n_samples).where(claims.c.status == "active")))

    def renew_claim(self, claim_id: str, lease_seconds: float = 1800.0) -> float:
        """Extend a live claim's lease (a heartbeat during long runs). Raises :class:`ClaimLost` if it is gone."""
        now = _now()
        with self._tx() as conn:
            renewed = conn.execute(update(claims).where(claims.c.claim_id == claim_id, claims.c.status == "active",
                                                        claims.c.lease_until >= now)
                                   .values(lease_until=now + lease_seconds)).rowcount
            if renewed != 1:
                raise ClaimLost(claim_id)
        return now + lease_seconds

    def complete_claim(self, claim_id: str, consumed_by: str | None = None, note: str | None = None) -> int:
        """Mark the claim's samples consumed (by a run or version id). Returns how many samples it still held.

        Raises :class:`ClaimLost` when the claim expired and another trainer took its samples meanwhile.
        """
        if not claim_id:
            return 0
        now = _now()
        with self._tx() as conn:
            claim = _dict(conn.execute(select(claims).where(claims.c.claim_id == claim_id).with_for_update()))
            if claim is None:
                raise ClaimLost(claim_id)
            if claim["status"] not in ("active", "expired"):
                raise ClaimLost(f"{claim_id} is {claim['status']}")
            held = and_(samples_t.c.claim_id == claim_id, samples_t.c.consumed_at.is_(None))
            n = conn.execute(update(samples_t).where(held)
                             .values(consumed_at=now, consumed_by=consumed_by or claim_id)).rowcount
            if claim["status"] == "expired" and n == 0 and claim["n_samples"]:
                raise ClaimLost(f"{claim_id} expired and its samples were re-claimed")
            conn.execute(update(claims).where(claims.c.claim_id == claim_id)
                         .values(status="completed", finished_at=now, note=note))
            return n

    def release_claim(self, claim_id: str, note: str | None = None) -> int:
        """Give the claim's samples back unconsumed (a trainer that fails or is interrupted)."""
        if not claim_id:
            return 0
        with self._tx() as conn:
            held = and_(samples_t.c.claim_id == claim_id, samples_t.c.consumed_at.is_(None))
            n = conn.execute(update(samples_t).where(held).values(claim_id=None)).rowcount
            conn.execute(update(claims).where(claims.c.claim_id == claim_id, claims.c.status.in_(["active", "expired"]))
                         .values(status="released", finished_at=_now(), note=note))
            return n

    def get_claim(self, claim_id: str) -> dict | None:
        with self._tx(write=False) as conn:
            return _dict(conn.execute(select(claims).where(claims.c.claim_id == claim_id)))

    # =================================================================================================================
    # training requests, runs, versions
    # =================================================================================================================
    def add_training_request(self, project_id=None, event_id: int | None = None) -> int:
        with self._tx() as conn:
            new_id = conn.execute(insert_unless_exists(conn, training_requests, "event_id")
                                  .values(project_id=as_int(project_id), event_id=event_id, requested_at=_now(),
                                          status="pending")
                                  .returning(training_requests.c.id)).scalar()
            if new_id is not None:
                return int(new_id)
            return int(conn.execute(select(training_requests.c.id)
                                    .where(training_requests.c.event_id == event_id)).scalar_one())

    def pending_training_requests(self) -> list[dict]:
        with self._tx(write=False) as conn:
            return _dicts(conn.execute(select(training_requests).where(training_requests.c.status == "pending")
                                       .order_by(training_requests.c.id)))

    def mark_training_requests_handled(self, ids: Iterable[int], run_id: str) -> int:
        ids = [int(i) for i in ids]
        if not ids:
            return 0
        with self._tx() as conn:
            return conn.execute(update(training_requests)
                                .where(training_requests.c.status == "pending", training_requests.c.id.in_(ids))
                                .values(status="handled", run_id=run_id, handled_at=_now())).rowcount

    def start_run(self, run_id: str, trainer_id: str, claim_id: str | None = None, parent: str | None = None) -> None:
        with self._tx() as conn:
            conn.execute(insert(runs).values(run_id=run_id, trainer_id=trainer_id, claim_id=claim_id,
                                             started_at=_now(), status="running", parent=parent))

    def finish_run(self, run_id: str, status: str, published: bool, version: str | None, reason: str,
                   metrics: Mapping | None = None, report_path: str | None = None) -> None:
        with self._tx() as conn:
            conn.execute(update(runs).where(runs.c.run_id == run_id)
                         .values(finished_at=_now(), status=status, published=1 if published else 0, version=version,
                                 reason=reason, metrics=canonical_json(metrics or {}), report_path=report_path))

    def list_runs(self) -> list[dict]:
        with self._tx(write=False) as conn:
            rows = _dicts(conn.execute(select(runs).order_by(runs.c.started_at)))
        return [_with_json(r, "metrics") for r in rows]

    def record_version(self, version: str, path: str, parent: str | None, metrics: Mapping | None = None,
                       run_id: str | None = None, n_train: int | None = None, n_heldout: int | None = None) -> None:
        with self._tx() as conn:
            conn.execute(insert(versions).values(version=version, path=str(path), parent=parent, created_at=_now(),
                                                 run_id=run_id, metrics=canonical_json(metrics or {}),
                                                 n_train=n_train, n_heldout=n_heldout))

    def list_versions(self) -> list[dict]:
        with self._tx(write=False) as conn:
            rows = _dicts(conn.execute(select(versions).order_by(versions.c.created_at)))
        return [_with_json(r, "metrics") for r in rows]

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
        submitted mask; ``queued`` counts active samples not yet consumed by a training run. Samples whose version
        is unknown are reported under ``"unknown"``.
        """
        out: dict[str, dict] = {}

        def entry(v):
            return out.setdefault("unknown" if v is None else v, {
                "predictions": 0, "no_target_predictions": 0, "regions": 0, "accepted": 0, "changed": 0, "manual": 0,
                "acceptance_rate": None, "mean_iou": None, "iou_samples": 0, "mean_lead_time": None, "queued": 0})

        with self._tx(write=False) as conn:
            for r in conn.execute(_predictions_by_version()).mappings():
                e = entry(r["model_version"])
                e["predictions"] = int(r["n"])
                e["no_target_predictions"] = int(r["empty"] or 0)
            for r in conn.execute(_regions_by_version_and_origin()).mappings():
                e = entry(r["model_version"])
                e[{"prediction": "accepted", "prediction-changed": "changed"}.get(r["origin"], "manual")] += int(r["n"])
                e["regions"] += int(r["n"])
            for r in conn.execute(_sample_means_by_version()).mappings():
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
        recent = (events.c.id, events.c.action, events.c.attempts, events.c.last_error)
        with self._tx(write=False) as conn:
            by_status = {r.status: int(r.n) for r in conn.execute(
                select(events.c.status, func.count().label("n")).group_by(events.c.status))}
            redeliveries = int(conn.execute(select(func.coalesce(func.sum(events.c.redeliveries), 0))).scalar_one())
            failed = _dicts(conn.execute(select(*recent, events.c.processed_at).where(events.c.status == EVENT_FAILED)
                                         .order_by(events.c.id.desc()).limit(20)))
            retrying = _dicts(conn.execute(select(*recent, events.c.next_attempt_at)
                                           .where(events.c.status == EVENT_PENDING, events.c.attempts > 0)
                                           .order_by(events.c.id).limit(20)))
            sample_counts = conn.execute(_sample_counts()).mappings().one()
            claim_counts = {r.status: int(r.n) for r in conn.execute(
                select(claims.c.status, func.count().label("n")).group_by(claims.c.status))}
            requests = int(conn.execute(select(func.count()).select_from(training_requests)
                                        .where(training_requests.c.status == "pending")).scalar_one())
            n_versions = int(conn.execute(select(func.count()).select_from(versions)).scalar_one())
        return {
            "engine": self.dialect,
            "events": {**{s: by_status.get(s, 0) for s in (EVENT_PENDING, EVENT_PROCESSING, EVENT_DONE, EVENT_FAILED,
                                                           EVENT_IGNORED)},
                       "redeliveries": redeliveries, "failed_recent": failed, "retrying": retrying},
            "samples": {k: int(sample_counts[k] or 0) for k in ("total", "active", "queued")},
            "claims": claim_counts,
            "training_requests_pending": requests,
            "versions_published": n_versions,
            "by_version": self.version_stats(),
        }


def _with_payload(row: dict) -> dict:
    row["payload"] = json.loads(row["payload"])
    return row


def _sample_columns(sample: Mapping, aid: int, annotation_row: Mapping) -> dict:
    """The sample's row: its own columns (unknown keys dropped) plus the keys and ids the store derives."""
    cols = {k: v for k, v in sample.items() if k in SAMPLE_COLUMNS}
    cols.update(sample_key=sample_key(aid, sample["region_id"]), annotation_id=aid,
                project_id=annotation_row["project_id"], task_id=annotation_row["task_id"],
                content_hash=content_hash(sample), event_id=annotation_row["event_id"],
                ls_updated_at=annotation_row["ls_updated_at"])
    return cols


def _count_if(condition):
    return func.sum(case((condition, 1), else_=0))


def _predictions_by_version():
    return (select(predictions.c.model_version, func.count().label("n"),
                   _count_if(predictions.c.mask_area == 0).label("empty"))
            .group_by(predictions.c.model_version))


def _regions_by_version_and_origin():
    return (select(samples_t.c.model_version, samples_t.c.origin, func.count().label("n"))
            .where(samples_t.c.active == 1).group_by(samples_t.c.model_version, samples_t.c.origin))


def _sample_means_by_version():
    return (select(samples_t.c.model_version, func.avg(samples_t.c.prediction_iou).label("iou"),
                   func.count(samples_t.c.prediction_iou).label("n"), func.avg(samples_t.c.lead_time).label("lt"),
                   _count_if(samples_t.c.consumed_at.is_(None)).label("q"))
            .where(samples_t.c.active == 1).group_by(samples_t.c.model_version))


def _sample_counts():
    return select(func.count().label("total"), func.sum(samples_t.c.active).label("active"),
                  _count_if(and_(samples_t.c.active == 1, samples_t.c.consumed_at.is_(None))).label("queued"))
