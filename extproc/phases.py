"""The ext_proc phase machinery, written once.

Envoy opens one gRPC stream per HTTP request (per attempt for the upstream filter) and sends a
``ProcessingRequest`` for each phase it was configured or asked to send. ``run`` reads them, hands
each to the matching method of a ``Handler`` and turns the handler's typed ``Reply`` into the
``ProcessingResponse`` Envoy expects. Handlers are per-endpoint strategies; the base class passes
everything through, so a strategy overrides only the phases it cares about.

A ``GatewayError`` raised by a handler becomes an immediate response with the right status and
an OpenAI-shaped body (or the shape ``error_shape`` says), in this one place.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterable, AsyncIterator, Callable
from dataclasses import dataclass, field
from typing import Any

from envoy.config.core.v3 import base_pb2
from envoy.extensions.filters.http.ext_proc.v3 import processing_mode_pb2
from envoy.service.ext_proc.v3 import external_processor_pb2 as ep
from envoy.type.v3 import http_status_pb2

from crdgol.access_log import NAMESPACE as ACCESS_NAMESPACE
from crdgol.replies import EXTPROC_REPLY_DETAILS
from extproc.capacity import Capacity, Overloaded
from extproc.errors import GatewayError

log = logging.getLogger(__name__)

ProcessingMode = processing_mode_pb2.ProcessingMode
BUFFERED = ProcessingMode.BUFFERED
STREAMED = ProcessingMode.STREAMED
NONE = ProcessingMode.NONE


class Headers(dict[str, str]):
    """Request or response headers as Envoy sent them: lower-case names, pseudo-headers included."""

    @staticmethod
    def from_pb(msg: ep.HttpHeaders) -> Headers:
        # Envoy sends raw_value; value is only for older peers.
        return Headers(
            {hv.key: hv.raw_value.decode("utf-8", "replace") if hv.raw_value else hv.value for hv in msg.headers.headers}
        )


@dataclass(slots=True)
class Continue:
    """Let the message go on, possibly changed."""

    set_headers: dict[str, str] = field(default_factory=dict)
    remove_headers: list[str] = field(default_factory=list)
    body: bytes | None = None
    clear_route_cache: bool = False
    # Ask Envoy for the response body in this mode (only honoured on the response-headers reply).
    response_body_mode: int | None = None
    # Ask the downstream filter for this request's response headers (only honoured on the
    # request-headers reply; the downstream filter skips responses unless asked, see
    # ``controller.envoy_config.ext_proc_filter``).
    process_response: bool = False
    # Dynamic metadata for Envoy: namespace -> fields (strings and numbers).
    dynamic_metadata: dict[str, dict[str, str | float]] | None = None


@dataclass(slots=True)
class Respond:
    """Stop here and answer the client directly."""

    status: int
    body: bytes
    headers: dict[str, str] = field(default_factory=lambda: {"content-type": "application/json"})


Reply = Continue | Respond
PASS = Continue()


class Handler:
    """One HTTP request (or one upstream attempt) as seen by extproc. Default: pass through."""

    async def request_headers(self, headers: Headers, end_of_stream: bool) -> Reply:
        return PASS

    async def request_body(self, body: bytes, end_of_stream: bool) -> Reply:
        return PASS

    async def response_headers(self, headers: Headers, end_of_stream: bool) -> Reply:
        return PASS

    async def response_body(self, body: bytes, end_of_stream: bool) -> Reply:
        return PASS

    def start(self, first: ep.ProcessingRequest) -> None:
        """Called with the stream's first message before it is dispatched: what Envoy sends once
        per stream (request attributes, forwarded metadata) is there."""

    def response_attributes(self, values: dict[str, str | float]) -> None:
        """Called before the stream's first response message is dispatched when it carries
        response attributes (expression -> value): the response headers extproc reads when
        Envoy skips them (``crdgol.request_path.RESPONSE_ATTRIBUTES``)."""

    def resolved(self) -> Handler:
        """The handler for the rest of the stream (a dispatcher returns the strategy it chose)."""
        return self

    def error_reply(self, exc: GatewayError) -> Respond:
        """How a refusal is shaped for this endpoint's client (OpenAI shape by default)."""
        return Respond(exc.status, exc.to_body(), {"content-type": "application/json", **exc.headers()})

    def close(self) -> None:
        """The stream ended, normally or not (client gone, Envoy reset): release what is held."""

    def take_metadata(self, phase: str, reply: Reply) -> dict[str, Any] | None:
        """Dynamic metadata for Envoy (the access log) to send with this reply; None: nothing.

        Called once per message after the reply is decided; what it returns is written into
        ``crdgol.access_log.NAMESPACE`` and merged with what earlier replies sent.
        """
        return None


