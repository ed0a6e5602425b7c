"""The model class, shaped like label-studio-ml 2.x's ``LabelStudioMLBase``: ``setup()``,
``predict(tasks, context=None, **kwargs) -> ModelResponse``, ``fit(event, data, **kwargs)``, ``get``/``set``,
``model_version``, ``label_interface``. As upstream, one instance is built per request (cheap); everything heavy
lives in the process-wide :class:`Runtime` (model manager, media fetcher, datastore, counters).

Data flow of ``predict``: prompts (context / task fields / labels) -> media (image at natural, EXIF-transposed size)
-> ``predictor.predict_batch`` over every (image, sentence) pair of a chunk of tasks -> brush RLE regions.
"""

from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass
from typing import Any, Optional

import numpy as np

from backend.labelstudio.brush import brush_region, textarea_region
from backend.labelstudio.media import MediaError
from backend.labelstudio.prompts import LabelingSpec, collect_prompts, is_interactive, parse_label_config

logger = logging.getLogger(__name__)

TRAIN_EVENTS = ("ANNOTATION_CREATED", "ANNOTATIONS_CREATED", "ANNOTATION_UPDATED", "ANNOTATIONS_DELETED",
                "ANNOTATION_DELETED", "START_TRAINING")


class TaskError(Exception):
    """One task cannot be predicted (the message is safe to log and to show)."""


class ModelUnavailable(RuntimeError):
    """The model cannot be loaded; every task of the request would fail."""


@dataclass
class ModelResponse:
    """What ``predict`` returns: one prediction dict per task, in task order (sent to LS as ``results``)."""
    predictions: list
    model_version: str
    message: Optional[str] = None

    def to_json(self) -> dict:
        out = {"results": self.predictions, "model_version": self.model_version}
        if self.message:
            out["message"] = self.message
        return out


