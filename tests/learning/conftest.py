"""Fixtures shared by the learning tests: one database per test on each engine (SQLite file, PostgreSQL schema)."""

from __future__ import annotations

import sqlite3
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from sqlalchemy import Engine, create_engine

from backend.learning.datastore import Datastore, open_datastore
from backend.learning.datastore.engines import resolve_target
from tests.learning import postgres


@dataclass
class Database:
    """A fresh, empty database for one test: SQLite ``model_dir/corrections.db``, or a PostgreSQL schema dropped
    afterwards. :meth:`open` opens store objects on it (each with its own engine, like separate processes)."""

    engine: str                 # "sqlite" or "postgresql"
    model_dir: Path
    url: str | None = None      # PostgreSQL server (None: SQLite in model_dir)
    schema: str | None = None
    stores: list = field(default_factory=list)

    @property
    def datastore_url(self) -> str:
        """The URL a user would give (``DATASTORE_URL`` / ``--datastore-url``)."""
        return f"{self.url}?schema={self.schema}" if self.url else f"sqlite:///{self.model_dir / 'corrections.db'}"

    def open(self, **kwargs) -> Datastore:
        store = open_datastore(self.url, self.model_dir, schema=self.schema, **kwargs)
        self.stores.append(store)
        return store

    def plain_engine(self) -> Engine:
        """An engine with none of the store's settings (no search path, no PRAGMAs): to look at the database."""
        return create_engine(resolve_target(self.url, self.model_dir).url)

    def run_sql(self, script: str) -> None:
        """Run a SQL script on the database outside the datastore (fixtures, tampering)."""
        if self.url:
            postgres.run_sql_in_schema(self.url, self.schema, script)
        else:
            with sqlite3.connect(self.model_dir / "corrections.db") as conn:
                conn.executescript(script)
            conn.close()


def _database(engine: str, model_dir: Path):
    model_dir.mkdir(parents=True, exist_ok=True)
    if engine == "sqlite":
        database = Database("sqlite", model_dir)
    else:
        database = Database("postgresql", model_dir, url=postgres.require_postgres(), schema=postgres.new_schema_name())
    try:
        yield database
    finally:
        for store in database.stores:
            store.close()
        if database.schema:
            postgres.drop_schema(database.url, database.schema)


@pytest.fixture(params=["sqlite", pytest.param("postgresql", marks=pytest.mark.postgres)])
def db(request, tmp_path):
    yield from _database(request.param, tmp_path)


@pytest.fixture
def other_db(db, tmp_path):
    """A second fresh database on the same engine as ``db``."""
    yield from _database(db.engine, tmp_path / "other")
