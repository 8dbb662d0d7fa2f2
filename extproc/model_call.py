"""What every model-calling endpoint shares (``ModelCall``: auth, binding selection, admission,
the one-message route reply, usage accounting from the response or the access log), and
``POST /v1/embeddings`` (``Embeddings``). Chat calls add their own in ``extproc.completion``.
"""

from __future__ import annotations

import logging
from typing import Any

import orjson

from crdgol import tenancy
from crdgol.replies import INTERNAL_HEADER_PREFIX
from crdgol.request_path import (
    CLUSTER_ATTRIBUTE,
    ROUTE_HEADER,
    response_status,
)
from crdgol.usage_log import SETTLE_NAMESPACE
from extproc import session_stream, translate_errors
from extproc.access_metadata import AccessRecord
from extproc.admission import Admission, Outcome
from extproc.attempt import rewrite_body, target_headers
from extproc.auth import Identity, credential_from_headers
from extproc.errors import (
    BadRequest,
    Forbidden,
    GatewayError,
    NotFound,
    UnsupportedMediaType,
)
from extproc.metrics import RequestLabels
from extproc.phases import (
    BUFFERED,
    PASS,
    Continue,
    Handler,
    Headers,
    Reply,
    Respond,
)
from extproc.policy import Api, Binding
from extproc.readers import ResponseReader, metric_model
from extproc.route_reply import route_reply, settle_record
from extproc.services import (
    BACKEND_HEADER,
    BODY_API_HEADER,
    CLIENT_API_HEADER,
    INTERNAL_HEADERS,
    Services,
)
from extproc.tracing import CallSpan, step
from extproc.usage import Usage

log = logging.getLogger(__name__)

UPSTREAM_TIMING = "x-envoy-upstream-service-time"



async def authenticate(services: Services, headers: Headers) -> Identity:
    credential = credential_from_headers(headers.get("authorization"), headers.get("x-api-key"))
    return await services.authenticate(credential)


