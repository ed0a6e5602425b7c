"""Turn Label Studio webhook events into training samples (the backend side of learning from corrections).

``/webhook`` only calls :meth:`Datastore.enqueue_event` (a durable insert, well under a millisecond on SQLite) and
answers. A :class:`CorrectionWorker` thread drains that inbox:

* ``ANNOTATION_CREATED`` / ``ANNOTATIONS_CREATED`` (bulk; ``annotation``/``annotations`` may be a list of bodies or of
  ids) / ``ANNOTATION_UPDATED``: one sample per brush region (sentence, mask from RLE, image snapshot in the blob
  store, ids, annotator, timestamps, region ``origin``, model version of the parent prediction, IoU with the
  prediction the server recorded). An update replaces that annotation's samples; cancelled/skipped annotations
  contribute nothing (and retract what they had).
* ``ANNOTATION_DELETED`` / ``ANNOTATIONS_DELETED``: retract the samples and leave a tombstone.
* ``START_TRAINING``: record a training request for ``ssp-sam finetune --watch``.
* anything else: marked ``ignored``.

Redelivered events change nothing (inbox dedup by payload hash; samples keyed by annotation id + region id; stale
``updated_at`` ignored). Transient failures (image unreachable, database busy) are retried with exponential backoff;
after ``max_attempts`` the event is marked ``failed`` with its error (``Datastore.stats()["events"]``). Malformed
payloads fail at once. A region that cannot be decoded (bad RLE, wrong size) is rejected on its own and reported in the
event's result; the rest of the annotation is kept.
"""

from __future__ import annotations

import io
import logging
import os
import re
import threading
import time
import uuid
from dataclasses import dataclass
from typing import Any, Callable, Iterable, Mapping

import numpy as np

from backend.learning.datastore import Datastore, EVENT_IGNORED, as_int as _int
from ssp_sam import metrics

log = logging.getLogger(__name__)

ANNOTATION_UPSERT_ACTIONS = {"ANNOTATION_CREATED", "ANNOTATIONS_CREATED", "ANNOTATION_UPDATED"}
ANNOTATION_DELETE_ACTIONS = {"ANNOTATION_DELETED", "ANNOTATIONS_DELETED"}
TRAINING_ACTIONS = {"START_TRAINING"}
HANDLED_ACTIONS = ANNOTATION_UPSERT_ACTIONS | ANNOTATION_DELETE_ACTIONS | TRAINING_ACTIONS

DEFAULT_PROMPT_FIELDS = ("prompt", "text", "sentence", "caption", "expression", "referring_expression", "query",
                         "description")
_IMAGE_TAG_RE = re.compile(r"<Image\b[^>]*>", re.IGNORECASE)
_ATTR_RE = re.compile(r'(\w+)\s*=\s*"([^"]*)"')


NO_TARGET_REGION_ID = "no-target"  # region id of the sample kept for an annotation submitted without regions


class PermanentError(Exception):
    """The event can never succeed as it is (malformed payload, missing body and no way to fetch it)."""


class RegionRejected(Exception):
    """One region cannot become a sample (bad RLE, wrong size, empty mask); the others are kept."""


MediaFetcher = Callable[[str, Mapping], bytes]


