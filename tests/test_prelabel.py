"""``ssp-sam prelabel`` (backend/prelabel.py) with a fake Label Studio client, the fake predictor and Label Studio's
media endpoints mocked: what it stores is what /predict answers, sharding, resuming, failures, summary, exit codes.
The real Label Studio and torchrun run in tests/e2e/test_prelabel_e2e.py."""

from __future__ import annotations

import json
import threading

import httpx
import pytest
from label_studio_sdk.core.api_error import ApiError

from backend import prelabel
from backend.labelstudio.project import ProjectTask
from backend.serving.model_manager import base_target
from tests.fakes import LEGACY_TOKEN, LS_URL, FakeLabelStudio, FakePredictor, make_config, png_bytes
from tests.local_http import LocalMediaServer
from tests.serving.test_api import predict_body


def _run(tmp_path, ls, predictor, store, connections=None, env=None, **options):
    options.setdefault("progress", False)
    config = make_config(tmp_path, **(env or {}))

    def client_factory(host, token):
        if connections is not None:
            connections.append((host, token))
        return ls

    return prelabel.run(prelabel.Options(project=1, **options), config, client_factory=client_factory,
                        predictor_factory=lambda c, ckpt: predictor, store_factory=lambda c: store)


def _version(tmp_path) -> str:
    return base_target(make_config(tmp_path)).version


def _without_ids(result: list) -> list:
    return [{k: v for k, v in r.items() if k != "id"} for r in result]


# ---------------------------------------------------------------------- planning
def test_plan_deals_out_the_tasks_left_disjoint_complete_equal_and_deterministic():
    tasks = [ProjectTask(i, {}, "v1" if i % 5 == 0 else ("other" if i % 7 == 0 else "")) for i in range(3, 60)]
    todo = [t.id for t in tasks if t.id % 5 != 0]
    for world in (1, 2, 3, 4):
        shards = [prelabel.plan(list(reversed(tasks)), "v1", rank, world)[0] for rank in range(world)]
        ids = [[t.id for t in s] for s in shards]
        assert sorted(sum(ids, [])) == todo                      # none missed, none twice
        assert ids == [todo[rank::world] for rank in range(world)]
        assert max(map(len, ids)) - min(map(len, ids)) <= 1      # equal shares
        assert ids == [[t.id for t in prelabel.plan(tasks, "v1", rank, world)[0]] for rank in range(world)]
    # what an earlier run left (here: every odd id done) is still shared equally
    left_by_odd_run = [ProjectTask(i, {}, "v1" if i % 2 else "") for i in range(1, 41)]
    assert [len(prelabel.plan(left_by_odd_run, "v1", rank, 2)[0]) for rank in (0, 1)] == [10, 10]
    mine, skipped = prelabel.plan(tasks, "v1", 0, 1, limit=4)
    assert skipped == sum(1 for t in tasks if t.id % 5 == 0) and [t.id for t in mine] == todo[:4]
    # the limit applies to the whole run, before sharding: two ranks share the same four lowest ids
    assert sorted(t.id for r in (0, 1) for t in prelabel.plan(tasks, "v1", r, 2, limit=4)[0]) == todo[:4]


@pytest.mark.parametrize("field, version, held", [
    ("", "v1", False), ("v1", "v1", True), ("v10", "v1", False), ("v1,v2", "v2", True), ("a, v2", "v2", True),
    ("demo-82b8422e", "demo-82b8422", False), ("x, y,v3", "x, y", True), ("x,v3", "x, y", False),
])
def test_a_task_holds_a_version_only_when_it_is_one_of_its_versions(field, version, held):
    assert ProjectTask(1, {}, field).has_prediction_of(version) is held


