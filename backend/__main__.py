"""Development server: ``python -m backend --host 127.0.0.1 --port 9090``.

Flask's threaded server, one process. For production use gunicorn (scripts/run.sh, Dockerfile).
Command-line options override the matching environment variables.
"""

from __future__ import annotations

import argparse
import os
import sys


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m backend", description=__doc__.splitlines()[0])
    parser.add_argument("--host", default=None, help="bind address (env HOST, default 127.0.0.1)")
    parser.add_argument("-p", "--port", type=int, default=None, help="port (env PORT, default 9090)")
    parser.add_argument("--model-dir", default=None, help="MODEL_DIR")
    parser.add_argument("--log-level", default=None, help="LOG_LEVEL: DEBUG, INFO, WARNING, ERROR")
    parser.add_argument("--preload", action="store_true", help="load the model at start instead of on first use")
    parser.add_argument("--check", action="store_true", help="validate the configuration and exit")
    args = parser.parse_args(argv)

    overrides = {"HOST": args.host, "PORT": args.port, "MODEL_DIR": args.model_dir, "LOG_LEVEL": args.log_level}
    for key, value in overrides.items():
        if value is not None:
            os.environ[key] = str(value)

    from backend.config import BackendConfig, ConfigError
    from backend.logs import configure_logging
    try:
        config = BackendConfig.from_env()
    except ConfigError as exc:
        print(f"configuration error: {exc}", file=sys.stderr)
        return 2
    configure_logging(config.log_level)
    if args.check:
        import json
        print(json.dumps(config.redacted(), indent=2))
        return 0

    from backend.serving.app import create_app
    app = create_app(config)
    if args.preload or config.preload_model:
        app.extensions["ssp_sam"].manager.warm_up(background=True)
    try:
        app.run(host=config.host, port=config.port, threaded=True, use_reloader=False, debug=False)
    finally:
        app.extensions["ssp_sam"].stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
