"""The first schema (meta included).

Exactly the tables and indexes the hand-written DDL of the first datastore created. Stores created by that code are
stamped with this revision instead of running it.

Revision ID: 0001
Revises:
Create Date: 2026-07-01
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects.sqlite import REAL

revision = "0001"
down_revision = None
branch_labels = None
depends_on = None

# frozen here: later revisions must not change what this one creates
DOUBLE = sa.Double().with_variant(REAL(), "sqlite")           # DOUBLE PRECISION; REAL on SQLite
SERIAL = sa.BigInteger().with_variant(sa.Integer(), "sqlite")  # BIGSERIAL; INTEGER PRIMARY KEY AUTOINCREMENT
TABLES = ("meta", "events", "predictions", "annotations", "samples", "claims", "training_requests", "runs",
          "versions")


def _key(name: str, type_) -> sa.Column:
    """``name TYPE PRIMARY KEY`` as the first DDL wrote it: NOT NULL on PostgreSQL (implied), not on SQLite."""
    return sa.Column(name, type_, primary_key=True, nullable=True, autoincrement=False)


def _id() -> sa.Column:
    return sa.Column("id", SERIAL, primary_key=True, nullable=True)


def _zero(name: str) -> sa.Column:
    return sa.Column(name, sa.Integer, nullable=False, server_default=sa.text("0"))


def upgrade() -> None:
    op.create_table("meta", _key("key", sa.Text), sa.Column("value", sa.Text))
    _create_inbox_and_predictions()
    _create_annotations_and_samples()
    _create_training_tables()
    op.execute(sa.text("INSERT INTO meta (key, value) VALUES ('schema_version', '1')"))


def _create_inbox_and_predictions() -> None:
    op.create_table(
        "events", _id(),
        sa.Column("dedup_key", sa.Text, nullable=False, unique=True),
        sa.Column("action", sa.Text, nullable=False),
        sa.Column("payload", sa.Text, nullable=False),
        sa.Column("project_id", sa.BigInteger),
        sa.Column("received_at", DOUBLE, nullable=False),
        sa.Column("status", sa.Text, nullable=False, server_default="pending"),
        _zero("attempts"),
        sa.Column("next_attempt_at", DOUBLE, nullable=False),
        sa.Column("lease_owner", sa.Text),
        sa.Column("lease_until", DOUBLE),
        sa.Column("last_error", sa.Text),
        sa.Column("processed_at", DOUBLE),
        sa.Column("result", sa.Text),
        _zero("redeliveries"),
        sqlite_autoincrement=True,
    )
    op.create_index("events_due", "events", ["status", "next_attempt_at"])
    op.create_table(
        "predictions", _id(),
        sa.Column("project_id", sa.BigInteger),
        sa.Column("task_id", sa.BigInteger),
        sa.Column("sentence", sa.Text),
        sa.Column("model_version", sa.Text),
        sa.Column("mask_blob", sa.Text),
        sa.Column("width", sa.Integer),
        sa.Column("height", sa.Integer),
        sa.Column("mask_area", sa.BigInteger),
        sa.Column("score", DOUBLE),
        sa.Column("created_at", DOUBLE, nullable=False),
        sqlite_autoincrement=True,
    )
    op.create_index("predictions_task", "predictions", ["task_id", "model_version"])
    op.create_index("predictions_version", "predictions", ["model_version"])


def _create_annotations_and_samples() -> None:
    op.create_table(
        "annotations",
        _key("annotation_id", sa.BigInteger),
        sa.Column("project_id", sa.BigInteger),
        sa.Column("task_id", sa.BigInteger),
        sa.Column("state", sa.Text, nullable=False),
        sa.Column("ls_updated_at", sa.Text),
        sa.Column("event_id", sa.BigInteger),
        _zero("n_samples"),
        sa.Column("seen_at", DOUBLE, nullable=False),
    )
    op.create_table(
        "samples", _id(),
        sa.Column("sample_key", sa.Text, nullable=False, unique=True),
        sa.Column("project_id", sa.BigInteger),
        sa.Column("task_id", sa.BigInteger),
        sa.Column("annotation_id", sa.BigInteger, nullable=False),
        sa.Column("region_id", sa.Text, nullable=False),
        sa.Column("sentence", sa.Text, nullable=False),
        sa.Column("sentence_source", sa.Text),
        sa.Column("label", sa.Text),
        sa.Column("mask_blob", sa.Text, nullable=False),
        sa.Column("image_blob", sa.Text, nullable=False),
        sa.Column("image_url", sa.Text),
        sa.Column("width", sa.Integer, nullable=False),
        sa.Column("height", sa.Integer, nullable=False),
        sa.Column("mask_area", sa.BigInteger),
        sa.Column("annotator", sa.BigInteger),
        sa.Column("lead_time", DOUBLE),
        _zero("ground_truth"),
        sa.Column("origin", sa.Text, nullable=False),
        sa.Column("model_version", sa.Text),
        sa.Column("prediction_id", sa.BigInteger),
        sa.Column("prediction_iou", DOUBLE),
        sa.Column("content_hash", sa.Text, nullable=False),
        sa.Column("ls_created_at", sa.Text),
        sa.Column("ls_updated_at", sa.Text),
        sa.Column("ingested_at", DOUBLE, nullable=False),
        sa.Column("event_id", sa.BigInteger),
        sa.Column("active", sa.Integer, nullable=False, server_default=sa.text("1")),
        sa.Column("retracted_at", DOUBLE),
        sa.Column("retract_reason", sa.Text),
        sa.Column("claim_id", sa.Text),
        sa.Column("consumed_at", DOUBLE),
        sa.Column("consumed_by", sa.Text),
        sqlite_autoincrement=True,
    )
    op.create_index("samples_annotation", "samples", ["annotation_id"])
    op.create_index("samples_queue", "samples", ["active", "consumed_at", "claim_id"])
    op.create_index("samples_version", "samples", ["model_version"])


def _create_training_tables() -> None:
    op.create_table(
        "claims",
        _key("claim_id", sa.Text),
        sa.Column("trainer_id", sa.Text, nullable=False),
        sa.Column("created_at", DOUBLE, nullable=False),
        sa.Column("lease_until", DOUBLE, nullable=False),
        sa.Column("status", sa.Text, nullable=False),
        _zero("n_samples"),
        sa.Column("finished_at", DOUBLE),
        sa.Column("note", sa.Text),
    )
    op.create_table(
        "training_requests", _id(),
        sa.Column("project_id", sa.BigInteger),
        sa.Column("event_id", sa.BigInteger, unique=True),
        sa.Column("requested_at", DOUBLE, nullable=False),
        sa.Column("status", sa.Text, nullable=False, server_default="pending"),
        sa.Column("run_id", sa.Text),
        sa.Column("handled_at", DOUBLE),
        sqlite_autoincrement=True,
    )
    op.create_table(
        "runs",
        _key("run_id", sa.Text),
        sa.Column("trainer_id", sa.Text),
        sa.Column("claim_id", sa.Text),
        sa.Column("started_at", DOUBLE, nullable=False),
        sa.Column("finished_at", DOUBLE),
        sa.Column("status", sa.Text, nullable=False),
        _zero("published"),
        sa.Column("version", sa.Text),
        sa.Column("parent", sa.Text),
        sa.Column("reason", sa.Text),
        sa.Column("metrics", sa.Text),
        sa.Column("report_path", sa.Text),
    )
    op.create_table(
        "versions",
        _key("version", sa.Text),
        sa.Column("path", sa.Text, nullable=False),
        sa.Column("parent", sa.Text),
        sa.Column("created_at", DOUBLE, nullable=False),
        sa.Column("run_id", sa.Text),
        sa.Column("metrics", sa.Text),
        sa.Column("n_train", sa.Integer),
        sa.Column("n_heldout", sa.Integer),
    )


def downgrade() -> None:
    for name in reversed(TABLES):
        op.drop_table(name)
