"""What one try at one backend needs, written once for both places that do it.

* ``rewrite`` points a request at a backend: path, authority, the provider credential (the
  client's and any earlier attempt's removed), the model name, and the body translated from the
  API it is in to the backend's.
* ``ResponseTranslation`` (``extproc.readers.ResponseReader``) turns the backend's answer (JSON,
  SSE stream or error) back into the client's API.

The upstream ext_proc filter (``extproc.upstream``) uses them on every fallback attempt; the
downstream filter uses them for a binding's single first-priority backend, whose cluster then
needs no upstream ext_proc at all (one gRPC stream per request instead of two).
"""

from __future__ import annotations

from typing import Any

import orjson

from crdgol.request_path import ROUTE_HEADER
from extproc import translate
from extproc.errors import BadRequest
from extproc.policy import Api, Backend
from extproc.readers import ResponseReader as ResponseTranslation
from extproc.services import BODY_API_HEADER, CLIENT_API_HEADER

ANTHROPIC_VERSION = "2023-06-01"
# Never forwarded to a provider: the client's credentials and crdgol's own request headers.
__all__ = ["STRIP", "ResponseTranslation", "api_of", "rewrite_body", "target_headers"]

STRIP = ("authorization", "x-api-key", ROUTE_HEADER, CLIENT_API_HEADER, BODY_API_HEADER)


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
