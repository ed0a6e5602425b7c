"""Reading annotations and tasks back from Label Studio for id-only webhook events (backend.labelstudio.records)."""

import pytest
from label_studio_sdk.core.api_error import ApiError

from backend.labelstudio.records import LabelStudioRecords, RecordUnavailable


class _Media:
    def __init__(self, host="http://ls:8080", token="tok"):
        self.host, self.token = host, token

    def connection(self, project_id=None):
        return self.host, self.token


class _Record:
    def __init__(self, data):
        self.data = data

    def model_dump(self):
        return dict(self.data)


class _Endpoint:
    def __init__(self, records, error=None):
        self.records, self.error, self.calls = records, error, []

    def get(self, id, request_options=None):  # noqa: A002 - the SDK's argument name
        self.calls.append(id)
        if self.error is not None:
            raise self.error
        return _Record(self.records[id])


class _Client:
    def __init__(self, error=None):
        self.annotations = _Endpoint({7: {"id": 7, "task": 3, "result": []}}, error)
        self.tasks = _Endpoint({"3": {"id": 3, "data": {"image": "/data/upload/1/a.png"}}}, error)


def test_fetches_records_with_the_sdk_types_and_one_client_per_connection():
    made = []
    client = _Client()
    records = LabelStudioRecords(_Media(), client_factory=lambda h, t: made.append((h, t)) or client)
    assert records.fetch_annotation(7) == {"id": 7, "task": 3, "result": []}
    assert records.fetch_task(3)["data"]["image"].endswith("a.png")
    assert client.annotations.calls == [7] and client.tasks.calls == ["3"]  # int annotation ids, str task ids
    assert made == [("http://ls:8080", "tok")]


def test_without_a_connection_the_event_fails_with_a_clear_message():
    records = LabelStudioRecords(_Media(host=None, token=None), client_factory=lambda h, t: _Client())
    with pytest.raises(RecordUnavailable, match="LABEL_STUDIO_URL"):
        records.fetch_annotation(7)


def test_client_errors_are_permanent_and_server_errors_are_retried():
    gone = LabelStudioRecords(_Media(), client_factory=lambda h, t: _Client(ApiError(status_code=404, body="x")))
    with pytest.raises(RecordUnavailable, match="404"):
        gone.fetch_annotation(7)
    busy = LabelStudioRecords(_Media(), client_factory=lambda h, t: _Client(ApiError(status_code=503, body="x")))
    with pytest.raises(ApiError):
        busy.fetch_task(3)
    offline = LabelStudioRecords(_Media(), client_factory=lambda h, t: _Client(ConnectionError("refused")))
    with pytest.raises(ConnectionError):
        offline.fetch_annotation(7)


def test_the_backend_worker_reads_id_only_events_back_from_label_studio(tmp_path):
    from backend.serving.app import _default_worker_factory
    from backend.learning.datastore import open_datastore
    from backend.labelstudio.media import MediaFetcher

    from backend.config import BackendConfig
    cfg = BackendConfig.from_env({"MODEL_DIR": str(tmp_path)})
    store = open_datastore(cfg)
    try:
        worker = _default_worker_factory(store, MediaFetcher(cfg), cfg)
        assert worker.config.fetch_annotation.__self__.__class__ is LabelStudioRecords
        assert worker.config.fetch_task.__self__.__class__ is LabelStudioRecords
    finally:
        store.close()
