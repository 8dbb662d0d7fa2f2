"""Per-attempt strategy: what the upstream ext_proc filter does on every try at a backend.

Envoy runs this filter in each backend cluster's upstream filter chain, so a fallback attempt on
another backend is processed again with that backend's settings. The cluster tells extproc which
backend it is through gRPC initial metadata (``x-crdgol-backend``). Per attempt it:

* points the request at the backend (``:path``, ``:authority``), removes the client's credential
  and internal headers, and injects the provider credential (which never reaches the client);
* rewrites the model name, and translates the body when the client and the backend speak
  different APIs (OpenAI chat <-> Anthropic messages), streaming included;
* tags the response with the backend id for the downstream filter's accounting.
"""

from __future__ import annotations

from typing import Any

import orjson

from extproc import translate
from extproc.errors import BadRequest, Unavailable
from extproc.phases import BUFFERED, PASS, STREAMED, Continue, Handler, Headers, Reply
from extproc.policy import Api, Backend, Binding
from extproc.services import BACKEND_HEADER, CLIENT_API_HEADER, ROUTE_HEADER, Services

ANTHROPIC_VERSION = "2023-06-01"
_STRIP = ("authorization", "x-api-key", ROUTE_HEADER, CLIENT_API_HEADER)

Translator = translate.AnthropicToOpenAIStream | translate.OpenAIToAnthropicStream


class Attempt(Handler):
    def __init__(self, services: Services, backend_id: str) -> None:
        entry = services.current.backends.get(backend_id)
        if entry is None:
            # The policy and the Envoy config disagree (an update in flight): fail this attempt.
            raise Unavailable(f"backend {backend_id} is not in the policy in force")
        self.binding: Binding = entry[0]
        self.backend: Backend = entry[1]
        self.client_api = Api.OPENAI
        self.embeddings = False
        self.translator: Translator | None = None
        self.error_status = 0

    @property
    def translating(self) -> bool:
        return self.client_api is not self.backend.api

    async def request_headers(self, headers: Headers, end_of_stream: bool) -> Reply:
        try:
            self.client_api = Api(headers.get(CLIENT_API_HEADER, "openai"))
        except ValueError:
            self.client_api = Api.OPENAI
        self.embeddings = headers.get(":path", "").startswith("/v1/embeddings")
        be = self.backend
        if self.embeddings:
            path = "/v1/embeddings"
        else:
            path = "/v1/messages" if be.api is Api.ANTHROPIC else "/v1/chat/completions"
        set_headers = {":path": be.path_prefix + path, ":authority": be.host, **dict(be.auth_headers)}
        if be.api is Api.ANTHROPIC and "anthropic-version" not in headers:
            set_headers["anthropic-version"] = ANTHROPIC_VERSION
        remove = [h for h in _STRIP if h in headers and h not in set_headers]
        return Continue(set_headers=set_headers, remove_headers=remove)

    async def request_body(self, body: bytes, end_of_stream: bool) -> Reply:
        doc: dict[str, Any] = orjson.loads(body)
        model = self.backend.model
        if not self.translating:
            doc["model"] = model
        elif self.client_api is Api.OPENAI:
            try:
                doc = translate.openai_request_to_anthropic(doc, model)
            except translate.TranslationError as exc:
                raise BadRequest(str(exc), code="unsupported_parameter") from None
        else:
            doc = translate.anthropic_request_to_openai(doc, model, include_usage=True)
        out = orjson.dumps(doc)
        return Continue(body=out, set_headers={"content-length": str(len(out))})

    async def response_headers(self, headers: Headers, end_of_stream: bool) -> Reply:
        reply = Continue(set_headers={BACKEND_HEADER: self.backend.id})
        if not self.translating or end_of_stream:
            return reply
        status = int(headers.get(":status", "0") or 0)
        reply.remove_headers.append("content-length")
        if status >= 300:
            self.error_status = status
            reply.response_body_mode = BUFFERED
        elif "text/event-stream" in headers.get("content-type", ""):
            model = self.binding.model
            self.translator = (
                translate.AnthropicToOpenAIStream(model, include_usage=True)
                if self.client_api is Api.OPENAI
                else translate.OpenAIToAnthropicStream(model)
            )
            reply.response_body_mode = STREAMED
        else:
            reply.response_body_mode = BUFFERED
        return reply

    async def response_body(self, body: bytes, end_of_stream: bool) -> Reply:
        if not self.translating:
            return PASS
        if self.translator is not None:
            out = self.translator.feed(body)
            if end_of_stream:
                out += self.translator.finish()
            return Continue(body=out)
        if not end_of_stream:
            return PASS
        if self.error_status:
            if self.client_api is Api.OPENAI:
                return Continue(body=translate.error_to_openai(self.error_status, body))
            return Continue(body=translate.error_to_anthropic(self.error_status, body))
        doc = orjson.loads(body)
        model = self.binding.model
        if self.client_api is Api.OPENAI:
            doc = translate.anthropic_response_to_openai(doc, model)
        else:
            doc = translate.openai_response_to_anthropic(doc, model)
        return Continue(body=orjson.dumps(doc))
