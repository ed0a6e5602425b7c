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

# the README's interactive config (a sentence TextArea, the mask control, smart clicks and boxes on the same image),
# with a second label
INTERACTIVE_CONFIG = (
    '<View><Image name="image" value="$image"/>'
    '<TextArea name="prompt" toName="image" editable="true" rows="1"/>'
    '<BrushLabels name="tag" toName="image"><Label value="object"/><Label value="circle"/></BrushLabels>'
    '<KeyPointLabels name="kp" toName="image" smart="true"><Label value="object"/><Label value="circle"/>'
    '<Label value="other"/></KeyPointLabels>'
    '<RectangleLabels name="box" toName="image" smart="true"><Label value="object"/><Label value="circle"/>'
    '</RectangleLabels></View>'
)


def keypoint_item(x: float, y: float, positive: bool = True, label: str = "object", *, w: int, h: int,
                  rid: str = "kp1", from_name: str = "kp", to_name: str = "image") -> dict:
    """A smart KeyPointLabels click as LS 1.23.2's editor sends it in an interactive context (``x``, ``y`` in % of
    the picture as displayed; Alt-click: ``positive=False``)."""
    return {"id": rid, "from_name": from_name, "to_name": to_name, "type": "keypointlabels", "origin": "manual",
            "original_width": w, "original_height": h, "image_rotation": 0, "is_positive": positive,
            "value": {"x": x, "y": y, "width": 0.5, "keypointlabels": [label], "labels": [label]}}


def rectangle_item(x: float, y: float, width: float, height: float, label: str = "object", *, w: int, h: int,
                   rid: str = "box1", rotation: float = 0, from_name: str = "box", to_name: str = "image") -> dict:
    """A smart RectangleLabels box as LS 1.23.2's editor sends it (all values in % of the picture)."""
    return {"id": rid, "from_name": from_name, "to_name": to_name, "type": "rectanglelabels", "origin": "manual",
            "original_width": w, "original_height": h, "image_rotation": 0,
            "value": {"x": x, "y": y, "width": width, "height": height, "rotation": rotation,
                      "rectanglelabels": [label]}}


def textarea_item(text: str, from_name: str = "prompt", to_name: str = "image") -> dict:
    """A submitted TextArea sentence as the editor sends it."""
    return {"id": "txt1", "from_name": from_name, "to_name": to_name, "type": "textarea", "origin": "manual",
            "value": {"text": [text]}}


