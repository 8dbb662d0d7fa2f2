"""extproc's spans: one per model call, with its decisions as child spans.

Built only when tracing is on (``crdgol.tracing``): ``Services.tracer`` is None otherwise, a model
call's ``trace`` stays None, and the request path pays one ``is None`` test per hook (``step``
hands back a shared do-nothing context manager). This module imports the OpenTelemetry API at
construction of a ``CallTracer``, never at import.

The call's span continues the trace Envoy sends (the ``traceparent`` of the ext_proc gRPC stream,
whose span is the child of Envoy's request span) and follows the OpenTelemetry GenAI semantic
conventions: named ``"{gen_ai.operation.name} {gen_ai.request.model}"``, kind CLIENT, with
``gen_ai.operation.name``, ``gen_ai.system`` (and its newer name ``gen_ai.provider.name``),
``gen_ai.request.model``, ``gen_ai.response.model``, ``gen_ai.usage.input_tokens`` and
``gen_ai.usage.output_tokens``, ``error.type`` when it failed, plus the gateway's own
``crdgol.*`` (tenant, binding, backend, policy version, auth method). Decisions are children:
``crdgol.authenticate``, ``crdgol.route`` (model -> binding), ``crdgol.context`` (context
injection), ``crdgol.admission`` (quotas). No attribute holds a header, a credential, a prompt or
a completion: only the facts the access log also carries.
"""

from __future__ import annotations

import contextlib
import itertools
import time
from collections import OrderedDict
from types import TracebackType
from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit

from extproc.errors import GatewayError

if TYPE_CHECKING:
    from opentelemetry.trace import Span, Tracer

    from extproc.model_call import ModelCall
    from extproc.usage import Usage

__all__ = ["CallSpan", "CallTracer", "step"]

NO_STEP: contextlib.nullcontext[None] = contextlib.nullcontext()


class CallTracer:
    """Starts one ``CallSpan`` per model call, parented on the trace Envoy sent.

    A call whose usage Envoy's usage log settles (extproc does not read its body) is *parked*
    until its log entry arrives, and its span ends then, with the tokens; at most ``max_parked``
    wait (beyond that the oldest ends without them).
    """

    def __init__(self, tracer: Tracer, max_parked: int = 10_000) -> None:
        from opentelemetry.trace import SpanKind
        from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

        self._tracer = tracer
        self._propagator = TraceContextTextMapPropagator()
        self._client = SpanKind.CLIENT
        self._parked: OrderedDict[str, ModelCall] = OrderedDict()
        self._max_parked = max_parked
        self._tokens = itertools.count(1)

    def start(self, traceparent: str, tracestate: str, operation: str) -> CallSpan:
        carrier = {"traceparent": traceparent, "tracestate": tracestate} if traceparent else {}
        parent = self._propagator.extract(carrier) if carrier else None
        span = self._tracer.start_span(
            operation, context=parent, kind=self._client, attributes={"gen_ai.operation.name": operation}
        )
        return CallSpan(self._tracer, span)

    def park(self, call: ModelCall) -> str:
        """Keep ``call`` until its usage-log entry names the returned token (``settle``)."""
        token = f"{next(self._tokens):x}"
        self._parked[token] = call
        while len(self._parked) > self._max_parked:
            _, oldest = self._parked.popitem(last=False)
            if oldest.trace is not None:
                oldest.trace.end(oldest, None)
        return token

    def settle(self, token: str, usage: Usage | None, status: int, backend: str = "") -> None:
        """End the parked call's span; ``backend``: the one that answered, when the call did not
        learn it (a call settled from the usage log on the one-message path)."""
        call = self._parked.pop(token, None)
        if call is not None and call.trace is not None:
            call.status = status or call.status
            call.backend = call.backend or backend
            call.trace.end(call, usage)


class CallSpan:
    __slots__ = ("_context", "_tracer", "ended", "span")

    def __init__(self, tracer: Tracer, span: Span) -> None:
        from opentelemetry.trace import set_span_in_context

        self._tracer = tracer
        self.span = span
        self._context = set_span_in_context(span)
        self.ended = False

    def step(self, name: str) -> _Step:
        return _Step(self, name)

    def child(self, name: str, start_ns: int, error: str) -> None:
        child = self._tracer.start_span(name, context=self._context, start_time=start_ns)
        if error:
            _fail(child, error)
        child.end()

    def end(self, call: ModelCall, usage: Usage | None, error: str = "", status: int = 0) -> None:
        """Close the call's span with what the call learnt (once; later calls do nothing).
        ``status``: the answer's, when it is not the call's own (a refusal's)."""
        if self.ended:
            return
        self.ended = True
        span = self.span
        attrs: dict[str, Any] = {"crdgol.policy_version": call.services.current.version}
        if call.request_model:
            attrs["gen_ai.request.model"] = call.request_model
            span.update_name(f"{call.operation} {call.request_model}")
        if call.identity is not None:
            attrs["crdgol.auth.method"] = call.identity.method
            if call.identity.tenant:
                attrs["crdgol.tenant"] = call.identity.tenant
        if call.binding is not None:
            attrs["crdgol.binding"] = call.binding.key
        entry = call.services.current.backends.get(call.backend) if call.backend else None
        if entry is not None:
            backend = entry[1]
            attrs["crdgol.backend"] = backend.id
            attrs["gen_ai.system"] = attrs["gen_ai.provider.name"] = backend.api.value
            host = urlsplit(f"//{backend.host}")
            attrs["server.address"] = host.hostname or backend.host
            if host.port:
                attrs["server.port"] = host.port
            attrs["gen_ai.response.model"] = call.response_model()
        if usage is not None:
            attrs["gen_ai.usage.input_tokens"] = usage.input_tokens
            attrs["gen_ai.usage.output_tokens"] = usage.output_tokens
        status = status or call.status
        if status:
            attrs["http.response.status_code"] = status
        span.set_attributes(attrs)
        if error or status >= 400:
            _fail(span, error or str(status))
        span.end()


class _Step:
    """A decision, timed: a child span from ``__enter__`` to ``__exit__`` (failed if it raised)."""

    __slots__ = ("_call", "_name", "_start")

    def __init__(self, call: CallSpan, name: str) -> None:
        self._call, self._name, self._start = call, name, 0

    def __enter__(self) -> None:
        self._start = time.time_ns()

    def __exit__(self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None) -> None:
        error = "" if exc is None else exc.code if isinstance(exc, GatewayError) else type(exc).__name__
        self._call.child(self._name, self._start, error)


def step(trace: CallSpan | None, name: str) -> contextlib.AbstractContextManager[None]:
    """``with step(call.trace, "crdgol.admission"):`` times a decision; nothing when tracing is off."""
    return NO_STEP if trace is None else trace.step(name)


def _fail(span: Span, error: str) -> None:
    from opentelemetry.trace import Status, StatusCode

    span.set_attribute("error.type", error)
    span.set_status(Status(StatusCode.ERROR))
