"""The few helpers every module that builds Envoy config as Python data shares."""

from __future__ import annotations

from typing import Any

Json = dict[str, Any]


def typed(type_name: str, **fields: Any) -> Json:
    """An ``Any`` of ``type_name`` with ``fields``, as Envoy's JSON config spells it."""
    return {"@type": f"type.googleapis.com/{type_name}", **fields}


def typed_struct(type_name: str, **value: Any) -> Json:
    """A ``TypedStruct`` Envoy converts itself: for filters whose protos xds-protos lacks
    (sse_to_metadata, its content parser)."""
    return {"@type": "type.googleapis.com/xds.type.v3.TypedStruct", "type_url": f"type.googleapis.com/{type_name}", "value": value}


def duration(seconds: float) -> str:
    return f"{seconds:.3f}s"
