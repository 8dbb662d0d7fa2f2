"""Log output for every crdgol command: plain text for people, or one JSON object per line.

``configure(level, fmt)`` is called once at the entry point (``crdgol.cli``). JSON lines carry
``time`` (UTC, ISO 8601 with milliseconds), ``level``, ``logger``, ``message``, ``pid``, and
``request_id`` (inside extproc's handling of a request) and ``exception`` when there is one, so a log pipeline can parse them without regular expressions.
Secrets stay out of logs the same way in both formats: no code path logs a credential, a header
value or a prompt (their types hide them from ``repr``); this module adds no fields of its own.
"""

from __future__ import annotations

import contextvars
import json
import logging
import os
import time

FORMATS = ("text", "json")

# The x-request-id of the request being handled (extproc sets it per ext_proc stream, whose task
# it is local to); JSON lines carry it as ``request_id`` so they join the access log's lines.
request_id: contextvars.ContextVar[str] = contextvars.ContextVar("crdgol_request_id", default="")
TEXT = "%(asctime)s %(levelname)s %(name)s: %(message)s"


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        ts = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
        doc: dict[str, object] = {
            "time": f"{ts}.{int(record.msecs):03d}Z",
            "level": record.levelname.lower(),
            "logger": record.name,
            "message": record.getMessage(),
            "pid": os.getpid(),
        }
        rid = request_id.get()
        if rid:
            doc["request_id"] = rid
        if record.exc_info:
            doc["exception"] = self.formatException(record.exc_info)
        return json.dumps(doc, ensure_ascii=False)


def configure(level: str, fmt: str) -> None:
    """Set up the root logger (replacing any handler) at ``level`` in format ``fmt``."""
    if fmt not in FORMATS:
        raise SystemExit(f"crdgol: --log-format must be one of {', '.join(FORMATS)}, not {fmt!r}")
    handler = logging.StreamHandler()
    handler.setFormatter(JsonFormatter() if fmt == "json" else logging.Formatter(TEXT))
    logging.basicConfig(level=getattr(logging, level.upper(), logging.INFO), handlers=[handler], force=True)
