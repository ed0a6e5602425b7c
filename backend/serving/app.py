"""Flask app speaking Label Studio's ML backend 2.x protocol.

Routes: ``GET /`` and ``/health``, ``POST /setup``, ``POST /predict``, ``POST /webhook``, ``GET /metrics``,
``GET /versions``. Every error is JSON ``{"status": <code>, "error": "<message>"}``; tracebacks stay in the server
log. Shapes are documented in docs/backend.md.

In front of the routes, :class:`backend.serving.guard.RequestGuard` admits at most ``THREADS - 1`` requests at once
and hands the app bodies read under ``REQUEST_BODY_TIMEOUT_S`` and ``MAX_REQUEST_BODY_MB``; bodies are parsed
strictly (:mod:`backend.serving.json_body`), ids checked with ``protocol.as_int`` and webhook payloads validated
(:mod:`backend.labelstudio.webhooks`) before anything is queued.
"""

from __future__ import annotations

import base64
import functools
import hmac
import json
import logging
import os
import threading
import time
import uuid
from typing import Any, Callable, Optional

from flask import Flask, current_app, g, has_request_context, jsonify, request
from flask.testing import FlaskClient
from werkzeug.exceptions import HTTPException

from backend.config import BackendConfig
from backend.labelstudio.brush import redact_rle
from backend.labelstudio.label_config import LabelConfigError, parse_label_config
from backend.labelstudio.media import MediaFetcher
from backend.labelstudio.protocol import CORRECTION_ACTIONS, as_int, describe_value, project_id_of
from backend.labelstudio.webhooks import InvalidWebhook, validate_webhook
from backend.learning import versions
from backend.serving.guard import RequestGuard
from backend.serving.json_body import BadJson, FastJSONProvider, parse_json_object
from backend.serving.metrics import ServingMetrics
from backend.serving.model import ModelUnavailable, SSPSAMBackend
from backend.serving.model_manager import ModelManager
from backend.serving.prewarm import Prewarmer
from backend.serving.sessions import InteractiveSessions
from ssp_sam.timing import collect, stage

logger = logging.getLogger("backend.serving.app")

WEBHOOK_SECRET_HEADER = "X-Webhook-Secret"
STORE_RETRY_S = 15.0                     # after a failed datastore open, retry at most this often
DEFERRED_MASKS_BYTES = 64 * 2**20        # masks one request may keep to record after its response (then inline)
OPEN_ROUTES = {"/", "/health"}           # liveness: no auth (orchestrators, LS's 1 s health check)


class ApiError(Exception):
    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = status
        self.message = message


