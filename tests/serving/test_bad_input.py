"""Hostile and malformed request bodies: every one gets a 4xx with ``{"status": code, "error": "<clear message>"}``,
never a 500 or a traceback, and no invalid webhook payload reaches the corrections queue."""

from __future__ import annotations

import json

import pytest

from tests.serving.test_api import predict_body, webhook_payload

DEEP = b"[" * 100_000


def _post_raw(client, path, body: bytes):
    return client.post(path, data=body, content_type="application/json")


def _assert_clear_4xx(r, status=400, fragment=None):
    assert r.status_code == status, r.get_data(as_text=True)[:300]
    body = r.get_json()
    assert set(body) == {"status", "error"} and body["status"] == status
    assert "Traceback" not in body["error"] and "internal error" not in body["error"]
    if fragment is not None:
        assert fragment in body["error"], body["error"]
    return body["error"]


def _short(raw: bytes, n: int = 90) -> str:
    text = raw.decode("utf-8", "backslashreplace")
    return text if len(text) <= n else f"{text[:n]}... ({len(raw)} bytes)"


# ---------------------------------------------------------------------- JSON itself
BAD_JSON = [
    ("nesting 100000 deep", DEEP, "nested"),
    ("object nested 200 deep", b'{"action": "ANNOTATION_CREATED", "annotation": {"id": 1, "result": '
     + b"[" * 200 + b"]" * 200 + b"}}", "nested"),
    ("NaN literal", b'{"action": "START_TRAINING", "project": NaN}', "NaN"),
    ("Infinity literal", b'{"action": "START_TRAINING", "project": {"id": -Infinity}}', "Infinity"),
    ("number overflowing a double", b'{"action": "START_TRAINING", "project": {"id": 1, "x": 1e400}}', "1e400"),
    ("integer with 5000 digits", b'{"action": "START_TRAINING", "project": ' + b"9" * 5000 + b"}", "digits"),
    ("not UTF-8", b'{"action": "\xff\xfe"}', "UTF-8"),
    ("lone surrogate in a value", b'{"action": "START_TRAINING", "project": {"id": 1, "t": "\\ud800"}}', "Unicode"),
    ("lone surrogate in a key", b'{"\\udfff": 1, "action": "START_TRAINING", "project": 1}', "Unicode"),
    ("syntax error", b'{"action": "START_TRAINING",, }', "not valid JSON"),
    ("truncated", b'{"action": "START_TRA', "not valid JSON"),
    ("empty body", b"", "empty"),
    ("top-level array", b"[1, 2]", "JSON object"),
    ("top-level string", b'"x"', "JSON object"),
]


@pytest.mark.reliability
@pytest.mark.parametrize("path", ["/predict", "/webhook", "/setup"])
@pytest.mark.parametrize("case,raw,fragment", BAD_JSON, ids=[c[0] for c in BAD_JSON])
def test_malformed_json_is_a_clear_400(client, store, reliability, path, case, raw, fragment):
    error = _assert_clear_4xx(_post_raw(client, path, raw), 400, fragment)
    assert store.events == []
    reliability("Malformed bodies", f"{path}: {case}", _short(raw), f"400 {error!r}")


# ---------------------------------------------------------------------- ids on /setup and /predict
BAD_IDS = [("project 1e308 (finite, out of 64 bits)", {"project": 1e308}, "'project'"),
           ("project {id: 10**30}", {"project": {"id": 10**30}}, "'project'"),
           ("project true", {"project": True}, "'project'"),
           ("project 'abc'", {"project": "abc"}, "'project'"),
           ("project 1.5", {"project": 1.5}, "'project'")]


@pytest.mark.reliability
@pytest.mark.parametrize("case,fields,fragment", BAD_IDS, ids=[c[0] for c in BAD_IDS])
def test_setup_and_predict_refuse_ids_that_are_no_ids(client, reliability, case, fields, fragment):
    for path, body in (("/setup", {"project": "1.1", **fields}), ("/predict", {**predict_body([]), **fields})):
        error = _assert_clear_4xx(client.post(path, json=body), 400, fragment)
        reliability("Request ids", f"{path}: {case}", json.dumps(fields), f"400 {error!r}")


@pytest.mark.reliability
@pytest.mark.parametrize("task,fragment", [({"id": 10**30, "data": {}}, "tasks[1].id"),
                                           ({"id": 2.5, "data": {}}, "tasks[1].id"),
                                           ({"id": 1, "project": {"id": -2**64}, "data": {}}, "tasks[1].project")])
