"""Flask app speaking Label Studio's ML backend 2.x protocol.

Routes: ``GET /`` and ``/health``, ``POST /setup``, ``POST /predict``, ``POST /webhook``, ``GET /metrics``,
``GET /versions``. Every error is JSON ``{"status": <code>, "error": "<message>"}``; tracebacks stay in the server
log. Shapes are documented in docs/backend.md.
"""

from __future__ import annotations

import base64
import hmac
import json
import logging
import os
import threading
import time
import uuid
from typing import Any, Callable, Optional

from flask import Flask, g, jsonify, request
from werkzeug.exceptions import HTTPException

from backend.labelstudio.brush import redact_rle
from backend.config import BackendConfig
from backend.labelstudio.media import MediaFetcher
from backend.serving.metrics import ServingMetrics
from backend.serving.model import TRAIN_EVENTS, ModelUnavailable, SSPSAMBackend
from backend.serving.model_manager import ModelManager
from backend.labelstudio.prompts import LabelConfigError, parse_label_config

logger = logging.getLogger("backend.serving.app")

MODEL_CLASS = SSPSAMBackend
WEBHOOK_SECRET_HEADER = "X-Webhook-Secret"
STORE_RETRY_S = 15.0                     # after a failed datastore open, retry at most this often
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
        self._store_error: Optional[str] = None
        self._store_failed_at = 0.0
        self._store_lock = threading.Lock()
        self._worker = None
        self._worker_pid = None
        self.extra_params: dict = {}

    # ------------------------------------------------------------------ datastore
    def store(self):
        """The corrections datastore, opened lazily; None when it cannot be opened (the error is remembered)."""
        if self._store is not None:
            return self._store
        with self._store_lock:
            if self._store is not None:
                return self._store
            if self._store_error and time.monotonic() - self._store_failed_at < STORE_RETRY_S:
                return None                    # failed recently: do not block every request on a reconnect
            try:
                factory = self._store_factory or _default_store_factory
                self._store = factory(self.config)
                self._store_error = None
            except Exception as exc:
                self._store_error = f"{type(exc).__name__}: {exc}"
                self._store_failed_at = time.monotonic()
                logger.error("corrections datastore unavailable: %s", self._store_error)
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
        """Best effort: a datastore failure never fails a prediction."""
        try:
            store = self.store()
            if store is not None:
                store.record_prediction(project_id, task_id, sentence, model_version, mask, score)
        except Exception as exc:
            self.metrics.inc("record_prediction_errors")
            logger.warning("record_prediction failed for task %s: %s: %s", task_id, type(exc).__name__, exc)

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
            if factory is None:
                return
            self._worker = factory(store, self.media, self.config)
            if self._worker is not None:
                self._worker.start()
                logger.info("correction worker started (pid %d)", os.getpid())
        except Exception as exc:
            logger.error("correction worker not started: %s: %s", type(exc).__name__, exc)
            self._worker = None

    def stop(self) -> None:
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
    try:
        from backend.learning.corrections import CorrectionWorker, WorkerConfig
        from backend.labelstudio.records import LabelStudioRecords
    except ImportError as exc:
        logger.warning("backend.learning.corrections is not available (%s); webhook events are queued but not processed", exc)
        return None

    worker_config = WorkerConfig.from_any(config)
    if media is not None and hasattr(media, "connection"):  # id-only bulk events: read the records back from LS
        records = LabelStudioRecords(media)
        worker_config.fetch_annotation = worker_config.fetch_annotation or records.fetch_annotation
        worker_config.fetch_task = worker_config.fetch_task or records.fetch_task
    return CorrectionWorker(store, media, worker_config)


# ---------------------------------------------------------------------- helpers
def _json_body() -> dict:
    data = request.get_json(silent=True, force=True)
    if not isinstance(data, dict):
        raise ApiError(400, "request body must be a JSON object")
    return data


def _project_id(project) -> Optional[str]:
    if project is None or project == "":
        return None
    if isinstance(project, dict):
        project = project.get("id")
        return None if project is None else str(project)
    return str(project).split(".")[0] or None


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


