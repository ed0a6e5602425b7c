"""One Label Studio project read and written through label-studio-sdk's public client, for bulk pre-labeling
(``ssp-sam prelabel``): its labeling config, its tasks with the model versions of their predictions, and new
predictions.

- The client is the one :mod:`backend.labelstudio.records` builds (``sdk_client``), with the host and token the
  backend's media fetcher resolves (``MediaFetcher.connection``): ``LABEL_STUDIO_URL`` and ``LABEL_STUDIO_API_KEY``,
  a legacy token or a personal access token (the SDK exchanges a PAT itself). The token goes to that host only.
- Tasks come from ``tasks.list`` with only ``id``, ``data`` and ``predictions_model_versions`` (no annotations or
  prediction results, so a listing of thousands of tasks stays small), a page at a time.
- Predictions go up in one ``projects.import_predictions`` request per batch (the bulk import API; measured faster
  than one ``predictions.create`` per task, see docs/performance.md). When Label Studio refuses a batch (one task was
  deleted meanwhile, say), each prediction of it is sent alone with ``predictions.create`` so that only the bad ones
  fail.
- A fatal problem (Label Studio unreachable, the token refused, no such project) is a :class:`LabelStudioUnavailable`
  with a one-line message; a problem of one task is that task's reason.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any, Optional

from backend.labelstudio.records import ClientFactory, sdk_client
from backend.logs import loggable

log = logging.getLogger(__name__)

TASK_FIELDS = "id,data,predictions_model_versions"


class LabelStudioUnavailable(RuntimeError):
    """Label Studio cannot be used at all for this project (the message is one line, without secrets)."""


@dataclass(frozen=True)
class ProjectTask:
    id: int
    data: dict
    model_versions: str = ""      # Label Studio's ``predictions_model_versions``: the versions, comma-joined

    def has_prediction_of(self, version: str) -> bool:
        """Whether the task holds a prediction of ``version``. Label Studio joins a task's distinct versions with
        commas, so this is exact for a version without a comma (every version this backend makes: variant names,
        hex digests, ``<variant>-ft-<date>-<hex>``); a version with a comma is looked for as a substring."""
        if "," in version:
            return version in self.model_versions
        return version.strip() in {v.strip() for v in self.model_versions.split(",")}


def api_error_message(exc: BaseException) -> str:
    """One line for an SDK error: ``HTTP 401: Invalid token.`` for an API error (its ``detail`` and validation
    errors, never its headers), ``ConnectError: ...`` for a transport error."""
    status = getattr(exc, "status_code", None)
    if isinstance(status, int):
        body = getattr(exc, "body", None)
        detail = ""
        if isinstance(body, dict):
            detail = str(body.get("detail") or "")
            if body.get("validation_errors"):
                detail = f"{detail} {body['validation_errors']}".strip()
        elif body:
            detail = str(body)
        return loggable(f"HTTP {status}" + (f": {detail}" if detail else ""), limit=300)
    return loggable(f"{type(exc).__name__}: {exc}", limit=300)


class LabelStudioProject:
    """``label_config()``, ``tasks()`` and ``upload(predictions)`` of project ``project_id``.

    ``media`` is the backend's :class:`backend.labelstudio.media.MediaFetcher` (only its ``connection`` is used);
    ``client_factory(hostname, token)`` replaces the SDK client in tests."""

    def __init__(self, media: Any, project_id: int, client_factory: Optional[ClientFactory] = None) -> None:
        self.project_id = int(project_id)
        self.host, token = media.connection(self.project_id)
        if not self.host:
            raise LabelStudioUnavailable("no Label Studio URL: set LABEL_STUDIO_URL (e.g. http://localhost:8080)")
        if not token:
            raise LabelStudioUnavailable("no Label Studio token: set LABEL_STUDIO_API_KEY (a legacy token or a "
                                         "personal access token, Label Studio's Account & Settings)")
        self.client = (client_factory or sdk_client)(self.host, token)

    # ------------------------------------------------------------------ reading
    def _fatal(self, what: str, exc: BaseException) -> LabelStudioUnavailable:
        status = getattr(exc, "status_code", None)
        if status == 401:
            hint = " (the token was refused: check LABEL_STUDIO_API_KEY)"
        elif status == 404:
            hint = f" (no project {self.project_id} at {self.host}, or the token's user cannot see it)"
        elif isinstance(status, int):
            hint = ""
        else:
            hint = f" (cannot reach Label Studio at {loggable(self.host)})"
        return LabelStudioUnavailable(f"{what} failed: {api_error_message(exc)}{hint}")

    def label_config(self) -> str:
        """The project's labeling config XML (``LabelStudioUnavailable`` when the project cannot be read)."""
        try:
            project = self.client.projects.get(id=self.project_id)
        except Exception as exc:
            raise self._fatal(f"reading project {self.project_id}", exc) from None
        config = getattr(project, "label_config", None)
        if not isinstance(config, str) or not config.strip():
            raise LabelStudioUnavailable(f"project {self.project_id} has no labeling config")
        return config

    def tasks(self, page_size: int = 500) -> list[ProjectTask]:
        """Every task of the project, sorted by id."""
        out: dict[int, ProjectTask] = {}
        try:
            pager = self.client.tasks.list(project=self.project_id, fields="all", include=TASK_FIELDS,
                                           page_size=page_size)
            for task in pager:
                item = task.model_dump() if hasattr(task, "model_dump") else dict(task)
                tid = item.get("id")
                if isinstance(tid, int) and not isinstance(tid, bool):
                    out[tid] = ProjectTask(tid, item.get("data") or {}, item.get("predictions_model_versions") or "")
        except Exception as exc:
            raise self._fatal(f"listing the tasks of project {self.project_id}", exc) from None
        return [out[k] for k in sorted(out)]

    # ------------------------------------------------------------------ writing
    def upload(self, predictions: list[dict]) -> dict[int, Optional[str]]:
        """Store ``predictions`` (``{"task", "result", "score", "model_version"}`` each) in Label Studio:
        ``{task id: None when stored, else the reason}``. ``LabelStudioUnavailable`` when Label Studio cannot be
        reached or refuses the token (nothing more can be stored; a later run resumes)."""
        if not predictions:
            return {}
        from label_studio_sdk import PredictionRequest

        try:
            self.client.projects.import_predictions(
                id=self.project_id, request=[PredictionRequest(**_fields(p)) for p in predictions])
            return {int(p["task"]): None for p in predictions}
        except Exception as exc:
            if not _refused_by_content(exc) or getattr(exc, "status_code", None) == 404:
                raise self._fatal("uploading predictions", exc) from None
            log.warning("Label Studio refused a batch of %d predictions (%s); sending them one by one",
                        len(predictions), api_error_message(exc))
        return {int(p["task"]): self._create_one(p) for p in predictions}

    def _create_one(self, prediction: dict) -> Optional[str]:
        try:
            self.client.predictions.create(**_fields(prediction))
            return None
        except Exception as exc:
            if not _refused_by_content(exc):
                raise self._fatal("uploading predictions", exc) from None
            return f"Label Studio refused the prediction: {api_error_message(exc)}"


def _refused_by_content(exc: BaseException) -> bool:
    """An HTTP 4xx other than 401/403: Label Studio refused what was sent (a deleted task, say), not the sender; a
    transport error, a refused token or a server error is not."""
    status = getattr(exc, "status_code", None)
    return isinstance(status, int) and 400 <= status < 500 and status not in (401, 403)


def _fields(prediction: dict) -> dict:
    return {"task": int(prediction["task"]), "result": prediction["result"], "score": float(prediction["score"]),
            "model_version": prediction["model_version"]}


__all__ = ["LabelStudioUnavailable", "ProjectTask", "LabelStudioProject", "api_error_message", "TASK_FIELDS"]
