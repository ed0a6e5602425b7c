"""Schema migrations of the corrections datastore, on SQLite and on the real PostgreSQL server.

A store made by the first (hand-written) schema is recognised and upgraded with its rows; ``migrate=False`` and
stores written by newer code fail with clear errors; the migrations lead to exactly the tables of ``schema.py``;
``ssp-sam datastore upgrade | current | stats`` work.
"""

from __future__ import annotations

import json
import threading
from pathlib import Path

import pytest
from alembic import command
from alembic.autogenerate import compare_metadata
from alembic.runtime.migration import MigrationContext
from sqlalchemy import inspect, text

from backend.cli import main
from backend.learning.datastore import DatastoreError, DatastoreNotAtHead, DatastoreTooNew
from backend.learning.datastore.migrate import alembic_config, head_revision
from backend.learning.datastore.schema import metadata

FIXTURES = Path(__file__).parents[1] / "fixtures"
HEAD = "0002"


def _first_schema_ddl(db) -> str:
    return (FIXTURES / f"datastore_v1_{'postgres' if db.url else 'sqlite'}.sql").read_text()


def _load_first_schema_store(db) -> None:
    """The database as the first datastore left it: its DDL and a few rows."""
    db.run_sql(_first_schema_ddl(db) + (FIXTURES / "datastore_v1_rows.sql").read_text())


def _look(db, sql: str) -> list:
    engine = db.plain_engine()
    try:
        with engine.connect() as conn:
            return conn.execute(text(sql.format(schema=f"{db.schema}." if db.schema else ""))).all()
    finally:
        engine.dispose()


def _tables(db) -> set[str]:
    engine = db.plain_engine()
    try:
        return set(inspect(engine).get_table_names(schema=db.schema))
    finally:
        engine.dispose()


def test_head_is_0002():
    assert head_revision() == HEAD


def test_a_new_store_is_at_head_with_the_tables_of_schema_py(db):
    store = db.open()
    assert _look(db, "SELECT version_num FROM {schema}alembic_version") == [(HEAD,)]
    assert _tables(db) == set(metadata.tables) | {"alembic_version"}
    with store.engine.connect() as conn:
        # the store's connections have the schema on their search path: alembic_version is in the default schema
        assert _differences(conn) == []


def _differences(conn) -> list:
    """What Alembic's autogenerate would change to make the database match ``schema.py``. PostgreSQL makes every
    primary key column NOT NULL whatever the DDL says (``schema.py`` declares none, as the first DDL)."""
    keys = {(t.name, c.name) for t in metadata.tables.values() for c in t.primary_key}
    # ("modify_nullable", schema, table, column, existing, nullable in the database, nullable in schema.py)
    implied = lambda op: (conn.dialect.name == "postgresql" and op[0] == "modify_nullable"  # noqa: E731
                          and (op[2], op[3]) in keys and op[5:7] == (False, True))
    return [d for d in compare_metadata(MigrationContext.configure(conn), metadata)
            if not (isinstance(d, list) and all(implied(op) for op in d))]


def _shape(db) -> dict:
    """Every table's columns (name, type, nullable, default), primary key, unique column sets and indexes."""
    engine = db.plain_engine()
    insp = inspect(engine)
    strip = f"{db.schema}." if db.schema else "\0"
    try:
        return {name: {
            "columns": [(c["name"], str(c["type"]), c["nullable"], str(c["default"]).replace(strip, ""))
                        for c in insp.get_columns(name, schema=db.schema)],
            "pk": insp.get_pk_constraint(name, schema=db.schema)["constrained_columns"],
            "unique": sorted(tuple(u["column_names"]) for u in insp.get_unique_constraints(name, schema=db.schema)),
            "indexes": sorted((i["name"], tuple(i["column_names"])) for i in insp.get_indexes(name, schema=db.schema)
                              if not i.get("duplicates_constraint")),
        } for name in sorted(set(insp.get_table_names(schema=db.schema)) - {"alembic_version"})}
    finally:
        engine.dispose()


def test_revision_0001_is_exactly_the_first_schema_and_0002_drops_meta(db, other_db):
    other_db.run_sql(_first_schema_ddl(other_db))
    first = _shape(other_db)
    assert "meta" in first and len(first) == 9
    store = db.open()
    assert _shape(db) == {k: v for k, v in first.items() if k != "meta"}
    with store.engine.begin() as conn:
        command.downgrade(alembic_config(conn, db.schema), "0001")
    assert _shape(db) == first
    assert _look(db, "SELECT key, value FROM {schema}meta") == [("schema_version", "1")]
    with store.engine.begin() as conn:
        command.downgrade(alembic_config(conn, db.schema), "base")
    assert _tables(db) <= {"alembic_version"}
    store.close()
    assert db.open().stats()["samples"]["total"] == 0  # and up again, from nothing
    assert _look(db, "SELECT version_num FROM {schema}alembic_version") == [(HEAD,)]


