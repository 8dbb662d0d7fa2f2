"""The response side of a one-message request, on the response filter's own stream.

On the one-message path (``crdgol.request_path``) extproc answers the request body and its
stream ends there. When the response needs extproc after all (the binding's response route:
translation, a stripped usage chunk, an answer to store; or any response that is not a 2xx: a provider's
error to map, Envoy's own reply for an admitted request), Envoy's response filter opens a second
stream whose first message is the response headers, with the request's state as forwarded
metadata: the settle record (``route_reply.settle_record``) and ``ModelCall.state``. ``resume``
rebuilds the model call from them, and the call's own response methods run unchanged: the
charge rule, provider-error mapping, translation, history. A stream without that state (the
refusal of a request extproc never admitted) passes through. (A call that names a session reads
its 200 on its request's own stream instead: ``extproc.session_stream``; only its errors
come here.)
"""

from __future__ import annotations

from envoy.service.ext_proc.v3 import external_processor_pb2 as ep
from google.protobuf import struct_pb2
from prometheus_client import CollectorRegistry

from crdgol.request_path import STATE_NAMESPACE
from crdgol.usage_log import SETTLE_NAMESPACE
from extproc.admission import decode_reservation
from extproc.auth import Identity
from extproc.cache import CacheCall
from extproc.cache_charge import CallerMeter
from extproc.cache_key import CacheKey, Directives
from extproc.completion import Completion
from extproc.errors import GatewayError
from extproc.model_call import Embeddings, ModelCall
from extproc.phases import Handler, Headers, Reply, Respond
from extproc.policy import Api, Binding
from extproc.services import Services


def _text(s: struct_pb2.Struct, key: str) -> str:
    v = s.fields.get(key)
    return v.string_value if v is not None else ""


def _number(s: struct_pb2.Struct, key: str) -> float:
    v = s.fields.get(key)
    return v.number_value if v is not None else 0.0


def resume(services: Services, settle: struct_pb2.Struct, state: struct_pb2.Struct) -> ModelCall | None:
    """The model call a body reply described, ready for its response; None if it cannot be
    rebuilt (its binding left the policy in force meanwhile: the access log settles it)."""
    api = Api.ANTHROPIC if _text(settle, "api") == Api.ANTHROPIC.value else Api.OPENAI
    model = _text(settle, "request_model")
    key = _text(settle, "binding")
    binding = next((b for b in services.current.models.get(model, ()) if b.key == key), None)
    if binding is None:
        return None
    call: ModelCall
    if _text(settle, "operation") == Embeddings.operation:
        call = Embeddings(services)
    else:
        completion = Completion(services, api)
        completion.stream = _text(state, "stream") == "1"
        completion.client_wants_usage = _text(state, "include_usage") == "1"
        completion.session = _text(state, "session")
        completion.user_text = _text(state, "user_text")
        completion.cache = resume_cache(
            services, binding, api, state, _text(settle, "tenant"), stream=completion.stream, include_usage=completion.client_wants_usage
        )
        call = completion
    tenant = _text(settle, "tenant")
    call.identity = Identity(tenants=(tenant,), subject="", method="", tenant=tenant, principal=_text(state, "principal"))
    call.binding = binding
    call.request_model = model
    call.usage_log = True
    call.resumed = True
    call.forwarded = True  # it was let through: the charge rule counts it as sent on
    # The request's start, on this process's clock (the body reply may have come from another).
    call.started = services.clock() - max(0.0, services.wall() - _number(state, "started"))
    raw = _text(settle, "reservation")
    call.admission.reservation = decode_reservation(raw) if raw else None
    return call


def resume_cache(
    services: Services, binding: Binding, api: Api, state: struct_pb2.Struct, tenant: str, *, stream: bool, include_usage: bool
) -> CacheCall | None:
    """The call's part in the response cache, from ``route_reply.cache_state`` (None: it had none).
    A semantic cache embeds the question again when it stores the answer (charged to ``tenant``,
    ``extproc.cache_charge``); identical requests waiting for this answer in this process get it
    (``CacheCall.adopt``)."""
    rule = binding.cache
    if rule is None or not _text(state, "cache_exact"):
        return None
    if services.cache.metrics is None:
        services.cache.attach(CollectorRegistry())
    key = CacheKey(_text(state, "cache_exact"), _text(state, "cache_partition"), _text(state, "cache_text"))
    wish = Directives(lookup=_text(state, "cache_lookup") == "1", store=_text(state, "cache_store") == "1")
    meter = CallerMeter(services, tenant)
    call = CacheCall(services.cache, services.current, binding, rule, api, key, wish, stream=stream, include_usage=include_usage, meter=meter)
    call.state = _text(state, "cache_state") or call.state
    call.adopt()
    return call


class ResponseStream(Handler):
    """A response filter stream: the resumed model call, or a pass-through."""

    def __init__(self, services: Services) -> None:
        self.services = services
        self.inner: Handler = Handler()

    def start(self, first: ep.ProcessingRequest) -> None:
        md = first.metadata_context.filter_metadata
        if STATE_NAMESPACE in md and SETTLE_NAMESPACE in md:
            call = resume(self.services, md[SETTLE_NAMESPACE], md[STATE_NAMESPACE])
            if call is not None:
                self.inner = call

    async def response_headers(self, headers: Headers, end_of_stream: bool) -> Reply:
        return await self.inner.response_headers(headers, end_of_stream)

    def resolved(self) -> Handler:
        return self.inner

    def error_reply(self, exc: GatewayError) -> Respond:
        return self.inner.error_reply(exc)

    def close(self) -> None:
        self.inner.close()
