"""Small facts of the Label Studio wire protocol shared by both sides: the webhook actions that carry corrections,
and ids as Label Studio sends them (integers, strings of digits, ``{"id": ...}`` objects, and the
``"<project>.<time>"`` strings of ``/setup`` and ``/predict``). Anything else (booleans, fractions, non-finite or
out-of-range numbers, text) is no id at all, never an exception. And the origin of a URL, which is what a Label Studio
host is compared by."""

from __future__ import annotations

import json
from typing import Any, Mapping
from urllib.parse import urlsplit

ANNOTATION_UPSERT_ACTIONS = frozenset({"ANNOTATION_CREATED", "ANNOTATIONS_CREATED", "ANNOTATION_UPDATED"})
ANNOTATION_DELETE_ACTIONS = frozenset({"ANNOTATION_DELETED", "ANNOTATIONS_DELETED"})
TRAINING_ACTIONS = frozenset({"START_TRAINING"})
CORRECTION_ACTIONS = ANNOTATION_UPSERT_ACTIONS | ANNOTATION_DELETE_ACTIONS | TRAINING_ACTIONS  # queued by /webhook

_INT64 = 2 ** 63


def as_int(value: Any) -> int | None:
    """A 64-bit integer id, or None."""
    if value is None or isinstance(value, bool):
        return None
    if isinstance(value, int):
        n = value
    elif isinstance(value, float) and value.is_integer():
        n = int(value)
    elif isinstance(value, str) and value.strip().lstrip("-").isdigit() and len(value.strip()) <= 20:
        n = int(value.strip())
    else:
        return None
    return n if -_INT64 <= n < _INT64 else None


def id_of(value: Any) -> int | None:
    """The id of an object given as ``{"id": ...}`` or as the id itself."""
    return as_int(value.get("id") if isinstance(value, Mapping) else value)


def project_id_of(project: Any) -> int | None:
    """A project as ``/setup``, ``/predict`` and webhooks name it: ``3``, ``"3"``, ``"3.1700000000"``, ``{"id": 3}``."""
    if isinstance(project, str):
        project = project.split(".", 1)[0]
    return id_of(project)


def url_origin(url: Any) -> str | None:
    """``scheme://host:port`` of an ``http(s)`` URL (lower case, the default port written out), the unit a token and
    the trust in a Label Studio host belong to; None for anything else. ``http://LS:80/x`` -> ``http://ls:80``."""
    if not isinstance(url, str):
        return None
    try:
        parts = urlsplit(url.strip())
        port = parts.port
    except ValueError:
        return None
    scheme, host = parts.scheme.lower(), parts.hostname
    if scheme not in ("http", "https") or not host:
        return None
    host = f"[{host}]" if ":" in host else host
    return f"{scheme}://{host}:{port or (443 if scheme == 'https' else 80)}"


def describe_value(value: Any) -> str:
    """A short rendering of a value a client sent, for an error message (objects and lists are not echoed)."""
    if isinstance(value, Mapping):
        return "an object" + (f" with 'id' {describe_value(value.get('id'))}" if "id" in value else " without 'id'")
    if isinstance(value, list):
        return f"a list of {len(value)}"
    text = json.dumps(value, default=str)
    return text if len(text) <= 40 else text[:37] + "..."


__all__ = ["ANNOTATION_UPSERT_ACTIONS", "ANNOTATION_DELETE_ACTIONS", "TRAINING_ACTIONS", "CORRECTION_ACTIONS",
           "as_int", "id_of", "project_id_of", "url_origin", "describe_value"]
