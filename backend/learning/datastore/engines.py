"""From a datastore URL to a SQLAlchemy engine, and the few places where SQLite and PostgreSQL truly differ.

* URLs: ``postgresql://``, ``postgres://`` and ``postgresql+psycopg://`` mean PostgreSQL through psycopg 3 (a
  ``?schema=name`` query parameter puts every table in that schema); ``sqlite:///relative.db``,
  ``sqlite:////absolute.db`` or a bare path mean a SQLite file; nothing means ``MODEL_DIR/corrections.db``.
* SQLite: the PRAGMAs on every new connection (WAL, busy timeout, ``synchronous=FULL``) and SQLAlchemy's pysqlite
  recipe for real transactions: the driver's own BEGIN is turned off (``isolation_level = None``) and the ``begin``
  event emits ``BEGIN IMMEDIATE`` for writes (the database's single write lock is taken at once, so two writers queue
  on the busy timeout instead of failing on a lock upgrade) and a plain deferred ``BEGIN`` for reads.
* PostgreSQL: every connection's ``search_path`` is the store's schema, so one set of unqualified statements (and the
  migrations) serve every schema; claims and migrations take transaction-scoped advisory locks.
* ``INSERT ... ON CONFLICT DO NOTHING`` comes from each dialect's own ``insert``.

Engines pool their connections and are thread-safe: each transaction checks a connection out and returns it.
"""

from __future__ import annotations

import os
import re
import sqlite3
import time
from dataclasses import dataclass
from pathlib import Path

from sqlalchemy import Connection, Engine, Table, create_engine, event, func, make_url, select
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.engine import URL
from sqlalchemy.exc import ArgumentError

# Execution option read by the SQLite ``begin`` hook: False for read-only transactions (deferred BEGIN).
WRITE_OPTION = "datastore_write"

_POSTGRES_SCHEMES = ("postgresql", "postgres", "postgresql+psycopg")
_SCHEMA_RE = re.compile(r"[a-z_][a-z0-9_]{0,62}")
_SYNCHRONOUS = ("OFF", "NORMAL", "FULL", "EXTRA")


class DatastoreURLError(ValueError):
    """A datastore URL or schema name this code cannot use (the message says why; never the password)."""


@dataclass(frozen=True)
class Target:
    """Where a store lives: the SQLAlchemy URL, and the PostgreSQL schema or the SQLite file."""

    url: URL
    schema: str | None = None
    path: Path | None = None

    @property
    def dialect(self) -> str:
        return self.url.get_backend_name()

    def display(self) -> str:
        """The URL for messages and logs, password hidden."""
        shown = self.url.render_as_string(hide_password=True)
        return f"{shown}{'&' if self.url.query else '?'}schema={self.schema}" if self.schema else shown


def resolve_target(url: str | None, model_dir: str | os.PathLike, schema: str | None = None) -> Target:
    """Apply the URL rules (module docstring). ``schema`` wins over a ``?schema=`` in the URL."""
    if not url:
        return Target(URL.create("sqlite", database=str(Path(model_dir) / "corrections.db")),
                      path=Path(model_dir) / "corrections.db")
    scheme = url.split("://", 1)[0].lower() if "://" in url else None
    if scheme is None:
        return Target(URL.create("sqlite", database=url), path=Path(url))
    if scheme == "sqlite":
        database = make_url(url).database or str(Path(model_dir) / "corrections.db")
        return Target(URL.create("sqlite", database=database), path=Path(database))
    if scheme in _POSTGRES_SCHEMES:
        return _postgres_target(url, schema)
    raise DatastoreURLError(f"unsupported datastore URL scheme {scheme!r}: use postgresql://..., sqlite:///path.db "
                            "or a file path")


def _postgres_target(url: str, schema: str | None) -> Target:
    try:
        parsed = make_url("postgresql+psycopg://" + url.split("://", 1)[1])
    except ArgumentError as exc:
        raise DatastoreURLError(f"cannot parse the PostgreSQL datastore URL: {exc.__class__.__name__}") from None
    schema = schema or parsed.query.get("schema") or None
    if isinstance(schema, tuple):
        schema = schema[-1]
    if schema is not None and not _SCHEMA_RE.fullmatch(schema):
        raise DatastoreURLError(f"bad schema name {schema!r}: lower-case letters, digits and _, at most 63")
    return Target(parsed.difference_update_query(["schema"]), schema=schema)


