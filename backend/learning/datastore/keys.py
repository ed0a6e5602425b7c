"""The keys and hashes the store derives from what it is given: event de-duplication keys, sample keys, sample
content hashes; and the clean-up applied before a payload is stored (secrets dropped)."""

from __future__ import annotations

import hashlib
import json
import time
from typing import Any, Mapping


def canonical_json(obj: Any) -> str:
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), default=str)


# Redeliveries are de-duplicated within a time bucket. Annotation events are idempotent anyway (samples are keyed by
# annotation and region), so the bucket only saves work; START_TRAINING payloads carry no ids and the same click
# repeated later must count again, hence a short bucket.
DEDUP_BUCKET_S = {"START_TRAINING": 60.0}
DEFAULT_DEDUP_BUCKET_S = 86400.0


def event_dedup_key(action: str, payload: Mapping, now: float | None = None) -> str:
    """Hash of the action, the canonical payload and a time bucket: a redelivered webhook maps to the same row."""
    bucket = DEDUP_BUCKET_S.get(str(action), DEFAULT_DEDUP_BUCKET_S)
    slot = int((time.time() if now is None else now) // bucket)
    return hashlib.sha256(f"{action}\n{slot}\n{canonical_json(payload)}".encode()).hexdigest()


_SECRET_PROJECT_FIELDS = ("token", "task_data_login", "task_data_password")


def redact_payload(payload: Mapping) -> Mapping:
    """Drop secrets Label Studio puts in webhook payloads (the project's invite token, task data credentials)."""
    project = payload.get("project")
    if isinstance(project, Mapping) and any(project.get(k) for k in _SECRET_PROJECT_FIELDS):
        payload = dict(payload)
        payload["project"] = {k: v for k, v in project.items() if k not in _SECRET_PROJECT_FIELDS}
    return payload


def sample_key(annotation_id, region_id) -> str:
    return f"{int(annotation_id)}:{region_id}"


# what makes a sample "new again" when it changes (metadata such as lead_time does not)
CONTENT_FIELDS = ("sentence", "mask_blob", "image_blob", "width", "height", "origin", "model_version")


def content_hash(sample: Mapping) -> str:
    return hashlib.sha256(canonical_json({k: sample.get(k) for k in CONTENT_FIELDS}).encode()).hexdigest()[:32]