# ---------------------------------------------------------------------- what is stored
def test_prelabel_stores_exactly_what_predict_answers(tmp_path, client, ls_media, store, predictor):
    a, b = ls_media("a.png", png_bytes(64, 48)), ls_media("b.png", png_bytes(30, 20))
    data = {1: {"image": a, "text": "the red circle"},
            2: {"image": b, "text": ["thing on the left", "a circle"]},
            3: {"image": a, "text": "nothing at all"},
            4: {"image": b}}                                        # no sentence: one region per label
    tasks = [{"id": tid, "project": 1, "data": d} for tid, d in data.items()]
    answered = client.post("/predict", json=predict_body(tasks)).get_json()["results"]
    recorded_by_predict = [(p["task_id"], p["sentence"], p["model_version"]) for p in store.predictions]
    store.predictions.clear()

    ls, connections = FakeLabelStudio(data), []
    summary = _run(tmp_path, ls, predictor, store, connections, batch_size=3)

    assert connections == [(LS_URL, LEGACY_TOKEN)]                # the SDK client talks to LABEL_STUDIO_URL only
    stored = {p["task"]: p for p in ls.stored}
    assert sorted(stored) == [1, 2, 3, 4]
    for tid, want in zip(data, answered):
        got = stored[tid]
        assert _without_ids(got["result"]) == _without_ids(want["result"]), tid
        assert (got["score"], got["model_version"]) == (want["score"], want["model_version"])
    assert stored[3]["result"] == [] and len(stored[4]["result"]) == 2      # two labels: "object", "circle"
    # recorded in the datastore as /predict records them (the corrections are scored against these masks)
    assert [(p["task_id"], p["sentence"], p["model_version"]) for p in store.predictions] == recorded_by_predict
    assert (summary.done, summary.skipped, summary.failed, summary.empty) == (4, 0, {}, 1)
    assert summary.regions == sum(r["type"] == "brushlabels" for p in ls.stored for r in p["result"]) == 5
    assert summary.model_version == _version(tmp_path) == answered[0]["model_version"]


def test_prelabel_stores_bitmask_regions_for_a_bitmask_config(tmp_path, client, ls_media, store, predictor):
    from backend.labelstudio.brush import region_mask
    from tests.fakes import LABEL_CONFIG

    config = LABEL_CONFIG.replace("BrushLabels", "BitmaskLabels")
    a = ls_media("a.png", png_bytes(64, 48))
    data = {1: {"image": a, "text": "thing on the left"}, 2: {"image": a, "text": "nothing at all"}}
    answered = client.post("/predict", json=predict_body([{"id": t, "project": 1, "data": d} for t, d in data.items()],
                                                         label_config=config)).get_json()["results"]
    ls = FakeLabelStudio(data, label_config=config)
    summary = _run(tmp_path, ls, predictor, store)
    assert (summary.done, summary.regions, summary.empty) == (2, 1, 1)
    stored = {p["task"]: p for p in ls.stored}
    assert _without_ids(stored[1]["result"]) == _without_ids(answered[0]["result"])
    (region,) = [r for r in stored[1]["result"] if r["type"] == "bitmasklabels"]
    mask = region_mask(region["value"], 64, 48)
    assert mask[:, :32].all() and not mask[:, 32:].any()


def test_images_of_a_batch_go_through_the_model_together(tmp_path, ls_media, store):
    img = ls_media("a.png", png_bytes())
    ls, predictor = FakeLabelStudio({i: {"image": img, "text": f"object {i}"} for i in range(1, 8)}), FakePredictor()
    _run(tmp_path, ls, predictor, store, batch_size=3)
    assert [len(c) for c in predictor.calls] == [3, 3, 1]
    assert ls.upload_requests == 3                                 # one bulk import per batch


# ---------------------------------------------------------------------- resuming
def test_a_second_run_skips_what_the_first_stored(tmp_path, ls_media, store, predictor):
    img = ls_media("a.png", png_bytes())
    ls = FakeLabelStudio({i: {"image": img, "text": f"object {i}"} for i in range(1, 11)})
    ls.stored.append({"task": 3, "result": [], "score": 0.0, "model_version": "an-older-version"})
    first = _run(tmp_path, ls, predictor, store, batch_size=2, limit=4)
    assert (first.done, first.skipped, first.to_json()["remaining"]) == (4, 0, 6)
    second = _run(tmp_path, ls, predictor, store, batch_size=2)
    assert (second.done, second.skipped, second.to_json()["remaining"]) == (6, 4, 0)
    version = first.model_version
    # every task holds exactly one prediction of this version; the older version's does not count
    assert {tid: ls.versions_of(tid).count(version) for tid in ls.task_data} == {i: 1 for i in range(1, 11)}
    third = _run(tmp_path, ls, predictor, store)
    assert (third.done, third.skipped, len(predictor.calls)) == (0, 10, 5)   # nothing predicted again


def test_label_studio_lost_mid_run_is_fatal_and_the_next_run_completes(tmp_path, ls_media, store, predictor):
    img = ls_media("a.png", png_bytes())
    ls = FakeLabelStudio({i: {"image": img, "text": f"object {i}"} for i in range(1, 13)}, fail_after_uploads=2)
    with pytest.raises(prelabel.PrelabelError) as err:
        _run(tmp_path, ls, predictor, store, batch_size=3)
    assert "uploading predictions failed: ConnectError" in str(err.value) and "\n" not in str(err.value)
    assert 0 < len(ls.stored) < 12
    ls.fail_after_uploads = None
    summary = _run(tmp_path, ls, predictor, store, batch_size=3)
    assert summary.skipped + summary.done == 12 and summary.skipped == len(ls.stored) - summary.done
    assert sorted(p["task"] for p in ls.stored) == list(range(1, 13))          # none twice, none missed


