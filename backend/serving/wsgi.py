"""WSGI entry point for production: ``gunicorn -c python:backend.serving.gunicorn_conf backend.serving.wsgi:app``.

Importing this module builds the app from the environment (``BackendConfig.from_env()``). Nothing heavy happens
here: the model loads lazily in each worker process on its first prediction (or right after the worker starts with
``PRELOAD_MODEL=true``); never use gunicorn ``--preload``.
"""

from backend.serving.app import create_app
from backend.config import BackendConfig
from backend.logs import configure_logging

config = BackendConfig.from_env()
configure_logging(config.log_level)
app = create_app(config)
