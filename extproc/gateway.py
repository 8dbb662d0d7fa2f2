"""Downstream strategies: what extproc does for each client-facing endpoint.

One handler per HTTP request, chosen from the method and path of its first message:

* ``POST /v1/chat/completions`` and ``POST /v1/messages`` -> ``Completion``: auth, model ->
  binding, tenant check, context policy (including context read from MCP servers), route selection; then usage and history from the
  response (streamed or not).
* ``POST /v1/embeddings`` -> ``Embeddings``: auth, binding, route; usage from the response.
* ``GET /v1/models`` -> ``Models``: answered by extproc from the policy.
* anything else -> 404 (405 for a known path with the wrong method).

Per-attempt work (model rewrite, credentials, API translation) is in ``extproc.upstream``.
"""

from __future__ import annotations

import orjson
from envoy.service.ext_proc.v3 import external_processor_pb2 as ep

from crdgol import logs
from crdgol.replies import ANTHROPIC_PATH
from crdgol.request_path import (
    SESSION_HEADER,
    attribute_headers,
)
from extproc import mcp_gateway, workflows
from extproc.completion import Completion
from extproc.errors import (
    GatewayError,
    MethodNotAllowed,
    NotFound,
)
from extproc.header_limits import check_request_headers
from extproc.model_call import Embeddings, ModelCall, authenticate
from extproc.phases import (
    Handler,
    Headers,
    Reply,
    Respond,
    attribute_values,
)
from extproc.policy import Api
from extproc.services import (
    Services,
)


class Downstream(Handler):
    """Picks the endpoint strategy from the first message, then delegates to it."""

    def __init__(self, services: Services, *, usage_log: bool = False, traceparent: str = "", tracestate: str = "") -> None:
        self.services = services
        self.usage_log = usage_log
        self.inner: Handler = Handler()
        self.traceparent, self.tracestate = traceparent, tracestate
        # The request headers extproc reads, when they came as attributes with the body (the
        # one-message path, ``crdgol.request_path``) instead of in a message of their own.
        self.attributes: Headers | None = None

    def start(self, first: ep.ProcessingRequest) -> None:
        if first.WhichOneof("request") == "request_body" and first.attributes:
            self.attributes = Headers(attribute_headers(attribute_values(first)))

    async def request_headers(self, headers: Headers, end_of_stream: bool) -> Reply:
        logs.request_id.set(headers.get("x-request-id", ""))  # joins log lines to the access log
        self.inner = choose(self.services, headers.get(":method", ""), headers.get(":path", ""))
        if isinstance(self.inner, ModelCall):
            self.inner.usage_log = self.usage_log
            if self.services.tracer is not None:
                self.inner.trace = self.services.tracer.start(self.traceparent, self.tracestate, self.inner.operation)
        check_request_headers(headers)  # refused in the chosen endpoint's error shape
        return await self.inner.request_headers(headers, end_of_stream)

    async def request_body(self, body: bytes, end_of_stream: bool) -> Reply:
        if self.attributes is not None:
            # The body is the stream's first message: decide on its headers first, as if they had
            # come on their own (a refusal ends the request here).
            headers, self.attributes = self.attributes, None
            early = await self.request_headers(headers, False)
            if isinstance(early, Respond):
                return early
            if isinstance(self.inner, ModelCall | mcp_gateway.ToolGateway):
                self.inner.one_message = True
            if isinstance(self.inner, ModelCall) and SESSION_HEADER in headers:
                # Its path route (``model-call-session``) sends the response body on this stream.
                self.inner.same_stream = True
        return await self.inner.request_body(body, end_of_stream)

    async def response_headers(self, headers: Headers, end_of_stream: bool) -> Reply:
        return await self.inner.response_headers(headers, end_of_stream)

    async def response_body(self, body: bytes, end_of_stream: bool) -> Reply:
        return await self.inner.response_body(body, end_of_stream)

    def resolved(self) -> Handler:
        # After the first message the chosen strategy takes the stream over: no delegation hop.
        return self.inner

    def error_reply(self, exc: GatewayError) -> Respond:
        return self.inner.error_reply(exc)

    def close(self) -> None:
        self.inner.close()


_ENDPOINTS = {
    "/v1/chat/completions": "POST",
    "/v1/messages": "POST",
    "/v1/embeddings": "POST",
    "/v1/models": "GET",
}


def choose(services: Services, method: str, raw_path: str) -> Handler:
    path = raw_path.split("?", 1)[0].rstrip("/") or "/"
    if workflows.handles(path):
        return workflows.choose(services, method, path)
    if mcp_gateway.handles(path):
        return mcp_gateway.choose(services, method)
    allowed = _ENDPOINTS.get(path)
    if allowed is None:
        return Refuse(NotFound(f"unknown path {path}: the gateway serves {', '.join(sorted(_ENDPOINTS))}", code="unknown_url"))
    if method != allowed:
        return Refuse(MethodNotAllowed(f"{path} accepts {allowed}, not {method}"), allow=allowed, anthropic=path == ANTHROPIC_PATH)
    match path:
        case "/v1/chat/completions":
            return Completion(services, Api.OPENAI)
        case "/v1/messages":
            return Completion(services, Api.ANTHROPIC)
        case "/v1/embeddings":
            return Embeddings(services)
        case _:
            return Models(services)


class Refuse(Handler):
    def __init__(self, exc: GatewayError, *, allow: str = "", anthropic: bool = False) -> None:
        self.exc, self.allow, self.anthropic = exc, allow, anthropic

    def error_reply(self, exc: GatewayError) -> Respond:
        return Respond(exc.status, exc.to_body(anthropic=self.anthropic), {"content-type": "application/json", **exc.headers()})

    async def request_headers(self, headers: Headers, end_of_stream: bool) -> Reply:
        r = self.error_reply(self.exc)
        if self.allow:
            r.headers["allow"] = self.allow
        return r


class Models(Handler):
    """``GET /v1/models``: the models this caller may use, from the policy."""

    def __init__(self, services: Services) -> None:
        self.services = services

    async def request_headers(self, headers: Headers, end_of_stream: bool) -> Reply:
        ident = await authenticate(self.services, headers)
        policy = self.services.current
        data = [
            {"id": b.model, "object": "model", "created": int(policy.generated_at), "owned_by": b.namespace}
            for b in policy.visible(ident.tenants)
        ]
        return Respond(200, orjson.dumps({"object": "list", "data": data}))