ATTRIBUTES_KEY = "envoy.filters.http.ext_proc"


def attribute_values(req: ep.ProcessingRequest) -> dict[str, str | float]:
    """The request or response attributes a message carries (expression -> string or number)."""
    found = req.attributes.get(ATTRIBUTES_KEY)
    if found is None:
        return {}
    return {k: v.string_value if v.HasField("string_value") else v.number_value for k, v in found.fields.items()}


def with_metadata(resp: ep.ProcessingResponse, metadata: dict[str, Any]) -> ep.ProcessingResponse:
    """``resp`` carrying ``metadata`` in the access-log namespace (a copy: answers may be shared)."""
    out = ep.ProcessingResponse()
    out.CopyFrom(resp)
    out.dynamic_metadata.update({ACCESS_NAMESPACE: metadata})
    return out


def _header_mutation(c: Continue) -> ep.HeaderMutation | None:
    if not c.set_headers and not c.remove_headers:
        return None
    return ep.HeaderMutation(
        set_headers=[
            base_pb2.HeaderValueOption(
                header=base_pb2.HeaderValue(key=k, raw_value=v.encode()),
                append_action=base_pb2.HeaderValueOption.OVERWRITE_IF_EXISTS_OR_ADD,
            )
            for k, v in c.set_headers.items()
        ],
        remove_headers=c.remove_headers,
    )


def _common(c: Continue) -> ep.CommonResponse:
    common = ep.CommonResponse(clear_route_cache=c.clear_route_cache)
    mutation = _header_mutation(c)
    if mutation is not None:
        common.header_mutation.CopyFrom(mutation)
    if c.body is not None:
        common.body_mutation.body = c.body
    return common


def _immediate(r: Respond) -> ep.ProcessingResponse:
    return ep.ProcessingResponse(
        immediate_response=ep.ImmediateResponse(
            status=http_status_pb2.HttpStatus(code=r.status),
            headers=_header_mutation(Continue(set_headers=r.headers)),
            body=r.body,
            # Envoy's local-reply mappers pass answers with these details through unchanged.
            details=EXTPROC_REPLY_DETAILS,
        )
    )


# The whole processing mode for a request extproc lets through (an override replaces every field):
# the request body buffered as configured, then the response headers, and bodies only on request.
_PROCESS_RESPONSE = ProcessingMode(
    request_header_mode=ProcessingMode.SEND,
    request_body_mode=BUFFERED,
    request_trailer_mode=ProcessingMode.SKIP,
    response_header_mode=ProcessingMode.SEND,
    response_body_mode=NONE,
    response_trailer_mode=ProcessingMode.SKIP,
)


# Unchanged pass-through answers are the same every time: built once, sent many times.
_PASS_PB = {
    "request_headers": ep.ProcessingResponse(request_headers=ep.HeadersResponse()),
    "request_body": ep.ProcessingResponse(request_body=ep.BodyResponse()),
    "response_headers": ep.ProcessingResponse(response_headers=ep.HeadersResponse()),
    "response_body": ep.ProcessingResponse(response_body=ep.BodyResponse()),
    "request_trailers": ep.ProcessingResponse(request_trailers=ep.TrailersResponse()),
    "response_trailers": ep.ProcessingResponse(response_trailers=ep.TrailersResponse()),
}


def to_pb(phase: str, reply: Reply) -> ep.ProcessingResponse:
    if reply is PASS:
        return _PASS_PB[phase]
    if isinstance(reply, Respond):
        return _immediate(reply)
    resp = _to_pb(phase, reply)
    if reply.dynamic_metadata:
        _set_metadata(resp, reply.dynamic_metadata)
    return resp


def _set_metadata(resp: ep.ProcessingResponse, metadata: dict[str, dict[str, str | float]]) -> None:
    # Field by field: Struct.update's generic conversion cost ~10 µs more per request (measured).
    outer = resp.dynamic_metadata.fields
    for namespace, fields in metadata.items():
        inner = outer[namespace].struct_value.fields
        for key, value in fields.items():
            if isinstance(value, str):
                inner[key].string_value = value
            else:
                inner[key].number_value = value


