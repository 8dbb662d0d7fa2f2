"""Provider error bodies: translated between the OpenAI and Anthropic shapes, mapped and sanitized.

``provider_error`` is what a client sees when a provider answered with an error: the status is
mapped to what the error means *for the caller* and the body is rebuilt in the client API's
shape, never passed through:

* 401 / 403 become **502** ``upstream_auth_failed``: the provider refused the gateway's credential,
  which the caller can do nothing about (passing the 401 on would look like the caller's own key
  failing, and some providers echo the key they were sent).
* 404 becomes 502 ``upstream_not_found`` (the binding names a model or path the provider lacks);
  408 and 504 become 504; 429 stays 429 (its ``Retry-After`` header is kept); 503 and 529 become
  503; any other 5xx becomes 502. These carry a fixed message: provider internals stay out.
* Any other 4xx (400, 409, 413, 422, ...) is about the request itself: 400 (413 stays 413) with
  the provider's own explanation, sanitized.

Sanitized means: only the message is kept (never the whole body), every credential the gateway
knows for the binding is replaced, as is anything shaped like a key or a bearer token, control
characters are removed and the message is cut to ``MAX_MESSAGE_CHARS``. Bodies over
``MAX_PARSED_BYTES`` are not parsed at all.

``error_to_openai`` / ``error_to_anthropic`` translate an error body between the two shapes
(for a fallback attempt, and for an error event inside a translated stream); they sanitize the
message the same way, without a list of known credentials.
"""

from __future__ import annotations

import re
import unicodedata
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import orjson

from crdgol import replies

__all__ = [
    "MAX_MESSAGE_CHARS",
    "MAX_PARSED_BYTES",
    "ProviderError",
    "client_status",
    "credentials",
    "error_to_anthropic",
    "error_to_openai",
    "map_provider_error",
    "provider_error",
    "redact",
]

Json = dict[str, Any]

MAX_MESSAGE_CHARS = 512
MAX_PARSED_BYTES = 64 * 1024
REDACTED = "[redacted]"

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

# What a credential looks like when a provider echoes one: a bearer token, a prefixed key
# (sk-..., sk-ant-..., key_..., also masked forms like sk-abc****wxyz), or any long unbroken token;
# keys carry digits (or a mask) and long runs without hyphens, which spares words like
# ``token_limit`` and hyphenated model names.
_KEYLIKE = re.compile(
    r"(?i)\bbearer\s+\S+"
    r"|\b(?:sk|pk|rk|key|api|apikey|token|secret|sess)[-_](?=[A-Za-z._\-]*[0-9*])[A-Za-z0-9*._\-]{4,}"
    r"|(?=[A-Za-z+/_*]*[0-9])[A-Za-z0-9+/_*]{24,}"
)
_CODE = re.compile(r"[a-z0-9_.\-]{1,64}")
_STRIP_CATEGORIES = frozenset({"Cc", "Cf", "Zl", "Zp"})


def redact(text: str, secrets: Iterable[str] = ()) -> str:
    """``text`` with every known secret and anything key-shaped replaced, one line, capped."""
    text = text[: MAX_MESSAGE_CHARS * 4]
    for secret in secrets:
        if len(secret) >= 4:
            text = text.replace(secret, REDACTED)
    text = _KEYLIKE.sub(REDACTED, text)
    text = "".join(" " if unicodedata.category(c) in _STRIP_CATEGORIES else c for c in text)
    text = " ".join(text.split())
    return text if len(text) <= MAX_MESSAGE_CHARS else text[: MAX_MESSAGE_CHARS - 1].rstrip() + "…"


def _parse_error(status: int, body: bytes) -> tuple[str, str | None, Json]:
    """(message, anthropic-style type if the body had one, the OpenAI error object if it had one)."""
    obj: object = None
    if len(body) <= MAX_PARSED_BYTES:
        try:
            obj = orjson.loads(body)
        except orjson.JSONDecodeError:
            obj = None
    err = obj.get("error") if isinstance(obj, dict) else None
    if isinstance(err, dict):
        msg = err.get("message")
        msg = msg if isinstance(msg, str) and msg else f"upstream error (HTTP {status})"
        if isinstance(obj, dict) and obj.get("type") == "error":
            return msg, str(err.get("type") or ""), {}
        return msg, None, err
    if isinstance(err, str) and err:  # some OpenAI-compatible servers send {"error": "text"}
        return err, None, {}
    # Garbage (an HTML page, a proxy's "upstream connect error ..."): keep a short, useful excerpt.
    excerpt = body[:200].decode("utf-8", "replace").strip()
    msg = f"upstream error (HTTP {status})" + (f": {excerpt}" if excerpt else "")
    return msg, None, {}


