"""``ssp-sam datastore upgrade | current | stats``: the corrections datastore from a shell.

``upgrade`` migrates the store to head (what opening it does by default; run it before starting replicas opened
with ``migrate=False``), ``current`` prints the store's revision and this code's head, ``stats`` prints
``Datastore.stats()`` as JSON. The store is the one the backend and the trainer would open: ``--datastore-url``
(default ``$DATASTORE_URL``), else SQLite in ``--model-dir`` (default ``$MODEL_DIR``, else ``./model_dir``).
"""

from __future__ import annotations

import argparse
import json
import os
import sys

from sqlalchemy.exc import OperationalError

from backend.learning.datastore.engines import DatastoreURLError, create_store_engine
from backend.learning.datastore.factory import open_datastore, resolve
from backend.learning.datastore.migrate import DatastoreError, current_revision, refuse_unknown, upgrade


def _store_arguments() -> argparse.ArgumentParser:
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--model-dir", default=os.environ.get("MODEL_DIR") or "./model_dir",
                        help="folder of corrections.db and blobs/ (default $MODEL_DIR, else ./model_dir)")
    common.add_argument("--datastore-url", default=os.environ.get("DATASTORE_URL") or None,
                        help="postgresql://... or sqlite:///path.db (default $DATASTORE_URL, else SQLite in "
                             "--model-dir)")
    return common


def register_cli(subparsers) -> None:
    p = subparsers.add_parser("datastore", help="migrate or inspect the corrections datastore",
                              description=__doc__.splitlines()[0])
    sub = p.add_subparsers(dest="datastore_command", required=True, metavar="ACTION")
    common = _store_arguments()
    for name, func, text in (("upgrade", _upgrade, "migrate the store to the newest schema"),
                             ("current", _current, "print the store's schema revision and this code's head"),
                             ("stats", _stats, "print the store's statistics as JSON")):
        sub.add_parser(name, parents=[common], help=text, description=text).set_defaults(func=_guarded(func))


def _guarded(func):
    """Report datastore errors as one clear line on stderr (exit 1) instead of a traceback."""
    def run(args: argparse.Namespace) -> int:
        try:
            return func(args)
        except (DatastoreError, DatastoreURLError) as exc:
            print(f"ssp-sam datastore {args.datastore_command}: {exc}", file=sys.stderr)
        except OperationalError as exc:  # the database is not reachable (the driver's message has no password)
            reason = str(exc.orig).strip().splitlines()[0] if str(exc.orig).strip() else type(exc.orig).__name__
            print(f"ssp-sam datastore {args.datastore_command}: cannot use the datastore: {reason}", file=sys.stderr)
        return 1
    return run


def _engine(args: argparse.Namespace):
    target, _ = resolve(args.datastore_url, args.model_dir)
    return target, create_store_engine(target)


def _upgrade(args: argparse.Namespace) -> int:
    target, engine = _engine(args)
    try:
        before, after = upgrade(engine, target.schema, target.display())
    finally:
        engine.dispose()
    if before.at_head:
        print(f"{target.display()}: already at revision {after.current} (head)")
    else:
        print(f"{target.display()}: {before.describe()} -> revision {after.current} (head)")
    return 0


def _current(args: argparse.Namespace) -> int:
    target, engine = _engine(args)
    try:
        revision = current_revision(engine, target.schema)
    finally:
        engine.dispose()
    print(f"datastore: {target.display()}")
    print(f"current:   {revision.describe()}{' (head)' if revision.at_head else ''}")
    print(f"head:      revision {revision.head}")
    refuse_unknown(revision, target.display())
    return 0


def _stats(args: argparse.Namespace) -> int:
    with open_datastore(args.datastore_url, args.model_dir, migrate=False) as store:
        print(json.dumps(store.stats(), indent=2, sort_keys=True, default=str))
    return 0