# ---------------------------------------------------------------------- failures
def test_bad_tasks_are_reported_with_their_reason_and_never_stop_the_run(tmp_path, ls_media, requests_mock, store):
    good = ls_media("a.png", png_bytes())
    broken = ls_media("broken.png", b"this is not an image")
    requests_mock.get(f"{LS_URL}/storage-data/uploaded/?filepath=upload/1/missing.png", status_code=404)
    requests_mock.get(f"{LS_URL}/data/upload/1/missing.png", status_code=404)
    data = {1: {"image": good, "text": "a circle"}, 2: {"image": "/data/upload/1/missing.png", "text": "x"},
            3: {"image": broken, "text": "y"}, 4: {"text": "no image"}, 5: {"image": good, "text": "explode"},
            6: {"image": good, "text": "refused by Label Studio"}, 7: {"image": good, "text": "the left one"}}
    ls = FakeLabelStudio(data, refuse={6})
    summary = _run(tmp_path, ls, FakePredictor(fail_on="explode"), store, batch_size=4)
    assert sorted(p["task"] for p in ls.stored) == [1, 7]
    reasons = summary.failed
    assert sorted(reasons) == [2, 3, 4, 5, 6]
    assert "HTTP 404" in reasons[2] and "cannot decode" in reasons[3] and "no 'image'" in reasons[4]
    assert reasons[5] == "prediction failed: RuntimeError"
    assert reasons[6].startswith("Label Studio refused the prediction: HTTP 400")
    out = summary.to_json()
    assert (out["done"], out["failed"], out["remaining"]) == (2, 5, 5)
    assert [f["task"] for f in out["failures"]] == [2, 3, 4, 5, 6]
    assert json.loads(json.dumps(out)) == out


@pytest.mark.parametrize("error, fragment", [
    (ApiError(status_code=401, body={"detail": "Invalid token."}), "HTTP 401: Invalid token. (the token was refused"),
    (ApiError(status_code=404, body={"detail": "No Project matches the given query."}), "no project 1 at"),
    (httpx.ConnectError("[Errno 111] Connection refused"), "cannot reach Label Studio at http://ls.test:8080"),
])
def test_label_studio_refusing_the_run_is_one_fatal_line(tmp_path, store, predictor, error, fragment):
    with pytest.raises(prelabel.PrelabelError) as err:
        _run(tmp_path, FakeLabelStudio({}, error=error), predictor, store)
    assert fragment in str(err.value) and "\n" not in str(err.value) and LEGACY_TOKEN not in str(err.value)


def test_an_unusable_labeling_config_is_fatal(tmp_path, store, predictor):
    ls = FakeLabelStudio({1: {"image": "x"}}, label_config='<View><Image name="i" value="$i"/></View>')
    with pytest.raises(prelabel.PrelabelError, match="labeling config cannot be used: .*BrushLabels"):
        _run(tmp_path, ls, predictor, store)


# ---------------------------------------------------------------------- overlap
def test_downloads_run_while_the_model_works(tmp_path, store):
    """The images of the second batch are served only once the model works on the first, and the model's first call
    returns only once one of them has been: that happens only when downloads run while the model works (a pipeline
    that downloads and predicts in turn would leave both waiting until their timeouts, and fail). A real local server
    (requests_mock serialises concurrent requests)."""
    model_started, fetched_during_model = threading.Event(), threading.Event()

    class HoldingLabelStudio(LocalMediaServer):
        def handler_for(self, path):
            answer = super().handler_for(path)
            if not path.endswith(("/3.png", "/4.png")):            # the second batch (batch size 2)
                return answer

            def held(handler):
                if model_started.wait(timeout=20):
                    fetched_during_model.set()
                answer(handler)
            return held

    class Waiting(FakePredictor):
        def predict_batch(self, pairs, batch_size=8):
            if not self.calls:
                model_started.set()
                self.overlapped = fetched_during_model.wait(timeout=20)
            return super().predict_batch(pairs, batch_size)

    with HoldingLabelStudio(token=LEGACY_TOKEN) as server:
        images = {i: server.add_upload(f"{i}.png", png_bytes()) for i in range(1, 7)}
        predictor = Waiting()
        ls = FakeLabelStudio({i: {"image": url, "text": f"object {i}"} for i, url in images.items()})
        summary = _run(tmp_path, ls, predictor, store, env={"LABEL_STUDIO_URL": server.origin}, batch_size=2,
                       workers=2)
    assert predictor.overlapped and (summary.done, summary.failed) == (6, {})


