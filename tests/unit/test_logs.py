"""--log-format json: one parseable object per line, with the request id inside a request."""

from __future__ import annotations

import json
import logging
import sys

import pytest

from crdgol import logs


def record(msg: str, exc: bool = False) -> logging.LogRecord:
    info = None
    if exc:
        try:
            raise ValueError("boom")
        except ValueError:
            info = sys.exc_info()
    return logging.LogRecord("extproc.server", logging.WARNING, __file__, 1, msg, ("x",), info)


def test_a_json_line_has_time_level_logger_and_the_formatted_message() -> None:
    doc = json.loads(logs.JsonFormatter().format(record("policy %s in force")))
    assert doc["level"] == "warning" and doc["logger"] == "extproc.server" and doc["message"] == "policy x in force"
    assert doc["time"].endswith("Z") and "request_id" not in doc and "exception" not in doc


def test_inside_a_request_the_line_carries_its_request_id_and_exceptions_stay_one_line() -> None:
    token = logs.request_id.set("req-123")
    try:
        line = logs.JsonFormatter().format(record("failed %s", exc=True))
    finally:
        logs.request_id.reset(token)
    assert "\n" not in line
    doc = json.loads(line)
    assert doc["request_id"] == "req-123" and "ValueError: boom" in doc["exception"]


def test_an_unknown_format_is_refused_with_the_choices() -> None:
    with pytest.raises(SystemExit, match="text, json"):
        logs.configure("info", "xml")