@dataclass
class WorkerConfig:
    max_attempts: int = 5              # tries before an event is marked failed (poison)
    backoff_base_s: float = 2.0        # retry delay = base * 2 ** (attempt - 1), capped
    backoff_max_s: float = 300.0
    poll_interval_s: float = 1.0       # idle wait between inbox polls (``notify()`` wakes the thread early)
    batch_size: int = 16
    lease_s: float = 300.0             # an event taken by a worker that dies is retried after this
    prompt_fields: tuple = DEFAULT_PROMPT_FIELDS
    min_mask_pixels: int = 1
    empty_annotation_is_no_target: bool = True  # no brush region + a sentence -> a no-target sample (empty mask)
    fetch_annotation: Callable[[int], Mapping] | None = None  # annotation id -> body (SDK), for id-only payloads
    fetch_task: Callable[[int], Mapping] | None = None        # task id -> task (SDK), when ``task`` is absent
    worker_id: str | None = None

    @classmethod
    def from_any(cls, cfg: Any) -> "WorkerConfig":
        if cfg is None:
            return cls()
        if isinstance(cfg, cls):
            return cfg
        out = cls()
        aliases = {"max_attempts": ("corrections_max_attempts",), "poll_interval_s": ("corrections_poll_interval_s",),
                   "backoff_base_s": ("corrections_backoff_base_s",), "backoff_max_s": ("corrections_backoff_max_s",)}
        for name in cls.__dataclass_fields__:
            for key in (name, *aliases.get(name, ())):
                v = cfg.get(key) if isinstance(cfg, Mapping) else getattr(cfg, key, None)
                if v is not None:
                    setattr(out, name, v)
                    break
        return out


