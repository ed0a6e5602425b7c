"""Property-based fuzzing (Hypothesis) of what clients send: ``/predict`` and ``/webhook`` bodies, labeling configs
through ``/setup`` and ``/predict``, and raw bytes. JSON is built from strategies that mix valid shapes with hostile
values (deep nesting, huge and non-finite numbers, wrong types, unicode, control characters, long strings).

Properties, for every example: never a 5xx, never a traceback or a file path of this machine in the response, every
4xx is JSON ``{"status": <code>, "error": <message>}``, and the queue only grows by the one event of a ``201``.

Bounded (``max_examples``), deterministic (``derandomize=True``, no example database) and a few seconds each.
"""

from __future__ import annotations

import copy
import json
import os
import tempfile
from collections import Counter
from pathlib import Path

import pytest
import requests_mock
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from backend.labelstudio.protocol import CORRECTION_ACTIONS, TRAINING_ACTIONS, id_of
from backend.serving.app import create_app
from tests.fakes import (INTERACTIVE_CONFIG, LABEL_CONFIG, LS_URL, FakePredictor, FakeStore, keypoint_item,
                         make_config, png_bytes, rectangle_item, textarea_item)

ROOT = Path(__file__).resolve().parents[2]
FUZZ = settings(max_examples=400, deadline=None, derandomize=True, database=None, print_blob=True,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large,
                                       HealthCheck.large_base_example])
IMAGE_URL = "/data/upload/1/fuzz.png"

# ---------------------------------------------------------------------- hostile values
CONTROL = "".join(map(chr, range(0, 32))) + "\x7f\u2028\u2029\u202e\ufeff"
HOSTILE_STRINGS = st.sampled_from([
    "", " ", "\x00", "\ud800", "\udfff", "../../../../etc/passwd", "file:///etc/passwd", "/data/local-files/?d=../../x",
    "s3://bucket/../key", "http://169.254.169.254/latest", "<script>alert(1)</script>", "' OR 1=1 --", "%s%n%x",
    "1.1700000000", "9" * 30, "-1", "NaN", "Infinity", "\u0661\u0662", "１２",
]) | st.integers(10_000, 300_000).map(lambda n: "\u00e9" * n)      # long strings, bounded
TEXT = st.text(alphabet=st.characters(codec="utf-8") | st.sampled_from(CONTROL), max_size=40)
NUMBERS = st.one_of(st.integers(-2**70, 2**70), st.sampled_from([2**63, -2**63 - 1, 10**30, 2**64, 0, -1]),
                    st.floats(allow_nan=True, allow_infinity=True), st.sampled_from([1e308, -0.0, 1.5, 7.0]))
SCALARS = st.one_of(st.none(), st.booleans(), NUMBERS, TEXT, HOSTILE_STRINGS)


def _nest(depth: int, as_object: bool):
    value: object = 1
    for _ in range(depth):
        value = {"a": value} if as_object else [value]
    return value


DEEP = st.builds(_nest, st.integers(1, 200), st.booleans())
TREES = st.recursive(SCALARS, lambda kids: st.lists(kids, max_size=4) | st.dictionaries(TEXT, kids, max_size=4),
                     max_leaves=12)
JSON_VALUES = st.one_of(TREES, DEEP)


@st.composite
def spoiled(draw, valid):
    """A valid body with none, one or two of its values (at any depth) replaced by a hostile one or removed."""
    body = copy.deepcopy(draw(valid))
    for _ in range(draw(st.sampled_from([0, 1, 1, 2]))):
        body = _spoil(draw, body)
    return body


def _spoil(draw, node):
    if isinstance(node, (dict, list)) and node and draw(st.booleans()):
        key = draw(st.sampled_from(list(node) if isinstance(node, dict) else list(range(len(node)))))
        if isinstance(node, dict) and draw(st.integers(0, 3)) == 0:
            del node[key]
        else:
            node[key] = _spoil(draw, node[key])
        return node
    return draw(JSON_VALUES)


