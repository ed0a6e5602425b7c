"""A token only goes to the host it belongs to: a /setup call naming another host never receives the configured
LABEL_STUDIO_API_KEY (nor a personal access token's refresh exchange), in /predict, in the correction worker's
downloads and in records read back through the SDK."""

from __future__ import annotations

import os

import pytest

from backend.labelstudio.media import MediaError, MediaFetcher
from backend.labelstudio.records import LabelStudioRecords, RecordUnavailable
from backend.learning.corrections import CorrectionWorker, WorkerConfig
from backend.learning.datastore import open_datastore
from tests.fakes import LABEL_CONFIG, LEGACY_TOKEN, make_config, png_bytes, task
from tests.labelstudio.test_media import make_jwt
from tests.payloads import annotation_event

pytestmark = pytest.mark.reliability

EVIL = "http://evil.test"
AREA = "Media and tokens"


def fetcher(tmp_path, token_client_factory=None, **env):
    cfg = make_config(tmp_path, **env)
    return MediaFetcher(cfg, token_client_factory=token_client_factory,
                        persist_path=os.path.join(cfg.model_dir, "ls_connection.json"))


def _auth_headers(requests_mock, host):
    return [h.headers.get("Authorization") for h in requests_mock.request_history if h.netloc == host]


def test_foreign_setup_host_never_gets_the_configured_token(tmp_path, requests_mock, reliability):
    requests_mock.get(f"{EVIL}/storage-data/uploaded/?filepath=upload/1/a.png", content=png_bytes())
    requests_mock.get(f"{EVIL}/data/upload/1/a.png", content=png_bytes())
    f = fetcher(tmp_path, LABEL_STUDIO_URL=None)              # LABEL_STUDIO_API_KEY set, no URL
    f.set_connection(EVIL, None)
    assert f.connection() == (EVIL, None)
    with pytest.raises(MediaError) as ei:
        f.fetch("/data/upload/1/a.png", task_id=7)
    assert all(LEGACY_TOKEN not in (a or "") for a in _auth_headers(requests_mock, "evil.test"))
    reliability(AREA, "LABEL_STUDIO_API_KEY set, no URL; /setup names a foreign host",
                "/setup hostname=http://evil.test (no token), then a download of /data/upload/1/a.png",
                f"no Authorization header sent to evil.test; {ei.value}")


def test_foreign_setup_host_may_use_its_own_token_only(tmp_path, requests_mock, reliability):
    requests_mock.get(f"{EVIL}/storage-data/uploaded/?filepath=upload/1/a.png", content=png_bytes())
    f = fetcher(tmp_path, LABEL_STUDIO_URL=None)
    f.set_connection(EVIL, "evil-own-token", project_id="1")
    f.fetch("/data/upload/1/a.png", project_id="1")
    assert _auth_headers(requests_mock, "evil.test") == ["Token evil-own-token"]
    reliability(AREA, "/setup names a foreign host and sends its own token",
                "/setup hostname=http://evil.test access_token=evil-own-token, then a download",
                "evil.test receives only the token it sent itself, never LABEL_STUDIO_API_KEY")


def test_foreign_setup_host_never_gets_a_pat_refresh(tmp_path, requests_mock, reliability):
    pat = make_jwt("refresh")
    made = []

    class Tokens:
        def __init__(self, host, token):
            made.append((host, token))

        def access_token(self):
            return make_jwt("access", 300)
    requests_mock.post(f"{EVIL}/api/token/refresh/", json={"access": "x"})
    requests_mock.get(f"{EVIL}/storage-data/uploaded/?filepath=upload/1/a.png", content=png_bytes())
    requests_mock.get(f"{EVIL}/data/upload/1/a.png", content=png_bytes())
    f = fetcher(tmp_path, token_client_factory=Tokens, LABEL_STUDIO_URL=None, LABEL_STUDIO_API_KEY=pat)
    f.set_connection(EVIL, None)
    with pytest.raises(MediaError):
        f.fetch("/data/upload/1/a.png")
    assert made == []
    assert not [h for h in requests_mock.request_history if h.method == "POST"]
    assert all(a is None for a in _auth_headers(requests_mock, "evil.test"))
    reliability(AREA, "personal access token configured; /setup names a foreign host",
                "LABEL_STUDIO_API_KEY=<PAT>, /setup hostname=http://evil.test, then a download",
                "no token exchange is started for evil.test and no POST /api/token/refresh/ goes there")


def test_allowed_setup_host_gets_the_configured_token(tmp_path, requests_mock, reliability):
    other = "http://ls.other:8080"
    requests_mock.get(f"{other}/storage-data/uploaded/?filepath=upload/1/a.png", content=png_bytes())
    f = fetcher(tmp_path, LABEL_STUDIO_URL=None, LABEL_STUDIO_ALLOWED_HOSTS=f"{other}, http://ls2:80")
    f.set_connection(other + "/", "setup-token")
    assert f.connection() == (other, LEGACY_TOKEN)
    f.fetch("/data/upload/1/a.png")
    assert _auth_headers(requests_mock, "ls.other:8080") == [f"Token {LEGACY_TOKEN}"]
    reliability(AREA, "/setup names a host listed in LABEL_STUDIO_ALLOWED_HOSTS",
                "LABEL_STUDIO_ALLOWED_HOSTS=http://ls.other:8080, /setup hostname=http://ls.other:8080",
                "the configured token is used with that host")