class Runtime:
    """Process-wide state: built once per worker process by ``create_app``."""

    def __init__(self, config: BackendConfig, manager: ModelManager, media: MediaFetcher,
                 store_factory: Optional[Callable[[BackendConfig], Any]] = None,
                 worker_factory: Optional[Callable[..., Any]] = None, start_worker: bool = True):
        self.config = config
        self.manager = manager
        self.media = media
        self.metrics = ServingMetrics()
        self._store_factory = store_factory
        self._worker_factory = worker_factory
        self._start_worker = start_worker
        self._store = None
        self.store_error: Optional[str] = None
        self._store_failed_at = 0.0
        self._store_lock = threading.Lock()
        self._worker = None
        self._worker_pid = None
        self.guard: Optional[RequestGuard] = None     # set by create_app: admission counts for /metrics
        self.prewarmer = Prewarmer(manager, media, self.metrics.inc)
        # what each picture's interactive calls said so far: the typed sentence, the clicks and boxes, and (with
        # INTERACTIVE_MASK_PROMPT) the last mask as SAM's dense prompt for the next click
        self.sessions = InteractiveSessions(mask_prompt=config.interactive_mask_prompt)

    # ------------------------------------------------------------------ datastore
    def store(self):
        """The corrections datastore, opened lazily; None when it cannot be opened (the error is remembered)."""
        if self._store is not None:
            return self._store
        with self._store_lock:
            if self._store is not None:
                return self._store
            if self.store_error and time.monotonic() - self._store_failed_at < STORE_RETRY_S:
                return None                    # failed recently: do not block every request on a reconnect
            try:
                factory = self._store_factory or _default_store_factory
                self._store = factory(self.config)
                self.store_error = None
            except Exception as exc:
                self.store_error = f"{type(exc).__name__}: {exc}"
                self._store_failed_at = time.monotonic()
                logger.error("corrections datastore unavailable: %s", self.store_error)
                return None
        return self._store

    def model_version(self) -> str:
        """The served model_version; a 503 with the reason when the configured model cannot be resolved."""
        try:
            return self.manager.version
        except Exception as exc:
            logger.error("model version unavailable: %s: %s", type(exc).__name__, exc)
            raise ApiError(503, f"the configured model is unavailable: {exc}") from None

    def require_store(self):
        store = self.store()
        if store is None:
            raise ApiError(503, "the corrections datastore is unavailable; the event was not recorded")
        return store

    def record_prediction(self, project_id, task_id, sentence, model_version, mask, score) -> None:
        """Remember a predicted mask in the datastore. Best effort: a datastore failure never fails a prediction.
        Inside a request the write waits until the response has been sent (``_after_request``): the client does not
        wait for the mask's PNG encoding and the datastore's commit (a stage of its own in /metrics, ``record``).
        A request keeps at most ``DEFERRED_MASKS_BYTES`` of masks for that (a large batch writes the rest at once)."""
        args = (project_id, task_id, sentence, model_version, mask, score)
        if has_request_context():
            pending = g.setdefault("deferred_records", [])
            if sum(r[4].nbytes for r in pending) + mask.nbytes <= DEFERRED_MASKS_BYTES:
                pending.append(args)
                return
        self.write_records([args])

    def write_records(self, records: list) -> None:
        t0 = time.perf_counter()
        for project_id, task_id, sentence, model_version, mask, score in records:
            try:
                store = self.store()
                if store is not None:
                    store.record_prediction(project_id, task_id, sentence, model_version, mask, score)
            except Exception as exc:
                self.metrics.inc("record_prediction_errors")
                logger.warning("record_prediction failed for task %s: %s: %s", task_id, type(exc).__name__, exc)
        self.metrics.observe_stages({"record": time.perf_counter() - t0})

    # ------------------------------------------------------------------ correction worker
    def ensure_worker(self) -> None:
        """Start the background correction worker once per process (lazily, so a forked worker gets its own)."""
        if not self._start_worker or self._worker_pid == os.getpid():
            return
        with self._store_lock:
            if self._worker_pid == os.getpid():
                return
            self._worker_pid = os.getpid()
        store = self.store()
        if store is None:
            return
        try:
            factory = self._worker_factory or _default_worker_factory
            self._worker = factory(store, self.media, self.config).start()
            logger.info("correction worker started (pid %d)", os.getpid())
        except Exception as exc:
            logger.error("correction worker not started: %s: %s", type(exc).__name__, exc)
            self._worker = None

    def notify_worker(self) -> None:
        """Wake this process's correction worker now (it also polls on its own)."""
        if self._worker is not None:
            self._worker.notify()

    def prewarm(self, url: str, task_id=None, project_id=None) -> bool:
        """Queue a task's picture for its embedding to be computed in the background (``prewarm.Prewarmer``)."""
        return self.prewarmer.submit(url, task_id=task_id, project_id=project_id)

    def stop(self) -> None:
        self.manager.stop()
        self.prewarmer.stop()
        worker, self._worker = self._worker, None
        if worker is not None:
            try:
                worker.stop()
            except Exception:
                logger.exception("stopping the correction worker failed")


def _default_store_factory(config):
    from backend.learning.datastore import open_datastore
    return open_datastore(config)


def _default_worker_factory(store, media, config):
    from backend.labelstudio.records import LabelStudioRecords
    from backend.learning.corrections import CorrectionWorker, WorkerConfig

    records = LabelStudioRecords(media)  # id-only bulk events: the records are read back from Label Studio
    worker_config = WorkerConfig.from_backend(config, fetch_annotation=records.fetch_annotation,
                                              fetch_task=records.fetch_task)
    return CorrectionWorker(store, media, worker_config)


