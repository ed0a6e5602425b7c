"""The model class, shaped like label-studio-ml 2.x's ``LabelStudioMLBase.predict(tasks, context=None) ->
ModelResponse``. As upstream, one instance is built per request (cheap); everything heavy lives in the process-wide
:class:`backend.serving.app.Runtime` (model manager, media fetcher, datastore, counters). Webhook events are not
handled here: ``/webhook`` queues them in the datastore and the correction worker turns them into samples.

Data flow of ``predict``: prompts (context / task fields / labels) -> media (image at natural, EXIF-transposed size)
-> ``predictor.predict_batch`` over every (image, sentence) pair of a chunk of tasks (the SAM and CLIP image encoders
run batched across the chunk's images) -> mask regions (brush RLE, or bitmask PNG for a ``<BitmaskLabels>`` config).
One bad task never fails the others: it gets an answer without a result, and its reason is logged.

An interactive call whose context holds smart clicks or boxes on the image (``backend.labelstudio.sam_prompts``)
takes another path: ``predictor.predict_interactive`` with the clicks, the box and the sentence (the call's, else the
one its interactive session remembers, else the task's own; ``backend.serving.sessions``), and one refined region.

The task -> regions steps are public so that ``ssp-sam prelabel`` (``backend/prelabel.py``) produces exactly what
``/predict`` answers: :meth:`SSPSAMBackend.prepare` (sentences and image of one task; thread-safe, so a bulk run
downloads ahead of the model) and :meth:`SSPSAMBackend.predict_prepared` (the model over prepared tasks, then one
prediction dict per task).
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from typing import Any, Optional

import numpy as np

from backend.labelstudio.brush import MASK_TYPES, mask_region, textarea_region
from backend.labelstudio.label_config import LabelingSpec, parse_label_config
from backend.labelstudio.media import MediaError
from backend.labelstudio.prompts import (clean_sentence, collect_prompts, context_sentences, is_interactive,
                                         label_for_sentence, task_sentences)
from backend.labelstudio.protocol import project_id_of
from backend.labelstudio.sam_prompts import PromptError, PromptItems, prompt_items, prompt_label, sam_prompts
from backend.logs import loggable
from backend.weights import WeightsMissing, WeightsNotReady
from ssp_sam.timing import stage

logger = logging.getLogger(__name__)


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


@dataclass
class PreparedTask:
    """One task ready for the model: the task, its image at natural (EXIF-transposed) size, and its sentences."""
    task: dict
    image: np.ndarray
    prompts: list
    picture: Optional[str] = None      # the picture's content key (``ImageRef.key``)


class SSPSAMBackend:
    """Text-prompted (and click- or box-refined) BrushLabels / BitmaskLabels pre-annotation with SSP-SAM."""

    def __init__(self, runtime, project_id: Optional[int] = None, label_config: Optional[str] = None):
        self.runtime = runtime
        self.project_id = project_id
        self.label_config = label_config

    @property
    def batch_size(self) -> int:
        """Tasks per ``predict_batch`` call (``PREDICT_BATCH_SIZE``): their images go through the encoders together."""
        return max(1, int(self.runtime.config.predict_batch_size))

    def served(self):
        """The model to predict with (``ModelManager.get``: loads it on first use); ``ModelUnavailable`` when it
        cannot be loaded. Snapshot it once per request or run."""
        try:
            return self.runtime.manager.get()
        except (WeightsNotReady, WeightsMissing) as exc:   # downloading, or which command fetches them
            raise ModelUnavailable(str(exc)) from None
        except Exception as exc:
            logger.error("model unavailable: %s: %s", type(exc).__name__, exc)
            raise ModelUnavailable(f"the model could not be loaded ({type(exc).__name__})") from None

    # ------------------------------------------------------------------ predict
    def predict(self, tasks: list, context: Optional[dict] = None) -> ModelResponse:
        spec = parse_label_config(self.label_config)
        items = prompt_items(spec, context) if is_interactive(context) else PromptItems((), (), ())
        if items and len(tasks) == 1:
            return self._predict_prompts(spec, tasks[0], context, items)
        if self._awaiting_sentence(spec, tasks, context):
            return self._prewarm(spec, tasks[0], items.notes)
        served = self.served()
        results: list = [None] * len(tasks)
        messages: list = []
        progress = _Progress(len(tasks))
        for start in range(0, len(tasks), self.batch_size):
            chunk = range(start, min(len(tasks), start + self.batch_size))
            self._predict_chunk(spec, served, tasks, chunk, context, results, messages, progress)
        message = None
        if is_interactive(context):
            message = _interactive_message(results, messages, "no object found for this sentence")
        return ModelResponse(predictions=results, model_version=served.version, message=message)

    def _predict_chunk(self, spec: LabelingSpec, served, tasks: list, chunk: range, context, results: list,
                       messages: list, progress: "_Progress") -> None:
        """Fill ``results[i]`` for the tasks of one chunk: prepare each, predict them together, build each."""
        prepared = {}
        for i in chunk:
            try:
                prepared[i] = self.prepare(spec, tasks[i], context)
            except TaskError as exc:
                results[i] = self.failed(served.version, tasks[i], str(exc))
                messages.append(str(exc))
        for i, (result, msg) in self.predict_prepared(spec, served, prepared).items():
            results[i] = result
            if msg:
                messages.append(msg)
            if "error" not in result:
                progress.task_done(i, tasks[i], result)

    # ------------------------------------------------------------------ prewarm
    def _awaiting_sentence(self, spec: LabelingSpec, tasks: list, context) -> bool:
        """An interactive call on one task before the annotator typed a sentence: the config has a prompt TextArea,
        the context has no sentence in it and the task data has none either."""
        return (is_interactive(context) and spec.prompt_name is not None and len(tasks) == 1
                and isinstance(tasks[0], dict) and isinstance(tasks[0].get("data"), dict)
                and not context_sentences(spec, context)
                and not task_sentences(tasks[0], self.runtime.config.prompt_fields))

    def _prewarm(self, spec: LabelingSpec, task: dict, notes: tuple = ()) -> ModelResponse:
        """Answer at once (nothing to segment yet) and compute the task image's embedding in the background, so the
        sentence the annotator types next runs only the prompt path."""
        url = task["data"].get(spec.image_value_key)
        queued = isinstance(url, str) and bool(url.strip()) and self.runtime.prewarm(
            url, task_id=task.get("id"), project_id=self._project_of(task))
        message = "; ".join(["type a sentence in the prompt box" + (" (the image is being prepared)" if queued else
                                                                     ""), *notes])
        version = self.runtime.model_version()
        return ModelResponse(predictions=[{"result": [], "score": 0.0, "model_version": version,
                                           "message": message}], model_version=version, message=message)

    # ------------------------------------------------------------------ clicks and boxes
    def _predict_prompts(self, spec: LabelingSpec, task: Any, context: dict, items: PromptItems) -> ModelResponse:
        """An interactive call with smart clicks and/or boxes on the image: one refined region, from the clicks, the
        box and the sentence (the call's, else its session's, else the task's own when it has exactly one) through
        ``predict_interactive``; the previous mask of the session as SAM's dense prompt with
        ``INTERACTIVE_MASK_PROMPT``. Any bad input answers one empty result with the reason."""
        served = self.served()
        version = served.version
        try:
            result = self._prompt_result(spec, served, task, context, items)
        except (TaskError, PromptError) as exc:
            result = self.failed(version, task, str(exc))
        except Exception as exc:         # a model or result-building failure: the reason is in the log
            logger.exception("task id %s: the interactive prediction failed", _task_id(task))
            result = self.failed(version, task, f"prediction failed: {type(exc).__name__}", logged=True)
        message = _interactive_message([result], [], "no object found for these clicks or this box")
        return ModelResponse(predictions=[result], model_version=version, message=message)

    def _prompt_result(self, spec: LabelingSpec, served, task: Any, context: dict, items: PromptItems) -> dict:
        rt, version, predictor = self.runtime, served.version, served.predictor
        if not callable(getattr(predictor, "predict_interactive", None)):
            raise TaskError("the served model takes no clicks or boxes")
        ref, image = self._open(task, _image_url(spec, task))
        h, w = ref.hw
        prompts = sam_prompts(spec, items, w, h)
        typed = context_sentences(spec, context)
        key = self._session_key(version, task, ref.key)
        plan = rt.sessions.plan(key, typed[-1] if typed else None, prompts.clicks, prompts.boxes)
        sentence = plan.sentence
        if sentence is None and not plan.known:          # this process never saw the task's sentence (another
            sentence = self._recorded_sentence(task, version)   # worker or replica did, or it was a pre-label)
        if sentence is None:
            own = task_sentences(task, rt.config.prompt_fields)
            sentence = own[0] if len(own) == 1 else None
        points = np.array([[c.x, c.y] for c in plan.clicks], np.float32).reshape(-1, 2)
        labels = np.array([1 if c.positive else 0 for c in plan.clicks], np.float32)
        mask_input = plan.mask_input
        if plan.sentence_mask_needed and sentence:   # the first refinement of a typed sentence's mask
            mask_input = predictor.predict_interactive(image, sentence).low_res_logits
        pred = predictor.predict_interactive(image, sentence, points=points if len(points) else None,
                                             labels=labels if len(points) else None, box=plan.box,
                                             mask_input=mask_input)
        rt.sessions.answered(key, plan, sentence, getattr(pred, "low_res_logits", None), mask_input)
        logger.info("interactive: task id %s: %d click(s) (%d negative), %s, %s, %s session%s", _task_id(task),
                    len(plan.clicks), sum(not c.positive for c in plan.clicks), "a box" if plan.box else "no box",
                    "a sentence" if sentence else "no sentence", "continued" if plan.continued else "new",
                    ", previous mask as dense prompt" if mask_input is not None else "")
        rt.metrics.inc("interactive_prompts")
        rt.metrics.inc("tasks")
        mask = np.asarray(pred.mask, dtype=bool)
        if mask.shape != (h, w):
            raise ValueError(f"mask shape {mask.shape} != image shape {(h, w)}")
        notes = list(prompts.notes)
        score = float(getattr(pred, "score", 0.0) or 0.0)
        if bool(getattr(pred, "no_target", False)) or not mask.any():
            rt.metrics.inc("no_target")
            what = " and ".join(x for x in ("these clicks" if plan.clicks else "", "this box" if plan.box else "") if x)
            what = f"'{sentence}' with {what}" if sentence else what
            return {"result": [], "score": 0.0, "model_version": version,
                    "message": "; ".join([f"no object found for {what}", *notes])}
        label = prompt_label(spec, prompts, label_for_sentence(spec, sentence) if sentence else None)
        with stage("rle"):
            result = [mask_region(mask, from_name=spec.brush_name, to_name=spec.image_name, label=label, score=score,
                                  kind=spec.mask_type)]
        if spec.prompt_name and sentence:
            result.append(textarea_region([sentence], from_name=spec.prompt_name, to_name=spec.image_name))
        rt.metrics.inc("regions")
        out = {"result": result, "score": score, "model_version": version}
        if notes:
            out["message"] = "; ".join(notes)
        return out

    def _recorded_sentence(self, task: dict, version: str) -> Optional[str]:
        """The sentence of the latest prediction this model version made for the task, from the datastore every worker
        and replica shares: the mask the annotator is correcting (typed in the editor, or the pre-label). It lets a
        click that reaches another worker or replica than the sentence did combine with it. None when there is none
        or the datastore is unavailable (best effort)."""
        store = self.runtime.store()
        if store is None or task.get("id") is None:
            return None
        try:
            row = store.find_prediction(task.get("id"), model_version=version)
        except Exception as exc:       # noqa: BLE001  (a datastore error must not fail the click)
            logger.warning("interactive: the datastore could not say the task's sentence: %s", type(exc).__name__)
            return None
        return clean_sentence(row.get("sentence")) if row else None

    def _session_key(self, version: str, task: dict, picture: str) -> tuple:
        return (version, self._project_of(task), task.get("id"), picture)

    # ------------------------------------------------------------------ steps (shared with ssp-sam prelabel)
    def prepare(self, spec: LabelingSpec, task: Any, context=None) -> PreparedTask:
        """The sentences and the image of one task; ``TaskError`` with a reason fit for the client when it has none
        or its image cannot be read. Thread-safe (the media fetcher is)."""
        url = _image_url(spec, task)
        prompts = collect_prompts(spec, task, context, self.runtime.config.prompt_fields)
        if not prompts:
            raise TaskError("no sentence: type one in the prompt TextArea, add a task field "
                            f"({', '.join(self.runtime.config.prompt_fields)}) or label values")
        ref, image = self._open(task, url)
        return PreparedTask(task, image, prompts, ref.key)

    def _open(self, task: dict, url: str) -> tuple:
        """The task's picture: its ``ImageRef`` and what the predictor takes (``_image_for``); ``TaskError``."""
        try:
            ref = self.runtime.media.open_image(url, task_id=task.get("id"), project_id=self._project_of(task))
            return ref, _image_for(self.runtime.manager.get().predictor, ref)
        except MediaError as exc:
            raise TaskError(str(exc)) from None

    def predict_prepared(self, spec: LabelingSpec, served, prepared: dict) -> dict:
        """The model over every (image, sentence) pair of ``prepared`` ({key: PreparedTask}) at once, then one
        prediction per task: ``{key: (prediction dict, message or None)}``. A prediction dict is what ``/predict``
        answers for the task: ``{"result", "score", "model_version"}``, or ``{"score", "model_version", "error"}``
        when the model or the result building failed for it (the other tasks are unaffected)."""
        version = served.version
        preds = self._run(served.predictor, prepared)
        out: dict = {}
        for key, item in prepared.items():
            task_preds = preds.get(key)
            if isinstance(task_preds, Exception):
                out[key] = (self.failed(version, item.task, f"prediction failed: {type(task_preds).__name__}"), None)
                continue
            try:
                out[key] = self._build(spec, item, task_preds, version)
            except Exception as exc:   # a malformed prediction must not fail the batch
                logger.exception("task id %s: building the result failed", _task_id(item.task))
                out[key] = (self.failed(version, item.task, f"result building failed: {type(exc).__name__}",
                                        logged=True), None)
        return out

    def _project_of(self, task: dict) -> Optional[int]:
        return self.project_id if self.project_id is not None else project_id_of(task.get("project"))

    def _run(self, predictor, prepared: dict) -> dict:
        """predict_batch over every (image, sentence) pair of the prepared tasks, the image encoders batched over all
        their images; on failure, task by task to isolate it. Returns {key: [Prediction, ...] or Exception}."""
        pairs, owners = [], []
        for key, item in prepared.items():
            for p in item.prompts:
                pairs.append((item.image, p.sentence))
                owners.append(key)
        if not pairs:
            return {}
        out: dict = {}
        batch = max(self.batch_size, len(prepared))
        try:
            preds = list(predictor.predict_batch(pairs, batch_size=batch))
            if len(preds) != len(pairs):
                raise RuntimeError(f"predict_batch returned {len(preds)} predictions for {len(pairs)} inputs")
            for key, p in zip(owners, preds):
                out.setdefault(key, []).append(p)
            return out
        except Exception:
            if len(prepared) == 1:
                key = next(iter(prepared))
                logger.exception("prediction failed for task id %s", _task_id(prepared[key].task))
                return {key: RuntimeError("prediction failed")}
            logger.warning("batched prediction failed; retrying task by task to isolate the failure")
        for key, item in prepared.items():
            try:
                preds = list(predictor.predict_batch([(item.image, p.sentence) for p in item.prompts],
                                                     batch_size=batch))
                if len(preds) != len(item.prompts):
                    raise RuntimeError("wrong number of predictions")
                out[key] = preds
            except Exception as exc:
                logger.exception("prediction failed for task id %s", _task_id(item.task))
                out[key] = exc
        return out

    def _build(self, spec: LabelingSpec, item: PreparedTask, preds: list, version: str) -> tuple:
        rt, task = self.runtime, item.task
        h, w = item.image.shape[:2]
        regions, scores, echoed, misses = [], [], [], []
        project_id = self._project_of(task)
        typed = [p.sentence for p in item.prompts if p.source == "context"]
        if typed and item.picture is not None:            # a typed sentence starts an interactive session
            rt.sessions.sentence_typed(self._session_key(version, task, item.picture), typed[-1])
        for prompt, pred in zip(item.prompts, preds):
            mask = np.asarray(pred.mask, dtype=bool)
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
            with stage("rle"):
                regions.append(mask_region(mask, from_name=spec.brush_name, to_name=spec.image_name,
                                           label=prompt.label, score=score, kind=spec.mask_type))
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

    def failed(self, version: str, task, message: str, logged: bool = False) -> dict:
        """The answer for a task that could not be predicted: its reason, and no ``result``. Label Studio stores a
        prediction only for an answer that has a ``result``, so the task stays without one and the next "Retrieve
        predictions" tries it again (an empty result would be stored as the model's answer under this version, and
        every later retrieval would skip the task)."""
        self.runtime.metrics.inc("task_errors")
        if not logged:
            logger.error("predict: task id %s failed: %s", _task_id(task), loggable(message, None))
        return {"score": 0.0, "model_version": version, "error": message}


def _image_url(spec: LabelingSpec, task: Any) -> str:
    """The task's image URL; ``TaskError`` when the task has none."""
    if not isinstance(task, dict):
        raise TaskError("task must be a JSON object")
    data = task.get("data")
    if not isinstance(data, dict):
        raise TaskError("task has no 'data' object")
    url = data.get(spec.image_value_key)
    if not isinstance(url, str) or not url.strip():
        raise TaskError(f"task data has no '{spec.image_value_key}' image URL")
    return url


def _interactive_message(results: list, messages: list, default: str) -> Optional[str]:
    """The message of an interactive call's answer: the editor shows it, and LS needs a result list, even an empty
    one, so a first result without one gets ``[]`` and its reason."""
    if not results or results[0].get("result"):
        return results[0].get("message") if results else None
    first = results[0]
    message = first.get("error") or first.get("message") or (messages[0] if messages else default)
    first.update(result=[], message=message)
    return message


def _image_for(predictor, ref):
    """What to hand the predictor for a task's picture (an ``ssp_sam.images.ImageRef``). A predictor that takes
    references (it has ``has_image``) gets the reference, decoded now unless its features are cached, so that a bad
    picture fails this task with its reason and a cached one is never decoded; any other predictor gets the pixels."""
    has_image = getattr(predictor, "has_image", None)
    if not callable(has_image):
        return ref.pixels()
    if not has_image(ref.key):
        ref.pixels()
    return ref


def _task_id(task) -> Any:
    """The task's id for log lines (a client-given value: written on one line)."""
    return loggable(task.get("id"), limit=40) if isinstance(task, dict) else None


class _Progress:
    """Logs every task of a small request, about every tenth of a large one."""

    def __init__(self, n: int):
        self.n, self.every, self.t0 = n, 1 if n <= 20 else max(1, n // 10), time.perf_counter()

    def task_done(self, i: int, task: Any, result: dict) -> None:
        if (i + 1) % self.every == 0 or i + 1 == self.n:
            logger.info("predict: task %d/%d (id %s): %d region(s), %.2f s elapsed", i + 1, self.n, _task_id(task),
                        sum(r["type"] in MASK_TYPES for r in result["result"]), time.perf_counter() - self.t0)
