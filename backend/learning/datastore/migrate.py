"""Schema migrations: Alembic, run from code (no alembic.ini), with the scripts shipped in ``migrations/``.

* :func:`upgrade` brings a store to head: under the migration lock (PostgreSQL: an advisory lock, so replicas
  opening at once do not race; SQLite: the write transaction), inside one transaction, creating the PostgreSQL schema
  if needed. A store made by the first, hand-written schema (its tables, ``meta.schema_version = '1'`` and no
  ``alembic_version``) is stamped ``0001`` first, its rows kept.
* :func:`require_head` refuses a store that is not at head (``open_datastore(..., migrate=False)``).
* A store at a revision this code does not know was written by newer code: :class:`DatastoreTooNew`, never a
  silent use.

A new revision: ``alembic.command.revision(alembic_config(), "what changes")`` writes a script into
``migrations/versions``; fill in its ``upgrade``/``downgrade`` and the same change in ``schema.py``.
"""

from __future__ import annotations

import functools
import logging
from dataclasses import dataclass
from pathlib import Path

from alembic import command
from alembic.config import Config
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory
from alembic.script.revision import RevisionError
from alembic.util import CommandError
from sqlalchemy import Connection, Engine, column, inspect, select, table
from sqlalchemy.schema import CreateSchema

from backend.learning.datastore.engines import WRITE_OPTION, advisory_lock

log = logging.getLogger(__name__)

MIGRATIONS_DIR = Path(__file__).with_name("migrations")
LEGACY_REVISION = "0001"        # the first schema, as the hand-written DDL created it
UPGRADE_COMMAND = "ssp-sam datastore upgrade"
_LOCK_KEY = "ssp-sam-datastore:{schema}"  # the key the first schema's code used for its initialisation


class DatastoreError(RuntimeError):
    """The datastore cannot be used as it is (the message says why and what to do)."""


class DatastoreNotAtHead(DatastoreError):
    """The store needs migrating and the caller asked not to (``migrate=False``)."""


class DatastoreTooNew(DatastoreError):
    """The store is at a revision this code does not know: newer code migrated it."""


def alembic_config(connection: Connection | None = None, schema: str | None = None) -> Config:
    """Alembic's configuration, built in code; ``env.py`` reads the connection and the schema from its attributes."""
    cfg = Config()
    cfg.set_main_option("script_location", str(MIGRATIONS_DIR))
    cfg.attributes["connection"] = connection
    cfg.attributes["schema"] = schema
    return cfg


@functools.lru_cache(maxsize=1)
def _scripts() -> ScriptDirectory:
    return ScriptDirectory.from_config(alembic_config())


def head_revision() -> str:
    return _scripts().get_current_head()


def is_known_revision(revision: str) -> bool:
    try:
        return _scripts().get_revision(revision) is not None
    except (CommandError, RevisionError):
        return False


@dataclass(frozen=True)
class StoreRevision:
    """Where a store stands: its Alembic revision (None: none recorded) and this code's head."""

    current: str | None
    head: str
    legacy: bool = False   # the first schema, before Alembic: will be stamped 0001
    empty: bool = False    # no tables yet

    @property
    def at_head(self) -> bool:
        return self.current == self.head

    @property
    def known(self) -> bool:
        return self.current is None or is_known_revision(self.current)

    def describe(self) -> str:
        if self.legacy:
            return f"the first schema (meta.schema_version = '1', before migrations; becomes {LEGACY_REVISION})"
        if self.empty:
            return "empty (no tables yet)"
        return f"revision {self.current}"


def read_revision(connection: Connection, schema: str | None = None) -> StoreRevision:
    """The store's revision, read on ``connection``; raises :class:`DatastoreError` for tables that are not a store
    this code can manage."""
    head = head_revision()
    context = MigrationContext.configure(connection, opts={"version_table_schema": schema})
    current = context.get_current_revision()
    if current is not None:
        return StoreRevision(current, head)
    names = set(inspect(connection).get_table_names(schema=schema)) - {"alembic_version"}
    if not names:
        return StoreRevision(None, head, empty=True)
    if "meta" in names and _legacy_schema_version(connection, schema) == "1":
        return StoreRevision(None, head, legacy=True)
    raise DatastoreError(f"the database holds tables ({', '.join(sorted(names)[:5])}...) but no migration record "
                         "and no meta.schema_version = '1': it is not a corrections datastore this code can migrate")


def _legacy_schema_version(connection: Connection, schema: str | None) -> str | None:
    meta = table("meta", column("key"), column("value"), schema=schema)
    return connection.execute(select(meta.c.value).where(meta.c.key == "schema_version")).scalar()


def current_revision(engine: Engine, schema: str | None = None) -> StoreRevision:
    with engine.execution_options(**{WRITE_OPTION: False}).connect() as connection:
        return read_revision(connection, schema)


def refuse_unknown(revision: StoreRevision, where: str) -> None:
    if not revision.known:
        raise DatastoreTooNew(
            f"the corrections datastore {where} is at revision {revision.current}, which this code does not know "
            f"(its newest is {revision.head}): a newer version of ssp-sam-labelstudio migrated it. Upgrade "
            "ssp-sam-labelstudio; this version must not use that store.")


def require_head(engine: Engine, schema: str | None, where: str) -> StoreRevision:
    """Raise unless the store is at head (``open_datastore(..., migrate=False)``)."""
    revision = current_revision(engine, schema)
    refuse_unknown(revision, where)
    if not revision.at_head:
        raise DatastoreNotAtHead(
            f"the corrections datastore {where} is {revision.describe()}; this code needs revision {revision.head}. "
            f"Run `{UPGRADE_COMMAND}` (with the same MODEL_DIR / DATASTORE_URL), or open it with migrate=True.")
    return revision


def upgrade(engine: Engine, schema: str | None, where: str) -> tuple[StoreRevision, StoreRevision]:
    """Migrate the store to head; returns (before, after). A store already at head costs one read."""
    before = current_revision(engine, schema)
    refuse_unknown(before, where)
    if before.at_head:
        return before, before
    with engine.begin() as connection:  # SQLite: BEGIN IMMEDIATE; everything below commits or nothing does
        advisory_lock(connection, _LOCK_KEY.format(schema=schema or ""))
        if schema:
            connection.execute(CreateSchema(schema, if_not_exists=True))
        locked = read_revision(connection, schema)  # again: another process may have migrated meanwhile
        refuse_unknown(locked, where)
        if not locked.at_head:
            _run_alembic(connection, schema, locked, where)
    return before, current_revision(engine, schema)


def _run_alembic(connection: Connection, schema: str | None, revision: StoreRevision, where: str) -> None:
    cfg = alembic_config(connection, schema)
    if revision.legacy:
        log.info("datastore %s: the first schema, stamped %s", where, LEGACY_REVISION)
        command.stamp(cfg, LEGACY_REVISION)
    log.info("datastore %s: %s -> %s", where, revision.describe(), revision.head)
    command.upgrade(cfg, "head")