class CorrectionWorker:
    """Background thread that drains the datastore's inbox into samples."""

    def __init__(self, store: Datastore, media_fetcher: MediaFetcher, config: Any = None):
        self.store = store
        self.media_fetcher = as_media_fetcher(media_fetcher)
        self.config = WorkerConfig.from_any(config)
        self.worker_id = self.config.worker_id or f"worker-{os.getpid()}-{uuid.uuid4().hex[:6]}"
        self._thread: threading.Thread | None = None
        self._stop = threading.Event()
        self._wake = threading.Event()
        self.processed = 0
        self.last_error: str | None = None

    # -- lifecycle ----------------------------------------------------------------------------------------------------
    def start(self) -> "CorrectionWorker":
        if self._thread and self._thread.is_alive():
            return self
        self._stop.clear()
        self._thread = threading.Thread(target=self._run, name="ssp-sam-corrections", daemon=True)
        self._thread.start()
        return self

    def stop(self, timeout: float | None = 10.0) -> None:
        self._stop.set()
        self._wake.set()
        if self._thread:
            self._thread.join(timeout)
            self._thread = None

    @property
    def running(self) -> bool:
        return bool(self._thread and self._thread.is_alive())

    def notify(self) -> None:
        """Wake the thread now (call after ``enqueue_event``)."""
        self._wake.set()

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                n = self.process_pending(self.config.batch_size)
            except Exception as exc:  # database down etc.: keep the thread alive, try again later
                self.last_error = repr(exc)
                log.exception("corrections worker loop error")
                n = 0
            if n == 0:
                self._wake.wait(self.config.poll_interval_s)
                self._wake.clear()

    # -- processing ---------------------------------------------------------------------------------------------------
    def process_pending(self, limit: int | None = None) -> int:
        """Process up to ``limit`` due events now (in this thread). Returns how many were taken."""
        events = self.store.claim_events(self.worker_id, limit=limit or self.config.batch_size,
                                         lease_seconds=self.config.lease_s)
        for ev in events:
            self._process_one(ev)
        return len(events)

    def drain(self, max_rounds: int = 1000) -> int:
        """Process until nothing is due (tests, benchmarks). Events waiting for a retry are not waited for."""
        total = 0
        for _ in range(max_rounds):
            n = self.process_pending()
            total += n
            if n == 0:
                break
        return total

    def _process_one(self, ev: Mapping) -> None:
        eid = ev["id"]
        try:
            result = self.handle_event(ev["action"], ev["payload"], eid)
        except PermanentError as exc:
            log.warning("event %s (%s) failed permanently: %s", eid, ev["action"], exc)
            self.store.mark_event_failed(eid, f"PermanentError: {exc}")
            return
        except Exception as exc:
            err = f"{type(exc).__name__}: {exc}"
            self.last_error = err
            attempts = int(ev.get("attempts") or 1)
            if attempts >= self.config.max_attempts:
                log.error("event %s (%s) failed after %d attempts: %s", eid, ev["action"], attempts, err)
                self.store.mark_event_failed(eid, f"after {attempts} attempts: {err}")
            else:
                delay = min(self.config.backoff_max_s, self.config.backoff_base_s * 2 ** (attempts - 1))
                log.warning("event %s (%s) attempt %d failed, retry in %.1fs: %s", eid, ev["action"], attempts,
                            delay, err)
                self.store.mark_event_retry(eid, err, delay)
            return
        status = EVENT_IGNORED if result.get("ignored") else "done"
        self.store.mark_event_done(eid, result, status=status)
        self.processed += 1

    def handle_event(self, action: str, payload: Mapping, event_id: int | None = None) -> dict:
        if not isinstance(payload, Mapping):
            raise PermanentError("payload is not a JSON object")
        action = str(action or payload.get("action") or "")
        project = payload.get("project") if isinstance(payload.get("project"), Mapping) else {}
        project_id = project.get("id") if project else payload.get("project")
        if action in TRAINING_ACTIONS:
            rid = self.store.add_training_request(project_id, event_id)
            return {"training_request": rid}
        if action in ANNOTATION_DELETE_ACTIONS:
            ids = [_id_of(a) for a in _as_list(payload.get("annotations", payload.get("annotation")))]
            ids = [i for i in ids if i is not None]
            if not ids:
                raise PermanentError(f"{action} without annotation ids")
            retracted = {str(i): self.store.retract_annotation(i, "deleted", event_id, project_id) for i in ids}
            return {"retracted": retracted}
        if action in ANNOTATION_UPSERT_ACTIONS:
            items = _as_list(payload.get("annotations", payload.get("annotation")))
            if not items:
                raise PermanentError(f"{action} without annotation")
            tasks = {}
            for t in _as_list(payload.get("tasks", payload.get("task"))):
                if isinstance(t, Mapping) and t.get("id") is not None:
                    tasks[_int(t["id"])] = t
            out = {}
            for item in items:
                ann = self._annotation_body(item)
                out[str(ann.get("id"))] = self.ingest_annotation(ann, tasks, project, event_id)
            return {"annotations": out}
        return {"ignored": True, "action": action}

    # -- one annotation -----------------------------------------------------------------------------------------------
    def _annotation_body(self, item: Any) -> Mapping:
        if isinstance(item, Mapping) and isinstance(item.get("result"), list):
            return item
        aid = _id_of(item)
        if aid is None:
            raise PermanentError(f"annotation item is neither a body nor an id: {str(item)[:200]}")
        if self.config.fetch_annotation is None:
            raise PermanentError(f"annotation {aid}: payload has no body and no fetch_annotation is configured")
        body = self.config.fetch_annotation(aid)  # transient errors propagate -> retried
        if not isinstance(body, Mapping):
            raise PermanentError(f"annotation {aid}: fetch_annotation returned {type(body).__name__}")
        return body

    def _task_for(self, ann: Mapping, tasks: Mapping[int, Mapping]) -> Mapping:
        tid = _int(ann.get("task") if not isinstance(ann.get("task"), Mapping) else ann["task"].get("id"))
        if isinstance(ann.get("task"), Mapping) and isinstance(ann["task"].get("data"), Mapping):
            return ann["task"]
        if tid in tasks:
            return tasks[tid]
        if len(tasks) == 1 and tid is None:
            return next(iter(tasks.values()))
        if self.config.fetch_task is not None and tid is not None:
            t = self.config.fetch_task(tid)
            if isinstance(t, Mapping):
                return t
        raise PermanentError(f"annotation {ann.get('id')}: task {tid} not in payload and no fetch_task configured")

    def ingest_annotation(self, ann: Mapping, tasks: Mapping[int, Mapping], project: Mapping,
                          event_id: int | None = None) -> dict:
        aid = _int(ann.get("id"))
        if aid is None:
            raise PermanentError("annotation without id")
        project_id = _int(ann.get("project")) or _int(project.get("id") if project else None)
        updated_at = ann.get("updated_at") or ann.get("created_at")
        if ann.get("was_cancelled") or ann.get("skipped"):
            task_id = _int(ann.get("task") if not isinstance(ann.get("task"), Mapping) else ann["task"].get("id"))
            res = self.store.apply_annotation(aid, project_id, task_id, updated_at, [], event_id, state="cancelled")
            res["cancelled"] = True
            return res
        task = self._task_for(ann, tasks)
        task_id = _int(task.get("id")) or _int(ann.get("task"))
        results = [r for r in (ann.get("result") or []) if isinstance(r, Mapping)]
        brush = [r for r in results if str(r.get("type", "")).lower() == "brushlabels"]
        label_config = (project or {}).get("label_config") or ""
        samples, rejected = [], []
        image_cache: dict[str, tuple[str, tuple[int, int]]] = {}
        for region in brush:
            rid = str(region.get("id") or "")
            try:
                if not rid:
                    raise RegionRejected("region without id")
                samples.append(self._region_sample(region, results, ann, task, label_config, image_cache))
            except RegionRejected as exc:
                rejected.append({"region_id": rid, "reason": str(exc)})
                log.warning("annotation %s region %s rejected: %s", aid, rid, exc)
        if not brush and self.config.empty_annotation_is_no_target:
            # Submitted with a sentence (TextArea or task field) and no region: the annotator says nothing matches.
            # Kept as a no-target sample (empty mask), so fine-tuning keeps the model's "nothing here" answer and
            # the held-out gate sees it. Labels alone (class-level pre-labelling) do not count: absent classes
            # are not sentences someone asked about.
            sentence, source = resolve_sentence({}, results, task, self.config.prompt_fields)
            if sentence:
                region = {"id": NO_TARGET_REGION_ID, "value": {}, "to_name": None}
                try:
                    samples.append(self._region_sample(region, results, ann, task, label_config, image_cache,
                                                       no_target=(sentence, source)))
                except RegionRejected as exc:
                    rejected.append({"region_id": NO_TARGET_REGION_ID, "reason": str(exc)})
        res = self.store.apply_annotation(aid, project_id, task_id, updated_at, samples, event_id)
        res["regions"] = len(brush)
        if rejected:
            res["rejected"] = rejected
        return res

    def _region_sample(self, region: Mapping, results: list[Mapping], ann: Mapping, task: Mapping,
                       label_config: str, image_cache: dict, no_target: tuple[str, str] | None = None) -> dict:
        """The sample of one brush region, or with ``no_target=(sentence, source)`` the empty-mask sample of an
        annotation submitted without regions."""
        rid = str(region["id"])
        value = region.get("value") or {}
        labels = value.get("brushlabels") or []
        label = str(labels[0]) if labels else None
        sentence, source = no_target or resolve_sentence(region, results, task, self.config.prompt_fields)
        if not sentence:
            if label:
                sentence, source = label, "label"
            else:
                raise RegionRejected("no sentence: no TextArea, no prompt field in task data, no label")

        # image snapshot (content-addressed; one fetch per annotation)
        url = image_url(task, region.get("to_name"), label_config)
        if not url:
            raise PermanentError(f"task {task.get('id')}: no image URL in task data")
        if url not in image_cache:
            data = self.media_fetcher(url, task)  # transient errors propagate -> the event is retried
            if not data:
                raise IOError(f"empty image from {url}")
            size = _image_size(data)
            image_cache[url] = (self.store.blobs.put(data), size)
        image_blob, (img_w, img_h) = image_cache[url]

        # mask from RLE, dimension-checked (a no-target sample: all zeros at the image's size)
        w = _int(region.get("original_width")) or img_w
        h = _int(region.get("original_height")) or img_h
        if (w, h) != (img_w, img_h):
            raise RegionRejected(f"original size {w}x{h} != image size {img_w}x{img_h}")
        mask = np.zeros((h, w), np.uint8) if no_target else decode_region_mask(value, w, h)
        area = int(mask.sum())
        if not no_target and area < self.config.min_mask_pixels:
            raise RegionRejected("empty mask")
        mask_blob = self.store.blobs.put_mask(mask)

        # provenance: origin, parent prediction's model version, IoU with what the server predicted
        origin = str(region.get("origin") or "")
        model_version = parent_model_version(ann, task)
        pred = None
        if task.get("id") is not None:
            pred = self.store.find_prediction(task["id"], model_version, sentence)
            if pred is None and model_version is not None:
                pred = self.store.find_prediction(task["id"], None, sentence)
                if pred is not None and pred["model_version"] != model_version:
                    pred = None
        if model_version is None and pred is not None:
            model_version = pred["model_version"]
        iou = None
        if pred is not None and (pred["width"], pred["height"]) == (w, h):
            try:
                iou = metrics.iou(self.store.prediction_mask(pred), mask)
            except Exception as exc:  # a missing blob must not block ingestion
                log.warning("prediction %s mask unreadable: %s", pred.get("id"), exc)
        if no_target:  # the model said nothing too (accepted), or its mask was removed (changed)
            origin = "manual" if iou is None else ("prediction" if iou >= 0.999 else "prediction-changed")
        elif origin not in ("prediction", "prediction-changed", "manual"):
            origin = "prediction" if iou is not None and iou >= 0.999 else (
                "prediction-changed" if iou is not None and iou > 0 else "manual")
        return {
            "region_id": rid, "sentence": sentence.strip(), "sentence_source": source, "label": label,
            "mask_blob": mask_blob, "image_blob": image_blob, "image_url": url, "width": w, "height": h,
            "mask_area": area, "annotator": _id_of(ann.get("completed_by")),
            "lead_time": _float(ann.get("lead_time")), "ground_truth": 1 if ann.get("ground_truth") else 0,
            "origin": origin, "model_version": model_version,
            "prediction_id": _int(pred["id"]) if pred else None, "prediction_iou": iou,
            "ls_created_at": ann.get("created_at"),
        }


