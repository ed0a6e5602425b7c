"""The corrections datastore: the contract between the serving side (webhook inbox, recorded predictions) and the
learning side (correction worker, fine-tuning trainer).

One store, two engines, one set of SQLAlchemy Core statements:

* SQLite (default): ``MODEL_DIR/corrections.db``, WAL journal, ``synchronous=FULL``, busy timeout, ``BEGIN
  IMMEDIATE`` write transactions; several processes (gunicorn workers, the trainer) share the file.
* PostgreSQL when ``DATASTORE_URL=postgresql://...`` (psycopg 3); ``?schema=name`` (or ``schema=``) puts every table
  in that schema. Event and sample claims use ``FOR UPDATE SKIP LOCKED``; sample claims and migrations also take
  advisory locks.

The schema is versioned with Alembic (scripts in ``migrations/``): :func:`open_datastore` migrates the store to head
(``migrate=False``: raise unless it is at head); ``ssp-sam datastore upgrade | current | stats`` does the same from a
shell. Blobs (image snapshots, masks) live in the content-addressed :class:`backend.learning.blobs.BlobStore` under
``MODEL_DIR/blobs``; rows only hold their SHA-256.

Modules: ``schema`` (the tables), ``store`` (:class:`Datastore`: every query), ``engines`` (URLs, engines, what differs
between SQLite and PostgreSQL), ``migrate`` (Alembic from code), ``keys`` (dedup keys, sample keys, content hashes),
``factory`` (:func:`open_datastore`), ``cli`` (``ssp-sam datastore``). Tables: see docs/corrections.md.
"""

from backend.learning.datastore.engines import DatastoreURLError
from backend.learning.datastore.factory import open_datastore
from backend.labelstudio.protocol import as_int
from backend.learning.datastore.keys import canonical_json, event_dedup_key, redact_payload, sample_key
from backend.learning.datastore.migrate import DatastoreError, DatastoreNotAtHead, DatastoreTooNew
from backend.learning.datastore.schema import (EVENT_DONE, EVENT_FAILED, EVENT_IGNORED, EVENT_PENDING,
                                               EVENT_PROCESSING, ORIGINS)
from backend.learning.datastore.store import Claim, ClaimLost, Datastore

__all__ = ["open_datastore", "Datastore", "Claim", "ClaimLost", "DatastoreError", "DatastoreNotAtHead",
           "DatastoreTooNew", "DatastoreURLError", "as_int", "canonical_json", "event_dedup_key", "redact_payload",
           "sample_key", "ORIGINS", "EVENT_PENDING", "EVENT_PROCESSING", "EVENT_DONE", "EVENT_FAILED",
           "EVENT_IGNORED"]
