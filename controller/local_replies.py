"""Envoy's own error replies as JSON in the client API's shape: the listener's ``local_reply_config``.

Envoy answers some requests itself: protocol errors (HTTP/1.0, invalid characters, oversized
headers, Content-Length with Transfer-Encoding), timeouts, refused upgrades, upstream failures,
extproc being down. Each such local reply gets a body from ``LOCAL_REPLIES``: OpenAI's error shape,
or Anthropic's when the request was for ``/v1/messages`` (``crdgol.replies`` holds the shared
vocabulary). extproc's own immediate responses are local replies too, but already shaped: they
carry ``EXTPROC_REPLY_DETAILS`` and the first mapper passes them through unchanged.

Pure data; ``controller.envoy_config.listener`` puts it into the HTTP connection manager.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

from crdgol import replies
from crdgol.replies import (
    ANTHROPIC_PATH,
    EXTPROC_REPLY_DETAILS,
    MAX_REQUEST_HEADER_BYTES,
    MAX_REQUEST_HEADERS,
)

Json = dict[str, Any]


def error_format(type_: str, code: str, message: str, *, anthropic: bool = False, status: int = 500) -> Json:
    """The body Envoy writes for one local reply, in the OpenAI or the Anthropic shape."""
    body = (
        replies.anthropic_error(message, type_, code, status) if anthropic else replies.openai_error(message, type_, code)
    )
    return {"json_format": body, "content_type": "application/json"}


def _cel(expression: str) -> Json:
    return {
        "extension_filter": {
            "name": "envoy.access_loggers.extension_filters.cel",
            "typed_config": {
                "@type": "type.googleapis.com/envoy.extensions.access_loggers.filters.cel.v3.ExpressionFilter",
                "expression": expression,
            },
        }
    }


def _status(op: str, code: int) -> Json:
    return {"status_code_filter": {"comparison": {"op": op, "value": {"default_value": code, "runtime_key": f"crdgol.local_reply.{op.lower()}.{code}"}}}}


# Envoy's own local replies, in order (the first that matches wins): what matched, the status the
# client gets, whether that replaces Envoy's own status, the OpenAI error type and code, and the
# message. %RESPONSE_CODE_DETAILS% is Envoy's fixed reason (for example
# ``http1.invalid_characters``); it never holds request data.
@dataclass(frozen=True, slots=True)
class LocalReply:
    match: Json
    status: int
    rewrite: bool
    type: str
    code: str
    message: str


LOCAL_REPLIES: tuple[LocalReply, ...] = (
    # extproc down, refusing connections or slower than the message timeout: fail closed, and say so.
    LocalReply(_cel("response.code_details.startsWith('ext_proc_error')"), 503, True, "server_error", "policy_unavailable",
               "the gateway's policy service is unavailable or did not answer in time; the request was not forwarded"),
    # Envoy refuses upgrades the route does not allow with a bare 403; it is the request that is wrong.
    LocalReply(_cel("response.code_details.startsWith('upgrade_failed')"), 400, True, "invalid_request_error",
               "upgrade_not_supported",
               "protocol upgrades (WebSocket and others) are not supported: call the HTTP API; streams use server-sent events"),
    # HTTP/1.0: Envoy says 426 Upgrade Required without the Upgrade header that status needs.
    LocalReply(_status("EQ", 426), 505, True, "invalid_request_error", "http_version_not_supported",
               "this HTTP version is not supported: use HTTP/1.1 or HTTP/2"),
    LocalReply(_status("EQ", 431), 431, False, "invalid_request_error", "request_headers_too_large",
               "the request headers are too large or too many: at most {headers_kb} KiB and {headers_count} headers"),
    LocalReply(_status("EQ", 413), 413, False, "invalid_request_error", "request_too_large",
               "the request body is larger than the gateway accepts ({body_mib} MiB)"),
    LocalReply(_status("EQ", 408), 408, False, "invalid_request_error", "request_timeout",
               "the request was not received in time: send the headers within {headers_s} s and the whole request "
               "within {request_s} s"),
    LocalReply(_status("EQ", 404), 404, False, "not_found_error", "not_found", "the gateway has no route for this request"),
    # A model call that reached the router without extproc's answer: it had no body to send.
    LocalReply(_cel("response.code == 400 && response.code_details == 'direct_response'"), 400, False,
               "invalid_request_error", "invalid_request", "the request body is empty: send a JSON object"),
    LocalReply(_status("EQ", 400), 400, False, "invalid_request_error", "bad_request",
               "the request is not valid HTTP (%RESPONSE_CODE_DETAILS%)"),
    # GET /mcp: the gateway offers MCP clients no standalone server-to-client stream.
    LocalReply(_cel("response.code == 405 && response.code_details == 'direct_response'"), 405, False,
               "invalid_request_error", "method_not_allowed",
               "no server-to-client stream here: POST one JSON-RPC message per request; DELETE ends an MCP session"),
    LocalReply(_status("EQ", 502), 502, False, "server_error", "bad_gateway",
               "the model's backend failed to answer (%RESPONSE_CODE_DETAILS%)"),
    LocalReply(_status("EQ", 503), 503, False, "server_error", "upstream_unavailable",
               "no backend of this model is available (%RESPONSE_CODE_DETAILS%)"),
    LocalReply(_status("EQ", 504), 504, False, "server_error", "upstream_timeout",
               "the model's backend did not answer in time"),
    LocalReply(_status("GE", 500), 500, False, "server_error", "internal_error",
               "the gateway failed to process this request (%RESPONSE_CODE_DETAILS%)"),
    LocalReply(_status("GE", 400), 400, False, "invalid_request_error", "bad_request",
               "the gateway refused this request (%RESPONSE_CODE_DETAILS%)"),
)


def local_replies(*, max_request_bytes: int, request_headers_timeout_s: float, request_timeout_s: float) -> Json:
    """Envoy's own error replies as JSON in the client API's shape, so SDKs raise the right exception.

    extproc's immediate responses are already shaped (they carry ``EXTPROC_REPLY_DETAILS``) and
    pass through unchanged; every other local reply (protocol errors, timeouts, upstream
    failures, extproc being down) gets a body from ``LOCAL_REPLIES``, in Anthropic's shape when
    the request was for ``/v1/messages``. A reply that arrives before the request headers were
    parsed has no path and gets the OpenAI shape.
    """
    facts = {
        "headers_kb": MAX_REQUEST_HEADER_BYTES // 1024,
        "headers_count": MAX_REQUEST_HEADERS,
        "body_mib": f"{max_request_bytes / (1024 * 1024):g}",
        "headers_s": f"{request_headers_timeout_s:g}",
        "request_s": f"{request_timeout_s:g}",
    }
    anthropic_path = {
        "header_filter": {
            "header": {"name": ":path", "string_match": {"safe_regex": {"regex": re.escape(ANTHROPIC_PATH) + r"/?(\?.*)?"}}}
        }
    }

    def mapper(rule: LocalReply, anthropic: bool) -> Json:
        out: Json = {
            "filter": {"and_filter": {"filters": [anthropic_path, rule.match]}} if anthropic else rule.match,
            "body_format_override": error_format(
                rule.type, rule.code, rule.message.format(**facts), anthropic=anthropic, status=rule.status
            ),
        }
        if rule.rewrite:
            out["status_code"] = rule.status
        return out

    passthrough = {"filter": _cel(f"response.code_details == '{EXTPROC_REPLY_DETAILS}'")}
    return {
        "mappers": [
            passthrough,
            *(mapper(r, anthropic=True) for r in LOCAL_REPLIES),
            *(mapper(r, anthropic=False) for r in LOCAL_REPLIES),
        ]
    }