def as_media_fetcher(media: Any) -> MediaFetcher:
    """``(url, task) -> bytes`` from a plain callable or from ``backend.labelstudio.media.MediaFetcher`` (``fetch() -> path``)."""
    if media is None:
        raise ValueError("a media fetcher is required")
    fetch = getattr(media, "fetch", None)
    if callable(fetch):
        def _fetch(url: str, task: Mapping) -> bytes:
            project = task.get("project")
            project_id = project.get("id") if isinstance(project, Mapping) else project
            path = fetch(url, task_id=task.get("id"), project_id=project_id)
            with open(path, "rb") as fh:
                return fh.read()
        return _fetch
    if callable(media):
        return media
    raise TypeError(f"media fetcher must be callable or have .fetch(url, task_id=..., project_id=...): {media!r}")


# ---------------------------------------------------------------------------------------------------------------------
# parsing helpers (pure functions, unit-tested on their own)
# ---------------------------------------------------------------------------------------------------------------------

def decode_region_mask(value: Mapping, width: int, height: int) -> np.ndarray:
    """(H, W) bool mask from a brush region's ``value`` (``format: rle``), checked against the image size."""
    from label_studio_sdk.converter.brush import decode_rle

    fmt = str(value.get("format") or "rle").lower()
    if fmt != "rle":
        raise RegionRejected(f"unsupported brush format {fmt!r}")
    rle = value.get("rle")
    if not isinstance(rle, (list, tuple)) or not rle:
        raise RegionRejected("missing rle")
    if not all(isinstance(x, int) and 0 <= x <= 255 for x in rle):
        raise RegionRejected("rle has values outside 0..255")
    try:
        flat = np.asarray(decode_rle(list(rle)), dtype=np.uint8)
    except Exception as exc:
        raise RegionRejected(f"undecodable rle: {type(exc).__name__}: {exc}") from exc
    if flat.size != width * height * 4:
        raise RegionRejected(f"rle decodes to {flat.size} values, expected {width}x{height}x4 = {width * height * 4}")
    return flat.reshape(height, width, 4)[:, :, 3] > 0


