"""The PostgreSQL server of the datastore tests: where it is, whether it answers, and throw-away schemas.

``$TEST_POSTGRES_URL`` (default ``postgresql://postgres@127.0.0.1:5432/test``). When the server does not answer, the
PostgreSQL tests skip with the reason, except when ``$CI`` is set (CI runs with ``CI=true``): then they fail, so a
CI run without its database cannot pass quietly.
"""

from __future__ import annotations

import functools
import os
import uuid

import pytest

DEFAULT_URL = "postgresql://postgres@127.0.0.1:5432/test"


def postgres_url() -> str:
    return os.environ.get("TEST_POSTGRES_URL") or DEFAULT_URL


@functools.lru_cache(maxsize=None)
def unreachable_reason(url: str) -> str | None:
    """None when the server answers, else why not (the driver's message, which never carries the password)."""
    import psycopg

    try:
        with psycopg.connect(url, connect_timeout=3):
            return None
    except Exception as exc:  # any failure to connect means "not reachable" for the tests
        return f"{type(exc).__name__}: {str(exc).strip().splitlines()[0] if str(exc).strip() else ''}"


def require_postgres() -> str:
    """The server's URL; skips the test (fails it when ``$CI`` is set) when the server does not answer."""
    url = postgres_url()
    reason = unreachable_reason(url)
    if reason is not None:
        if os.environ.get("CI"):
            pytest.fail(f"PostgreSQL is unreachable and CI is set: {reason}", pytrace=False)
        pytest.skip(f"PostgreSQL is unreachable ({reason}); with CI set this fails instead")
    return url


def new_schema_name() -> str:
    return f"t_{uuid.uuid4().hex[:12]}"


def drop_schema(url: str, schema: str) -> None:
    import psycopg
    from psycopg import sql

    with psycopg.connect(url, autocommit=True) as conn:
        conn.execute(sql.SQL("DROP SCHEMA IF EXISTS {} CASCADE").format(sql.Identifier(schema)))


def run_sql_in_schema(url: str, schema: str, script: str) -> None:
    """Run a SQL script with ``schema`` (created if needed) as the only schema on the search path."""
    import psycopg
    from psycopg import sql

    with psycopg.connect(url, autocommit=True) as conn:
        conn.execute(sql.SQL("CREATE SCHEMA IF NOT EXISTS {}").format(sql.Identifier(schema)))
        conn.execute(sql.SQL("SET search_path TO {}").format(sql.Identifier(schema)))
        with conn.transaction():
            conn.execute(script)
