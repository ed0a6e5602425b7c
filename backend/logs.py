"""Logging setup shared by every ``ssp-sam`` command and the gunicorn workers."""

from __future__ import annotations

import logging

FORMAT = "%(asctime)s %(levelname)s [%(process)d] %(name)s: %(message)s"


def configure_logging(level: str = "INFO") -> None:
    lvl = getattr(logging, str(level).upper(), logging.INFO)
    root = logging.getLogger()
    if not root.handlers:
        logging.basicConfig(level=lvl, format=FORMAT)
    root.setLevel(lvl)
    # the SDK logs every resolved media URL at INFO and Alembic two lines per datastore opened: quieter unless debugging
    if lvl > logging.DEBUG:
        for name in ("label_studio_sdk", "urllib3", "werkzeug", "alembic"):
            logging.getLogger(name).setLevel(max(lvl, logging.WARNING))
