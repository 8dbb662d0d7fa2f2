"""What extproc's error answers and Envoy's local replies agree on: one error vocabulary, two shapes.

Both processes answer bad input with JSON in the client API's shape: OpenAI's
``{"error": {"message", "type", "code"}}`` everywhere, Anthropic's
``{"type": "error", "error": {"type", "message", "code"}}`` on ``/v1/messages``. extproc builds
its bodies itself (``extproc.errors``); Envoy's own local replies are shaped by the listener's
``local_reply_config`` (``controller.envoy_config``), which leaves extproc's answers alone: they
carry ``EXTPROC_REPLY_DETAILS`` as their response-code details.

Defined here, on the ground floor, because both sides import it (no import between extproc/ and
controller/).
"""

from __future__ import annotations

from typing import Any

# The response-code details extproc puts on every immediate response. Envoy's local-reply mappers
# match it first and pass those bodies through unchanged (they are already in the right shape).
EXTPROC_REPLY_DETAILS = "crdgol"

# Requests under this path speak the Anthropic Messages API, and get Anthropic-shaped errors.
ANTHROPIC_PATH = "/v1/messages"

# OpenAI error type -> Anthropic error type. Anthropic names some conditions by status instead
# (``request_too_large``, ``overloaded_error``, ``timeout_error``): see ``anthropic_type``.
_OPENAI_TO_ANTHROPIC = {
    "invalid_request_error": "invalid_request_error",
    "authentication_error": "authentication_error",
    "permission_error": "permission_error",
    "not_found_error": "not_found_error",
    "rate_limit_error": "rate_limit_error",
    "server_error": "api_error",
}
_ANTHROPIC_BY_STATUS = {413: "request_too_large", 503: "overloaded_error", 504: "timeout_error"}


def anthropic_type(openai_type: str, status: int) -> str:
    """The Anthropic error type for an OpenAI-vocabulary type and the HTTP status it goes with."""
    by_status = _ANTHROPIC_BY_STATUS.get(status)
    if by_status is not None:
        return by_status
    return _OPENAI_TO_ANTHROPIC.get(openai_type, "api_error" if status >= 500 else "invalid_request_error")


def openai_error(message: str, type_: str, code: str) -> dict[str, Any]:
    return {"error": {"message": message, "type": type_, "code": code}}


def anthropic_error(message: str, type_: str, code: str, status: int) -> dict[str, Any]:
    """Anthropic's shape; it also carries the OpenAI ``code`` so both SDKs' users see one vocabulary."""
    return {"type": "error", "error": {"type": anthropic_type(type_, status), "message": message, "code": code}}


# Request headers the gateway accepts: total bytes (names and values, pseudo-headers included)
# and count. extproc enforces these with a JSON 431; Envoy's codecs are set to a multiple of them
# (``controller.envoy_config.RenderSettings``), because over its codec limit Envoy can answer an
# HTTP/1 request with a 431 but only resets an HTTP/2 stream.
MAX_REQUEST_HEADER_BYTES = 32 * 1024
MAX_REQUEST_HEADERS = 100
CODEC_HEADER_HEADROOM = 3

# crdgol's own headers (between its filters, and from extproc to the run API) all start so. A
# provider's answer never brings one in: Envoy strips them from every upstream response.
INTERNAL_HEADER_PREFIX = "x-crdgol-"
