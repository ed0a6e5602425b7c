"""The backend and the trainer with official weights: ``SSP_SAM_WEIGHTS_DIR``, ``AUTO_DOWNLOAD`` (through the Flask
app: /health, /setup, /predict while the weights download, after a failure, and once they are in), one download for
several workers sharing ``MODEL_DIR``, and the error that names the command when an official variant has no weights.

The "official" variant here is ``tiny`` with its files on a local server (``tests.ssp_sam.weights_files.WeightsHomes``);
the predictor is the fake one, built by a factory that records which weights it was given."""

from __future__ import annotations

import argparse
import hashlib
import re
import shlex
import threading
import time

import pytest

import backend.weights
from backend.config import ConfigError
from backend.learning.finetune import FinetuneConfig, prepare_weights
from backend.serving import serve
from backend.serving.app import create_app
from backend.serving.model_manager import ModelManager
from backend.weights import weights_problem
from ssp_sam import hub
from tests.fakes import LABEL_CONFIG, FakePredictor, FakeStore, make_config, png_bytes, task



@pytest.fixture
def ls_media(ls_media, requests_mock):
    """Task images from the mocked Label Studio; every other URL (the weights' local server) really connects."""
    requests_mock.real_http = True
    return ls_media


class RecordingFactory:
    """A predictor factory that records (weights folder, checkpoint) of every load."""

    def __init__(self):
        self.loads = []

    def __call__(self, config, checkpoint):
        self.loads.append((config.weights_dir, checkpoint))
        return FakePredictor()


def until(condition, what: str, timeout: float = 30.0):
    """Poll ``condition`` until it returns something true (the timeout is only a safety net)."""
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        value = condition()
        if value:
            return value
        time.sleep(0.01)
    raise AssertionError(f"timed out waiting for {what}")


def sha8(content: bytes) -> str:
    return hashlib.sha256(content).hexdigest()[:8]


def predict_body(ls_media):
    return {"tasks": [task(1, ls_media("a.png", png_bytes()), text="the red square")], "label_config": LABEL_CONFIG,
            "project": "1.1"}


# ------------------------------------------------------------------------------------------------ SSP_SAM_WEIGHTS_DIR

def test_a_weights_folder_is_one_variable_for_backend_and_trainer(homes, tmp_path, tiny_files):
    out = tmp_path / "w"
    hub.download_weights("tiny", "refcoco", out, quiet=True)
    cfg = make_config(tmp_path, SSP_SAM_WEIGHTS_DIR=str(out))
    assert (cfg.variant, cfg.weights_dir) == ("tiny", str(out))            # the variant comes with the folder
    assert make_config(tmp_path, SSP_SAM_WEIGHTS_DIR=str(out), SSP_SAM_VARIANT="tiny").variant == "tiny"
    with pytest.raises(ConfigError, match="SSP_SAM_WEIGHTS_DIR: .* holds tiny weights, but variant ssp-sam-224"):
        make_config(tmp_path, SSP_SAM_WEIGHTS_DIR=str(out), SSP_SAM_VARIANT="ssp-sam-224")
    with pytest.raises(ConfigError, match="SSP_SAM_WEIGHTS_DIR: .* has no weights.json"):
        make_config(tmp_path, SSP_SAM_WEIGHTS_DIR=str(tmp_path))
    assert weights_problem(cfg) is None

    factory = RecordingFactory()
    manager = ModelManager(cfg, predictor_factory=factory)
    assert manager.version == f"tiny-{sha8(tiny_files['checkpoint'])}"
    manager.get()
    assert factory.loads == [(str(out), str(out / "checkpoint_best_miou.pth"))]
    trainer = FinetuneConfig.from_env({"MODEL_DIR": cfg.model_dir, "SSP_SAM_WEIGHTS_DIR": str(out)})
    assert (trainer.model.variant, trainer.model.weights_dir) == ("tiny", str(out))

    (out / homes.sam.name).unlink()
    assert homes.sam.name in weights_problem(cfg) and "ssp-sam download-weights" in weights_problem(cfg)


# ------------------------------------------------------------------------------------------------ no weights at all

