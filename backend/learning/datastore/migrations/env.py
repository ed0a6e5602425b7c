"""Alembic environment of the corrections datastore.

Run from code only (``backend.learning.datastore.migrate``): the caller hands over an open connection, already inside
its transaction and under its migration lock, and the PostgreSQL schema (None for SQLite or the default schema).

PostgreSQL schemas follow Alembic's cookbook for schema-level multi-tenancy: the connection's ``search_path`` names
the schema (the store's engine sets it on every connection), so the scripts' unqualified DDL lands there; the dialect's
default schema is set to it for reflection, and ``alembic_version`` lives in that schema too.
"""

from alembic import context

from backend.learning.datastore.schema import metadata

config = context.config
connection = config.attributes.get("connection")
if context.is_offline_mode() or connection is None:
    raise RuntimeError("the datastore's migrations run from code on an open connection: use `ssp-sam datastore "
                       "upgrade` or backend.learning.datastore.migrate.upgrade()")

schema = config.attributes.get("schema")
if schema:
    connection.dialect.default_schema_name = schema

context.configure(connection=connection, target_metadata=metadata, version_table_schema=schema)

with context.begin_transaction():
    context.run_migrations()
