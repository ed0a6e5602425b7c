"""gunicorn settings read from the environment (``gunicorn -c python:backend.serving.gunicorn_conf backend.serving.wsgi:app``).

``PORT`` (9090), ``HOST`` (127.0.0.1; use 0.0.0.0 in a container), ``WORKERS`` (1: each worker holds its own copy of
the model), ``THREADS`` (8: pool threads per worker; at most THREADS - 1 requests are admitted into the app at once,
see backend/serving/guard.py; inference is thread-safe), ``GUNICORN_TIMEOUT`` (300 s,
a long batch /predict must not get the worker killed), ``LOG_LEVEL``. ``preload_app`` stays False: the model is
never loaded in the master (CUDA cannot be re-initialised in forked workers).
"""

import os

from backend.config import BackendConfig

_cfg = BackendConfig.from_env()

bind = os.environ.get("GUNICORN_BIND") or f"{_cfg.host}:{_cfg.port}"
workers = _cfg.workers
threads = _cfg.threads
worker_class = "gthread"
timeout = _cfg.timeout
graceful_timeout = 30
keepalive = 5
preload_app = False
loglevel = _cfg.log_level.lower()
accesslog = None          # the app logs every request itself (without bodies)
errorlog = "-"
capture_output = False
control_socket_disable = True   # gunicorn 27 control socket: unused, and it would collide between instances


def post_worker_init(worker):  # runs in each worker after the app is loaded
    if _cfg.preload_model:
        from backend.serving.wsgi import app
        app.extensions["ssp_sam"].manager.warm_up(background=True)


def worker_exit(server, worker):
    try:
        from backend.serving.wsgi import app
        app.extensions["ssp_sam"].stop()
    except Exception:
        pass