def _short_code(value: object) -> str | None:
    return value if isinstance(value, str) and _CODE.fullmatch(value) else None


def error_to_openai(status: int, body: bytes) -> bytes:
    msg, a_type, err = _parse_error(status, body)
    msg = redact(msg)
    fallback = _STATUS_OPENAI.get(status, "server_error" if status >= 500 else "invalid_request_error")
    out: Json
    if a_type is not None:
        out = {"message": msg, "type": _A2O_TYPE.get(a_type, "server_error" if a_type else fallback), "code": a_type or None}
    else:
        etype = _short_code(err.get("type")) or fallback
        out = {"message": msg, "type": etype, "code": _short_code(err.get("code"))}
        if "param" in err:
            out["param"] = _short_code(err["param"])
    return orjson.dumps({"error": out})


def error_to_anthropic(status: int, body: bytes) -> bytes:
    msg, a_type, _ = _parse_error(status, body)
    a_type = _short_code(a_type)
    if not a_type:
        a_type = _STATUS_ANTHROPIC.get(status, "api_error" if status >= 500 else "invalid_request_error")
    return orjson.dumps({"type": "error", "error": {"type": a_type, "message": redact(msg)}})


@dataclass(frozen=True, slots=True)
class ProviderError:
    """What the client is told about a provider's error answer."""

    status: int
    type: str
    code: str
    message: str


_FIXED: dict[int, ProviderError] = {
    401: ProviderError(502, "server_error", "upstream_auth_failed",
                       "the model's provider refused the gateway's credential (HTTP {status}); "
                       "this is the gateway's configuration, not your API key: tell its operator"),
    404: ProviderError(502, "server_error", "upstream_not_found",
                       "the model's provider does not know the model or path the gateway is configured with (HTTP 404)"),
    408: ProviderError(504, "server_error", "upstream_timeout", "the model's provider timed out (HTTP {status})"),
    429: ProviderError(429, "rate_limit_error", "upstream_rate_limited",
                       "the model's provider is rate-limiting the gateway: retry later"),
    503: ProviderError(503, "server_error", "upstream_unavailable",
                       "the model's provider is unavailable or overloaded (HTTP {status}): retry later"),
}
_FIXED[403] = _FIXED[401]
_FIXED[504] = _FIXED[408]
_FIXED[529] = _FIXED[503]
_SERVER = ProviderError(502, "server_error", "upstream_error", "the model's provider failed (HTTP {status})")


def client_status(status: int) -> int:
    """The status a client gets for a provider's error status (known before the body arrives)."""
    fixed = _FIXED.get(status) or (_SERVER if status >= 500 else None)
    if fixed is not None:
        return fixed.status
    return 413 if status == 413 else 400


def credentials(auth_headers: Iterable[tuple[str, str]]) -> list[str]:
    """The secrets in a backend's credential headers, as a provider might echo them."""
    out: list[str] = []
    for _, value in auth_headers:
        out.append(value)
        if value[:7].lower() == "bearer ":
            out.append(value[7:])
    return out


def map_provider_error(status: int, body: bytes, secrets: Iterable[str] = ()) -> ProviderError:
    """The client's view of a provider's error answer (see the module docstring for the rules)."""
    fixed = _FIXED.get(status) or (_SERVER if status >= 500 else None)
    if fixed is not None:
        return ProviderError(fixed.status, fixed.type, fixed.code, fixed.message.format(status=status))
    msg, _, err = _parse_error(status, body)
    code = _short_code(err.get("code")) or ("request_too_large" if status == 413 else "upstream_invalid_request")
    return ProviderError(
        413 if status == 413 else 400,
        "invalid_request_error",
        code,
        "the model's provider refused the request: " + redact(msg, secrets),
    )


def provider_error(status: int, body: bytes, *, anthropic: bool, secrets: Iterable[str] = ()) -> tuple[int, bytes]:
    """(the status, the body) a client gets for a provider's error answer, in its API's shape."""
    e = map_provider_error(status, body, secrets)
    doc = (
        replies.anthropic_error(e.message, e.type, e.code, e.status)
        if anthropic
        else replies.openai_error(e.message, e.type, e.code)
    )
    return e.status, orjson.dumps(doc)
