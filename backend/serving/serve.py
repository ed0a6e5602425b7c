"""``ssp-sam serve``: run the backend — gunicorn (production: several threads, optionally several workers) or, with
``--dev``, Flask's threaded server in one process. ``python -m backend`` is the same command.

Options override the matching environment variables (``HOST``, ``PORT``, ``MODEL_DIR``, ``LOG_LEVEL``,
``PRELOAD_MODEL``); everything else is read from the environment (docs/backend.md). ``--check`` prints the resolved
configuration (secrets masked) and exits, non-zero when it is invalid. An official variant without weights (no
checkpoint, no ``SSP_SAM_WEIGHTS_DIR``, no ``AUTO_DOWNLOAD``) stops the start with the command that fetches them.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

GUNICORN_ARGS = ["-c", "python:backend.serving.gunicorn_conf", "backend.serving.wsgi:app"]


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--host", default=None, help="bind address (env HOST, default 127.0.0.1; 0.0.0.0 in a container)")
    p.add_argument("-p", "--port", type=int, default=None, help="port (env PORT, default 9090)")
    p.add_argument("--model-dir", default=None, help="corrections datastore and published versions (env MODEL_DIR)")
    p.add_argument("--log-level", default=None, help="DEBUG, INFO, WARNING or ERROR (env LOG_LEVEL)")
    p.add_argument("--preload", action="store_true", help="load the model when a worker starts, not on first use")
    p.add_argument("--dev", action="store_true", help="Flask's development server in one process (no gunicorn)")
    p.add_argument("--check", action="store_true", help="print the resolved configuration and exit")


def run(args: argparse.Namespace) -> int:
    overrides = {"HOST": args.host, "PORT": args.port, "MODEL_DIR": args.model_dir, "LOG_LEVEL": args.log_level,
                 "PRELOAD_MODEL": "true" if args.preload else None}
    os.environ.update({k: str(v) for k, v in overrides.items() if v is not None})

    from backend.config import BackendConfig, ConfigError
    from backend.weights import weights_problem

    try:
        config = BackendConfig.from_env()
    except ConfigError as exc:
        print(f"configuration error: {exc}", file=sys.stderr)
        return 2
    problem = weights_problem(config)
    if args.check:
        print(json.dumps(config.redacted(), indent=2))
    if problem:
        print(f"configuration error: {problem}", file=sys.stderr)
        return 2
    if args.check:
        return 0
    os.makedirs(config.model_dir, exist_ok=True)
    if not args.dev:
        os.execvp(sys.executable, [sys.executable, "-m", "gunicorn", *GUNICORN_ARGS])
    return _run_dev_server(config)


def _run_dev_server(config) -> int:
    from backend.logs import configure_logging
    from backend.serving.app import create_app

    configure_logging(config.log_level)
    app = create_app(config)
    if config.preload_model:
        app.extensions["ssp_sam"].manager.warm_up(background=True)
    try:
        app.run(host=config.host, port=config.port, threaded=True, use_reloader=False, debug=False)
    finally:
        app.extensions["ssp_sam"].stop()
    return 0


def register_cli(subparsers) -> None:
    p = subparsers.add_parser("serve", help="run the Label Studio ML backend (gunicorn; --dev: one process)",
                              description=__doc__.splitlines()[0])
    add_arguments(p)
    p.set_defaults(func=run)
