"""Test doubles shared by the backend tests: a fake predictor (no torch), a fake datastore, PNG bytes, configs."""

from __future__ import annotations

import io
import threading
import time
import tracemalloc
from dataclasses import dataclass, field

import numpy as np
from PIL import Image

from backend.config import BackendConfig

LS_URL = "http://ls.test:8080"
LEGACY_TOKEN = "legacy0123456789abcdef"

LABEL_CONFIG = (
    '<View><Image name="image" value="$image"/>'
    '<TextArea name="prompt" toName="image" editable="true" rows="1"/>'
    '<BrushLabels name="tag" toName="image"><Label value="object"/><Label value="circle"/></BrushLabels></View>'
)


@dataclass
class FakePrediction:
    mask: np.ndarray
    score: float
    box_xyxy: np.ndarray
    no_target: bool
    frame_logits: np.ndarray = field(default_factory=lambda: np.zeros((8, 8), np.float32))


def fake_mask(image: np.ndarray, sentence: str) -> np.ndarray:
    """Deterministic masks from the sentence: 'left' -> left half, 'nothing' -> empty, else the centre quarter."""
    h, w = image.shape[:2]
    m = np.zeros((h, w), bool)
    s = sentence.lower()
    if "nothing" in s:
        return m
    if "left" in s:
        m[:, : w // 2] = True
    else:
        m[h // 4: 3 * h // 4, w // 4: 3 * w // 4] = True
    return m


class FakePredictor:
    """``predict_batch`` with masks from ``fake_mask``; ``score`` marks which predictor answered."""

    def __init__(self, version="fake-0001", fail_on=None, delay=0.0, score=0.9):
        self.version = version
        self.fail_on = fail_on
        self.delay = delay
        self.score = score
        self.calls = []
        self.lock = threading.Lock()

    def predict_batch(self, pairs, batch_size=8):
        with self.lock:
            self.calls.append([s for _, s in pairs])
        if self.delay:
            time.sleep(self.delay)
        out = []
        for image, sentence in pairs:
            if self.fail_on and self.fail_on in sentence:
                raise RuntimeError("boom: CUDA out of memory (fake)")
            assert isinstance(image, np.ndarray) and image.dtype == np.uint8 and image.ndim == 3
            m = fake_mask(image, sentence)
            out.append(FakePrediction(mask=m, score=self.score if m.any() else 0.0,
                                      box_xyxy=np.zeros(4, np.float32), no_target=not m.any()))
        return out

    def cache_stats(self):
        return {"hits": 1, "misses": 2, "hit_rate": 1 / 3}


class FakeStore:
    def __init__(self):
        self.events = []
        self.predictions = []
        self.lock = threading.Lock()
        self.fail_record = False

    def enqueue_event(self, action, payload):
        with self.lock:
            self.events.append((action, payload))
            return len(self.events)

    def record_prediction(self, project_id, task_id, sentence, model_version, mask, score):
        if self.fail_record:
            raise RuntimeError("database is locked")
        with self.lock:
            self.predictions.append(dict(project_id=project_id, task_id=task_id, sentence=sentence,
                                         model_version=model_version, mask=mask, score=score))
            return len(self.predictions)

    def version_stats(self):
        with self.lock:
            versions = {}
            for p in self.predictions:
                versions.setdefault(p["model_version"], {"predictions": 0})["predictions"] += 1
            return versions

    def pending_event_count(self):
        return len(self.events)


def png_bytes(w=64, h=48, color=(200, 30, 30), exif_orientation=None, fmt="PNG") -> bytes:
    im = Image.new("RGB", (w, h), color)
    buf = io.BytesIO()
    if exif_orientation is not None:
        exif = Image.Exif()
        exif[0x0112] = exif_orientation
        im.save(buf, format="JPEG", exif=exif.tobytes())
    else:
        im.save(buf, format=fmt)
    return buf.getvalue()


def make_config(tmp_path, **env) -> BackendConfig:
    base = {"MODEL_DIR": str(tmp_path / "model_dir"), "LABEL_STUDIO_URL": LS_URL, "LABEL_STUDIO_API_KEY": LEGACY_TOKEN,
            "RELOAD_INTERVAL_S": "0"}
    base.update({k: v for k, v in env.items() if v is not None})
    for k in [k for k, v in env.items() if v is None]:
        base.pop(k, None)
    return BackendConfig.from_env(base)


def task(tid, image, text=None, **data):
    d = {"image": image}
    if text is not None:
        d["text"] = text
    d.update(data)
    return {"id": tid, "project": 1, "data": d}


def wait_until_idle(store, timeout: float = 30.0, poll: float = 0.05) -> bool:
    """Block until the datastore's inbox has nothing pending or processing (tests, benchmarks)."""
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if store.pending_event_count() == 0:
            return True
        time.sleep(poll)
    return False


class TracedPeak:
    """``with TracedPeak() as mem: ...`` then ``mem.peak_bytes``: the peak of Python-traced allocations (numpy,
    PIL and bytes buffers included) inside the block."""

    peak_bytes = 0

    def __enter__(self) -> "TracedPeak":
        tracemalloc.start()
        return self

    def __exit__(self, *exc) -> None:
        self.peak_bytes = tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()

    @property
    def mib(self) -> float:
        return self.peak_bytes / 2 ** 20
