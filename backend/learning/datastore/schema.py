"""The datastore's tables, defined once for both engines (SQLAlchemy Core).

This is the schema at the migrations' head; ``migrations/versions`` holds the steps that lead here. A change to a
table here needs a new revision there (``tests/learning/test_datastore_migrations.py`` compares the two).

Times are UNIX seconds (``DOUBLE PRECISION``; ``REAL`` on SQLite); Label Studio's own timestamps are kept as its ISO
strings. Flags are INTEGER 0/1 (``active``, ``published``, ``ground_truth``), as the first schema had them.
"""

from __future__ import annotations

from sqlalchemy import BigInteger, Column, Double, Index, Integer, MetaData, Table, Text, text
from sqlalchemy.dialects.sqlite import REAL

# PostgreSQL's own names for inline PRIMARY KEY / UNIQUE constraints, so stores created by the first (hand-written)
# schema and stores created by the migrations carry the same constraint names.
NAMING_CONVENTION = {"pk": "%(table_name)s_pkey", "uq": "%(table_name)s_%(column_0_name)s_key"}

DOUBLE = Double().with_variant(REAL(), "sqlite")
SERIAL = BigInteger().with_variant(Integer(), "sqlite")  # BIGSERIAL; INTEGER PRIMARY KEY AUTOINCREMENT on SQLite

EVENT_PENDING, EVENT_PROCESSING, EVENT_DONE, EVENT_FAILED, EVENT_IGNORED = (
    "pending", "processing", "done", "failed", "ignored")
ORIGINS = ("prediction", "prediction-changed", "manual")

metadata = MetaData(naming_convention=NAMING_CONVENTION)


def _key(name: str, type_) -> Column:
    """A primary key as the first DDL wrote it (``name TYPE PRIMARY KEY``): PostgreSQL makes it NOT NULL, SQLite
    does not (its long-standing quirk), so no NOT NULL of its own; the store never writes NULL keys."""
    return Column(name, type_, primary_key=True, nullable=True, autoincrement=False)


def _serial_id() -> Column:
    return Column("id", SERIAL, primary_key=True, nullable=True)


def _zero(name: str) -> Column:
    return Column(name, Integer, nullable=False, server_default=text("0"))


# the webhook inbox: raw payloads, de-duplicated by a hash, processed with leases, retries and a failed state
events = Table(
    "events", metadata,
    _serial_id(),
    Column("dedup_key", Text, nullable=False, unique=True),
    Column("action", Text, nullable=False),
    Column("payload", Text, nullable=False),
    Column("project_id", BigInteger),
    Column("received_at", DOUBLE, nullable=False),
    Column("status", Text, nullable=False, server_default=EVENT_PENDING),
    _zero("attempts"),
    Column("next_attempt_at", DOUBLE, nullable=False),
    Column("lease_owner", Text),
    Column("lease_until", DOUBLE),
    Column("last_error", Text),
    Column("processed_at", DOUBLE),
    Column("result", Text),
    _zero("redeliveries"),
    Index("events_due", "status", "next_attempt_at"),
    sqlite_autoincrement=True,
)

# every mask the server predicted, for IoU(prediction, submission)
predictions = Table(
    "predictions", metadata,
    _serial_id(),
    Column("project_id", BigInteger),
    Column("task_id", BigInteger),
    Column("sentence", Text),
    Column("model_version", Text),
    Column("mask_blob", Text),
    Column("width", Integer),
    Column("height", Integer),
    Column("mask_area", BigInteger),
    Column("score", DOUBLE),
    Column("created_at", DOUBLE, nullable=False),
    Index("predictions_task", "task_id", "model_version"),
    Index("predictions_version", "model_version"),
    sqlite_autoincrement=True,
)

# one row per Label Studio annotation seen: its updated_at (stale events are ignored) and a tombstone when deleted
annotations = Table(
    "annotations", metadata,
    _key("annotation_id", BigInteger),
    Column("project_id", BigInteger),
    Column("task_id", BigInteger),
    Column("state", Text, nullable=False),
    Column("ls_updated_at", Text),
    Column("event_id", BigInteger),
    _zero("n_samples"),
    Column("seen_at", DOUBLE, nullable=False),
)

# one per brush region of a submitted annotation
samples = Table(
    "samples", metadata,
    _serial_id(),
    Column("sample_key", Text, nullable=False, unique=True),
    Column("project_id", BigInteger),
    Column("task_id", BigInteger),
    Column("annotation_id", BigInteger, nullable=False),
    Column("region_id", Text, nullable=False),
    Column("sentence", Text, nullable=False),
    Column("sentence_source", Text),
    Column("label", Text),
    Column("mask_blob", Text, nullable=False),
    Column("image_blob", Text, nullable=False),
    Column("image_url", Text),
    Column("width", Integer, nullable=False),
    Column("height", Integer, nullable=False),
    Column("mask_area", BigInteger),
    Column("annotator", BigInteger),
    Column("lead_time", DOUBLE),
    _zero("ground_truth"),
    Column("origin", Text, nullable=False),
    Column("model_version", Text),
    Column("prediction_id", BigInteger),
    Column("prediction_iou", DOUBLE),
    Column("content_hash", Text, nullable=False),
    Column("ls_created_at", Text),
    Column("ls_updated_at", Text),
    Column("ingested_at", DOUBLE, nullable=False),
    Column("event_id", BigInteger),
    Column("active", Integer, nullable=False, server_default=text("1")),
    Column("retracted_at", DOUBLE),
    Column("retract_reason", Text),
    Column("claim_id", Text),
    Column("consumed_at", DOUBLE),
    Column("consumed_by", Text),
    Index("samples_annotation", "annotation_id"),
    Index("samples_queue", "active", "consumed_at", "claim_id"),
    Index("samples_version", "model_version"),
    sqlite_autoincrement=True,
)

# a trainer's exclusive hold on new samples, with a lease that expires if the trainer dies
claims = Table(
    "claims", metadata,
    _key("claim_id", Text),
    Column("trainer_id", Text, nullable=False),
    Column("created_at", DOUBLE, nullable=False),
    Column("lease_until", DOUBLE, nullable=False),
    Column("status", Text, nullable=False),
    _zero("n_samples"),
    Column("finished_at", DOUBLE),
    Column("note", Text),
)

# START_TRAINING events
training_requests = Table(
    "training_requests", metadata,
    _serial_id(),
    Column("project_id", BigInteger),
    Column("event_id", BigInteger, unique=True),
    Column("requested_at", DOUBLE, nullable=False),
    Column("status", Text, nullable=False, server_default="pending"),
    Column("run_id", Text),
    Column("handled_at", DOUBLE),
    sqlite_autoincrement=True,
)

# every fine-tuning run and its decision (published or not, and why)
runs = Table(
    "runs", metadata,
    _key("run_id", Text),
    Column("trainer_id", Text),
    Column("claim_id", Text),
    Column("started_at", DOUBLE, nullable=False),
    Column("finished_at", DOUBLE),
    Column("status", Text, nullable=False),
    _zero("published"),
    Column("version", Text),
    Column("parent", Text),
    Column("reason", Text),
    Column("metrics", Text),
    Column("report_path", Text),
)

# published model versions
versions = Table(
    "versions", metadata,
    _key("version", Text),
    Column("path", Text, nullable=False),
    Column("parent", Text),
    Column("created_at", DOUBLE, nullable=False),
    Column("run_id", Text),
    Column("metrics", Text),
    Column("n_train", Integer),
    Column("n_heldout", Integer),
)

SAMPLE_COLUMNS = frozenset(samples.c.keys()) - {"id"}
