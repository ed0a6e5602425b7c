"""What a webhook payload of a correction action must carry before ``/webhook`` queues it (docs/label-studio.md,
Events; the payloads Label Studio 1.23.2 really sends are in tests/fixtures/webhooks/).

The rules follow what the correction worker reads, so that nothing in the queue can only fail there:

* every annotation action: the annotations under ``annotations`` if that key is present, else under ``annotation``
  (the worker's order). ``ANNOTATION_CREATED``/``ANNOTATION_UPDATED``/``ANNOTATION_DELETED``: one annotation;
  the bulk ``ANNOTATIONS_CREATED``/``ANNOTATIONS_DELETED``: a non-empty list. An annotation is an object with an
  integer ``id`` (its ``result``, when present, a list; its ``task`` and ``project``, when present, ids) or the id
  itself (the worker then reads the body back from Label Studio);
* ``task``/``tasks``, when present: a task object with an integer ``id``, the id, or a list of those;
* ``project``: an object with an integer ``id``, or the id; required by ``START_TRAINING``, optional otherwise.

An id is what :func:`backend.labelstudio.protocol.as_int` accepts: a 64-bit integer (or its digits), never a
boolean, a fraction or a non-finite number. Actions outside ``CORRECTION_ACTIONS`` are not checked (they are not
queued).
"""

from __future__ import annotations

from typing import Any, Mapping

from backend.labelstudio.protocol import (ANNOTATION_DELETE_ACTIONS, ANNOTATION_UPSERT_ACTIONS, TRAINING_ACTIONS,
                                          as_int, describe_value, id_of)

BULK_ACTIONS = frozenset({"ANNOTATIONS_CREATED", "ANNOTATIONS_DELETED"})
ANNOTATION_ACTIONS = ANNOTATION_UPSERT_ACTIONS | ANNOTATION_DELETE_ACTIONS

class InvalidWebhook(ValueError):
    """A payload of a correction action that the worker could not use; the message says why."""


def validate_webhook(action: str, payload: Mapping) -> None:
    """InvalidWebhook unless ``payload`` of a correction ``action`` has what the correction worker needs."""
    _check_project(payload, required=action in TRAINING_ACTIONS, action=action)
    if action in ANNOTATION_ACTIONS:
        _check_annotations(action, payload)
        _check_tasks(payload)


def _check_project(payload: Mapping, required: bool, action: str) -> None:
    project = payload.get("project")
    if project is None:
        if required:
            raise InvalidWebhook(f"{action} needs 'project': an object with an integer 'id', or the id")
        return
    if id_of(project) is None:
        raise InvalidWebhook(f"'project' must be an object with an integer 'id', or the id; "
                             f"got {describe_value(project)}")


def _check_annotations(action: str, payload: Mapping) -> None:
    key = "annotations" if "annotations" in payload else "annotation"
    value = payload.get(key)
    if action in BULK_ACTIONS:
        if not isinstance(value, list) or not value:
            raise InvalidWebhook(f"{action} needs 'annotations' (or 'annotation'): a non-empty list of annotation "
                                 f"objects with an integer 'id', or of ids; got {describe_value(value)}")
        for i, item in enumerate(value):
            _check_annotation(item, f"{key}[{i}]")
    else:
        if value is None or isinstance(value, list):
            raise InvalidWebhook(f"{action} needs one 'annotation': an object with an integer 'id', or the id; "
                                 f"got {describe_value(value)}")
        _check_annotation(value, key)


def _check_annotation(item: Any, where: str) -> None:
    if not isinstance(item, Mapping):
        if as_int(item) is None:
            raise InvalidWebhook(f"'{where}' must be an annotation object with an integer 'id', or the id; "
                                 f"got {describe_value(item)}")
        return
    if as_int(item.get("id")) is None:
        raise InvalidWebhook(f"'{where}' must have an integer 'id'; got {describe_value(item.get('id'))}")
    if item.get("result") is not None and not isinstance(item["result"], list):
        raise InvalidWebhook(f"'{where}.result' must be a list of regions; got {describe_value(item['result'])}")
    for field in ("task", "project"):
        if item.get(field) is not None and id_of(item[field]) is None:
            raise InvalidWebhook(f"'{where}.{field}' must be an integer id or an object with an integer 'id'; "
                                 f"got {describe_value(item[field])}")


def _check_tasks(payload: Mapping) -> None:
    key = "tasks" if "tasks" in payload else "task"
    value = payload.get(key)
    if value is None:
        return
    for i, item in enumerate(value if isinstance(value, list) else [value]):
        where = f"{key}[{i}]" if isinstance(value, list) else key
        if id_of(item) is None:
            raise InvalidWebhook(f"'{where}' must be a task object with an integer 'id', or the id; "
                                 f"got {describe_value(item)}")



__all__ = ["InvalidWebhook", "validate_webhook", "BULK_ACTIONS", "ANNOTATION_ACTIONS"]
