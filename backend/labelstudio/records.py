"""Annotations and tasks read back from Label Studio through ``label-studio-sdk``.

Bulk webhook events (``ANNOTATIONS_CREATED``) may carry annotation ids instead of bodies, and an annotation body may
name its task by id only. The correction worker then asks Label Studio for the record, with the connection the media
fetcher already knows (environment first, then what ``/setup`` sent; the configured token never goes to a ``/setup``
host the operator did not allow, see ``MediaFetcher.connection``), legacy tokens and personal access tokens alike.
"""

from __future__ import annotations

import logging
import threading
from typing import Any, Callable, Mapping


log = logging.getLogger(__name__)

ClientFactory = Callable[[str, str], Any]


class RecordUnavailable(LookupError):
    """Label Studio cannot give this record, and asking again will not help (no connection, HTTP 4xx)."""


def sdk_client(hostname: str, token: str) -> Any:
    """label-studio-sdk's client for ``hostname`` (the token goes to that host only); a legacy token or a personal
    access token."""
    from label_studio_sdk.client import LabelStudio

    return LabelStudio(base_url=hostname, api_key=token)  # the SDK refreshes a personal access token itself


class LabelStudioRecords:
    """``fetch_annotation(id)`` / ``fetch_task(id)`` for :class:`backend.learning.corrections.WorkerConfig`.

    A missing connection or a record Label Studio does not have (HTTP 4xx) is a :class:`RecordUnavailable` (the event
    fails with that message); network errors and 5xx propagate, so the worker retries the event with backoff.
    """

    def __init__(self, media: Any, client_factory: ClientFactory | None = None) -> None:
        self.media = media                      # backend.labelstudio.media.MediaFetcher (for .connection())
        self._factory = client_factory or sdk_client
        self._clients: dict[tuple[str, str], Any] = {}
        self._lock = threading.Lock()

    def _client(self) -> Any:
        host, token = self.media.connection()
        if not host or not token:
            raise RecordUnavailable("the event names Label Studio records by id, but no Label Studio connection is known "
                                 "(set LABEL_STUDIO_URL and LABEL_STUDIO_API_KEY, or connect the backend in Label "
                                 "Studio so /setup sends them)")
        with self._lock:
            client = self._clients.get((host, token))
            if client is None:
                client = self._clients[(host, token)] = self._factory(host, token)
        return client

    def _get(self, kind: str, record_id: Any) -> Mapping:
        client = self._client()
        try:  # the SDK types annotation ids as int and task ids as str
            record = getattr(client, kind).get(id=int(record_id) if kind == "annotations" else str(record_id))
        except Exception as exc:
            status = getattr(exc, "status_code", None)
            if isinstance(status, int) and 400 <= status < 500:
                raise RecordUnavailable(f"Label Studio answered HTTP {status} for {kind[:-1]} {record_id}") from None
            raise
        data = record.model_dump() if hasattr(record, "model_dump") else record
        if not isinstance(data, Mapping):
            raise RecordUnavailable(f"Label Studio returned {type(data).__name__} for {kind[:-1]} {record_id}")
        return data

    def fetch_annotation(self, annotation_id: int) -> Mapping:
        """The annotation body (``result``, ``task``, ``completed_by``, ...) as Label Studio stores it."""
        return self._get("annotations", annotation_id)

    def fetch_task(self, task_id: int) -> Mapping:
        """The task (``id``, ``data``, ``project``, ...)."""
        return self._get("tasks", task_id)