def test_predict_refuses_task_ids_that_are_no_ids(client, reliability, task, fragment):
    body = predict_body([{"id": 1, "data": {}}, task])
    error = _assert_clear_4xx(client.post("/predict", json=body), 400, fragment)
    reliability("Request ids", f"/predict: {fragment} = {json.dumps(task)[:60]}", "a task list with one bad id",
                f"400 {error!r}")


def test_valid_id_forms_are_still_accepted(client):
    for project in ("1.1700000000", 3, "3", {"id": 3}, None):
        assert client.post("/setup", json={"project": project}).status_code == 200, project
        assert client.post("/predict", json={**predict_body([]), "project": project}).status_code == 200, project


# ---------------------------------------------------------------------- /webhook: validated before the queue
def _ann(action, **fields):
    payload = webhook_payload(action)
    payload.update(fields)
    return payload


def _without(payload, key):
    return {k: v for k, v in payload.items() if k != key}


CREATED = webhook_payload("ANNOTATION_CREATED")
INVALID_WEBHOOKS = [
    ("no annotation", _without(CREATED, "annotation"), "'annotation'"),
    ("annotation is a string", _ann("ANNOTATION_CREATED", annotation="seven"), "'annotation'"),
    ("annotation without id", _ann("ANNOTATION_CREATED", annotation={"result": []}), "'annotation'"),
    ("annotation id 1.5", _ann("ANNOTATION_CREATED", annotation={"id": 1.5}), "'annotation'"),
    ("annotation id true", _ann("ANNOTATION_UPDATED", annotation={"id": True}), "'annotation'"),
    ("annotation id 10**30", _ann("ANNOTATION_DELETED", annotation={"id": 10**30}), "'annotation'"),
    ("annotation id -2**63-1", _ann("ANNOTATION_CREATED", annotation={"id": -2**63 - 1}), "'annotation'"),
    ("annotation a list on a single-annotation action", _ann("ANNOTATION_CREATED", annotation=[{"id": 1}]),
     "'annotation'"),
    ("annotation.result not a list", _ann("ANNOTATION_CREATED", annotation={"id": 1, "result": "x"}),
     "annotation.result"),
    ("annotation.task 1e30", _ann("ANNOTATION_CREATED", annotation={"id": 1, "task": 1e30}), "annotation.task"),
    ("annotation.project 'p'", _ann("ANNOTATION_CREATED", annotation={"id": 1, "project": "p"}),
     "annotation.project"),
    ("bulk: empty list", _ann("ANNOTATIONS_CREATED", annotations=[]), "'annotations'"),
    ("bulk: not a list", _ann("ANNOTATIONS_DELETED", annotations={"id": 1}), "'annotations'"),
    ("bulk: one bad item", _ann("ANNOTATIONS_DELETED", annotations=[{"id": 1}, "x"]), "'annotations[1]'"),
    ("bulk: no annotations at all", _without(webhook_payload("ANNOTATIONS_DELETED"), "annotations"),
     "'annotations'"),
    ("project a string", _ann("ANNOTATION_CREATED", project="p"), "'project'"),
    ("project object without id", _ann("ANNOTATION_CREATED", project={"title": "p"}), "'project'"),
    ("project id 2**63", _ann("ANNOTATION_CREATED", project={"id": 2**63}), "'project'"),
    ("START_TRAINING without project", {"action": "START_TRAINING"}, "'project'"),
    ("START_TRAINING project null", {"action": "START_TRAINING", "project": None}, "'project'"),
    ("task a string", _ann("ANNOTATION_CREATED", task="t"), "'task'"),
    ("tasks with a bad id", _ann("ANNOTATIONS_CREATED", tasks=[{"id": "x"}]), "'tasks[0]'"),
    ("action a number", {"action": 5, "project": {"id": 1}}, "'action'"),
    ("no action", {"project": {"id": 1}}, "'action'"),
]


@pytest.mark.reliability
@pytest.mark.parametrize("case,payload,fragment", INVALID_WEBHOOKS, ids=[c[0] for c in INVALID_WEBHOOKS])
def test_invalid_webhook_payloads_never_reach_the_queue(client, store, reliability, case, payload, fragment):
    error = _assert_clear_4xx(client.post("/webhook", json=payload), 400, fragment)
    assert store.events == []
    reliability("Webhook validation", f"{payload.get('action')}: {case}", json.dumps(payload)[:120],
                f"400 {error!r}, nothing queued")


