"""Turn Label Studio webhook events into training samples (the backend side of learning from corrections).

``/webhook`` only calls :meth:`Datastore.enqueue_event` (a durable insert, well under a millisecond on SQLite) and
answers. A :class:`CorrectionWorker` thread drains that inbox:

* ``ANNOTATION_CREATED`` / ``ANNOTATIONS_CREATED`` (bulk; ``annotation``/``annotations`` may be a list of bodies or of
  ids) / ``ANNOTATION_UPDATED``: one sample per mask region (``brushlabels`` RLE or ``bitmasklabels`` PNG: sentence,
  mask, image snapshot in the blob store, ids, annotator, timestamps, region ``origin``, model version of the parent
  prediction, IoU with the prediction the server recorded). An update replaces that annotation's samples;
  cancelled/skipped annotations contribute nothing (and retract what they had).
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

import logging
import re
import threading
from dataclasses import dataclass
from typing import Any, Callable, Mapping

import numpy as np

from backend.config import BackendConfig
from backend.labelstudio.brush import MASK_TYPES, region_labels, region_mask
from backend.labelstudio.protocol import (ANNOTATION_DELETE_ACTIONS, ANNOTATION_UPSERT_ACTIONS, TRAINING_ACTIONS,
                                          as_int, id_of)
from backend.labelstudio.label_config import LabelConfigError, parse_label_config
from backend.labelstudio.prompts import DEFAULT_PROMPT_FIELDS, region_sentence
from backend.labelstudio.records import RecordUnavailable
from backend.learning.datastore import EVENT_IGNORED, ORIGINS, Datastore
from backend.learning.leases import is_dead_local_owner, new_owner_id
from ssp_sam.images import ImageTooLarge, image_size
from ssp_sam.metrics import iou

log = logging.getLogger(__name__)

NO_TARGET_REGION_ID = "no-target"  # region id of the sample kept for an annotation submitted without regions
_URL_LIKE = re.compile(r"^(https?://|s3://|gs://|azure-blob://|/data/|data/|upload/)")


class PermanentError(Exception):
    """The event can never succeed as it is (malformed payload, missing body and no way to fetch it)."""


class RegionRejected(Exception):
    """One region cannot become a sample (bad RLE, wrong size, empty mask); the others are kept."""


ImageFetcher = Callable[[str, Mapping], bytes]   # (url, task) -> the image's bytes


@dataclass
class WorkerConfig:
    max_attempts: int = 5              # tries before an event is marked failed (poison)
    backoff_base_s: float = 2.0        # retry delay = base * 2 ** (attempt - 1), capped
    backoff_max_s: float = 300.0
    poll_interval_s: float = 1.0       # idle wait between inbox polls (``notify()`` wakes the thread early)
    batch_size: int = 16
    lease_s: float = 60.0              # an event's lease; renewed every lease_s / 3 while the worker lives, so a worker
                                       # that dies frees it within lease_s (at once for a process of this host)
    prompt_fields: tuple = DEFAULT_PROMPT_FIELDS
    min_mask_pixels: int = 1
    empty_annotation_is_no_target: bool = True  # no brush region + a sentence -> a no-target sample (empty mask)
    max_image_pixels: int | None = None  # a bigger image fails the event, checked from its header (MAX_IMAGE_PIXELS)
    fetch_annotation: Callable[[int], Mapping] | None = None  # annotation id -> body (SDK), for id-only payloads
    fetch_task: Callable[[int], Mapping] | None = None        # task id -> task (SDK), when ``task`` is absent
    worker_id: str | None = None

    @classmethod
    def from_backend(cls, config: BackendConfig, **overrides: Any) -> "WorkerConfig":
        """The worker settings the backend's environment gives (``PROMPT_FIELDS``, ``EMPTY_ANNOTATION_IS_NO_TARGET``,
        ``MAX_IMAGE_PIXELS``)."""
        return cls(prompt_fields=tuple(config.prompt_fields),
                   empty_annotation_is_no_target=config.empty_annotation_is_no_target,
                   max_image_pixels=config.max_image_pixels, **overrides)


class CorrectionWorker:
    """Background thread that drains the datastore's inbox into samples."""

    def __init__(self, store: Datastore, media_fetcher: Any, config: WorkerConfig | None = None):
        self.store = store
        self.fetch_image = as_image_fetcher(media_fetcher)
        self.config = config or WorkerConfig()
        self.worker_id = self.config.worker_id or new_owner_id("worker")
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
        self.recover_dead_workers()
        heartbeat = threading.Thread(target=self._renew_leases, name="ssp-sam-corrections-lease", daemon=True)
        heartbeat.start()
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

    def _renew_leases(self) -> None:
        """Heartbeat: keep the leases of the events being processed alive while this worker lives."""
        while not self._stop.wait(self.config.lease_s / 3):
            try:
                self.store.renew_event_leases(self.worker_id, self.config.lease_s)
            except Exception as exc:  # database hiccup: the next beat tries again
                log.warning("renewing event leases failed: %s", exc)

    def recover_dead_workers(self) -> int:
        """Give the events held by workers of this host that are gone (killed, crashed) back to the inbox now,
        rather than after their lease. Returns how many events came back."""
        try:
            dead = [o for o in self.store.event_lease_owners() if is_dead_local_owner(o)]
            n = self.store.release_event_leases(dead)
        except Exception as exc:
            log.warning("could not check for events of dead workers: %s", exc)
            return 0
        if n:
            log.warning("%d event(s) held by %d dead worker process(es) handed back to the inbox", n, len(dead))
        return n

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
            self._retry_or_fail(ev, f"{type(exc).__name__}: {exc}")
            return
        self.store.mark_event_done(eid, result, status=EVENT_IGNORED if result.get("ignored") else "done")
        self.processed += 1

    def _retry_or_fail(self, ev: Mapping, err: str) -> None:
        """A transient failure: retry with exponential backoff, or mark the event failed after ``max_attempts``."""
        self.last_error = err
        attempts = int(ev.get("attempts") or 1)
        if attempts >= self.config.max_attempts:
            log.error("event %s (%s) failed after %d attempts: %s", ev["id"], ev["action"], attempts, err)
            self.store.mark_event_failed(ev["id"], f"after {attempts} attempts: {err}")
            return
        delay = min(self.config.backoff_max_s, self.config.backoff_base_s * 2 ** (attempts - 1))
        log.warning("event %s (%s) attempt %d failed, retry in %.1fs: %s", ev["id"], ev["action"], attempts, delay,
                    err)
        self.store.mark_event_retry(ev["id"], err, delay)

    def handle_event(self, action: str, payload: Mapping, event_id: int | None = None) -> dict:
        if not isinstance(payload, Mapping):
            raise PermanentError("payload is not a JSON object")
        action = str(action or payload.get("action") or "")
        project = payload.get("project") if isinstance(payload.get("project"), Mapping) else {}
        project_id = project.get("id") if project else payload.get("project")
        annotations = _as_list(payload.get("annotations", payload.get("annotation")))
        if action in TRAINING_ACTIONS:
            return {"training_request": self.store.add_training_request(project_id, event_id)}
        if action in ANNOTATION_DELETE_ACTIONS:
            ids = [i for i in map(id_of, annotations) if i is not None]
            if not ids:
                raise PermanentError(f"{action} without annotation ids")
            return {"retracted": {str(i): self.store.retract_annotation(i, "deleted", event_id, project_id)
                                  for i in ids}}
        if action in ANNOTATION_UPSERT_ACTIONS:
            if not annotations:
                raise PermanentError(f"{action} without annotation")
            tasks = {as_int(t["id"]): t for t in _as_list(payload.get("tasks", payload.get("task")))
                     if isinstance(t, Mapping) and t.get("id") is not None}
            out = {}
            for item in annotations:
                ann = self._annotation_body(item)
                out[str(ann.get("id"))] = self.ingest_annotation(ann, tasks, project, event_id)
            return {"annotations": out}
        return {"ignored": True, "action": action}

    # -- one annotation -----------------------------------------------------------------------------------------------
    def _annotation_body(self, item: Any) -> Mapping:
        if isinstance(item, Mapping) and isinstance(item.get("result"), list):
            return item
        aid = id_of(item)
        if aid is None:
            raise PermanentError(f"annotation item is neither a body nor an id: {str(item)[:200]}")
        if self.config.fetch_annotation is None:
            raise PermanentError(f"annotation {aid}: payload has no body and no fetch_annotation is configured")
        body = _fetch_record(self.config.fetch_annotation, aid)
        if not isinstance(body, Mapping):
            raise PermanentError(f"annotation {aid}: fetch_annotation returned {type(body).__name__}")
        return body

    def _task_for(self, ann: Mapping, tasks: Mapping[int, Mapping]) -> Mapping:
        task = ann.get("task")
        if isinstance(task, Mapping) and isinstance(task.get("data"), Mapping):
            return task
        tid = id_of(task)
        if tid in tasks:
            return tasks[tid]
        if len(tasks) == 1 and tid is None:
            return next(iter(tasks.values()))
        if self.config.fetch_task is not None and tid is not None:
            t = _fetch_record(self.config.fetch_task, tid)
            if isinstance(t, Mapping):
                return t
        raise PermanentError(f"annotation {ann.get('id')}: task {tid} not in payload and no fetch_task configured")

    def ingest_annotation(self, ann: Mapping, tasks: Mapping[int, Mapping], project: Mapping,
                          event_id: int | None = None) -> dict:
        """Replace the samples of one annotation with one per brush region (or a no-target sample)."""
        aid = as_int(ann.get("id"))
        if aid is None:
            raise PermanentError("annotation without id")
        project_id = as_int(ann.get("project")) or as_int(project.get("id") if project else None)
        updated_at = ann.get("updated_at") or ann.get("created_at")
        if ann.get("was_cancelled") or ann.get("skipped"):
            res = self.store.apply_annotation(aid, project_id, id_of(ann.get("task")), updated_at, [], event_id,
                                              state="cancelled")
            return {**res, "cancelled": True}
        task = self._task_for(ann, tasks)
        results = [r for r in (ann.get("result") or []) if isinstance(r, Mapping)]
        brush = [r for r in results if str(r.get("type", "")).lower() in MASK_TYPES]   # brush or bitmask
        builder = _SampleBuilder(self, ann, task, results, (project or {}).get("label_config") or "")
        samples, rejected = [], []
        for region in brush:
            try:
                samples.append(builder.region_sample(region))
            except RegionRejected as exc:
                rejected.append({"region_id": str(region.get("id") or ""), "reason": str(exc)})
                log.warning("annotation %s region %s rejected: %s", aid, region.get("id"), exc)
        if not brush and self.config.empty_annotation_is_no_target:
            try:
                samples += builder.no_target_sample()
            except RegionRejected as exc:
                rejected.append({"region_id": NO_TARGET_REGION_ID, "reason": str(exc)})
        task_id = as_int(task.get("id")) or id_of(ann.get("task"))
        res = self.store.apply_annotation(aid, project_id, task_id, updated_at, samples, event_id)
        res["regions"] = len(brush)
        if rejected:
            res["rejected"] = rejected
        return res