class ModelCall(Handler):
    """What every model-calling endpoint shares: auth, binding selection, usage accounting."""

    operation = "chat"

    def __init__(self, services: Services, api: Api) -> None:
        self.services = services
        self.api = api
        self.started = services.clock()
        self.identity: Identity | None = None
        self.headers = Headers()
        self.binding: Binding | None = None
        self.request_model = ""
        self.backend = ""
        self.status = 0
        self.finished = False
        self.admission = Admission(services)
        # Reads the response (and translates it when it comes from the first backend, which this
        # filter rewrote the request for; a fallback's arrives already translated): the client's
        # bytes, usage, the provider's model and the reply text, in one parse.
        self.reader: ResponseReader | None = None
        self.client_wants_usage = True  # an OpenAI stream's usage chunk (chat completions only)
        self.answered = False
        # extproc let the request go on to a provider (admitted, body sent back to Envoy): from
        # here the provider may be doing the work, answered or not (``Outcome.ABANDONED``).
        self.forwarded = False
        # Usage can come over Envoy's access log (``extproc.usage_log``): a response whose body
        # nothing else needs is then not sent to extproc at all, and settled from the log entry.
        self.usage_log = False
        self.deferred = False
        # A provider's error status: its body is rebuilt, mapped and sanitized (translate_errors).
        self.upstream_error = 0
        self.access = AccessRecord()  # what the access log learns from extproc
        # One message per request (``crdgol.request_path``): the body reply names the route in
        # dynamic metadata, and the response, if it needs extproc, comes on the response filter's
        # stream (``extproc.response_side``), where ``resumed`` is set.
        self.one_message = False
        self.resumed = False
        # A one-message call that names a session: its response body comes on this same stream
        # (its headers skipped, what extproc reads of them as response attributes).
        self.same_stream = False
        self.answer: session_stream.SessionAnswer | None = None  # its 200, read here (extproc.session_stream)
        self.trace: CallSpan | None = None  # this call's span, when tracing is on (extproc.tracing)

    def error_reply(self, exc: GatewayError) -> Respond:
        self.services.metrics.rejections.labels(exc.code).inc()
        self.access.error = exc.code
        if self.trace is not None:
            self.trace.end(self, None, exc.code, exc.status)
        body = exc.to_body(anthropic=self.api is Api.ANTHROPIC)
        return Respond(exc.status, body, {"content-type": "application/json", **exc.headers()})

    async def request_headers(self, headers: Headers, end_of_stream: bool) -> Reply:
        ctype = headers.get("content-type", "")
        if not ctype.lower().startswith("application/json"):
            raise UnsupportedMediaType(f"send the request body as application/json, not {ctype or 'no content type'!r}")
        with step(self.trace, "crdgol.authenticate"):
            self.identity = await authenticate(self.services, headers)
        if end_of_stream:
            raise BadRequest("the request body is empty: send a JSON object")
        self.headers = headers
        return Continue(remove_headers=[h for h in INTERNAL_HEADERS if h in headers], process_response=True)

    def parse(self, body: bytes) -> dict[str, Any]:
        try:
            doc = orjson.loads(body)
        except orjson.JSONDecodeError as exc:
            raise BadRequest(f"the request body is not valid JSON: {exc}", code="invalid_json") from None
        if not isinstance(doc, dict):
            raise BadRequest("the request body must be a JSON object", code="invalid_json")
        # An upstream that matches JSON keys in any case (Go's encoding/json) would read a "Model"
        # beside the "model" the gateway decided on, and serve a model the caller was not routed to.
        if (other := next((k for k in doc if len(k) == 5 and k != "model" and k.lower() == "model"), None)) is not None:
            raise BadRequest(f"the request body names its model as {other!r}: send it as 'model' only")
        return doc

    def select(self, doc: dict[str, Any]) -> Binding:
        model = doc.get("model")
        if not isinstance(model, str) or not model:
            raise BadRequest("'model' is required: name one of the models GET /v1/models lists", code="missing_model")
        self.request_model = model
        assert self.identity is not None
        # Which binding, and which of the caller's tenants it acts as, is decided here: quotas,
        # history and metrics below all key on that one qualified tenant (crdgol.tenancy).
        found = self.services.current.resolution(model, self.identity.tenants)
        binding, tenant = found.binding, found.tenant
        if binding is None:
            raise NotFound(f"the model {model!r} does not exist or you do not have access to it", code="model_not_found")
        if found.ambiguous:
            # Say what happened, but name no namespace: the others are not the caller's to learn
            # (one may be an attacker's copy of the caller's issuer, or the caller an attacker).
            raise Forbidden(
                f"your credential is accepted in more than one namespace, and they serve the model {model!r} "
                "from different bindings: the gateway does not choose between them; ask your administrator for "
                "a credential of one namespace (its issuer is declared with the same keys in several)",
                code="ambiguous_credential",
            )
        if not tenant:
            # Only the caller's tenant in the binding's own namespace (the one that refused it).
            mine = [t for t in self.identity.tenants if tenancy.namespace_of(t) == binding.namespace]
            raise Forbidden(f"tenant {' or '.join(mine)} may not call the model {model!r}: ask its owner to list your tenant")
        self.identity = self.identity.acting_as(tenant)
        self.binding = binding
        return binding

    async def forward(self, doc: dict[str, Any], binding: Binding) -> Continue:
        """Admit the request, then send it on: to its first backend directly when that is known."""
        assert self.identity is not None
        primary = binding.primary
        set_headers = {ROUTE_HEADER: binding.route, CLIENT_API_HEADER: self.api.value}
        remove: list[str] = []
        try:
            body = orjson.dumps(doc) if primary is None else rewrite_body(primary, doc, self.api)
        except orjson.JSONEncodeError:
            # orjson reads 1024 levels of nesting but writes only 254: a legal but absurd body.
            raise BadRequest("the request body is nested too deeply", code="invalid_json") from None
        if primary is not None:
            # The first attempt's backend is fixed: do its rewrite here, so its cluster needs no
            # upstream ext_proc. A fallback attempt's filter starts from this body (x-crdgol-body-api).
            targets = target_headers(primary, self.operation == "embeddings", "anthropic-version" in self.headers)
            set_headers.update(targets)
            set_headers[BODY_API_HEADER] = primary.api.value
            remove = [h for h in ("authorization", "x-api-key") if h in self.headers and h not in targets]
        with step(self.trace, "crdgol.admission"):
            await self.admission.admit(self.identity.tenant, binding, doc, len(body))
        if self.one_message:
            return self.route_reply(binding, body)
        set_headers["content-length"] = str(len(body))
        self.forwarded = True
        # The route by header (the Istio config, or the gateway's with the one-message path off).
        return Continue(set_headers=set_headers, remove_headers=remove, body=body, clear_route_cache=True)

    def response_needs(self) -> tuple[str, ...]:
        """Why this request's response must pass through extproc (empty: it need not).

        Decided once the body is read; the binding's response route is taken when this is not
        empty. A new need (a response to store, say) is one more entry here.
        """
        return ()

    def route_reply(self, binding: Binding, body: bytes) -> Continue:
        """The one-message answer (``extproc.route_reply``)."""
        return route_reply(self, binding, body)

    def route_response_headers(self) -> dict[str, str]:
        """Response headers Envoy sets from the route metadata on the one-message path
        (``request_path.ROUTE_RESPONSE_HEADERS``): no response side needed for them."""
        return self.admission.headers()

    def state(self) -> dict[str, str | float]:
        """What the response side needs that the settle record does not carry."""
        return {"started": self.services.wall() - (self.services.clock() - self.started)}

    def labels(self) -> RequestLabels:
        return RequestLabels(
            tenant=self.services.current.metric_tenant(self.identity.tenant) if self.identity else "",
            binding=self.binding.key if self.binding else "",
            backend=self.backend,
            operation=self.operation,
            request_model=self.request_model,
            response_model=self.response_model(),
        )

    def response_model(self) -> str:
        """``gen_ai_response_model``: the model the provider said answered, else the backend's
        ("" when no backend answered: a refusal or a local reply)."""
        entry = self.services.current.backends.get(self.backend)
        if entry is None:
            return ""
        configured = entry[1].model
        reported = self.reader.model if self.reader is not None else ""
        if self.reader is not None and not self.reader.needed and entry[1].api is not self.api:
            reported = ""  # a fallback attempt's filter translated it, writing the client's name
        return metric_model(reported, configured)

    def account(self, usage: Usage | None, *, complete: bool, abandoned: bool = False) -> None:
        """Record what the request cost, once, by the charge rule (``extproc.admission``).

        ``complete``: the response ended normally and ``usage`` is the provider's usage block (or
        None when it had none); otherwise ``usage`` is whatever partial usage was seen.
        ``abandoned``: the request went on to a provider and its stream ended before any response.
        """
        if self.finished:
            return
        self.finished = True
        m = self.services.metrics
        labels = self.labels()
        if not self.answered:
            # Envoy's own 504 is its upstream timeout: the provider had the request and may
            # still be generating it (a long non-streamed answer must not time out for free).
            upstream_timeout = self.forwarded and self.status == 504
            outcome = Outcome.ABANDONED if abandoned or upstream_timeout else Outcome.NOT_ANSWERED
        elif not 200 <= self.status < 300:
            outcome = Outcome.PROVIDER_ERROR
        elif complete and usage is not None and usage.input_tokens > 0:
            # Every real request has a prompt: a usage block that counts no prompt token was
            # made up (a translator closing a stream or body that carried no usage), not reported.
            outcome = Outcome.ANSWERED
        else:
            outcome = Outcome.CUT_SHORT
        self.admission.finish(outcome, usage, self.backend)
        self.access.finish(self, usage)
        if self.trace is not None:
            self.trace.end(self, usage)
        if usage is not None:
            m.record_usage(labels, usage.input_tokens, usage.output_tokens)
        m.record_duration(labels, self.status, self.services.clock() - self.started)  # and counts it

    def take_metadata(self, phase: str, reply: Reply) -> dict[str, Any] | None:
        return self.access.take(self, phase, reply)

    def seen_usage(self) -> Usage | None:
        """Usage seen so far in a response that has not ended (a stream's partial usage)."""
        return self.reader.usage if self.reader is not None else None

    async def response_headers(self, headers: Headers, end_of_stream: bool) -> Reply:
        self.status = int(headers.get(":status", "0") or 0)
        tagged = self.answering_backend(headers)
        # A provider answered (its response came through the router, or a fallback attempt's
        # filter tagged it); Envoy's own local replies carry neither mark. From here on the
        # request is charged, whatever happens to the rest of the response.
        self.answered = tagged is not None or UPSTREAM_TIMING in headers
        # crdgol's own headers never reach the client (Envoy already strips what a provider sent).
        strip = [h for h in headers if h.startswith(INTERNAL_HEADER_PREFIX)]
        reply = Continue(set_headers=self.admission.headers(), remove_headers=strip)
        # A provider's error never reaches the client as it was sent (see translate_errors).
        provider_error = self.status >= 400 and self.answered
        if provider_error:
            self.upstream_error = self.status
            reply.set_headers[":status"] = str(translate_errors.client_status(self.status))
            if not end_of_stream:
                reply.response_body_mode = BUFFERED
                reply.remove_headers.append("content-length")
        backend_api = self.api  # a fallback attempt's answer arrives in the client's API
        if tagged is not None:
            self.backend = tagged
        elif self.binding is not None and self.binding.primary is not None and UPSTREAM_TIMING in headers:
            # An untagged answer from upstream came from the first backend, whose cluster has no
            # upstream filter. (Envoy's own local replies carry no upstream timing header.)
            self.backend = self.binding.primary.id
            backend_api = self.binding.primary.api
        if self.binding is not None and not end_of_stream and not provider_error:
            # Read for usage only when it cannot come from the access log, or something else
            # (history, usage stripping) needs the body; translation reads it regardless.
            observe = not self.usage_log or self.needs_body(headers)
            self.reader = ResponseReader(
                backend_api, self.api, self.binding.model, include_usage=self.client_wants_usage, observe=observe
            )
            mode = self.reader.start(self.status, headers.get("content-type", ""))
            if mode is not None:
                reply.response_body_mode = mode
                if self.reader.rewrites:
                    reply.remove_headers.append("content-length")
        if end_of_stream or self.status != 200 or self.binding is None:
            self.account(None, complete=True)
        elif reply.response_body_mode is None and self.usage_log:
            return self.defer(reply)
        if self.resumed:
            # This stream accounts for the request: the access-log entry must not settle it again.
            reply.dynamic_metadata = {SETTLE_NAMESPACE: {"handled": "1"}}
        return reply

    def response_attributes(self, values: dict[str, str | float]) -> None:
        if self.same_stream:
            self.answer = session_stream.start(self, response_status(values), str(values.get(CLUSTER_ATTRIBUTE, "")))

    def streamed(self) -> bool:
        """Whether the client asked for a streamed answer."""
        return False

    def answering_backend(self, headers: Headers) -> str | None:
        """The backend a fallback attempt's filter tagged this answer with, if it is one of this
        binding's: the tag is set inside Envoy for the cluster Envoy chose (a provider's own
        ``x-crdgol-*`` headers are stripped as its answer enters Envoy), and anything else is
        ignored rather than billed. None: untagged (the first backend's answer, or Envoy's own)."""
        tagged = headers.get(BACKEND_HEADER)
        if tagged is None or self.binding is None:
            return None
        if any(be.id == tagged for be in self.binding.backends):
            return tagged
        log.warning("ignoring a backend tag that is not one of %s's backends", self.binding.key)
        return None

    def needs_body(self, headers: Headers) -> bool:
        """Whether anything but usage needs this (200) response's body."""
        return False

    def answer_in_backend_api(self) -> bool:
        """Whether the answer passing by is in the answering backend's own API (not translated)."""
        entry = self.services.current.backends.get(self.backend)
        return entry is not None and entry[1].api is self.api

    def defer(self, reply: Continue) -> Continue:
        """Settle from the access-log entry instead of the body: mark the request for it."""
        self.deferred = True
        self.finished = True  # this stream accounts nothing more; the log entry does
        self.access.settled_elsewhere(self)
        if not self.resumed:  # (a resumed request's record is already there, from its body reply)
            record = settle_record(self)
            tracer = self.services.tracer
            if tracer is not None and self.trace is not None:  # its span ends when the entry arrives
                record["trace"] = tracer.park(self)
            reply.dynamic_metadata = {SETTLE_NAMESPACE: record}
        return reply

    def client_bytes(self, body: bytes, end_of_stream: bool) -> bytes:
        """The response body in the client's API (translated here for a direct first backend)."""
        if self.upstream_error and self.binding is not None:
            secrets = [c for be in self.binding.backends for c in translate_errors.credentials(be.auth_headers)]
            _, out = translate_errors.provider_error(
                self.upstream_error, body, anthropic=self.api is Api.ANTHROPIC, secrets=secrets
            )
            return out
        if self.answer is not None:
            return self.answer.body(self.reader, body, end_of_stream)
        return self.reader.body(body, end_of_stream) if self.reader is not None else body

    async def response_body(self, body: bytes, end_of_stream: bool) -> Reply:
        reply = await self.read_body(body, end_of_stream)
        return self.answer.mark(reply) if self.answer is not None else reply

    async def read_body(self, body: bytes, end_of_stream: bool) -> Reply:
        out = self.client_bytes(body, end_of_stream)
        if end_of_stream and not self.finished:
            self.account(self.reader.usage if self.reader is not None else None, complete=True)
        return PASS if out is body else Continue(body=out)

    def close(self) -> None:
        if not self.finished and self.binding is not None:
            # The client went away, the upstream reset, or a timeout cut the stream before the
            # response ended: charged if the request had gone on to a provider (answering or
            # still working on it), released only if it never left the gateway or Envoy answered
            # it itself (a local reply: no provider reached).
            abandoned = self.forwarded and not self.status
            self.status = self.status or 499
            self.account(self.seen_usage(), complete=False, abandoned=abandoned)
        if self.trace is not None and not self.deferred:  # a deferred one ends with its log entry
            self.trace.end(self, None, "stream_closed")  # ended by now, unless closed before a decision


class Embeddings(ModelCall):
    operation = "embeddings"

    def __init__(self, services: Services) -> None:
        super().__init__(services, Api.OPENAI)

    async def request_body(self, body: bytes, end_of_stream: bool) -> Reply:
        doc = self.parse(body)
        with step(self.trace, "crdgol.route"):
            binding = self.select(doc)
        if any(b.api is Api.ANTHROPIC for b in binding.backends):
            raise BadRequest(f"the model {self.request_model!r} does not support embeddings", code="unsupported_operation")
        if "input" not in doc:
            raise BadRequest("'input' is required: a string or a list of strings", code="missing_input")
        return await self.forward(doc, binding)
