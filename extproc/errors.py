"""The gateway's error hierarchy, mapped to an HTTP status and a JSON body in one place.

Every refusal extproc makes is one of these. ``to_body`` renders the body that the official SDKs
understand: OpenAI's ``{"error": {"message", "type", "code"}}``, or with ``anthropic=True``
Anthropic's ``{"type": "error", "error": {"type", "message", "code"}}`` (``crdgol.replies``
holds the shared vocabulary, which Envoy's own local replies use too). The message is never empty.
"""

from __future__ import annotations

import orjson

from crdgol import replies


class GatewayError(Exception):
    """A request the gateway refuses. Subclasses fix the status and the error type."""

    status: int = 500
    type: str = "server_error"
    code: str = "internal_error"

    def __init__(self, message: str, *, code: str | None = None) -> None:
        message = message or f"the gateway refused this request ({self.code if code is None else code})"
        super().__init__(message)
        self.message = message
        if code is not None:
            self.code = code

    def to_body(self, *, anthropic: bool = False) -> bytes:
        if anthropic:
            return orjson.dumps(replies.anthropic_error(self.message, self.type, self.code, self.status))
        return error_body(self.message, self.type, self.code)

    def headers(self) -> dict[str, str]:
        """Extra response headers (for example Retry-After)."""
        return {}


class BadRequest(GatewayError):
    status = 400
    type = "invalid_request_error"
    code = "invalid_request"


class Unauthenticated(GatewayError):
    status = 401
    type = "authentication_error"
    code = "invalid_api_key"


class Forbidden(GatewayError):
    status = 403
    type = "permission_error"
    code = "model_not_allowed"


class NotFound(GatewayError):
    status = 404
    type = "not_found_error"
    code = "not_found"


class PayloadTooLarge(GatewayError):
    status = 413
    type = "invalid_request_error"
    code = "request_too_large"


class HeadersTooLarge(GatewayError):
    status = 431
    type = "invalid_request_error"
    code = "request_headers_too_large"


class MethodNotAllowed(GatewayError):
    status = 405
    type = "invalid_request_error"
    code = "method_not_allowed"


class UnsupportedMediaType(GatewayError):
    status = 415
    type = "invalid_request_error"
    code = "unsupported_media_type"


class RateLimited(GatewayError):
    status = 429
    type = "rate_limit_error"
    code = "rate_limit_exceeded"

    def __init__(self, message: str, *, retry_after: int = 1, code: str | None = None) -> None:
        super().__init__(message, code=code)
        self.retry_after = retry_after

    def headers(self) -> dict[str, str]:
        return {"retry-after": str(self.retry_after)}


class Unavailable(GatewayError):
    status = 503
    type = "server_error"
    code = "service_unavailable"


def error_body(message: str, type_: str, code: str) -> bytes:
    return orjson.dumps(replies.openai_error(message, type_, code))
