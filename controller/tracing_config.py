"""Envoy's side of tracing: the gateway listener starts (or continues) each request's trace.

Rendered only when tracing is on (``crdgol.tracing.TracingSettings``). Envoy's OpenTelemetry
tracer reads a client's W3C ``traceparent`` (or starts a trace), records the request's server span
and a child span per ext_proc stream and per upstream attempt, and passes the context on: to
extproc in the ext_proc stream's gRPC metadata (``extproc.tracing`` parents its spans there) and to
the provider in ``traceparent``. Spans go to the collector over OTLP/gRPC through the cluster
``COLLECTOR_CLUSTER`` (sent over CDS with the others, so the bootstrap needs nothing).

Envoy batches its spans and sends them every 5 s (or after 5 spans), its defaults.
"""

from __future__ import annotations

import ipaddress

from envoy.config.trace.v3 import opentelemetry_pb2  # noqa: F401 (registers the Any type the xDS server packs)

from controller.envoy_json import Json, typed
from crdgol.tracing import GATEWAY_SERVICE, TracingSettings

COLLECTOR_CLUSTER = "crdgol-otel-collector"


def gateway_tracing() -> Json:
    """The listener's ``tracing``: Envoy's OpenTelemetry tracer, every request sampled (the client's
    own ``traceparent`` sampled flag is honoured; sample at the collector to keep fewer)."""
    return {
        "provider": {
            "name": "envoy.tracers.opentelemetry",
            "typed_config": typed(
                "envoy.config.trace.v3.OpenTelemetryConfig",
                grpc_service={"envoy_grpc": {"cluster_name": COLLECTOR_CLUSTER}, "timeout": "2s"},
                service_name=GATEWAY_SERVICE,
            ),
        },
        # One span per upstream attempt (a fallback shows as a second one), not only the request's.
        "spawn_upstream_span": True,
    }


def collector_cluster(tracing: TracingSettings, ca_bundle: str) -> Json:
    """An HTTP/2 cluster to the OTLP/gRPC collector (TLS with the system CAs for ``https://``)."""
    host, port = tracing.host, tracing.port
    cluster: Json = {
        "name": COLLECTOR_CLUSTER,
        "type": "STATIC" if _is_ip(host) else "STRICT_DNS",
        "dns_lookup_family": "V4_PREFERRED",
        "connect_timeout": "2s",
        "typed_extension_protocol_options": {
            "envoy.extensions.upstreams.http.v3.HttpProtocolOptions": typed(
                "envoy.extensions.upstreams.http.v3.HttpProtocolOptions", explicit_http_config={"http2_protocol_options": {}}
            )
        },
        "load_assignment": {
            "cluster_name": COLLECTOR_CLUSTER,
            "endpoints": [{"lb_endpoints": [{"endpoint": {"address": {"socket_address": {"address": host, "port_value": port}}}}]}],
        },
    }
    if tracing.tls:
        cluster["transport_socket"] = {
            "name": "envoy.transport_sockets.tls",
            "typed_config": typed(
                "envoy.extensions.transport_sockets.tls.v3.UpstreamTlsContext",
                sni=host,
                common_tls_context={
                    "alpn_protocols": ["h2"],
                    "validation_context": {
                        "trusted_ca": {"filename": ca_bundle},
                        "match_typed_subject_alt_names": [{"san_type": "DNS", "matcher": {"exact": host}}],
                    },
                },
            ),
        }
    return cluster


def _is_ip(host: str) -> bool:
    try:
        ipaddress.ip_address(host)
    except ValueError:
        return False
    return True