def _texts(result: Mapping) -> str | None:
    v = result.get("value") or {}
    t = v.get("text")
    if isinstance(t, str):
        t = [t]
    if isinstance(t, list):
        parts = [str(x).strip() for x in t if str(x).strip()]
        if parts:
            return " ".join(parts)
    return None


def resolve_sentence(region: Mapping, results: list[Mapping], task: Mapping,
                     prompt_fields: Iterable[str] = DEFAULT_PROMPT_FIELDS) -> tuple[str | None, str | None]:
    """The sentence for a brush region: per-region TextArea (same id or ``parentID``), else the task-level TextArea,
    else a prompt field of the task data. Returns ``(sentence, source)``; ``(None, None)`` when none."""
    rid = region.get("id")
    textareas = [r for r in results if str(r.get("type", "")).lower() == "textarea"]
    region_ids = {r.get("id") for r in results if str(r.get("type", "")).lower() != "textarea"}
    for r in textareas:
        if rid is not None and (r.get("id") == rid or r.get("parentID") == rid):
            t = _texts(r)
            if t:
                return t, "region-textarea"
    for r in textareas:
        if r.get("id") in region_ids or r.get("parentID") in region_ids:
            continue  # belongs to another region
        t = _texts(r)
        if t:
            return t, "textarea"
    data = task.get("data") if isinstance(task.get("data"), Mapping) else {}
    for f in prompt_fields:
        v = data.get(f)
        if isinstance(v, str) and v.strip():
            return v.strip(), f"task.data.{f}"
    return None, None