def test_configured_url_is_never_replaced_by_setup(tmp_path, requests_mock, reliability):
    f = fetcher(tmp_path, LABEL_STUDIO_ALLOWED_HOSTS=EVIL)
    f.set_connection(EVIL, "tok")
    assert f.connection()[0] == "http://ls.test:8080"
    reliability(AREA, "LABEL_STUDIO_URL set; /setup names another host",
                "/setup hostname=http://evil.test", "the host stays LABEL_STUDIO_URL")


def test_plain_url_on_another_host_never_carries_the_token(tmp_path, requests_mock, reliability):
    requests_mock.get("http://ls.test:8080/img/r.png", status_code=302,
                      headers={"Location": "https://bucket.example/f.png?sig=1"})
    requests_mock.get("https://bucket.example/f.png?sig=1", content=png_bytes())
    requests_mock.get("https://ls.test.example/g.png", content=png_bytes())
    f = fetcher(tmp_path)
    f.fetch("http://ls.test:8080/img/r.png")
    f.fetch("https://ls.test.example/g.png")
    first, redirected, lookalike = requests_mock.request_history
    assert first.headers["Authorization"] == f"Token {LEGACY_TOKEN}"
    assert "Authorization" not in redirected.headers and "Authorization" not in lookalike.headers
    reliability(AREA, "an LS URL redirecting to storage, and a look-alike host",
                "http://ls.test:8080/img/r.png -> 302 https://bucket.example/...; https://ls.test.example/g.png",
                "the token goes to the LS host only, never to the redirect target or the look-alike")


def test_predict_after_foreign_setup_sends_no_token_there(make_app, requests_mock, reliability):
    requests_mock.get(f"{EVIL}/storage-data/uploaded/?filepath=upload/1/a.png", content=png_bytes())
    requests_mock.get(f"{EVIL}/data/upload/1/a.png", content=png_bytes())
    client = make_app(LABEL_STUDIO_URL=None).test_client()
    assert client.post("/setup", json={"project": "1.1", "hostname": EVIL}).status_code == 200
    r = client.post("/predict", json={"tasks": [task(7, "/data/upload/1/a.png", "the thing")],
                                      "project": "1.1", "label_config": LABEL_CONFIG})
    answer = r.get_json()["results"][0]
    assert r.status_code == 200 and "result" not in answer and "LABEL_STUDIO_ALLOWED_HOSTS" in answer["error"]
    assert all(LEGACY_TOKEN not in (a or "") for a in _auth_headers(requests_mock, "evil.test"))
    reliability(AREA, "token and a foreign /setup hostname",
                "POST /setup hostname=http://evil.test (no auth), then /predict",
                "no Authorization header sent to evil.test; the task gets an error naming LABEL_STUDIO_ALLOWED_HOSTS, no result")


def test_correction_worker_after_foreign_setup_sends_no_token_there(tmp_path, requests_mock, reliability):
    requests_mock.get(f"{EVIL}/storage-data/uploaded/?filepath=upload/1/a.png", content=png_bytes(40, 30))
    requests_mock.get(f"{EVIL}/data/upload/1/a.png", content=png_bytes(40, 30))
    f = fetcher(tmp_path, LABEL_STUDIO_URL=None)
    f.set_connection(EVIL, None)
    store = open_datastore(None, tmp_path)
    try:
        worker = CorrectionWorker(store, f, WorkerConfig(backoff_base_s=0.0, max_attempts=1))
        payload = annotation_event("ANNOTATION_CREATED", 1, 10, 1, "/data/upload/1/a.png", "a thing", None)
        eid = store.enqueue_event(payload["action"], payload)
        worker.drain()
        ev = store.get_event(eid)
    finally:
        store.close()
    assert ev["status"] == "failed"
    assert all(LEGACY_TOKEN not in (a or "") for a in _auth_headers(requests_mock, "evil.test"))
    reliability(AREA, "correction worker after a foreign /setup",
                "/setup hostname=http://evil.test, then an ANNOTATION_CREATED webhook for an upload",
                f"no Authorization header sent to evil.test; the event fails: {ev['last_error']}")


def test_records_after_foreign_setup_never_use_the_configured_token(tmp_path, reliability):
    made = []
    f = fetcher(tmp_path, LABEL_STUDIO_URL=None)
    f.set_connection(EVIL, None)
    records = LabelStudioRecords(f, client_factory=lambda host, token: made.append((host, token)))
    with pytest.raises(RecordUnavailable):
        records.fetch_annotation(7)
    assert made == []
    reliability(AREA, "id-only webhook event after a foreign /setup",
                "/setup hostname=http://evil.test, then an ANNOTATIONS_CREATED event with ids",
                "no SDK client is built for evil.test with LABEL_STUDIO_API_KEY; the event fails as unavailable")
