"""What one try at one backend needs, written once for both places that do it.

* ``rewrite`` points a request at a backend: path, authority, the provider credential (the
  client's and any earlier attempt's removed), the model name, and the body translated from the
  API it is in to the backend's.
* ``ResponseTranslation`` turns the backend's answer (JSON, SSE stream or error) back into the
  client's API.

The upstream ext_proc filter (``extproc.upstream``) uses them on every fallback attempt; the
downstream filter uses them for a binding's single first-priority backend, whose cluster then
needs no upstream ext_proc at all (one gRPC stream per request instead of two).
"""

from __future__ import annotations

from typing import Any

import orjson

from extproc import translate, translate_errors, translate_stream
from extproc.errors import BadRequest
from extproc.phases import BUFFERED, STREAMED
from extproc.policy import Api, Backend
from extproc.services import BODY_API_HEADER, CLIENT_API_HEADER, ROUTE_HEADER

ANTHROPIC_VERSION = "2023-06-01"
# Never forwarded to a provider: the client's credentials and crdgol's own request headers.
STRIP = ("authorization", "x-api-key", ROUTE_HEADER, CLIENT_API_HEADER, BODY_API_HEADER)

Translator = translate_stream.AnthropicToOpenAIStream | translate_stream.OpenAIToAnthropicStream


def api_of(value: str | None) -> Api:
    return Api.ANTHROPIC if value == "anthropic" else Api.OPENAI


def target_headers(backend: Backend, embeddings: bool, has_anthropic_version: bool) -> dict[str, str]:
    """Headers that point a request at ``backend`` and carry its credential."""
    if embeddings:
        path = "/v1/embeddings"
    else:
        path = "/v1/messages" if backend.api is Api.ANTHROPIC else "/v1/chat/completions"
    out = {":path": backend.path_prefix + path, ":authority": backend.host, **dict(backend.auth_headers)}
    if backend.api is Api.ANTHROPIC and not has_anthropic_version:
        out["anthropic-version"] = ANTHROPIC_VERSION
    return out


def rewrite_body(backend: Backend, doc: dict[str, Any], body_api: Api) -> bytes:
    """The request body for ``backend``: its model name, in its API."""
    model = backend.model
    if body_api is backend.api:
        doc["model"] = model
    elif body_api is Api.OPENAI:
        try:
            doc = translate.openai_request_to_anthropic(doc, model)
        except translate.TranslationError as exc:
            raise BadRequest(str(exc), code="unsupported_parameter") from None
    else:
        try:
            doc = translate.anthropic_request_to_openai(doc, model, include_usage=True)
        except translate.TranslationError as exc:
            raise BadRequest(str(exc), code="unsupported_parameter") from None
    return orjson.dumps(doc)


class ResponseTranslation:
    """Backend API -> client API for one response; a no-op when they are the same."""

    def __init__(self, backend_api: Api, client_api: Api, model: str) -> None:
        self.backend_api = backend_api
        self.client_api = client_api
        self.model = model
        self.needed = backend_api is not client_api
        self.stream: Translator | None = None
        self.error_status = 0
        self.buffered = False

    def start(self, status: int, content_type: str) -> int | None:
        """Called with the response headers; returns the body mode to ask Envoy for, if any."""
        if not self.needed:
            return None
        if status >= 300:
            self.error_status = status
        elif "text/event-stream" in content_type:
            self.stream = (
                translate_stream.AnthropicToOpenAIStream(self.model, include_usage=True)
                if self.client_api is Api.OPENAI
                else translate_stream.OpenAIToAnthropicStream(self.model)
            )
            return int(STREAMED)
        self.buffered = True
        return int(BUFFERED)

    def body(self, chunk: bytes, end_of_stream: bool) -> bytes:
        """The client's bytes for this chunk of the backend's body."""
        if not self.needed:
            return chunk
        if self.stream is not None:
            out = self.stream.feed(chunk)
            return out + self.stream.finish() if end_of_stream else out
        if not end_of_stream:
            return chunk
        if self.error_status:
            if self.client_api is Api.OPENAI:
                return translate_errors.error_to_openai(self.error_status, chunk)
            return translate_errors.error_to_anthropic(self.error_status, chunk)
        try:
            doc = orjson.loads(chunk)
        except orjson.JSONDecodeError:
            return translate_errors.error_to_openai(502, chunk) if self.client_api is Api.OPENAI else translate_errors.error_to_anthropic(502, chunk)
        if self.client_api is Api.OPENAI:
            doc = translate.anthropic_response_to_openai(doc, self.model)
        else:
            doc = translate.openai_response_to_anthropic(doc, self.model)
        return orjson.dumps(doc)