def image_url(task: Mapping, to_name: str | None = None, label_config: str = "") -> str | None:
    """The image reference of a task: the ``<Image>`` tag named ``to_name`` in the label config, else common keys."""
    data = task.get("data") if isinstance(task.get("data"), Mapping) else {}
    keys = []
    for tag in _IMAGE_TAG_RE.findall(label_config or ""):
        attrs = dict(_ATTR_RE.findall(tag))
        val = attrs.get("value", "")
        if val.startswith("$"):
            if to_name and attrs.get("name") == to_name:
                keys.insert(0, val[1:])
            else:
                keys.append(val[1:])
    keys += ["image", "img", "image_url", "url"]
    for k in keys:
        v = data.get(k)
        if isinstance(v, str) and v:
            return v
    for v in data.values():
        if isinstance(v, str) and re.match(r"^(https?://|s3://|gs://|azure-blob://|/data/|data/|upload/)", v):
            return v
    return None


def parent_model_version(ann: Mapping, task: Mapping) -> str | None:
    """The ``model_version`` of the prediction this annotation started from, when the payload tells."""
    pred = ann.get("prediction")
    if isinstance(pred, Mapping) and pred.get("model_version"):
        return str(pred["model_version"])
    parent = ann.get("parent_prediction")
    if isinstance(parent, Mapping):
        if parent.get("model_version"):
            return str(parent["model_version"])
        parent = parent.get("id")
    preds = [p for p in (task.get("predictions") or []) if isinstance(p, Mapping)]
    if parent is not None:
        for p in preds:
            if _int(p.get("id")) == _int(parent) and p.get("model_version"):
                return str(p["model_version"])
    return None


def _image_size(data: bytes) -> tuple[int, int]:
    """(width, height) as the browser shows it (EXIF orientation applied)."""
    from PIL import Image, ImageOps

    try:
        with Image.open(io.BytesIO(data)) as im:
            w, h = im.size
            orientation = im.getexif().get(0x0112, 1)
    except Exception as exc:
        raise PermanentError(f"image is not decodable: {exc}") from exc
    return (h, w) if orientation in (5, 6, 7, 8) else (w, h)


def _as_list(v) -> list:
    if v is None:
        return []
    if isinstance(v, (list, tuple)):
        return list(v)
    return [v]


def _id_of(v):
    if isinstance(v, Mapping):
        v = v.get("id")
    return _int(v)


def _float(v):
    try:
        return None if v is None else float(v)
    except (TypeError, ValueError):
        return None


def wait_until_idle(store: Datastore, timeout: float = 30.0, poll: float = 0.05) -> bool:
    """Block until the inbox has nothing pending or processing (tests, benchmarks)."""
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if store.pending_event_count() == 0:
            return True
        time.sleep(poll)
    return False