# ---------------------------------------------------------------------- factory
def create_app(config: Optional[BackendConfig] = None, *, predictor_factory=None, manager: Optional[ModelManager] = None,
               media: Optional[MediaFetcher] = None, store_factory=None, worker_factory=None,
               start_worker: bool = True, token_client_factory=None) -> Flask:
    config = config or BackendConfig.from_env()
    os.makedirs(config.model_dir, exist_ok=True)
    # import the SDK's label-config parser now, not inside LS's first /setup (3 s timeout), which may race a model load
    import label_studio_sdk.label_interface  # noqa: F401
    manager = manager or ModelManager(config, predictor_factory=predictor_factory)
    media = media or MediaFetcher(config, token_client_factory=token_client_factory,
                                  persist_path=os.path.join(config.model_dir, "ls_connection.json"))
    rt = Runtime(config, manager, media, store_factory=store_factory, worker_factory=worker_factory,
                 start_worker=start_worker)

    def _prime_version():
        # hash the checkpoint now (in this worker, in the background) so that LS's first /setup is instant
        try:
            manager.version
        except Exception as exc:
            logger.error("the configured model is unavailable: %s", exc)
    threading.Thread(target=_prime_version, name="ssp-sam-version", daemon=True).start()

    app = Flask("backend")
    app.config["MAX_CONTENT_LENGTH"] = 256 * 2**20     # larger bodies get a JSON 413
    app.json.sort_keys = False
    app.extensions["ssp_sam"] = rt

    # -------------------------------------------------------------- hooks
    @app.before_request
    def _before():
        g.t0 = time.perf_counter()
        g.request_id = uuid.uuid4().hex[:12]
        if request.path not in OPEN_ROUTES and request.path != "/webhook" and config.basic_auth_enabled:
            if not _check_basic_auth(config):
                resp = _error(401, "basic authentication required")
                resp.headers["WWW-Authenticate"] = 'Basic realm="ssp-sam-backend"'
                return resp
        if request.path == "/webhook" and config.webhook_secret:
            given = request.headers.get(WEBHOOK_SECRET_HEADER, "")
            if not hmac.compare_digest(given.encode(), config.webhook_secret.encode()):
                return _error(401, f"missing or wrong {WEBHOOK_SECRET_HEADER} header")
        if request.path in ("/webhook", "/predict"):
            rt.ensure_worker()

    @app.after_request
    def _after(resp):
        seconds = time.perf_counter() - g.get("t0", time.perf_counter())
        endpoint = request.url_rule.rule if request.url_rule is not None else "<unmatched>"
        rt.metrics.observe_request(endpoint, resp.status_code, seconds)
        resp.headers["X-Request-Id"] = g.get("request_id", "")
        level = logging.INFO if endpoint not in ("/", "/health", "/metrics") else logging.DEBUG
        logger.log(level, "%s %s -> %d in %.3f s", request.method, request.path, resp.status_code, seconds)
        return resp

    @app.errorhandler(ApiError)
    def _api_error(exc: ApiError):
        return _error(exc.status, exc.message)

    @app.errorhandler(HTTPException)
    def _http_error(exc: HTTPException):
        return _error(exc.code or 500, exc.description or exc.name)

    @app.errorhandler(Exception)
    def _unhandled(exc: Exception):
        logger.exception("unhandled error in %s %s (request %s)", request.method, request.path, g.get("request_id"))
        return _error(500, f"internal error ({type(exc).__name__}); see the backend log, request id "
                           f"{g.get('request_id', '?')}")

    # -------------------------------------------------------------- routes
    @app.get("/")
    @app.get("/health")
    def health():
        try:
            info = rt.manager.info()
        except Exception as exc:        # e.g. SSP_SAM_CHECKPOINT missing: still alive, say why it cannot serve
            info = {"model_version": None, "model_loaded": False, "last_error": f"{type(exc).__name__}: {exc}"}
        return jsonify({"status": "UP", "model_class": MODEL_CLASS.__name__, **info})

    @app.post("/setup")
    def setup():
        data = _json_body()
        project_id = _project_id(data.get("project"))
        schema = data.get("schema")
        if schema is not None:
            try:
                parse_label_config(schema)
            except LabelConfigError as exc:
                raise ApiError(400, str(exc))
        hostname, token = data.get("hostname"), data.get("access_token")
        if isinstance(hostname, str) or isinstance(token, str):
            rt.media.set_connection(hostname if isinstance(hostname, str) else None,
                                    token if isinstance(token, str) else None, project_id)
        extra = data.get("extra_params")
        if extra:
            if isinstance(extra, str):
                try:
                    extra = json.loads(extra)
                except ValueError:
                    extra = {"raw": extra}
            rt.extra_params[project_id] = extra
        MODEL_CLASS(rt, project_id=project_id, label_config=schema, extra_params=rt.extra_params.get(project_id))
        return jsonify({"model_version": rt.model_version()})

    @app.post("/predict")
    def predict():
        data = _json_body()
        tasks = data.get("tasks")
        if not isinstance(tasks, list):
            raise ApiError(400, "'tasks' must be a list of tasks")
        label_config = data.get("label_config")
        if not isinstance(label_config, str) or not label_config.strip():
            raise ApiError(400, "'label_config' (the project's labeling config XML) is required")
        try:
            parse_label_config(label_config)
        except LabelConfigError as exc:
            raise ApiError(400, str(exc))
        params = data.get("params") or {}
        if not isinstance(params, dict):
            raise ApiError(400, "'params' must be an object")
        context = params.get("context")
        if context is not None and not isinstance(context, dict):
            raise ApiError(400, "'params.context' must be an object or null")
        project_id = _project_id(data.get("project"))
        model = MODEL_CLASS(rt, project_id=project_id, label_config=label_config,
                            extra_params=rt.extra_params.get(project_id))
        kwargs = {k: v for k, v in params.items() if k != "context"}
        if not tasks:
            return jsonify({"results": [], "model_version": rt.model_version()})
        try:
            response = model.predict(tasks, context=context, **kwargs)
        except ModelUnavailable as exc:
            raise ApiError(503, str(exc))
        body = response.to_json()
        if logger.isEnabledFor(logging.DEBUG):
            logger.debug("predict response: %s", json.dumps(redact_rle(body))[:4000])
        return jsonify(body)

    @app.post("/webhook")
    def webhook():
        data = _json_body()
        action = data.get("action")
        if not isinstance(action, str) or not action:
            raise ApiError(400, "webhook payload has no 'action'")
        if action not in TRAIN_EVENTS:
            rt.metrics.inc("events_ignored")
            return jsonify({"status": "Unknown event"}), 200
        project_id = _project_id(data.get("project"))
        label_config = None
        if isinstance(data.get("project"), dict):
            label_config = data["project"].get("label_config")
        model = MODEL_CLASS(rt, project_id=project_id, label_config=label_config)
        result = model.fit(action, data)
        return jsonify({"status": "ok", "event_id": result["event_id"]}), 201

    @app.get("/metrics")
    def metrics():
        out: dict = {}
        store = rt.store()
        if store is not None:
            try:
                stats = store.version_stats()
                if isinstance(stats, dict):
                    out.update(stats)
            except Exception as exc:
                logger.warning("version_stats failed: %s: %s", type(exc).__name__, exc)
                out["datastore_error"] = f"version_stats failed ({type(exc).__name__})"
            try:
                pending = getattr(store, "pending_event_count", None)
                serving_extra = {"pending_events": pending()} if callable(pending) else {}
            except Exception:
                serving_extra = {}
        else:
            serving_extra = {}
            if rt._store_error:
                out["datastore_error"] = "datastore unavailable"
        serving = rt.metrics.snapshot()
        serving["model"] = rt.manager.info()
        serving["media_cache"] = rt.media.stats()
        emb = rt.manager.cache_stats()
        if emb is not None:
            serving["embedding_cache"] = emb
        serving.update(serving_extra)
        out["serving"] = serving
        return jsonify(out)

    @app.get("/versions")
    def versions():
        current = rt.model_version()
        found = []
        vdir = config.versions_dir
        try:
            for name in sorted(os.listdir(vdir)):
                if os.path.isdir(os.path.join(vdir, name)):
                    found.append(name)
        except FileNotFoundError:
            pass
        if current not in found:
            found.append(current)
        return jsonify({"versions": found, "model_version": current})

    return app