def test_a_first_schema_store_is_upgraded_with_its_rows(db):
    _load_first_schema_store(db)
    store = db.open()
    assert "meta" not in _tables(db)
    assert _look(db, "SELECT version_num FROM {schema}alembic_version") == [(HEAD,)]
    assert [(s["region_id"], s["consumed_by"]) for s in store.list_samples()] == [("r1", "ft-1"), ("r2", None)]
    assert store.get_event(1)["payload"]["annotation"]["id"] == 10 and store.get_event(2)["status"] == "pending"
    assert [r["event_id"] for r in store.pending_training_requests()] == [2]
    assert store.list_runs()[0]["metrics"] == {"after": {"mIoU": 0.5}} and store.list_versions()[0]["version"] == "ft-1"
    assert store.version_stats()["demo-1"]["accepted"] == 1 and store.count_new_samples() == 1
    # the old rows behave as the store's own: same content hashes, the tombstone holds, ids continue
    same = [{"region_id": "r1", "sentence": "the red circle", "mask_blob": "a" * 64, "image_blob": "b" * 64,
             "width": 8, "height": 6, "origin": "prediction", "model_version": "demo-1"},
            {"region_id": "r2", "sentence": "the blue square", "mask_blob": "c" * 64, "image_blob": "b" * 64,
             "width": 8, "height": 6, "origin": "manual", "model_version": "demo-1"}]
    assert store.apply_annotation(10, 1, 100, "2026-01-01T00:00:00Z", same)["unchanged"] == 2
    assert not store.apply_annotation(11, 1, 101, "2026-01-02T00:00:00Z", same)["applied"]
    assert store.enqueue_event("X", {"new": True}) == 3
    claim = store.claim_samples("trainer-2", 60)
    assert [s["region_id"] for s in claim.samples] == ["r2"]


def test_migrate_false_refuses_a_store_that_is_not_at_head(db):
    _load_first_schema_store(db)
    with pytest.raises(DatastoreNotAtHead) as err:
        db.open(migrate=False)
    message = str(err.value)
    assert "ssp-sam datastore upgrade" in message and "first schema" in message and HEAD in message
    assert "meta" in _tables(db) and "alembic_version" not in _tables(db)  # nothing was changed
    db.open()
    assert db.open(migrate=False).count_new_samples() == 1


def test_migrate_false_refuses_an_empty_database(db):
    with pytest.raises(DatastoreNotAtHead, match="empty"):
        db.open(migrate=False)
    assert _tables(db) == set()


def _written_by_newer_code(db) -> None:
    db.open().close()
    db.run_sql(f"UPDATE {db.schema + '.' if db.schema else ''}alembic_version SET version_num = '0042_future'")


def test_a_store_migrated_by_newer_code_is_refused(db):
    _written_by_newer_code(db)
    for migrate in (True, False):
        with pytest.raises(DatastoreTooNew) as err:
            db.open(migrate=migrate)
        message = str(err.value)
        assert "0042_future" in message and HEAD in message and "upgrade ssp-sam-labelstudio" in message.lower()
    assert _look(db, "SELECT version_num FROM {schema}alembic_version") == [("0042_future",)]  # left alone


def test_tables_that_are_not_a_datastore_are_refused(db):
    db.run_sql("CREATE TABLE unrelated (id INTEGER PRIMARY KEY);")
    with pytest.raises(DatastoreError, match="not a corrections datastore"):
        db.open()


def test_replicas_opening_a_new_store_at_once_migrate_it_once(db):
    errors, opened = [], []
    start = threading.Barrier(4)

    def open_one():
        start.wait()
        try:
            opened.append(db.open())
        except Exception as exc:  # collected: the assertion below names it
            errors.append(exc)

    threads = [threading.Thread(target=open_one) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert errors == [] and len(opened) == 4
    assert _look(db, "SELECT version_num FROM {schema}alembic_version") == [(HEAD,)]
    ids = {store.enqueue_event("X", {"from": i}) for i, store in enumerate(opened)}
    assert ids == {1, 2, 3, 4}


# ---------------------------------------------------------------------------------------------------------------------
# ssp-sam datastore
# ---------------------------------------------------------------------------------------------------------------------

def _cli(db, *args: str) -> int:
    return main(["datastore", *args, "--model-dir", str(db.model_dir), "--datastore-url", db.datastore_url])


def test_cli_current_upgrade_stats(db, capsys):
    _load_first_schema_store(db)
    assert _cli(db, "current") == 0
    out = capsys.readouterr().out
    assert "first schema" in out and f"head:      revision {HEAD}" in out
    assert _cli(db, "stats") == 1  # not at head: stats does not migrate
    assert "ssp-sam datastore upgrade" in capsys.readouterr().err
    assert _cli(db, "upgrade") == 0
    assert f"-> revision {HEAD} (head)" in capsys.readouterr().out
    assert _cli(db, "upgrade") == 0
    assert "already at revision" in capsys.readouterr().out
    assert _cli(db, "current") == 0
    assert f"current:   revision {HEAD} (head)" in capsys.readouterr().out
    assert _cli(db, "stats") == 0
    stats = json.loads(capsys.readouterr().out)
    assert stats["engine"] == db.engine and stats["samples"] == {"total": 2, "active": 2, "queued": 1}


def test_cli_reports_a_store_of_newer_code_without_a_traceback(db, capsys):
    _written_by_newer_code(db)
    assert _cli(db, "current") == 1
    captured = capsys.readouterr()
    assert "current:   revision 0042_future" in captured.out
    assert "upgrade ssp-sam-labelstudio" in captured.err.lower() and "Traceback" not in captured.err
    assert _cli(db, "upgrade") == 1
    assert "0042_future" in capsys.readouterr().err


def test_cli_defaults_come_from_the_environment(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("MODEL_DIR", str(tmp_path / "from-env"))
    monkeypatch.delenv("DATASTORE_URL", raising=False)
    assert main(["datastore", "upgrade"]) == 0
    assert "empty (no tables yet) -> revision" in capsys.readouterr().out
    assert (tmp_path / "from-env" / "corrections.db").exists()


def test_cli_reports_an_unreachable_database_in_one_line(tmp_path, capsys):
    url = "postgresql://postgres:pw-never-shown@127.0.0.1:1/test"  # nothing listens on port 1
    assert main(["datastore", "current", "--model-dir", str(tmp_path), "--datastore-url", url]) == 1
    err = capsys.readouterr().err
    assert "cannot use the datastore" in err and "Traceback" not in err and "pw-never-shown" not in err
