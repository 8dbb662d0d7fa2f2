"""Usage off the request path: settle quotas and count metrics from Envoy's access-log entries.

Contract
--------
* Envoy's gRPC access-log service (``envoy.service.accesslog.v3``) streams every finished HTTP
  request's entry to extproc, batched per worker (``controller.usage_filters.usage_access_log``).
* Only entries that carry ``crdgol.settle`` metadata are acted on: extproc set it in its answer
  to the response headers of a request whose body it did not ask for
  (``extproc.model_call.ModelCall.defer``), or, on the one-message path, in its answer to the
  request body (then without the backend, which the entry's upstream cluster names). It names the
  reservation and the metric labels. An entry marked ``handled`` was accounted for by the
  response side's stream (``extproc.response_side``) and is skipped.
* The usage is what Envoy's native filters read from the response into ``crdgol.usage``; the
  charge rule (``extproc.admission``) applies unchanged: a request that ended cleanly with a usage
  block is charged exactly that; one cut short (client gone, upstream reset, a timeout: Envoy's
  response flags) or without usage is charged at least its reservation; a provider's error is
  charged the error charge; a request no provider answered (no upstream byte received) is
  charged its reservation when the client left first or Envoy's upstream timeout ended it, and
  released when Envoy answered it itself without reaching a provider (a failed connection).
* Each entry is handled once: Envoy logs each downstream request once, and the store's settle is
  idempotent by reservation id. An entry that never arrives (extproc down when Envoy flushed)
  leaves the reservation charged at its estimate; its concurrency slot frees at the store's TTL.
* The settle delay adds to the overshoot bound: a finished request's usage is counted at most
  ``usage_log_flush_ms`` (+ one gRPC hop) after its response ended (README, "Quotas").
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from typing import Any

import grpc
from envoy.data.accesslog.v3 import accesslog_pb2 as al
from envoy.service.accesslog.v3 import als_pb2, als_pb2_grpc
from google.protobuf import struct_pb2

from crdgol.usage_log import (
    CACHE_CREATION_TOKENS,
    CACHE_READ_TOKENS,
    INPUT_TOKENS,
    LAST_EVENT,
    OUTPUT_TOKENS,
    RESPONSE_MODEL,
    SETTLE_NAMESPACE,
    STREAM_COMPLETE,
    USAGE_NAMESPACE,
)
from extproc.admission import Admission, Outcome, decode_reservation
from extproc.metrics import RequestLabels
from extproc.quota import cost_micros
from extproc.readers import metric_model
from extproc.services import Services
from extproc.usage import Usage

log = logging.getLogger(__name__)

# Response flags that mean the answer did not end as the provider sent it.
_CUT = (
    "downstream_connection_termination",
    "downstream_remote_reset",
    "upstream_remote_reset",
    "upstream_connection_termination",
    "upstream_request_timeout",
    "stream_idle_timeout",
    "local_reset",
    "duration_timeout",
    "upstream_max_stream_duration_reached",
    "upstream_protocol_error",
    "downstream_protocol_error",
)


def _number(fields: Any, key: str) -> int:
    v = fields.get(key)
    return int(v.number_value) if v is not None and v.HasField("number_value") else 0


def usage_of(metadata: struct_pb2.Struct | None) -> Usage | None:
    """The usage the native filters wrote, or None when they found none."""
    if metadata is None:
        return None
    f = metadata.fields
    if INPUT_TOKENS not in f and OUTPUT_TOKENS not in f:
        return None
    prompt = _number(f, INPUT_TOKENS) + _number(f, CACHE_CREATION_TOKENS) + _number(f, CACHE_READ_TOKENS)
    return Usage(prompt, _number(f, OUTPUT_TOKENS))


_CUT_FLAGS = frozenset(_CUT)


def cut_short(entry: al.HTTPAccessLogEntry) -> bool:
    # The flags that are set (usually none), rather than eleven attribute reads per entry.
    return any(field.name in _CUT_FLAGS and on for field, on in entry.common_properties.response_flags.ListFields())


def outcome(entry: al.HTTPAccessLogEntry, complete: bool, *, answered: bool) -> Outcome:
    """The charge rule from the log entry: was a provider's answer received, and how did it end.

    ``answered``: known to be (the record was written with a provider's 200 response headers).
    """
    status = entry.response.response_code.value
    if not answered and not entry.common_properties.HasField("time_to_first_upstream_rx_byte"):
        # No byte came back from a provider. The request went on (extproc admitted it): charged
        # if the client left before any response (no status) or Envoy's upstream timeout ended it
        # (504), released if Envoy answered it itself without reaching one (a failed connection).
        return Outcome.ABANDONED if status in (0, 504) else Outcome.NOT_ANSWERED
    if not 200 <= status < 300:
        return Outcome.PROVIDER_ERROR
    return Outcome.ANSWERED if complete else Outcome.CUT_SHORT


def settle_entry(services: Services, entry: al.HTTPAccessLogEntry) -> bool:
    """Settle and count one deferred request from its log entry; False if it was not one."""
    md = entry.common_properties.metadata.filter_metadata
    if SETTLE_NAMESPACE not in md:
        return False
    # Read once into a dict: a protobuf map look-up per field read costs more than the copy.
    record: dict[str, str] = {k: v.string_value for k, v in md[SETTLE_NAMESPACE].fields.items()}

    def text(key: str) -> str:
        return record.get(key, "")

    token = text("trace")
    if text("handled"):
        # The response side's stream accounted for it (extproc.response_side); a traced call's
        # span still ends here, with what Envoy saw.
        if token and services.tracer is not None:
            served = services.current.backends.get(entry.common_properties.upstream_cluster)
            usage = usage_of(md.get(USAGE_NAMESPACE))
            services.tracer.settle(token, usage, entry.response.response_code.value, served[1].id if served is not None else "")
        return False
    found = md.get(USAGE_NAMESPACE)
    usage = usage_of(found)
    complete = not cut_short(entry) and usage is not None and usage.input_tokens > 0
    last_event = found.fields.get(LAST_EVENT) if found is not None else None
    if last_event is not None and last_event.string_value != STREAM_COMPLETE:
        complete = False  # an Anthropic stream that stopped before message_stop: usage not final
    # A record written with the response headers names the backend; one written with the body
    # reply (one-message path) does not: the cluster that answered does.
    written_late = bool(text("backend"))
    served = services.current.backends.get(text("backend") or entry.common_properties.upstream_cluster)
    backend = text("backend") or (served[1].id if served is not None else entry.common_properties.upstream_cluster)
    reservation = decode_reservation(text("reservation")) if text("reservation") else None
    if reservation is not None:
        admission = Admission(services)
        admission.reservation = reservation
        admission.finish(outcome(entry, complete, answered=written_late), usage, backend)
    names_model = text("provider_names_model") == "1" or (
        not written_late and served is not None and served[1].api.value == text("api")
    )
    reported = found.fields.get(RESPONSE_MODEL) if found is not None and names_model else None
    configured = text("response_model") or (served[1].model if served is not None and not written_late else "")
    labels = RequestLabels(
        tenant=text("tenant"),
        binding=text("binding"),
        backend=backend,
        operation=text("operation"),
        request_model=text("request_model"),
        # The model the provider said answered (the native filters read it), else the backend's.
        response_model=metric_model(reported.string_value if reported is not None else "", configured),
    )
    m = services.metrics
    if usage is not None:
        m.record_usage(labels, usage.input_tokens, usage.output_tokens)
        # Spend, priced at the backend that answered, as for an answer extproc read itself.
        found_backend = services.current.backends.get(backend)
        price = found_backend[1].price if found_backend is not None else None
        if price is not None:
            cost = cost_micros(price, usage.input_tokens, usage.output_tokens)
            if cost > 0:
                m.add_spend(labels.tenant, labels.binding, backend, cost / 1_000_000)
    status = entry.response.response_code.value
    took = entry.common_properties.time_to_last_downstream_tx_byte
    m.record_duration(labels, status, took.seconds + took.nanos / 1e9)  # and counts it
    if token and services.tracer is not None:
        services.tracer.settle(token, usage, status, backend)
    return True


class UsageLog(als_pb2_grpc.AccessLogServiceServicer):  # type: ignore[misc]
    """The access-log service on extproc's gRPC server."""

    def __init__(self, services: Services) -> None:
        self.services = services

    async def StreamAccessLogs(
        self, request_iterator: AsyncIterator[als_pb2.StreamAccessLogsMessage], context: grpc.aio.ServicerContext
    ) -> als_pb2.StreamAccessLogsResponse:
        async for msg in request_iterator:
            for entry in msg.http_logs.log_entry:
                try:
                    settle_entry(self.services, entry)
                except Exception:  # one bad entry must not lose the rest of the batch
                    self.services.metrics.handler_errors.inc()
                    log.exception("could not settle an access-log entry")
        return als_pb2.StreamAccessLogsResponse()