@dataclass
class FakePrediction:
    mask: np.ndarray
    score: float
    box_xyxy: np.ndarray
    no_target: bool
    frame_logits: np.ndarray = field(default_factory=lambda: np.zeros((8, 8), np.float32))
    low_res_logits: np.ndarray | None = None


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
        self.interactive_calls = []
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

    def predict_interactive(self, image, sentence=None, points=None, labels=None, box=None, mask_input=None):
        """``fake_mask`` of the sentence (else nothing), replaced by the box when there is one, then a square of
        side ``min(H, W) // 4`` set around each positive click and cleared around each negative one, in order.
        ``low_res_logits`` holds the call's number (from 1), so a test can tell which answer a later call was given
        as ``mask_input``; every call is kept in ``interactive_calls``."""
        assert isinstance(image, np.ndarray) and image.dtype == np.uint8 and image.ndim == 3
        if not sentence and points is None and box is None:
            raise ValueError("an interactive prediction needs a sentence, a click or a box")
        with self.lock:
            self.interactive_calls.append({"sentence": sentence, "points": None if points is None else
                                           np.asarray(points, np.float32).tolist(),
                                           "labels": None if labels is None else np.asarray(labels).tolist(),
                                           "box": None if box is None else [float(v) for v in box],
                                           "mask_input": None if mask_input is None else np.asarray(mask_input)})
            n = len(self.interactive_calls)
        h, w = image.shape[:2]
        m = fake_mask(image, sentence) if sentence else np.zeros((h, w), bool)
        if box is not None:
            x0, y0, x1, y1 = (int(round(v)) for v in box)
            m = np.zeros((h, w), bool)
            m[y0:y1, x0:x1] = True
        r = max(1, min(h, w) // 8)
        for (x, y), lab in zip(np.asarray(points if points is not None else np.zeros((0, 2))).reshape(-1, 2),
                               np.asarray(labels if labels is not None else np.ones(0))):
            xi, yi = int(x), int(y)
            m[max(0, yi - r):yi + r, max(0, xi - r):xi + r] = bool(lab)
        return FakePrediction(mask=m, score=self.score if m.any() else 0.0, box_xyxy=np.zeros(4, np.float32),
                              no_target=not m.any(), low_res_logits=np.full((1, 8, 8), float(n), np.float32))

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

    def find_prediction(self, task_id, model_version=None, sentence=None):
        """The latest recorded prediction of a task (of ``model_version``), as ``Datastore.find_prediction``."""
        with self.lock:
            rows = [p for p in reversed(self.predictions) if p["task_id"] == task_id
                    and (model_version is None or p["model_version"] == model_version)]
        return rows[0] if rows else None

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


class FakeLabelStudio:
    """The part of label-studio-sdk's client ``backend.labelstudio.project`` uses (``projects.get``,
    ``projects.import_predictions``, ``tasks.list``, ``predictions.create``) over one in-memory project.

    ``tasks``: {task id: data}. ``refuse``: task ids whose predictions Label Studio refuses (HTTP 400, as for a
    deleted task). ``fail_after_uploads``: upload requests answered before Label Studio becomes unreachable.
    ``error``: raised by every call (a refused token, an unknown project)."""

    def __init__(self, tasks: dict, label_config: str = LABEL_CONFIG, project_id: int = 1, refuse=(),
                 fail_after_uploads=None, error=None):
        self.task_data = dict(tasks)
        self.label_config = label_config
        self.project_id = project_id
        self.refuse = set(refuse)
        self.fail_after_uploads = fail_after_uploads
        self.error = error
        self.stored: list[dict] = []          # every prediction stored, in order
        self.upload_requests = 0
        self.lock = threading.Lock()
        self.projects = _FakeProjects(self)
        self.tasks = _FakeTasks(self)
        self.predictions = _FakePredictions(self)

    def versions_of(self, task_id) -> list[str]:
        return [p["model_version"] for p in self.stored if p["task"] == task_id]

    def _check(self, project=None):
        from label_studio_sdk.core.api_error import ApiError

        if self.error is not None:
            raise self.error
        if project is not None and project != self.project_id:
            raise ApiError(status_code=404, body={"detail": "No Project matches the given query."})

    def _upload(self, items: list[dict]) -> None:
        from label_studio_sdk.core.api_error import ApiError
        import httpx

        with self.lock:
            self._check()
            self.upload_requests += 1
            if self.fail_after_uploads is not None and self.upload_requests > self.fail_after_uploads:
                raise httpx.ConnectError("[Errno 111] Connection refused")
            bad = [p["task"] for p in items if p["task"] in self.refuse or p["task"] not in self.task_data]
            if bad:
                raise ApiError(status_code=400, body={"detail": "Validation error",
                                                      "validation_errors": {"task": [f"Invalid pk {bad[0]}"]}})
            self.stored.extend(items)


class _FakeRecord:
    def __init__(self, **data):
        self.__dict__.update(data)
        self._data = data

    def model_dump(self):
        return dict(self._data)


class _FakeProjects:
    def __init__(self, ls: FakeLabelStudio):
        self.ls = ls

    def get(self, id):  # noqa: A002 - the SDK's argument name
        self.ls._check(id)
        return _FakeRecord(id=id, label_config=self.ls.label_config)

    def import_predictions(self, id, request):  # noqa: A002
        self.ls._check(id)
        self.ls._upload([p.model_dump(exclude_none=True) for p in request])
        return _FakeRecord(created=len(request))


class _FakeTasks:
    def __init__(self, ls: FakeLabelStudio):
        self.ls = ls
        self.calls: list[dict] = []

    def list(self, project, fields=None, include=None, page_size=None):
        self.ls._check(project)
        self.calls.append({"fields": fields, "include": include, "page_size": page_size})
        with self.ls.lock:
            return [_FakeRecord(id=tid, data=dict(data),
                                predictions_model_versions=",".join(sorted(set(self.ls.versions_of(tid)))))
                    for tid, data in self.ls.task_data.items()]


class _FakePredictions:
    def __init__(self, ls: FakeLabelStudio):
        self.ls = ls

    def create(self, **fields):
        self.ls._upload([fields])
        return _FakeRecord(id=len(self.ls.stored), **fields)
