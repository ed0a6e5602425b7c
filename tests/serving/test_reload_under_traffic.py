"""Hot reload under traffic: while `ssp-sam finetune` publishes versions in a loop, concurrent `/predict` calls to
`ssp-sam serve` (gunicorn, two workers) never fail, and each answer is exactly what the version it names predicts
(so no answer came from a half-loaded model or from another version than the one reported)."""

from __future__ import annotations

import io
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import requests
from PIL import Image

from backend.learning import versions
from backend.learning.corrections import CorrectionWorker
from backend.learning.datastore import open_datastore
from ssp_sam.data.masks import brush_rle_to_mask
from ssp_sam.metrics import iou
from tests.e2e.ls_harness import stop, wait_http
from tests.local_http import LocalMediaServer, free_port
from tests.payloads import TEST_LABEL_CONFIG, annotation_event

pytestmark = pytest.mark.reliability
ROOT = Path(__file__).resolve().parents[2]
ROUNDS = 3
CLIENTS = 4


def _png(image: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(image).save(buf, format="PNG")
    return buf.getvalue()


def _scenes(n: int):
    from ssp_sam.data.synthetic import SyntheticConfig, SyntheticDataset

    return list(SyntheticDataset(n, seed=11, config=SyntheticConfig(min_size=48, max_size=64,
                                                                    kind_weights={"attr": 1.0})))


def _publish_rounds(model_dir: Path, base: str) -> list[str]:
    """`ssp-sam finetune --once --force` ROUNDS times; every round publishes (tolerance 1)."""
    published = []
    for _ in range(ROUNDS):
        cmd = [sys.executable, "-m", "backend.cli", "--log-level", "WARNING", "finetune", "--once", "--force",
               "--model-dir", str(model_dir), "--variant", "tiny", "--base-checkpoint", base, "--device", "cpu",
               "--epochs", "1", "--max-steps", "2", "--lr", "0.01", "--lr-decoder", "0.01", "--batch-size", "2",
               "--heldout", "0.3", "--min-train", "2", "--min-heldout", "1", "--tolerance", "1",
               "--curve-every", "0", "--threads", "1"]
        out = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600)
        assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-2000:]
        published.append(versions.read_current(model_dir).version)
    return published


def _expected_mask(model_dir: Path, base: str, version: str, image: np.ndarray, sentence: str) -> np.ndarray:
    """What ``version`` itself predicts (loaded here, outside the server)."""
    from ssp_sam.build import ModelConfig, load_model
    from ssp_sam.predictor import SSPSAMPredictor

    path = base if version.startswith("tiny-") and "-ft-" not in version else str(
        versions.bundle_path(model_dir, version))
    return SSPSAMPredictor(load_model(ModelConfig(variant="tiny", checkpoint=path, device="cpu"))).predict(
        image, sentence).mask


def test_hot_reload_under_traffic(tmp_path, tiny_bundle, reliability):
    model_dir = tmp_path / "md"
    scenes = _scenes(6)
    media = LocalMediaServer().start()
    urls = [media.add_upload(f"s{i}.png", _png(s.image)) for i, s in enumerate(scenes)]
    store = open_datastore(None, model_dir)           # corrections for the rounds to train on
    for i, (s, url) in enumerate(zip(scenes, urls)):
        store.enqueue_event("ANNOTATION_CREATED", annotation_event(
            "ANNOTATION_CREATED", 500 + i, 50 + i, 1, url, s.sentence, s.mask))
    CorrectionWorker(store, lambda u, t: _png(scenes[urls.index(u)].image)).drain()
    store.close()
    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("LABEL_STUDIO")}
    env.update({"HOST": "127.0.0.1", "PORT": str(port), "WORKERS": "2", "THREADS": "4", "MODEL_DIR": str(model_dir),
                "SSP_SAM_VARIANT": "tiny", "SSP_SAM_CHECKPOINT": tiny_bundle, "DEVICE": "cpu", "RELOAD_INTERVAL_S": "0.2",
                "LABEL_STUDIO_URL": media.origin, "LABEL_STUDIO_API_KEY": "legacy0123456789abcdef", "LOG_LEVEL": "WARNING"})
    log = tmp_path / "serve.log"
    server = subprocess.Popen([sys.executable, "-m", "backend.cli", "serve"], cwd=ROOT, env=env,
                              stdout=open(log, "wb"), stderr=subprocess.STDOUT, start_new_session=True)
    answers, failures, busy, done = [], [], [], threading.Event()
    base = f"http://127.0.0.1:{port}"

    def client(k: int) -> None:
        session = requests.Session()
        for n in range(1000):                         # bounded: stops when the last version answered, or after
            if done.is_set():                         # 1000 calls
                return
            i = (k + n) % len(scenes)
            body = {"tasks": [{"id": 50 + i, "project": 1, "data": {"image": urls[i], "text": scenes[i].sentence}}],
                    "label_config": TEST_LABEL_CONFIG, "project": "1.1"}
            try:
                r = session.post(base + "/predict", json=body, timeout=60)
                if r.status_code == 503 and r.headers.get("Retry-After"):   # admission: busy, come back later
                    busy.append(k)
                    time.sleep(float(r.headers["Retry-After"]))
                    continue
                payload = r.json()
                results = payload.get("results") if isinstance(payload, dict) else None
                result = results[0] if isinstance(results, list) and results else None
                if r.status_code != 200 or not isinstance(result, dict) or "result" not in result:
                    failures.append((r.status_code, str(payload)[:300]))
                else:
                    answers.append((i, result["model_version"], result["result"]))
            except Exception as exc:                  # recorded, never a silently dead client thread
                failures.append(("exception", repr(exc)))

    try:
        wait_http(base + "/health", server, 60, log)
        threads = [threading.Thread(target=client, args=(k,)) for k in range(CLIENTS)]
        for t in threads:
            t.start()
        published = _publish_rounds(model_dir, tiny_bundle)
        deadline = time.monotonic() + 60              # traffic goes on until the last version answers
        while time.monotonic() < deadline and published[-1] not in {v for _, v, _ in answers}:
            time.sleep(0.1)
        done.set()
        for t in threads:
            t.join(120)
    finally:
        done.set()
        stop(server)
        media.stop()
    seen = {v for _, v, _ in answers}
    assert failures == [], failures[:3]
    assert published[-1] in seen and len(seen) >= 2, (seen, published)
    start_version = next(v for _, v, _ in answers)
    assert seen <= set(published) | {start_version}
    expected = {}
    for i, version, result in answers:             # every answer is what the version it names predicts
        h, w = scenes[i].mask.shape
        got = np.zeros((h, w), bool)
        for region in (r for r in result if r["type"] == "brushlabels"):
            got |= brush_rle_to_mask(region["value"]["rle"], h, w)
        key = (i, version)
        if key not in expected:
            expected[key] = _expected_mask(model_dir, tiny_bundle, version, scenes[i].image, scenes[i].sentence)
        assert iou(got, expected[key]) >= 0.98, (i, version)
    reliability("Hot reload under traffic", f"{ROUNDS} versions published while {CLIENTS} clients predict",
                f"`ssp-sam finetune --once --force` {ROUNDS} times while {CLIENTS} threads call /predict on "
                "`ssp-sam serve` (gunicorn, 2 workers, pointer checked every 0.2 s)",
                f"{len(answers)} answers, 0 failures ({len(busy)} busy answers retried), {len(seen)} versions served; "
                "every answer equals what the "
                "version it names predicts when loaded on its own")
