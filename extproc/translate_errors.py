"""OpenAI <-> Anthropic translation of upstream error bodies.

``error_to_openai`` / ``error_to_anthropic`` accept any upstream error body (either shape or
garbage) and always return a well-formed error body of the target shape.
"""

from __future__ import annotations

from typing import Any

import orjson

__all__ = ["error_to_anthropic", "error_to_openai"]

Json = dict[str, Any]

# Anthropic error type -> OpenAI error type, in the vocabulary extproc/errors.py uses.
_A2O_TYPE = {
    "invalid_request_error": "invalid_request_error",
    "request_too_large": "invalid_request_error",
    "authentication_error": "authentication_error",
    "permission_error": "permission_error",
    "billing_error": "insufficient_quota",
    "not_found_error": "not_found_error",
    "rate_limit_error": "rate_limit_error",
}
_STATUS_OPENAI = {400: "invalid_request_error", 401: "authentication_error", 403: "permission_error",
                  404: "not_found_error", 413: "invalid_request_error", 429: "rate_limit_error"}
_STATUS_ANTHROPIC = {400: "invalid_request_error", 401: "authentication_error", 402: "billing_error",
                     403: "permission_error", 404: "not_found_error", 413: "request_too_large",
                     429: "rate_limit_error", 503: "overloaded_error", 504: "timeout_error",
                     529: "overloaded_error"}


def _parse_error(status: int, body: bytes) -> tuple[str, str | None, Json]:
    """(message, anthropic-style type if the body had one, the OpenAI error object if it had one)."""
    try:
        obj = orjson.loads(body)
    except orjson.JSONDecodeError:
        obj = None
    err = obj.get("error") if isinstance(obj, dict) else None
    if isinstance(err, dict):
        msg = err.get("message")
        msg = msg if isinstance(msg, str) and msg else f"upstream error (HTTP {status})"
        if obj.get("type") == "error":
            return msg, str(err.get("type") or ""), {}
        return msg, None, err
    if isinstance(err, str):  # some OpenAI-compatible servers send {"error": "text"}
        return err, None, {}
    # Garbage (an HTML page, Envoy's "upstream connect error ..."): keep a short, useful excerpt.
    excerpt = body[:200].decode("utf-8", "replace").strip()
    msg = f"upstream error (HTTP {status})" + (f": {excerpt}" if excerpt else "")
    return msg, None, {}


def error_to_openai(status: int, body: bytes) -> bytes:
    msg, a_type, err = _parse_error(status, body)
    fallback = _STATUS_OPENAI.get(status, "server_error" if status >= 500 else "invalid_request_error")
    if a_type is not None:
        out = {"message": msg, "type": _A2O_TYPE.get(a_type, "server_error" if a_type else fallback), "code": a_type or None}
    else:
        out = {"message": msg, "type": err.get("type") or fallback, "code": err.get("code")}
        if "param" in err:
            out["param"] = err["param"]
    return orjson.dumps({"error": out})


def error_to_anthropic(status: int, body: bytes) -> bytes:
    msg, a_type, _ = _parse_error(status, body)
    if not a_type:
        a_type = _STATUS_ANTHROPIC.get(status, "api_error" if status >= 500 else "invalid_request_error")
    return orjson.dumps({"type": "error", "error": {"type": a_type, "message": msg}})