# ---------------------------------------------------------------------- valid shapes
IDS = st.one_of(st.integers(1, 10**6), st.integers(1, 10**6).map(str))
PROJECTS = st.one_of(IDS, IDS.map(lambda i: {"id": i}), st.just("1.1700000000"))
SENTENCES = st.one_of(TEXT, st.lists(TEXT, max_size=3), st.sampled_from(["a circle", "the thing on the left"]))

# ---------------------------------------------------------------------- labeling configs
LABEL_VALUES = st.one_of(st.sampled_from(["object", "circle", "a b"]), TEXT, SCALARS)
ATTRS = st.sampled_from(['predicted_values="the cat, a kitten"', 'hint="on the left"', "", 'value="$x"'])


def _xml_attr(value) -> str:
    text = value if isinstance(value, str) else json.dumps(value)
    return text.replace("&", "&amp;").replace('"', "&quot;").replace("<", "&lt;")


@st.composite
def label_configs(draw):
    kind = draw(st.sampled_from(["valid", "labels", "mangled", "deep", "text", "entity"]))
    if kind == "valid":
        return LABEL_CONFIG
    if kind == "labels":
        labels = draw(st.lists(LABEL_VALUES, max_size=4))
        image_value = draw(st.sampled_from(["$image", "$", "image", "$$", "$" + "i" * 300]))
        body = "".join(f'<Label value="{_xml_attr(v)}" {draw(ATTRS)}/>' for v in labels)
        return (f'<View><Image name="image" value="{image_value}"/><TextArea name="p" toName="image"/>'
                f'<BrushLabels name="tag" toName="{draw(st.sampled_from(["image", "nope", ""]))}">{body}'
                f'</BrushLabels></View>')
    if kind == "mangled":
        cut = draw(st.integers(0, len(LABEL_CONFIG)))
        return LABEL_CONFIG[:cut] + draw(TEXT) + LABEL_CONFIG[cut:]
    if kind == "deep":
        n = draw(st.integers(1, 3000))
        return "<View>" * n + "</View>" * n
    if kind == "entity":
        return ('<?xml version="1.0"?><!DOCTYPE v [<!ENTITY e SYSTEM "file:///etc/hostname">'
                '<!ENTITY a "aaaaaaaaaa"><!ENTITY b "&a;&a;&a;&a;&a;&a;&a;&a;&a;&a;">]>'
                '<View><Image name="image" value="$image"/><BrushLabels name="tag" toName="image">'
                f'<Label value="{draw(st.sampled_from(["&e;", "&b;", "x"]))}"/></BrushLabels></View>')
    return draw(st.one_of(TEXT, HOSTILE_STRINGS))


# ---------------------------------------------------------------------- bodies
TASKS = st.fixed_dictionaries({"id": IDS, "data": st.fixed_dictionaries(
    {"image": st.sampled_from([IMAGE_URL, "/data/upload/1/none.png"]), "text": SENTENCES})},
    optional={"project": PROJECTS})
CONTEXTS = st.one_of(st.none(), st.fixed_dictionaries({"result": st.lists(st.fixed_dictionaries(
    {"type": st.just("textarea"), "from_name": st.just("prompt"), "to_name": st.just("image"),
     "value": st.fixed_dictionaries({"text": st.lists(TEXT, min_size=1, max_size=2)})}), max_size=2)}))
PREDICT_BODIES = spoiled(st.fixed_dictionaries(
    {"tasks": st.lists(TASKS, max_size=3), "label_config": st.one_of(st.just(LABEL_CONFIG), label_configs()),
     "project": PROJECTS, "params": st.fixed_dictionaries({"login": st.none(), "context": CONTEXTS})}))