class _SampleBuilder:
    """Turns the regions of one submitted annotation into sample rows (one image fetch per annotation)."""

    def __init__(self, worker: CorrectionWorker, ann: Mapping, task: Mapping, results: list[Mapping],
                 label_config: str):
        self.worker, self.store, self.cfg = worker, worker.store, worker.config
        self.ann, self.task, self.results, self.label_config = ann, task, results, label_config
        self._images: dict[str, tuple[str, tuple[int, int]]] = {}

    def region_sample(self, region: Mapping) -> dict:
        """The sample of one brush region."""
        rid = str(region.get("id") or "")
        if not rid:
            raise RegionRejected("region without id")
        value = region.get("value") or {}
        labels = region_labels(value)
        label = str(labels[0]) if labels else None
        sentence, source = region_sentence(region, self.results, self.task, self.cfg.prompt_fields)
        if not sentence and label:
            sentence, source = label, "label"
        if not sentence:
            raise RegionRejected("no sentence: no TextArea, no prompt field in task data, no label")
        url, image_blob, (w, h) = self._image(region.get("to_name"))
        rw, rh = as_int(region.get("original_width")) or w, as_int(region.get("original_height")) or h
        if (rw, rh) != (w, h):
            raise RegionRejected(f"original size {rw}x{rh} != image size {w}x{h}")
        try:
            mask = region_mask(value, w, h)
        except ValueError as exc:
            raise RegionRejected(str(exc)) from None
        if int(mask.sum()) < self.cfg.min_mask_pixels:
            raise RegionRejected("empty mask")
        origin = str(region.get("origin") or "")
        return self._row(rid, sentence, source, label, url, image_blob, mask, origin if origin in ORIGINS else None)

    def no_target_sample(self) -> list[dict]:
        """Submitted with a sentence (TextArea or task field) and no region: the annotator says nothing matches. Kept
        as a sample with an empty mask, so fine-tuning keeps the model's "nothing here" answer and the held-out gate
        sees it. Labels alone (class-level pre-labeling) do not count: absent classes are not sentences someone asked
        about. Returns [] when there is no sentence."""
        sentence, source = region_sentence({}, self.results, self.task, self.cfg.prompt_fields)
        if not sentence:
            return []
        url, image_blob, (w, h) = self._image(None)
        return [self._row(NO_TARGET_REGION_ID, sentence, source, None, url, image_blob, np.zeros((h, w), bool),
                          None, no_target=True)]

    def _image(self, to_name: str | None) -> tuple[str, str, tuple[int, int]]:
        """(url, image blob, (width, height)) of the region's image, snapshotted into the blob store once."""
        url = image_url(self.task, to_name, self.label_config)
        if not url:
            raise PermanentError(f"task {self.task.get('id')}: no image URL in task data")
        if url not in self._images:
            data = self.worker.fetch_image(url, self.task)  # transient errors propagate -> the event is retried
            if not data:
                raise IOError(f"empty image from {url}")
            try:
                size = image_size(data, max_pixels=self.cfg.max_image_pixels)
            except ImageTooLarge as exc:
                raise PermanentError(f"task {self.task.get('id')}: image too large: {exc} (MAX_IMAGE_PIXELS)") from None
            except Exception as exc:
                raise PermanentError(f"image is not decodable: {exc}") from None
            self._images[url] = (self.store.blobs.put(data), size)
        return (url, *self._images[url])

    def _row(self, rid: str, sentence: str, source: str | None, label: str | None, url: str, image_blob: str,
             mask: np.ndarray, origin: str | None, no_target: bool = False) -> dict:
        h, w = mask.shape
        model_version, pred, pred_iou = self._parent_prediction(sentence, mask)
        if no_target:   # the model said nothing too (accepted), or its mask was removed (changed)
            origin = "manual" if pred_iou is None else ("prediction" if pred_iou >= 0.999 else "prediction-changed")
        elif origin is None:
            origin = "prediction" if pred_iou is not None and pred_iou >= 0.999 else (
                "prediction-changed" if pred_iou is not None and pred_iou > 0 else "manual")
        ann = self.ann
        return {
            "region_id": rid, "sentence": sentence.strip(), "sentence_source": source, "label": label,
            "mask_blob": self.store.blobs.put_mask(mask), "image_blob": image_blob, "image_url": url, "width": w,
            "height": h, "mask_area": int(mask.sum()), "annotator": id_of(ann.get("completed_by")),
            "lead_time": _float(ann.get("lead_time")), "ground_truth": 1 if ann.get("ground_truth") else 0,
            "origin": origin, "model_version": model_version,
            "prediction_id": as_int(pred["id"]) if pred else None, "prediction_iou": pred_iou,
            "ls_created_at": ann.get("created_at"),
        }

    def _parent_prediction(self, sentence: str, mask: np.ndarray) -> tuple[str | None, dict | None, float | None]:
        """(model version, recorded prediction, IoU of that prediction with the submitted mask) of the prediction
        this region started from: the payload's parent prediction version, matched to what the server recorded."""
        model_version = parent_model_version(self.ann, self.task)
        pred = None
        if self.task.get("id") is not None:
            pred = self.store.find_prediction(self.task["id"], model_version, sentence)
            if pred is None and model_version is not None:
                pred = self.store.find_prediction(self.task["id"], None, sentence)
                if pred is not None and pred["model_version"] != model_version:
                    pred = None
        if model_version is None and pred is not None:
            model_version = pred["model_version"]
        pred_iou = None
        if pred is not None and (pred["width"], pred["height"]) == (mask.shape[1], mask.shape[0]):
            try:
                pred_iou = iou(self.store.prediction_mask(pred), mask)
            except Exception as exc:  # a missing blob must not block ingestion
                log.warning("prediction %s mask unreadable: %s", pred.get("id"), exc)
        return model_version, pred, pred_iou