def _to_pb(phase: str, reply: Continue) -> ep.ProcessingResponse:
    common = _common(reply)
    match phase:
        case "request_headers":
            resp = ep.ProcessingResponse(request_headers=ep.HeadersResponse(response=common))
            if reply.process_response:
                resp.mode_override.CopyFrom(_PROCESS_RESPONSE)
            return resp
        case "request_body":
            return ep.ProcessingResponse(request_body=ep.BodyResponse(response=common))
        case "response_headers":
            resp = ep.ProcessingResponse(response_headers=ep.HeadersResponse(response=common))
            if reply.response_body_mode is not None:
                resp.mode_override.response_body_mode = reply.response_body_mode
            return resp
        case "response_body":
            return ep.ProcessingResponse(response_body=ep.BodyResponse(response=common))
        case "request_trailers":
            return ep.ProcessingResponse(request_trailers=ep.TrailersResponse())
        case _:
            return ep.ProcessingResponse(response_trailers=ep.TrailersResponse())


async def _dispatch(handler: Handler, phase: str, req: ep.ProcessingRequest) -> Reply:
    match phase:
        case "request_headers":
            return await handler.request_headers(Headers.from_pb(req.request_headers), req.request_headers.end_of_stream)
        case "request_body":
            return await handler.request_body(req.request_body.body, req.request_body.end_of_stream)
        case "response_headers":
            return await handler.response_headers(Headers.from_pb(req.response_headers), req.response_headers.end_of_stream)
        case "response_body":
            return await handler.response_body(req.response_body.body, req.response_body.end_of_stream)
        case _:
            return PASS


def _body_size(phase: str, req: ep.ProcessingRequest) -> int:
    if phase == "request_body":
        return len(req.request_body.body)
    if phase == "response_body":
        return len(req.response_body.body)
    return 0


def _hold(capacity: Capacity, phase: str, req: ep.ProcessingRequest, count: int) -> int:
    """Count this message against the caps; returns the body bytes now held (raises Overloaded)."""
    if count > capacity.settings.max_messages:
        raise Overloaded(f"this request exceeded {capacity.settings.max_messages} messages; it was cut")
    size = _body_size(phase, req)
    if phase == "request_body":
        capacity.take_request_body(size)
    elif size:
        capacity.take_response_body(size)
    return size


async def run(
    requests: AsyncIterable[ep.ProcessingRequest],
    handler: Handler,
    on_error: Callable[[BaseException], None] | None = None,
    capacity: Capacity | None = None,
    *,
    count_stream: bool = False,
) -> AsyncIterator[ep.ProcessingResponse]:
    """Drive one ext_proc stream through ``handler``; always calls ``handler.close()``.

    With ``capacity``, every message is held against its caps while it is processed (body bytes,
    messages per stream) and, with ``count_stream``, the stream itself is counted from its first
    message; a request over a cap is refused with 503 ``gateway_overloaded``.
    """
    count = 0
    opened = False
    try:
        async for req in requests:
            phase = req.WhichOneof("request")
            if phase is None:
                continue
            count += 1
            if count == 1:
                handler.start(req)
            elif req.attributes and phase in ("response_headers", "response_body"):
                handler.response_attributes(attribute_values(req))
            held = 0
            try:
                try:
                    if capacity is not None:
                        if count_stream and not opened:
                            capacity.open_stream()
                            opened = True
                        held = _hold(capacity, phase, req, count)
                    reply = await _dispatch(handler, phase, req)
                except GatewayError as exc:
                    reply = handler.error_reply(exc)
                except Exception as exc:  # a bug must not hang the request: answer 500 and log it
                    log.exception("extproc handler failed in %s", phase)
                    if on_error is not None:
                        on_error(exc)
                    reply = handler.error_reply(GatewayError("the gateway failed to process this request"))
                out = to_pb(phase, reply)
                metadata = handler.resolved().take_metadata(phase, reply)
                if metadata:
                    out = with_metadata(out, metadata)
                del req, reply  # the body is not kept past the answer (to_pb copied what it needs)
                yield out  # held until gRPC has taken the answer
            finally:
                if held and capacity is not None:
                    capacity.give(held)
            if out.HasField("immediate_response"):
                return
            handler = handler.resolved()
    finally:
        if opened and capacity is not None:
            capacity.close_stream()
        handler.close()