# interactive calls of the README's "interactive correction" config: smart clicks and boxes (and a sentence) as the
# editor sends them, in % of the 32 x 24 picture, then spoiled at any depth
PERCENT = st.one_of(st.floats(0, 100), st.sampled_from([0, 100, 50]))
PROMPT_ITEMS = st.one_of(
    st.builds(lambda x, y, pos, i: keypoint_item(x, y, pos, w=32, h=24, rid=f"k{i}"), PERCENT, PERCENT,
              st.booleans(), st.integers(0, 3)),
    st.builds(lambda x, y, bw, bh, r: rectangle_item(x, y, bw, bh, w=32, h=24, rotation=r), PERCENT, PERCENT,
              PERCENT, PERCENT, st.sampled_from([0, 0, 30, 90])),
    st.builds(textarea_item, st.sampled_from(["a circle", "the thing on the left", "nothing"])))
INTERACTIVE_BODIES = spoiled(st.fixed_dictionaries(
    {"tasks": st.lists(TASKS, min_size=1, max_size=1), "label_config": st.just(INTERACTIVE_CONFIG),
     "project": st.just("1.1700000000"),
     "params": st.fixed_dictionaries({"context": st.fixed_dictionaries(
         {"result": st.lists(PROMPT_ITEMS, min_size=1, max_size=4)})})}))

ANNOTATIONS = st.one_of(IDS, st.fixed_dictionaries({"id": IDS}, optional={
    "result": st.lists(JSON_VALUES, max_size=2), "task": IDS, "project": IDS, "lead_time": NUMBERS}))
TASK_REFS = st.one_of(IDS, st.fixed_dictionaries({"id": IDS}, optional={"data": st.dictionaries(TEXT, TEXT)}))
SINGLE = st.sampled_from(["ANNOTATION_CREATED", "ANNOTATION_UPDATED", "ANNOTATION_DELETED"])
BULK = st.sampled_from(["ANNOTATIONS_CREATED", "ANNOTATIONS_DELETED"])
WEBHOOK_BODIES = spoiled(st.one_of(
    st.fixed_dictionaries({"action": SINGLE, "annotation": ANNOTATIONS}, optional={
        "project": PROJECTS.filter(lambda p: p != "1.1700000000"), "task": TASK_REFS}),
    st.builds(lambda action, key, items, rest: {"action": action, key: items, **rest}, BULK,
              st.sampled_from(["annotations", "annotation"]), st.lists(ANNOTATIONS, min_size=1, max_size=3),
              st.fixed_dictionaries({}, optional={"project": PROJECTS, "tasks": st.lists(TASK_REFS, max_size=2)})),
    st.fixed_dictionaries({"action": st.just("START_TRAINING"), "project": IDS.map(lambda i: {"id": i})}),
    st.fixed_dictionaries({"action": st.sampled_from(["TASKS_CREATED", "PROJECT_UPDATED", ""])},
                          optional={"project": JSON_VALUES, "tasks": JSON_VALUES})))
SETUP_BODIES = spoiled(st.fixed_dictionaries({"project": PROJECTS}, optional={"schema": label_configs()}))


def encode(body, ascii_only: bool = True) -> bytes:
    """JSON as a client could send it: Python's encoder writes NaN/Infinity too; without ``ascii_only`` a lone
    surrogate goes out as the invalid UTF-8 a careless client would send."""
    return json.dumps(body, allow_nan=True, ensure_ascii=ascii_only).encode("utf-8", "surrogatepass")


def as_bytes(strategy):
    """The bodies of ``strategy`` encoded, escaped to ASCII or not."""
    return st.builds(encode, strategy, st.booleans())


RAW_BYTES = st.one_of(st.binary(max_size=300), st.sampled_from([b"[" * 100_000, b"{" * 5000, b'{"a":' * 3000,
                                                                b"\xef\xbb\xbf{}", b"\x00", b"1e400", b'"\\ud800"']),
                      st.builds(lambda a, b: a + b, as_bytes(PREDICT_BODIES), st.binary(max_size=20)))


