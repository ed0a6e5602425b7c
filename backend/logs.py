"""Logging setup shared by every ``ssp-sam`` command and the gunicorn workers, and the one-line rule for
client-given strings in log records (:func:`loggable`)."""

from __future__ import annotations

import logging
import re
from typing import Any, Optional

FORMAT = "%(asctime)s %(levelname)s [%(process)d] %(name)s: %(message)s"


def configure_logging(level: str = "INFO") -> None:
    lvl = getattr(logging, str(level).upper(), logging.INFO)
    root = logging.getLogger()
    if not root.handlers:
        logging.basicConfig(level=lvl, format=FORMAT)
    root.setLevel(lvl)
    # the SDK logs every resolved media URL at INFO, its HTTP client (httpx) every request and Alembic two lines per
    # datastore opened: quieter unless debugging
    if lvl > logging.DEBUG:
        for name in ("label_studio_sdk", "httpx", "urllib3", "werkzeug", "alembic"):
            logging.getLogger(name).setLevel(max(lvl, logging.WARNING))


_CONTROL = re.compile(r"[\x00-\x1f\x7f\x85\u2028\u2029]")


def loggable(value: Any, limit: Optional[int] = 300) -> str:
    """``str(value)`` fit for one log line: control characters (a newline in a client's URL, ANSI escapes) written as
    escapes (``\\n``), so a client-given string can never start a forged line; cut after ``limit`` characters."""
    text = _CONTROL.sub(lambda m: m.group().encode("unicode_escape").decode("ascii"), str(value))
    return text if limit is None or len(text) <= limit else text[:limit] + "..."


class OneLineMessages(logging.Filter):
    """A logger filter that writes a record's message with :func:`loggable` (for libraries that log URLs raw)."""

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        if _CONTROL.search(message):
            record.msg, record.args = loggable(message, limit=None), None
        return True