def test_an_official_variant_without_weights_names_the_command(tmp_path, monkeypatch, make_app, capsys):
    cfg = make_config(tmp_path, SSP_SAM_VARIANT="ssp-sam-224")
    problem = weights_problem(cfg)
    command = re.search(r"`(ssp-sam download-weights [^`]+)`", problem).group(1)
    out = f"{cfg.model_dir}/weights/ssp-sam-224-refcoco"
    assert command == f"ssp-sam download-weights --variant ssp-sam-224 --dataset refcoco --out {out}"
    assert f"SSP_SAM_WEIGHTS_DIR={out}" in problem and "AUTO_DOWNLOAD=true" in problem
    from backend.cli import build_parser
    args = build_parser().parse_args(shlex.split(command)[1:])             # the command is one that runs
    assert (args.variant, args.dataset, args.out) == ("ssp-sam-224", "refcoco", out)

    client = make_app(SSP_SAM_VARIANT="ssp-sam-224").test_client()
    assert command in client.get("/health").get_json()["last_error"]
    r = client.post("/setup", json={"project": "1.1"})
    assert r.status_code == 503 and command in r.get_json()["error"]

    for name in ("SSP_SAM_CHECKPOINT", "SAM_CHECKPOINT", "CLIP_CHECKPOINT", "SSP_SAM_WEIGHTS_DIR", "AUTO_DOWNLOAD"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("SSP_SAM_VARIANT", "ssp-sam-224")
    monkeypatch.setenv("MODEL_DIR", cfg.model_dir)
    args = argparse.Namespace(host=None, port=None, model_dir=None, log_level=None, preload=False, dev=False,
                              check=False)
    assert serve.run(args) == 2                                            # `ssp-sam serve` does not start
    assert command in capsys.readouterr().err
    with pytest.raises(ConfigError, match=re.escape(command)):             # nor does the trainer
        prepare_weights(FinetuneConfig.from_env({"MODEL_DIR": cfg.model_dir, "SSP_SAM_VARIANT": "ssp-sam-224"}))


# ------------------------------------------------------------------------------------------------ AUTO_DOWNLOAD

def test_auto_download_through_the_app(homes, tmp_path, ls_media, tiny_files):
    gate = homes.server.gate[homes.keys["sam"]] = threading.Event()   # SAM (the second file) stops half-way
    factory = RecordingFactory()
    cfg = make_config(tmp_path, SSP_SAM_VARIANT="tiny", AUTO_DOWNLOAD="true")
    app = create_app(cfg, predictor_factory=factory, store_factory=lambda c: FakeStore(), start_worker=False)
    client = app.test_client()

    def half_way():
        h = client.get("/health").get_json()
        w = h["weights"]
        return h if w["file"] == homes.sam.name and w["bytes_done"] > len(tiny_files["checkpoint"]) else None

    health = until(half_way, "the download to reach SAM's first half")
    assert health["model_version"] == "tiny-downloading" and not health["model_loaded"]
    weights = health["weights"]
    assert weights["state"] == "downloading" and weights["dir"] == f"{cfg.model_dir}/weights/tiny-refcoco"
    assert weights["bytes_done"] < weights["bytes_total"] == sum(map(len, tiny_files.values()))
    assert client.post("/setup", json={"project": "1.1"}).get_json() == {"model_version": "tiny-downloading"}
    r = client.post("/predict", json=predict_body(ls_media))
    assert r.status_code == 503
    assert re.fullmatch(r"model weights are downloading \([\d,]+ of [\d,]+ MB\)", r.get_json()["error"])
    assert factory.loads == []

    gate.set()
    until(lambda: client.get("/health").get_json()["model_loaded"], "the model to load after the download")
    health = client.get("/health").get_json()
    version = f"tiny-{sha8(tiny_files['checkpoint'])}"
    assert health["model_version"] == version and health["weights"]["state"] == "ready"
    assert health["last_error"] is None
    r = client.post("/predict", json=predict_body(ls_media))
    assert r.status_code == 200 and r.get_json()["model_version"] == version
    folder = f"{cfg.model_dir}/weights/tiny-refcoco"
    assert factory.loads == [(folder, f"{folder}/checkpoint_best_miou.pth")]
    assert hub.folder_complete(folder, "tiny", "refcoco")
    app.extensions["ssp_sam"].stop()


def test_a_failed_download_is_reported_and_tried_again(homes, tmp_path, ls_media, monkeypatch):
    monkeypatch.setattr(backend.weights, "RETRY_S", 3600.0)
    homes.server.fail[homes.keys["sam"]] = 1
    cfg = make_config(tmp_path, SSP_SAM_VARIANT="tiny", AUTO_DOWNLOAD="true")
    app = create_app(cfg, predictor_factory=RecordingFactory(), store_factory=lambda c: FakeStore(),
                     start_worker=False)
    client = app.test_client()
    health = until(lambda: (h := client.get("/health").get_json())["weights"]["error"] and h, "the failure")
    assert health["weights"]["state"] == "failed" and "HTTP 500" in health["last_error"]
    assert health["model_version"] == "tiny-downloading"
    r = client.post("/predict", json=predict_body(ls_media))
    assert r.status_code == 503 and "could not be downloaded" in r.get_json()["error"]
    assert "trying again in" in r.get_json()["error"]

    app.extensions["ssp_sam"].manager.auto.retry_now()
    until(lambda: client.get("/health").get_json()["model_loaded"], "the second attempt")
    assert client.get("/health").get_json()["last_error"] is None
    assert homes.downloads("checkpoint") == [0]          # the first attempt's checkpoint was kept
    assert homes.downloads("sam") == [0]                 # the 500 sent no body; the retry did
    app.extensions["ssp_sam"].stop()


def test_workers_sharing_model_dir_download_once(homes, tmp_path):
    gate = homes.server.gate[homes.keys["sam"]] = threading.Event()
    cfg = make_config(tmp_path, SSP_SAM_VARIANT="tiny", AUTO_DOWNLOAD="true")
    first, second = (ModelManager(cfg, predictor_factory=RecordingFactory()) for _ in range(2))
    assert first.version == "tiny-downloading"
    until(lambda: first.auto.progress and first.auto.progress.bytes_done, "the first worker's download")
    assert second.version == "tiny-downloading"
    until(lambda: second.auto.state() == "waiting" and second.auto.progress.bytes_done, "the second worker to wait")
    assert "downloading by another process" in second.auto.message()
    gate.set()
    assert first.auto.wait(30) and second.auto.wait(30)
    until(lambda: first.loaded and second.loaded, "both workers to load")
    assert [homes.downloads(role) for role in ("checkpoint", "sam", "clip")] == [[0], [0], [0]]
    assert first.version == second.version


def test_the_trainer_downloads_before_its_first_round(homes, tmp_path):
    env = {"MODEL_DIR": str(tmp_path / "md"), "SSP_SAM_VARIANT": "tiny", "AUTO_DOWNLOAD": "true"}
    ready = prepare_weights(FinetuneConfig.from_env(env), env=env)
    assert ready.model.weights_dir == str(tmp_path / "md" / "weights" / "tiny-refcoco")
    assert hub.folder_complete(ready.model.weights_dir, "tiny", "refcoco")


def test_auto_download_fills_the_weights_folder_it_is_given(homes, tmp_path):
    named = str(tmp_path / "volume" / "tiny-refcoco")                   # e.g. on the compose `weights` volume
    env = {"MODEL_DIR": str(tmp_path / "md"), "SSP_SAM_VARIANT": "tiny", "AUTO_DOWNLOAD": "true",
           "SSP_SAM_WEIGHTS_DIR": named}
    cfg = make_config(tmp_path, **env)
    assert (cfg.variant, cfg.weights_dir, weights_problem(cfg)) == ("tiny", named, None)
    with pytest.raises(ConfigError, match="AUTO_DOWNLOAD fills it only for an official SSP_SAM_VARIANT"):
        make_config(tmp_path, **{**env, "SSP_SAM_VARIANT": "demo"})
    manager = ModelManager(cfg, predictor_factory=RecordingFactory())
    assert manager.version == "tiny-downloading" and manager.auto.folder == named
    assert manager.auto.wait(30)
    until(lambda: manager.loaded, "the model to load")
    assert hub.folder_complete(named, "tiny", "refcoco")
    assert prepare_weights(FinetuneConfig.from_env(env), env=env).model.weights_dir == named   # nothing to fetch
    assert [homes.downloads(role) for role in ("checkpoint", "sam", "clip")] == [[0], [0], [0]]
