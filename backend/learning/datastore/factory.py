"""``open_datastore``: from a URL or a config to a store whose schema is at head."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Mapping

from backend.learning.blobs import BlobStore
from backend.learning.datastore.engines import Target, create_store_engine, resolve_target
from backend.learning.datastore.migrate import require_head, upgrade
from backend.learning.datastore.store import Datastore


def _cfg_get(cfg: Any, *names: str, default=None):
    for n in names:
        if isinstance(cfg, Mapping):
            if cfg.get(n) is not None:
                return cfg[n]
        elif getattr(cfg, n, None) is not None:
            return getattr(cfg, n)
    return default


def resolve(config_or_url: Any = None, model_dir: str | os.PathLike | None = None,
            schema: str | None = None) -> tuple[Target, Path]:
    """The store's target and model folder from the arguments of :func:`open_datastore`."""
    url = None
    if isinstance(config_or_url, (str, os.PathLike)):
        url = str(config_or_url)
    elif config_or_url is not None:
        url = _cfg_get(config_or_url, "datastore_url", "DATASTORE_URL")
        if model_dir is None:
            model_dir = _cfg_get(config_or_url, "model_dir", "MODEL_DIR")
    url = url or os.environ.get("DATASTORE_URL") or None
    model_dir = Path(model_dir if model_dir is not None else os.environ.get("MODEL_DIR") or "./model_dir")
    return resolve_target(url, model_dir, schema), model_dir


def open_datastore(config_or_url: Any = None, model_dir: str | os.PathLike | None = None, *,
                   schema: str | None = None, migrate: bool = True, blobs: BlobStore | None = None,
                   **engine_options) -> Datastore:
    """Open the corrections datastore, migrated to the schema's head.

    ``config_or_url``: a URL string (``postgresql://...``, ``postgres://...``, ``postgresql+psycopg://...``,
    ``sqlite:///path.db``, a bare ``.db`` path), a config object or mapping with ``datastore_url`` / ``model_dir``,
    or None (``$DATASTORE_URL``, else SQLite ``MODEL_DIR/corrections.db``). ``model_dir`` (default ``$MODEL_DIR``,
    else ``./model_dir``) holds ``corrections.db`` and ``blobs/``. ``schema`` (or ``?schema=name`` in the URL): the
    PostgreSQL schema of the tables, created if needed.

    ``migrate=False``: do not change the schema; raise :class:`DatastoreNotAtHead` (naming ``ssp-sam datastore
    upgrade``) unless the store is at head. Either way a store migrated by newer code raises
    :class:`DatastoreTooNew`. ``engine_options``: ``busy_timeout_s`` and ``synchronous`` (SQLite),
    ``connect_timeout`` (PostgreSQL).
    """
    target, model_dir = resolve(config_or_url, model_dir, schema)
    engine = create_store_engine(target, **engine_options)
    try:
        if migrate:
            upgrade(engine, target.schema, target.display())
        else:
            require_head(engine, target.schema, target.display())
    except BaseException:
        engine.dispose()
        raise
    return Datastore(engine, model_dir, schema=target.schema, path=target.path, where=target.display(), blobs=blobs)