def _fetch_record(fetch: Callable[[int], Mapping], record_id: int) -> Mapping:
    """A record read back from Label Studio; one it cannot give fails the event at once, transient errors (network,
    5xx) propagate and the event is retried."""
    try:
        return fetch(record_id)
    except RecordUnavailable as exc:
        raise PermanentError(str(exc)) from None


def as_image_fetcher(media: Any) -> ImageFetcher:
    """``(url, task) -> bytes`` from a plain callable or from ``backend.labelstudio.media.MediaFetcher``."""
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

def image_url(task: Mapping, to_name: str | None = None, label_config: str = "") -> str | None:
    """The image reference of a task: the key of the ``<Image>`` named ``to_name`` in the project's labeling config
    (else of the brush control's image), then common keys, then the first value that looks like a media URL."""
    data = task.get("data") if isinstance(task.get("data"), Mapping) else {}
    keys = []
    if label_config:
        try:
            keys.append(parse_label_config(label_config).image_data_key(to_name))
        except LabelConfigError:
            pass  # a payload whose config this backend cannot use: fall back to the common keys
    for key in [*keys, "image", "img", "image_url", "url"]:
        if isinstance(data.get(key), str) and data[key]:
            return data[key]
    return next((v for v in data.values() if isinstance(v, str) and _URL_LIKE.match(v)), None)


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
    if parent is not None:
        for p in task.get("predictions") or []:
            if isinstance(p, Mapping) and as_int(p.get("id")) == as_int(parent) and p.get("model_version"):
                return str(p["model_version"])
    return None


def _as_list(v) -> list:
    if v is None:
        return []
    return list(v) if isinstance(v, (list, tuple)) else [v]


def _float(v):
    try:
        return None if v is None else float(v)
    except (TypeError, ValueError):
        return None
