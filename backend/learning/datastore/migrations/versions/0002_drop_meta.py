"""Drop the meta table.

Its ``schema_version`` was written and never read; ``alembic_version`` records the schema's revision now.

Revision ID: 0002
Revises: 0001
Create Date: 2026-07-01
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0002"
down_revision = "0001"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.drop_table("meta")


def downgrade() -> None:
    op.create_table("meta", sa.Column("key", sa.Text, primary_key=True, nullable=True), sa.Column("value", sa.Text))
    op.execute(sa.text("INSERT INTO meta (key, value) VALUES ('schema_version', '1')"))