# ---------------------------------------------------------------------- factory
def create_app(config: Optional[BackendConfig] = None, *, predictor_factory=None, manager: Optional[ModelManager] = None,
               media: Optional[MediaFetcher] = None, store_factory=None, worker_factory=None,
               start_worker: bool = True, token_client_factory=None) -> Flask:
    """The Flask app of one worker process; the factories replace the real model, datastore and worker in tests."""
    config = config or BackendConfig.from_env()
    os.makedirs(config.model_dir, exist_ok=True)
    # import the SDK's label-config parser now, not inside LS's first /setup (3 s timeout), which may race a model load
    import label_studio_sdk.label_interface  # noqa: F401
    manager = manager or ModelManager(config, predictor_factory=predictor_factory)
    media = media or MediaFetcher(config, token_client_factory=token_client_factory,
                                  persist_path=os.path.join(config.model_dir, "ls_connection.json"))
    rt = Runtime(config, manager, media, store_factory=store_factory, worker_factory=worker_factory,
                 start_worker=start_worker)
    # hash the checkpoint now (in this worker, in the background) so that LS's first /setup is instant
    threading.Thread(target=_prime_version, args=(manager,), name="ssp-sam-version", daemon=True).start()

    app = Flask("backend")
    app.config["MAX_CONTENT_LENGTH"] = config.max_request_body_bytes     # the guard enforces it on the bytes read
    app.json = FastJSONProvider(app)
    app.json.sort_keys = False
    app.test_client_class = BufferedClient
    rt.guard = RequestGuard(app.wsgi_app, max_in_flight=config.max_in_flight,
                            body_timeout_s=config.request_body_timeout_s,
                            max_body_bytes=config.max_request_body_bytes, count=rt.metrics.inc)
    app.wsgi_app = rt.guard
    app.extensions["ssp_sam"] = rt
    app.before_request(_before_request)
    app.after_request(_after_request)
    app.teardown_request(_write_leftover_records)
    app.register_error_handler(ApiError, lambda exc: _error(exc.status, exc.message))
    app.register_error_handler(HTTPException, lambda exc: _error(exc.code or 500, exc.description or exc.name))
    app.register_error_handler(Exception, _unhandled)
    for rule, view, methods in ROUTES:
        app.add_url_rule(rule, view_func=view, methods=methods)
    return app


class BufferedClient(FlaskClient):
    """Flask's test client, reading each response to its end as a WSGI server does (so the guard's admission slot
    is released when the response is done, not when the test happens to close it)."""

    def open(self, *args, buffered: bool = True, **kwargs):
        return super().open(*args, buffered=buffered, **kwargs)


def _prime_version(manager: ModelManager) -> None:
    try:
        manager.version
    except Exception as exc:
        logger.error("the configured model is unavailable: %s", exc)


def _rt() -> Runtime:
    return current_app.extensions["ssp_sam"]


# ---------------------------------------------------------------------- request hooks
def _before_request():
    rt = _rt()
    g.t0 = time.perf_counter()
    g.request_id = uuid.uuid4().hex[:12]
    if request.path not in OPEN_ROUTES and request.path != "/webhook" and rt.config.basic_auth_enabled:
        if not _check_basic_auth(rt.config):
            resp = _error(401, "basic authentication required")
            resp.headers["WWW-Authenticate"] = 'Basic realm="ssp-sam-backend"'
            return resp
    if request.path == "/webhook" and rt.config.webhook_secret:
        given = request.headers.get(WEBHOOK_SECRET_HEADER, "")
        if not hmac.compare_digest(given.encode(), rt.config.webhook_secret.encode()):
            return _error(401, f"missing or wrong {WEBHOOK_SECRET_HEADER} header")
    if request.path in ("/webhook", "/predict"):
        rt.ensure_worker()
    return None