class SSPSAMBackend:
    """Text-prompted BrushLabels pre-annotation with SSP-SAM."""

    _kv_lock = threading.Lock()
    _kv: dict = {}                 # per-process key/value store (upstream's get/set), keyed by (project, key)

    def __init__(self, runtime, project_id: Optional[str] = None, label_config: Optional[str] = None,
                 extra_params: Optional[dict] = None):
        self.runtime = runtime
        self.project_id = project_id
        self.label_config = label_config
        self.extra_params = extra_params or {}
        self.setup()

    # ------------------------------------------------------------------ upstream-compatible helpers
    def setup(self) -> None:
        """Called for every instance (as upstream). Never loads the model."""

    @property
    def model_version(self) -> str:
        return self.runtime.manager.version

    @property
    def label_interface(self):
        from label_studio_sdk.label_interface import LabelInterface
        return LabelInterface(self.label_config)

    def get(self, key: str):
        with self._kv_lock:
            return self._kv.get((str(self.project_id), key))

    def set(self, key: str, value) -> None:
        with self._kv_lock:
            self._kv[(str(self.project_id), key)] = value

    def has(self, key: str) -> bool:
        with self._kv_lock:
            return (str(self.project_id), key) in self._kv

    # ------------------------------------------------------------------ fit
    def fit(self, event: str, data: dict, **kwargs) -> dict:
        """Queue the event for the background correction worker (never trains inside the request)."""
        store = self.runtime.require_store()
        event_id = store.enqueue_event(event, data)
        self.runtime.metrics.inc("events_enqueued")
        return {"event_id": event_id}

    # ------------------------------------------------------------------ predict
    def predict(self, tasks: list, context: Optional[dict] = None, **kwargs) -> ModelResponse:
        spec = parse_label_config(self.label_config)
        rt = self.runtime
        interactive = is_interactive(context)
        try:
            served = rt.manager.get()
        except Exception as exc:
            logger.error("model unavailable: %s: %s", type(exc).__name__, exc)
            raise ModelUnavailable(f"the model could not be loaded ({type(exc).__name__})") from None
        version = served.version
        n = len(tasks)
        results: list = [None] * n
        messages: list = []
        batch = max(1, int(rt.config.predict_batch_size))
        every = 1 if n <= 20 else max(1, n // 10)
        t_start = time.perf_counter()
        for start in range(0, n, batch):
            chunk = list(range(start, min(n, start + batch)))
            prepared = {}
            for i in chunk:
                try:
                    prepared[i] = self._prepare(spec, tasks[i], context)
                except TaskError as exc:
                    results[i] = self._failed(version, tasks[i], i, n, str(exc))
                    messages.append(str(exc))
            preds = self._run(served.predictor, prepared)
            for i in chunk:
                if results[i] is not None:
                    continue
                task = tasks[i]
                image, prompts = prepared[i]
                task_preds = preds.get(i)
                if isinstance(task_preds, Exception):
                    results[i] = self._failed(version, task, i, n, f"prediction failed: {type(task_preds).__name__}")
                    continue
                try:
                    results[i], msg = self._build(spec, task, image, prompts, task_preds, version, interactive)
                except Exception as exc:   # a malformed prediction must not fail the batch
                    logger.exception("task %d/%d (id %s): building the result failed", i + 1, n, _task_id(task))
                    results[i] = self._failed(version, task, i, n, f"result building failed: {type(exc).__name__}",
                                              logged=True)
                    continue
                if msg:
                    messages.append(msg)
                if (i + 1) % every == 0 or i + 1 == n:
                    logger.info("predict: task %d/%d (id %s): %d region(s), %.2f s elapsed", i + 1, n,
                                _task_id(task), sum(r["type"] == "brushlabels" for r in results[i]["result"]),
                                time.perf_counter() - t_start)
        message = None
        if interactive and results and not results[0]["result"]:
            message = messages[0] if messages else "no object found for this sentence"
            results[0]["message"] = message
        return ModelResponse(predictions=results, model_version=version, message=message)

    # ------------------------------------------------------------------ steps
    def _prepare(self, spec: LabelingSpec, task: Any, context) -> tuple:
        if not isinstance(task, dict):
            raise TaskError("task must be a JSON object")
        data = task.get("data")
        if not isinstance(data, dict):
            raise TaskError("task has no 'data' object")
        url = data.get(spec.image_value_key)
        if not isinstance(url, str) or not url.strip():
            raise TaskError(f"task data has no '{spec.image_value_key}' image URL")
        prompts = collect_prompts(spec, task, context, self.runtime.config.prompt_fields)
        if not prompts:
            raise TaskError("no sentence: type one in the prompt TextArea, add a task field "
                            f"({', '.join(self.runtime.config.prompt_fields)}) or label values")
        try:
            image = self.runtime.media.load_image(url, task_id=task.get("id"),
                                                  project_id=self.project_id or task.get("project"))
        except MediaError as exc:
            raise TaskError(str(exc)) from None
        return image, prompts

    def _run(self, predictor, prepared: dict) -> dict:
        """predict_batch over every (image, sentence) pair of the prepared tasks; on failure, per task to isolate it.
        Returns {task index: [Prediction, ...] or Exception}."""
        pairs, owners = [], []
        for i, (image, prompts) in prepared.items():
            for p in prompts:
                pairs.append((image, p.sentence))
                owners.append(i)
        if not pairs:
            return {}
        out: dict = {}
        try:
            preds = list(predictor.predict_batch(pairs))
            if len(preds) != len(pairs):
                raise RuntimeError(f"predict_batch returned {len(preds)} predictions for {len(pairs)} inputs")
            for i, p in zip(owners, preds):
                out.setdefault(i, []).append(p)
            return out
        except Exception:
            if len(prepared) == 1:
                i = next(iter(prepared))
                logger.exception("prediction failed for task index %d", i)
                return {i: RuntimeError("prediction failed")}
            logger.warning("batched prediction failed; retrying task by task to isolate the failure")
        for i, (image, prompts) in prepared.items():
            try:
                preds = list(predictor.predict_batch([(image, p.sentence) for p in prompts]))
                if len(preds) != len(prompts):
                    raise RuntimeError("wrong number of predictions")
                out[i] = preds
            except Exception as exc:
                logger.exception("prediction failed for task index %d", i)
                out[i] = exc
        return out

    def _build(self, spec: LabelingSpec, task: dict, image: np.ndarray, prompts: list, preds: list, version: str,
               interactive: bool) -> tuple:
        rt = self.runtime
        h, w = image.shape[:2]
        regions, scores, echoed, misses = [], [], [], []
        project_id = _project_id(self.project_id, task)
        for prompt, pred in zip(prompts, preds):
            mask = np.asarray(pred.mask).astype(bool)
            if mask.shape != (h, w):
                raise ValueError(f"mask shape {mask.shape} != image shape {(h, w)}")
            score = float(getattr(pred, "score", 0.0) or 0.0)
            if bool(getattr(pred, "no_target", False)) or not mask.any():
                misses.append(prompt.sentence)
                rt.metrics.inc("no_target")
                # recorded too (an empty mask): a region the annotator then draws for this sentence is scored
                # against it (IoU 0), and the per-version statistics count the model's "nothing here" answers
                rt.record_prediction(project_id, task.get("id"), prompt.sentence, version, np.zeros_like(mask),
                                     score)
                continue
            regions.append(brush_region(mask, from_name=spec.brush_name, to_name=spec.image_name,
                                        label=prompt.label, score=score))
            scores.append(score)
            if prompt.source in ("context", "task") and prompt.sentence not in echoed:
                echoed.append(prompt.sentence)
            rt.record_prediction(project_id, task.get("id"), prompt.sentence, version, mask, score)
        rt.metrics.inc("tasks")
        rt.metrics.inc("regions", len(regions))
        result = list(regions)
        if spec.prompt_name and echoed:
            result.append(textarea_region(echoed, from_name=spec.prompt_name, to_name=spec.image_name))
        msg = None
        if misses and not regions:
            msg = "no object matches " + "; ".join(f"'{s}'" for s in misses[:3])
        return {"result": result, "score": float(np.mean(scores)) if scores else 0.0, "model_version": version}, msg

    def _failed(self, version: str, task, i: int, n: int, message: str, logged: bool = False) -> dict:
        self.runtime.metrics.inc("task_errors")
        if not logged:
            logger.error("predict: task %d/%d (id %s) failed: %s", i + 1, n, _task_id(task), message)
        return {"result": [], "score": 0.0, "model_version": version}


def _task_id(task) -> Any:
    return task.get("id") if isinstance(task, dict) else None


def _project_id(project_id, task):
    pid = project_id if project_id not in (None, "", "None") else (task.get("project") if isinstance(task, dict)
                                                                    else None)
    try:
        return int(pid) if pid is not None else None
    except (TypeError, ValueError):
        return pid