def create_store_engine(target: Target, *, busy_timeout_s: float = 30.0, synchronous: str = "FULL",
                        connect_timeout: int = 10) -> Engine:
    if target.dialect == "sqlite":
        return _sqlite_engine(target, busy_timeout_s, synchronous)
    return _postgres_engine(target, connect_timeout)


def _sqlite_engine(target: Target, busy_timeout_s: float, synchronous: str) -> Engine:
    synchronous = str(synchronous).upper()
    if synchronous not in _SYNCHRONOUS:
        raise ValueError(f"synchronous must be one of {_SYNCHRONOUS}, got {synchronous!r}")
    if target.path is not None:
        target.path.parent.mkdir(parents=True, exist_ok=True)
    engine = create_engine(target.url, connect_args={"timeout": busy_timeout_s, "check_same_thread": False})

    @event.listens_for(engine, "connect")
    def on_connect(dbapi_connection, _record) -> None:
        dbapi_connection.isolation_level = None  # the recipe: sqlite3 emits no BEGIN of its own
        cursor = dbapi_connection.cursor()
        cursor.execute(f"PRAGMA busy_timeout={int(busy_timeout_s * 1000)}")
        _enable_wal(cursor, busy_timeout_s)
        cursor.execute(f"PRAGMA synchronous={synchronous}")
        cursor.execute("PRAGMA foreign_keys=ON")
        cursor.close()

    @event.listens_for(engine, "begin")
    def on_begin(connection: Connection) -> None:
        write = connection.get_execution_options().get(WRITE_OPTION, True)
        connection.exec_driver_sql("BEGIN IMMEDIATE" if write else "BEGIN")

    return engine


def _enable_wal(cursor, timeout_s: float) -> None:
    """``PRAGMA journal_mode=WAL`` (persistent: a no-op once the file is in WAL mode). The first switch needs the
    file to itself and SQLite does not wait for that on the busy handler: when several processes open a brand-new
    store at once, the losers get "database is locked" (or the old mode back) and retry here, within the timeout."""
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            if cursor.execute("PRAGMA journal_mode=WAL").fetchone()[0].lower() == "wal":
                return
        except sqlite3.OperationalError as exc:
            if "locked" not in str(exc) or time.monotonic() > deadline:
                raise
        if time.monotonic() > deadline:
            raise sqlite3.OperationalError("could not switch the SQLite datastore to WAL mode")
        time.sleep(0.02)


def _postgres_engine(target: Target, connect_timeout: int) -> Engine:
    engine = create_engine(target.url, pool_pre_ping=True, connect_args={"connect_timeout": int(connect_timeout)})
    if target.schema:
        _set_search_path_on_connect(engine, target.schema)
    return engine


def _set_search_path_on_connect(engine: Engine, schema: str) -> None:
    """SQLAlchemy's recipe for a default schema: ``SET search_path`` on each new DBAPI connection, in autocommit
    so that the setting is not rolled back with the first transaction. Only this schema is on the path: a
    statement can never land in ``public`` by mistake."""
    from psycopg import sql

    @event.listens_for(engine, "connect", insert=True)
    def set_search_path(dbapi_connection, _record) -> None:
        autocommit = dbapi_connection.autocommit
        dbapi_connection.autocommit = True
        with dbapi_connection.cursor() as cursor:
            cursor.execute(sql.SQL("SET SESSION search_path TO {}").format(sql.Identifier(schema)))
        dbapi_connection.autocommit = autocommit


def advisory_lock(connection: Connection, key: str) -> None:
    """Hold the lock named ``key`` until the connection's transaction ends (PostgreSQL ``pg_advisory_xact_lock``).

    Nothing on SQLite: a write transaction (``BEGIN IMMEDIATE``) already holds the database's only write lock."""
    if connection.dialect.name == "postgresql":
        connection.execute(select(func.pg_advisory_xact_lock(func.hashtext(key))))


def insert_unless_exists(connection: Connection, table: Table, *conflict_columns: str):
    """``INSERT ... ON CONFLICT (conflict_columns) DO NOTHING`` in the connection's dialect (add ``.values()``)."""
    dialect_insert = postgresql.insert if connection.dialect.name == "postgresql" else sqlite.insert
    return dialect_insert(table).on_conflict_do_nothing(index_elements=list(conflict_columns))