# ---------------------------------------------------------------------- the checks
@pytest.fixture(scope="module")
def fuzz_app():
    """One app for every example (a fresh one per example would make the run minutes long)."""
    tmp = Path(tempfile.mkdtemp(prefix="ssp-fuzz-"))
    store = FakeStore()
    app = create_app(make_config(tmp), predictor_factory=lambda c, k: FakePredictor(),
                     store_factory=lambda c: store, start_worker=False)
    with requests_mock.Mocker() as mock:       # media never leaves the process: unknown URLs fail as a task error
        mock.get(f"{LS_URL}/storage-data/uploaded/?filepath=upload/1/fuzz.png", content=png_bytes(32, 24))
        yield app.test_client(), store, tmp


def check_response(r, tmp: Path) -> int:
    text = r.get_data(as_text=True)
    assert r.status_code < 500, text[:500]
    assert "Traceback" not in text and 'File "' not in text
    home = os.path.expanduser("~")
    for path in (str(ROOT), str(tmp), "site-packages", *([home] if len(home) > 1 else [])):
        assert path not in text, (path, text[:500])
    body = json.loads(text)                      # every answer is JSON
    if r.status_code >= 400:
        assert set(body) == {"status", "error"} and body["status"] == r.status_code, body
        assert isinstance(body["error"], str) and body["error"]
    return r.status_code


def check_queue(store: FakeStore, before: int, status: int) -> None:
    """Only a 201 adds one event, and what it added is something the correction worker can use."""
    assert len(store.events) == before + (1 if status == 201 else 0)
    if status != 201:
        return
    action, payload = store.events[-1]
    assert action in CORRECTION_ACTIONS
    if action in TRAINING_ACTIONS:
        assert id_of(payload.get("project")) is not None
        return
    items = payload.get("annotations", payload.get("annotation"))       # as the worker reads them
    items = items if isinstance(items, list) else [items]
    assert items and all(id_of(i) is not None for i in items)
    assert all(isinstance(i.get("result", []), (list, type(None))) for i in items if isinstance(i, dict))


def run_property(reliability, area: str, case: str, strategy, post) -> Counter:
    seen: Counter = Counter()

    @FUZZ
    @given(strategy)
    def prop(example):
        seen[post(example)] += 1

    prop()
    print(case, dict(seen))
    reliability(area, case, f"{sum(seen.values())} Hypothesis examples (derandomized)",
                "status codes " + ", ".join(f"{k}: {v}" for k, v in sorted(seen.items())))
    return seen


# ---------------------------------------------------------------------- the properties
@pytest.mark.reliability
def test_fuzz_predict_bodies(fuzz_app, reliability):
    client, store, tmp = fuzz_app

    def post(raw):
        before = len(store.events)
        status = check_response(client.post("/predict", data=raw, content_type="application/json"), tmp)
        assert len(store.events) == before
        return status

    seen = run_property(reliability, "Fuzzing (Hypothesis)", "/predict bodies (valid shapes, hostile values)",
                        as_bytes(PREDICT_BODIES), post)
    assert seen[200] and seen[400]              # the strategy reaches both the model and the refusals


@pytest.mark.reliability
def test_fuzz_interactive_clicks_and_boxes(fuzz_app, reliability):
    """Interactive calls with smart clicks and boxes: never a 5xx or a traceback, and every 200 for one task is one
    result with a result list (LS's editor needs it), regions of the picture's size or a message."""
    client, store, tmp = fuzz_app
    answers: Counter = Counter()

    def post(raw):
        r = client.post("/predict", data=raw, content_type="application/json")
        status = check_response(r, tmp)
        body = r.get_json()
        if status == 200 and isinstance(body.get("results"), list) and len(body["results"]) == 1:
            (res,) = body["results"]
            assert isinstance(res.get("result"), list) or "error" in res, res
            for region in res.get("result") or []:
                if region["type"] == "brushlabels":
                    assert (region["original_width"], region["original_height"]) == (32, 24)
                    answers["region"] += 1
            if isinstance(res.get("result"), list) and not res["result"]:
                assert isinstance(res.get("message"), str) and res["message"], res
                answers["message"] += 1
        return status

    seen = run_property(reliability, "Fuzzing (Hypothesis)", "interactive clicks and boxes (valid shapes, hostile "
                        "values)", as_bytes(INTERACTIVE_BODIES), post)
    print(dict(answers))
    assert seen[200] and answers["region"] and answers["message"]