VALID_WEBHOOKS = [
    ("annotation as an id only", _ann("ANNOTATION_CREATED", annotation=7)),
    ("annotation id as digits", _ann("ANNOTATION_UPDATED", annotation={"id": "7", "result": []})),
    ("no project", _without(CREATED, "project")),
    ("project as an id", _ann("ANNOTATION_CREATED", project=1)),
    ("bulk created under 'annotation'", _ann("ANNOTATIONS_CREATED", annotation=[{"id": 1, "result": []}, 2])),
    ("bulk deleted ids only", _ann("ANNOTATIONS_DELETED", annotations=[1, 2])),
    ("task as an id", _ann("ANNOTATION_CREATED", task=3)),
    ("START_TRAINING project id", {"action": "START_TRAINING", "project": 5}),
]


@pytest.mark.parametrize("case,payload", VALID_WEBHOOKS, ids=[c[0] for c in VALID_WEBHOOKS])
def test_valid_webhook_shapes_are_queued(client, store, case, payload):
    r = client.post("/webhook", json=payload)
    assert r.status_code == 201, r.get_json()
    assert store.events == [(payload["action"], payload)]


def test_unknown_actions_are_not_validated_nor_stored(client, store):
    r = client.post("/webhook", json={"action": "TASKS_DELETED", "project": "not an id", "tasks": "x"})
    assert r.status_code == 200 and r.get_json() == {"status": "Unknown event"}
    assert store.events == []


@pytest.mark.reliability
def test_a_failing_datastore_insert_is_a_503_not_a_500(client, store, monkeypatch, reliability):
    def broken(action, payload):
        raise RuntimeError("disk I/O error at /var/lib/secret.db")
    monkeypatch.setattr(store, "enqueue_event", broken)
    r = client.post("/webhook", json=CREATED)
    error = _assert_clear_4xx(r, 503, "not recorded")
    assert "/var/lib" not in error
    reliability("Webhook validation", "the datastore insert raises", "a valid ANNOTATION_CREATED",
                f"503 {error!r}")


def test_label_config_deeper_than_the_xml_parser_allows_is_a_400(client):
    deep = "<View>" * 5000 + "</View>" * 5000
    _assert_clear_4xx(client.post("/predict", json=predict_body([], label_config=deep)), 400, "labeling config")
    _assert_clear_4xx(client.post("/setup", json={"project": "1.1", "schema": deep}), 400, "labeling config")


def test_error_messages_are_json_even_for_non_json_content_types(client):
    r = client.post("/webhook", data=b"action=START_TRAINING", content_type="application/x-www-form-urlencoded")
    _assert_clear_4xx(r, 400, "not valid JSON")


XML_ATTACKS = [
    ("external entity (XXE) naming a local file",
     '<?xml version="1.0"?><!DOCTYPE View [<!ENTITY xxe SYSTEM "file:///etc/hostname">]><View>'
     '<Image name="image" value="$image"/><BrushLabels name="tag" toName="image"><Label value="&xxe;"/>'
     '</BrushLabels></View>'),
    ("entity expansion (billion laughs)",
     '<?xml version="1.0"?><!DOCTYPE l [<!ENTITY a "aaaaaaaaaa">' + "".join(
         f'<!ENTITY {chr(98 + i)} "' + f"&{chr(97 + i)};" * 10 + '">' for i in range(8)) +
     ']><View><Image name="image" value="$image"/><BrushLabels name="tag" toName="image"><Label value="&i;"/>'
     '</BrushLabels></View>'),
    ("a lone surrogate", '<View><Image name="image" value="$image"/><BrushLabels name="tag" toName="image">'
                         '<Label value="\ud800"/></BrushLabels></View>'),
]


@pytest.mark.reliability
@pytest.mark.parametrize("case,config", XML_ATTACKS, ids=[c[0] for c in XML_ATTACKS])
def test_hostile_label_configs_are_refused(client, reliability, case, config):
    from backend.labelstudio.label_config import LabelConfigError, parse_label_config

    for path, body in (("/setup", {"project": "1.1", "schema": config}),
                       ("/predict", predict_body([], label_config=config))):
        error = _assert_clear_4xx(client.post(path, json=body), 400)
        reliability("Labeling configs", f"{path}: {case}", _short(config.encode("utf-8", "surrogatepass"), 60),
                    f"400 {error!r}")
    with pytest.raises(LabelConfigError):        # the parser itself refuses it, whoever calls it (the worker too)
        parse_label_config(config)