# ---------------------------------------------------------------------- summary and CLI
def test_summaries_of_the_ranks_merge():
    a = prelabel.Summary(1, "v", tasks=10, done=3, skipped=2, failed={7: "x"}, regions=4, empty=1, elapsed_s=5.0,
                         pipeline_s=3.5, stages={"media_wait_s": 0.5, "model_s": 2.0, "upload_wait_s": 0.25})
    b = prelabel.Summary(1, "v", tasks=10, done=4, skipped=2, failed={8: "y"}, regions=2, empty=2, elapsed_s=6.0,
                         pipeline_s=3.0, stages={"media_wait_s": 0.75, "model_s": 1.5, "upload_wait_s": 0.0})
    out = prelabel.Summary.merge([a, b]).to_json()
    assert out == {"project": 1, "model_version": "v", "tasks": 10, "done": 7, "skipped": 2, "failed": 2,
                   "remaining": 1, "failures": [{"task": 7, "reason": "x"}, {"task": 8, "reason": "y"}],
                   "regions": 6, "empty": 3, "elapsed_s": 6.0, "pipeline_s": 3.5, "images_per_s": 2.0,
                   "stages": {"media_wait_s": 0.75, "model_s": 2.0, "upload_wait_s": 0.25}, "ranks": 2}


@pytest.fixture
def cli_env(tmp_path, monkeypatch, ls_media):
    """The command line's environment: Label Studio at LS_URL (a fake SDK client), the fake predictor."""
    for key in ("LABEL_STUDIO_URL", "LABEL_STUDIO_HOST", "LABEL_STUDIO_API_KEY", "LABEL_STUDIO_ACCESS_TOKEN",
                "WORLD_SIZE", "PREDICT_BATCH_SIZE"):
        monkeypatch.delenv(key, raising=False)
    monkeypatch.setenv("MODEL_DIR", str(tmp_path / "model_dir"))
    monkeypatch.setenv("LABEL_STUDIO_URL", LS_URL)
    monkeypatch.setenv("LABEL_STUDIO_API_KEY", LEGACY_TOKEN)
    monkeypatch.setattr("backend.serving.model_manager.default_predictor_factory", lambda c, ckpt: FakePredictor())
    img = ls_media("a.png", png_bytes())
    ls = FakeLabelStudio({1: {"image": img, "text": "a circle"}, 2: {"image": "/data/upload/1/gone.png"}})
    monkeypatch.setattr("backend.labelstudio.project.sdk_client", lambda host, token: ls)
    return ls


def _cli(*argv):
    from backend.cli import main
    return main(["--log-level", "WARNING", "prelabel", *argv])


def test_cli_prints_the_summary_and_exits_0_with_failed_tasks(cli_env, requests_mock, capsys):
    requests_mock.get(f"{LS_URL}/storage-data/uploaded/?filepath=upload/1/gone.png", status_code=404)
    requests_mock.get(f"{LS_URL}/data/upload/1/gone.png", status_code=404)
    assert _cli("--project", "1", "--no-progress") == 0
    out = json.loads(capsys.readouterr().out)
    assert (out["done"], out["failed"], out["ranks"]) == (1, 1, 1)
    assert out["failures"][0]["task"] == 2 and "HTTP 404" in out["failures"][0]["reason"]
    assert cli_env.versions_of(1) == [out["model_version"]]


@pytest.mark.parametrize("env, fragment", [
    ({"LABEL_STUDIO_URL": None}, "no Label Studio URL: set LABEL_STUDIO_URL"),
    ({"LABEL_STUDIO_API_KEY": None}, "no Label Studio token: set LABEL_STUDIO_API_KEY"),
    ({"LABEL_STUDIO_URL": "ls.test:8080"}, "LABEL_STUDIO_URL must start with http:// or https://"),
    ({"SSP_SAM_CHECKPOINT": "/nonexistent/model.pt"}, "the configured model is unavailable"),
])
def test_cli_fatal_errors_are_one_line_and_exit_1(cli_env, monkeypatch, capsys, env, fragment):
    for key, value in env.items():
        if value is None:
            monkeypatch.delenv(key)
        else:
            monkeypatch.setenv(key, value)
    assert _cli("--project", "1", "--no-progress") == 1
    captured = capsys.readouterr()
    assert captured.out == "" and fragment in captured.err
    assert captured.err.count("\n") == 1 and "Traceback" not in captured.err


@pytest.mark.parametrize("argv", [["--project", "x"], ["--project", "0"], ["--project", "1", "--batch-size", "0"]])
def test_cli_bad_arguments(argv, capsys):
    with pytest.raises(SystemExit) as exc:
        _cli(*argv)
    assert exc.value.code == 2 and "expected a positive integer" in capsys.readouterr().err