def _after_request(resp):
    seconds = time.perf_counter() - g.get("t0", time.perf_counter())
    endpoint = request.url_rule.rule if request.url_rule is not None else "<unmatched>"
    rt = _rt()
    rt.metrics.observe_request(endpoint, resp.status_code, seconds)
    resp.headers["X-Request-Id"] = g.get("request_id", "")
    records = g.pop("deferred_records", None)
    if records:                                   # written once the response has been sent
        resp.call_on_close(functools.partial(rt.write_records, records))
    timer = g.get("stage_timer")
    if timer is not None:
        if rt.config.server_timing:
            resp.headers["Server-Timing"] = timer.server_timing(total=seconds)
        logger.debug("predict stages (request %s): %s", g.get("request_id"), timer.server_timing(total=seconds))
    level = logging.INFO if endpoint not in ("/", "/health", "/metrics") else logging.DEBUG
    logger.log(level, "%s %s -> %d in %.3f s", request.method, request.path, resp.status_code, seconds)
    return resp


def _write_leftover_records(exc=None) -> None:
    """Masks a request kept for after its response, when no response took them (``_after_request`` did not run)."""
    records = g.pop("deferred_records", None)
    if records:
        _rt().write_records(records)


def _unhandled(exc: Exception):
    logger.exception("unhandled error in %s %s (request %s)", request.method, request.path, g.get("request_id"))
    return _error(500, f"internal error ({type(exc).__name__}); see the backend log, request id "
                       f"{g.get('request_id', '?')}")


# ---------------------------------------------------------------------- routes
def health():
    rt = _rt()
    try:
        info = rt.manager.info()
    except Exception as exc:        # e.g. SSP_SAM_CHECKPOINT missing: still alive, say why it cannot serve
        info = {"model_version": None, "model_loaded": False, "last_error": f"{type(exc).__name__}: {exc}"}
    return jsonify({"status": "UP", "model_class": SSPSAMBackend.__name__, **info})


def setup():
    rt = _rt()
    data = _json_body()
    project_id = _project_param(data.get("project"), "'project'")
    if data.get("schema") is not None:
        _parse_config(data["schema"])
    hostname, token = data.get("hostname"), data.get("access_token")
    if isinstance(hostname, str) or isinstance(token, str):
        rt.media.set_connection(hostname if isinstance(hostname, str) else None,
                                token if isinstance(token, str) else None, project_id)
    return jsonify({"model_version": rt.model_version()})


def predict():
    rt = _rt()
    data = _json_body()
    tasks = data.get("tasks")
    if not isinstance(tasks, list):
        raise ApiError(400, "'tasks' must be a list of tasks")
    project_id = _project_param(data.get("project"), "'project'")
    _check_task_ids(tasks)
    label_config = data.get("label_config")
    if not isinstance(label_config, str) or not label_config.strip():
        raise ApiError(400, "'label_config' (the project's labeling config XML) is required")
    _parse_config(label_config)
    params = data.get("params") or {}
    if not isinstance(params, dict):
        raise ApiError(400, "'params' must be an object")
    context = params.get("context")
    if context is not None and not isinstance(context, dict):
        raise ApiError(400, "'params.context' must be an object or null")
    if not tasks:
        return jsonify({"results": [], "model_version": rt.model_version()})
    model = SSPSAMBackend(rt, project_id=project_id, label_config=label_config)
    with collect() as timer:                       # stage spans of this request (ssp_sam.timing)
        try:
            body = model.predict(tasks, context=context).to_json()
        except ModelUnavailable as exc:
            raise ApiError(503, str(exc))
        with stage("json"):
            response = jsonify(body)
    _report_stages(rt, timer)
    if logger.isEnabledFor(logging.DEBUG):
        logger.debug("predict response: %s", json.dumps(redact_rle(body))[:4000])
    return response


def _report_stages(rt: Runtime, timer) -> None:
    """Stage times of this /predict into /metrics; into a ``Server-Timing`` header with SERVER_TIMING=true (the
    header is added in ``_after_request``, where the total is known); into the log at DEBUG."""
    rt.metrics.observe_stages(timer.seconds)
    if rt.config.server_timing or logger.isEnabledFor(logging.DEBUG):
        g.stage_timer = timer