@pytest.mark.reliability
def test_fuzz_webhook_bodies(fuzz_app, reliability):
    client, store, tmp = fuzz_app

    def post(raw):
        before = len(store.events)
        status = check_response(client.post("/webhook", data=raw, content_type="application/json"), tmp)
        check_queue(store, before, status)
        return status

    seen = run_property(reliability, "Fuzzing (Hypothesis)", "/webhook bodies (valid shapes, hostile values)",
                        as_bytes(WEBHOOK_BODIES), post)
    assert seen[201] and seen[400] and seen[200]


@pytest.mark.reliability
def test_fuzz_label_configs(fuzz_app, reliability):
    client, _, tmp = fuzz_app

    def post(config):
        s1 = check_response(client.post("/setup", json={"project": "1.1", "schema": config}), tmp)
        s2 = check_response(client.post("/predict", json={"tasks": [{"id": 1, "data": {"image": IMAGE_URL,
                                                                                      "text": "a circle"}}],
                                                           "label_config": config}), tmp)
        if isinstance(config, str) and config.strip():
            assert (s1 == 200) == (s2 == 200)   # both endpoints read a config the same way
        return s2

    seen = run_property(reliability, "Fuzzing (Hypothesis)", "labeling configs through /setup and /predict", label_configs(), post)
    assert seen[200] and seen[400]


@pytest.mark.reliability
def test_fuzz_setup_bodies(fuzz_app, reliability):
    client, _, tmp = fuzz_app
    run_property(reliability, "Fuzzing (Hypothesis)", "/setup bodies", as_bytes(SETUP_BODIES),
                 lambda raw: check_response(client.post("/setup", data=raw, content_type="application/json"), tmp))


@pytest.mark.reliability
def test_fuzz_raw_bytes(fuzz_app, reliability):
    client, store, tmp = fuzz_app

    def post(raw):
        before = len(store.events)
        statuses = [check_response(client.post(path, data=raw, content_type="application/json"), tmp)
                    for path in ("/predict", "/webhook", "/setup")]
        check_queue(store, before, statuses[1])
        return statuses[1]

    run_property(reliability, "Fuzzing (Hypothesis)", "raw bytes to /predict, /webhook and /setup", RAW_BYTES, post)


@pytest.mark.reliability
def test_fuzz_webhooks_into_a_real_sqlite_store(tmp_path, reliability):
    """The same webhook fuzz against the real datastore: its row count only grows with a 201."""
    from backend.learning.datastore import open_datastore

    cfg = make_config(tmp_path)
    store = open_datastore(cfg)
    app = create_app(cfg, predictor_factory=lambda c, k: FakePredictor(), store_factory=lambda c: store,
                     start_worker=False)
    client = app.test_client()

    def rows() -> int:
        return sum(v for k, v in store.stats()["events"].items() if isinstance(v, int) and k != "redeliveries")

    def post(raw):
        before = rows()
        status = check_response(client.post("/webhook", data=raw, content_type="application/json"), tmp_path)
        after = rows()
        assert after == before or (status == 201 and after in (before, before + 1)), (before, after, status)
        return status

    try:
        seen = run_property(reliability, "Fuzzing (Hypothesis)", "/webhook bodies into a real SQLite datastore",
                            as_bytes(WEBHOOK_BODIES), post)
    finally:
        store.close()
    assert seen[201] and seen[400]
