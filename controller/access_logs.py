"""Envoy's access log on the gateway listener: one JSON line per request (``crdgol.access_log``).

``access_logs(target)`` is the listener's ``access_log`` list: ``"-"`` writes to Envoy's stdout,
any other value is a file path, ``""`` turns the log off. ``usage_filters``: the listener runs
Envoy's usage filters, and the line's token counts come from them. The line's fields and the metadata
namespace extproc fills are defined once in ``crdgol.access_log``.
"""

from __future__ import annotations

from envoy.extensions.access_loggers.file.v3 import file_pb2  # noqa: F401 (registers the Any types the
from envoy.extensions.access_loggers.stream.v3 import stream_pb2  # noqa: F401  xDS server packs)

from controller.envoy_json import Json, typed
from crdgol.access_log import json_format

STDOUT = "-"


def log_format(usage_filters: bool = False) -> Json:
    return {"json_format": json_format(usage_filters=usage_filters)}


def access_logs(target: str, *, usage_filters: bool = False) -> list[Json]:
    if not target:
        return []
    if target == STDOUT:
        logger = {
            "name": "envoy.access_loggers.stdout",
            "typed_config": typed("envoy.extensions.access_loggers.stream.v3.StdoutAccessLog", log_format=log_format(usage_filters)),
        }
    else:
        logger = {
            "name": "envoy.access_loggers.file",
            "typed_config": typed(
                "envoy.extensions.access_loggers.file.v3.FileAccessLog", path=target, log_format=log_format(usage_filters)
            ),
        }
    return [logger]