def webhook():
    rt = _rt()
    data = _json_body()
    action = data.get("action")
    if not isinstance(action, str) or not action:
        raise ApiError(400, "webhook payload has no 'action' (a non-empty string)")
    if action not in CORRECTION_ACTIONS:
        rt.metrics.inc("events_ignored")
        return jsonify({"status": "Unknown event"}), 200
    try:
        validate_webhook(action, data)
    except InvalidWebhook as exc:
        rt.metrics.inc("events_invalid")
        raise ApiError(400, f"invalid {action} payload: {exc}") from None
    event_id = _enqueue(rt, action, data)        # durable; the correction worker does the rest
    rt.metrics.inc("events_enqueued")
    rt.notify_worker()
    return jsonify({"status": "ok", "event_id": event_id}), 201


def _enqueue(rt: Runtime, action: str, data: dict) -> int:
    store = rt.require_store()
    try:
        return store.enqueue_event(action, data)
    except Exception as exc:
        logger.exception("enqueue_event failed (request %s)", g.get("request_id"))
        raise ApiError(503, f"the corrections datastore failed ({type(exc).__name__}); the event was not recorded, "
                            f"request id {g.get('request_id', '?')}") from None


def metrics():
    rt = _rt()
    out: dict = {}
    serving = rt.metrics.snapshot()
    store = rt.store()
    if store is not None:
        try:
            out.update(store.version_stats())
            serving["pending_events"] = store.pending_event_count()
        except Exception as exc:
            logger.warning("datastore statistics failed: %s: %s", type(exc).__name__, exc)
            out["datastore_error"] = f"statistics failed ({type(exc).__name__})"
    elif rt.store_error:
        out["datastore_error"] = "datastore unavailable"
    if rt.guard is not None:
        serving["admission"] = rt.guard.stats()
    serving["model"] = rt.manager.info()
    serving["media_cache"] = rt.media.stats()
    serving["interactive_sessions"] = rt.sessions.stats()
    emb = rt.manager.cache_stats()
    if emb is not None:
        serving["embedding_cache"] = emb
    out["serving"] = serving
    return jsonify(out)


def list_versions():
    rt = _rt()
    current = rt.model_version()
    found = versions.list_versions(rt.config.model_dir)
    return jsonify({"versions": found if current in found else found + [current], "model_version": current})


ROUTES = (("/", health, ["GET"]), ("/health", health, ["GET"]), ("/setup", setup, ["POST"]),
          ("/predict", predict, ["POST"]), ("/webhook", webhook, ["POST"]), ("/metrics", metrics, ["GET"]),
          ("/versions", list_versions, ["GET"]))


# ---------------------------------------------------------------------- helpers
def _json_body() -> dict:
    try:
        return parse_json_object(request.get_data(cache=True))
    except BadJson as exc:
        raise ApiError(400, str(exc)) from None


def _project_param(value, where: str) -> Optional[int]:
    """A project as /setup and /predict name it, or None when absent; 400 when it is there but no id."""
    if value is None or value == "":
        return None
    project_id = project_id_of(value)
    if project_id is None:
        raise ApiError(400, f"{where} must be a 64-bit integer project id, \"<id>.<timestamp>\" or {{\"id\": <id>}}; "
                            f"got {describe_value(value)}")
    return project_id


def _check_task_ids(tasks: list) -> None:
    """400 when a task object's ``id`` or ``project`` is there but is no id (other task faults stay per task)."""
    for i, t in enumerate(tasks):
        if not isinstance(t, dict):
            continue
        if t.get("id") is not None and as_int(t["id"]) is None:
            raise ApiError(400, f"tasks[{i}].id must be a 64-bit integer id; got {describe_value(t['id'])}")
        _project_param(t.get("project"), f"tasks[{i}].project")



def _parse_config(label_config: str):
    try:
        return parse_label_config(label_config)
    except LabelConfigError as exc:
        raise ApiError(400, str(exc)) from None


def _error(status: int, message: str):
    resp = jsonify({"status": status, "error": message})
    resp.status_code = status
    return resp


def _check_basic_auth(config: BackendConfig) -> bool:
    header = request.headers.get("Authorization", "")
    if not header.startswith("Basic "):
        return False
    try:
        user, _, password = base64.b64decode(header[6:]).decode("utf-8").partition(":")
    except Exception:
        return False
    return (hmac.compare_digest(user.encode(), config.basic_auth_user.encode())
            and hmac.compare_digest(password.encode(), config.basic_auth_pass.encode()))
