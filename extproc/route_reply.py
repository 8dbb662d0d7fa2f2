"""What extproc hands Envoy when it lets a model call through without looking at the response.

* ``settle_record``: the access-log consumer's record of a call (``extproc.usage_log``), written
  with the response headers (a call read the old way) or with the body reply (one message).
* ``route_reply``: the one-message answer (``crdgol.request_path``): the body for the first
  backend, and as dynamic metadata the binding's route (the plain one, its response route when
  ``ModelCall.response_needs`` says the response needs extproc, or its session route for a call
  whose response comes back on the same stream), what that route turns into
  headers (the APIs a fallback attempt reads, the rate-limit headers), the settle record and the
  state the response side starts from. No header change: Envoy drops those from a body reply
  when it skipped the headers; the route and the cluster do them instead.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from crdgol.request_path import (
    BODY_API_KEY,
    CLIENT_API_KEY,
    NO_OP_HEADER,
    RESPONSE_SUFFIX,
    ROUTE_KEY,
    ROUTE_NAMESPACE,
    SESSION_SUFFIX,
    STATE_NAMESPACE,
)
from crdgol.usage_log import SETTLE_NAMESPACE
from extproc.admission import encode_reservation
from extproc.phases import Continue

if TYPE_CHECKING:
    from extproc.cache import CacheCall
    from extproc.model_call import ModelCall
    from extproc.policy import Binding


def settle_record(call: ModelCall) -> dict[str, str | float]:
    """What the access-log consumer needs to settle and count ``call`` (``extproc.usage_log``)."""
    r = call.admission.reservation
    labels = call.labels()
    return {
        "reservation": encode_reservation(r) if r is not None and not call.admission.done else "",
        "tenant": labels.tenant,
        "binding": labels.binding,
        "backend": labels.backend,
        "operation": labels.operation,
        "request_model": labels.request_model,
        "response_model": labels.response_model,
        # The model an answer names is the provider's only when no fallback attempt's filter
        # translated it (that filter writes the alias the client called).
        "provider_names_model": "1" if call.answer_in_backend_api() else "",
        # The client's API: for a record written before any backend answered (one-message path),
        # whether the answer names the provider's model is decided from the one that did.
        "api": call.api.value,
    }


def route_reply(call: ModelCall, binding: Binding, body: bytes) -> Continue:
    """The one-message answer for an admitted ``call`` to ``binding``, with its ``body``."""
    # Envoy accounts from here on (the access log, or the response side's stream): this stream
    # ends with this answer, and its close must not release the reservation.
    call.finished = True
    call.forwarded = True
    call.deferred = True  # its span too ends with its access-log entry, not with this stream
    primary = binding.primary
    if call.same_stream:
        # A session call: its response body comes on this stream (``extproc.session_stream``),
        # which reads it where the response side would. A chat call's route has the chat path (a
        # translated answer changes API); the response filter maps a provider's error on either.
        needs: tuple[str, ...] = ()
        suffix = SESSION_SUFFIX if call.operation == "chat" else ""
    else:
        needs = call.response_needs()
        suffix = RESPONSE_SUFFIX if needs else ""
        if not needs:
            # Settled from the access log: what the access log learns from extproc goes now.
            call.access.settled_elsewhere(call)
    settle = settle_record(call)
    tracer = call.services.tracer
    if tracer is not None and call.trace is not None:
        # The call's span ends when its access-log entry arrives (whichever stream accounts).
        settle["trace"] = tracer.park(call)
    route: dict[str, str | float] = {
        ROUTE_KEY: binding.route + suffix,
        CLIENT_API_KEY: call.api.value,
        BODY_API_KEY: (primary.api if primary is not None else call.api).value,
        **call.route_response_headers(),
    }
    return Continue(
        body=body,
        # Envoy honours clear_route_cache in a body reply only with a header mutation in it.
        remove_headers=[NO_OP_HEADER],
        clear_route_cache=True,
        dynamic_metadata={ROUTE_NAMESPACE: route, SETTLE_NAMESPACE: settle, STATE_NAMESPACE: call.state()},
    )


def cache_state(cache: CacheCall) -> dict[str, str | float]:
    """What the response side needs to rebuild a call's part in the response cache
    (``extproc.response_side.resume_cache``): its key, what the caller allowed, its header."""
    return {
        "cache_exact": cache.key.exact,
        "cache_partition": cache.key.partition,
        "cache_text": cache.key.text,
        "cache_lookup": "1" if cache.wish.lookup else "",
        "cache_store": "1" if cache.wish.store else "",
        "cache_state": cache.state,
    }
