"""Envoy's resources as Python data: listener, routes, clusters, filters, bootstraps.

Pure functions of typed specs and ``RenderSettings``; ``controller.render`` assembles them (with
the policy snapshot) into a whole configuration, and ``controller.mesh`` reuses them for Istio.
Nothing here holds a secret: credentials travel only in the policy snapshot.
"""

from __future__ import annotations

import functools
import hashlib
import ipaddress
from dataclasses import dataclass, field

from controller.access_logs import access_logs
from controller.envoy_json import (
    Json as Json,  # re-exported: the other builders import them from here
)
from controller.envoy_json import duration as duration
from controller.envoy_json import typed as typed
from controller.health import cluster_health
from controller.local_replies import local_replies
from controller.models import BackendSpec, BindingSpec
from controller.native_path import enabled as native_enabled
from controller.native_path import native_filter
from controller.one_message import (
    NO_RESPONSE_SIDE,
    buffer_filter,
    credential_injector,
    model_path_routes,
    one_message,
    response_filter,
)
from controller.tracing_config import gateway_tracing
from controller.usage_filters import usage_access_log, usage_filters
from crdgol.access_log import CLUSTER_NAMESPACE
from crdgol.access_log import NAMESPACE as ACCESS_NAMESPACE
from crdgol.replies import (
    CODEC_HEADER_HEADROOM,
    INTERNAL_HEADER_PREFIX,
    MAX_REQUEST_HEADER_BYTES,
    MAX_REQUEST_HEADERS,
)
from crdgol.request_path import (
    BACKEND_METADATA,
    RESPONSE_ATTRIBUTES,
    ROUTE_HEADER,
    ROUTE_NAMESPACE,
    STATE_NAMESPACE,
    attributes,
    credential_secret,
)
from crdgol.tracing import TracingSettings
from crdgol.usage_log import (
    SETTLE_NAMESPACE,
    USAGE_LOG_METADATA,
)

EXTPROC_CLUSTER = "crdgol-extproc"
# The per-attempt ext_proc filter on a cluster a fallback can reach (``upstream_filters``).
ATTEMPT_FILTER = "crdgol.attempt"


CA_BUNDLE = "/etc/ssl/certs/ca-certificates.crt"


_RETRY_ON = {
    "connect-failure": "connect-failure",
    "5xx": "5xx",
    "reset": "reset",
    "timeout": "gateway-error",
    "429": "retriable-status-codes",
}



@dataclass(frozen=True, slots=True)
class RenderSettings:
    listen_host: str = "127.0.0.1"
    listen_port: int = 8080
    admin_port: int = 9901
    # Envoy's admin API on this Unix socket (mode 0600) instead of the TCP port: the admin API has
    # no authentication, and a local user could stop Envoy or raise its log level until it logs
    # request headers (credentials included).
    admin_socket: str = ""
    extproc_host: str = "127.0.0.1"
    extproc_port: int = 9002
    # Several extproc replicas (Envoy spreads streams across them); overrides extproc_port.
    extproc_ports: tuple[int, ...] = ()
    # Unix domain sockets of the extproc replicas, when they share a host with Envoy; overrides
    # the TCP address (no TCP stack on the hottest path).
    extproc_sockets: tuple[str, ...] = ()
    # Largest request body accepted (Envoy answers 413 above it) and buffered for retries.
    max_request_bytes: int = 4 * 1024 * 1024
    # How long Envoy waits for one extproc answer before failing the request closed.
    extproc_timeout_ms: int = 2000
    # Downstream connections Envoy accepts at once.
    max_connections: int = 50_000
    # Envoy's codec limits on request headers: a multiple of the gateway's own limits, which
    # extproc enforces with a JSON 431 (over the codec limit an HTTP/2 stream is only reset).
    max_request_headers_kb: int = MAX_REQUEST_HEADER_BYTES // 1024 * CODEC_HEADER_HEADROOM
    max_request_headers: int = MAX_REQUEST_HEADERS * CODEC_HEADER_HEADROOM
    # Slow clients (slowloris): the headers must arrive within this many seconds of their first
    # byte, and the whole request within the second figure (both 408); a connection with no
    # request in flight is closed after the third.
    request_headers_timeout_s: float = 10.0
    request_timeout_s: float = 60.0
    connection_idle_timeout_s: float = 300.0
    version: int = 1
    generated_at: int = 0
    # The JSON access log of the gateway listener: "-" = Envoy's stdout, a path = that file,
    # "" = off (controller.access_logs).
    access_log: str = ""
    ca_bundle: str = CA_BUNDLE
    # Usage read by native filters and sent to extproc over the gRPC access log, batched for up
    # to this long per Envoy worker (the settle delay: README, "Quotas"). Off: extproc reads usage
    # from every response body, as the Istio config has it.
    usage_log: bool = True
    usage_log_flush_ms: int = 20
    # Model calls cost one ext_proc message (``crdgol.request_path``): extproc gets the body alone,
    # Envoy routes on the metadata it answers with and injects provider credentials itself. Needs
    # the usage log. Off: request headers, body and response headers all go to extproc.
    one_message: bool = True
    # Where the provider credentials' SDS secrets come from: "" = the ADS stream (the controller
    # serves them, over the authenticated control plane), else files in this folder (a static
    # config: ``crdgol render`` writes them, mode 0600).
    sds_dir: str = ""
    # Header names context profiles read (sent to extproc with the body; ``request_path.attributes``).
    profile_headers: tuple[str, ...] = ()
    # OpenTelemetry traces (controller.tracing_config); off by default.
    tracing: TracingSettings = field(default_factory=TracingSettings)
    # Model calls to a binding that needs no extproc decision are decided by Envoy alone, with no
    # ext_proc message (``controller.native_path``). Needs the one-message path; off with tracing.
    native_path: bool = True


def overload_manager(max_connections: int) -> Json:
    """A cap on downstream connections, so a flood cannot exhaust the gateway's file descriptors."""
    return {
        "resource_monitors": [
            {
                "name": "envoy.resource_monitors.global_downstream_max_connections",
                "typed_config": typed(
                    "envoy.extensions.resource_monitors.downstream_connections.v3.DownstreamConnectionsConfig",
                    max_active_downstream_connections=max_connections,
                ),
            }
        ]
    }


def binding_stamp(b: BindingSpec, direct: BackendSpec | None = None) -> str:
    """A short hash of what extproc must agree with Envoy about for this binding.

    Route and cluster names carry it, so a name never changes meaning between config versions:
    which backends the route reaches, at which priorities, and which one is rewritten by the
    downstream filter (its cluster has no upstream ext_proc). Weights, timeouts and retries do not
    change what a name means, so they keep the names (and Envoy's connection pools).
    """
    direct = direct or direct_backend(b)
    parts = [b.key, direct.name if direct else ""]
    for be in b.backends:
        ep = be.endpoint
        parts.append(f"{be.name} {be.priority} {ep.scheme}://{ep.host}:{ep.port}{ep.path_prefix}")
    return hashlib.blake2b("\n".join(parts).encode(), digest_size=4).hexdigest()


def route_id(b: BindingSpec, stamp: str) -> str:
    return f"{b.namespace}.{b.name}.{stamp}"


def backend_id(b: BindingSpec, be: BackendSpec) -> str:
    """The backend's stable id (metrics, logs); its Envoy cluster is ``cluster_name``."""
    return f"crdgol-be.{b.namespace}.{b.name}.{be.name}"


def cluster_name(b: BindingSpec, be: BackendSpec, stamp: str) -> str:
    return f"{backend_id(b, be)}.{stamp}"


def socket_address(host: str, port: int) -> Json:
    return {"socket_address": {"address": host, "port_value": port}}


@functools.lru_cache(maxsize=4096)
def is_ip(host: str) -> bool:
    # Cached: ipaddress is slow on hostnames (it fails through the IPv6 parser), and a config
    # names few distinct hosts.
    try:
        ipaddress.ip_address(host)
    except ValueError:
        return False
    return True


def ext_proc_filter(settings: RenderSettings, *, backend: str | None) -> Json:
    grpc: Json = {
        "envoy_grpc": {"cluster_name": EXTPROC_CLUSTER},
        "timeout": f"{settings.extproc_timeout_ms / 1000:.3f}s",
    }
    if backend is not None:
        grpc["initial_metadata"] = [{"key": BACKEND_METADATA, "value": backend}]
    extra: Json = {}
    if backend is None and settings.usage_log:
        # Usage reaches extproc over the access log: it may skip response bodies it does not need,
        # and marks a request whose usage it settles from the log entry.
        grpc["initial_metadata"] = [{"key": USAGE_LOG_METADATA, "value": "1"}]
        received = [SETTLE_NAMESPACE]
        if one_message(settings):
            # The body reply names the route and carries what the response side needs.
            received += [ROUTE_NAMESPACE, STATE_NAMESPACE]
            # The header values extproc reads travel with the body (model paths skip the headers).
            extra["request_attributes"] = attributes(settings.profile_headers)
            # A session call's response headers are skipped: what extproc reads of them comes
            # with the first response body message (``request_path.RESPONSE_ATTRIBUTES``).
            extra["response_attributes"] = list(RESPONSE_ATTRIBUTES)
        extra["metadata_options"] = {"receiving_namespaces": {"untyped": received}}
    return {
        # A fallback attempt's filter has a name of its own: per-route configs of the downstream
        # filter (the native route turns that one off) must not reach it (upstream filters read
        # the route's per-filter configs by name too).
        "name": "envoy.filters.http.ext_proc" if backend is None else ATTEMPT_FILTER,
        "typed_config": typed(
            "envoy.extensions.filters.http.ext_proc.v3.ExternalProcessor",
            grpc_service=grpc,
            # Fail closed: if extproc is down or slow the request is refused, never forwarded.
            failure_mode_allow=False,
            status_on_error={"code": 503},
            message_timeout=f"{settings.extproc_timeout_ms / 1000:.3f}s",
            processing_mode={
                "request_header_mode": "SEND",
                "request_body_mode": "BUFFERED",
                "request_trailer_mode": "SKIP",
                # Downstream, extproc asks for the response (a mode override in its answer to the
                # request headers) only for a request it lets through. Envoy's own replies to a
                # request extproc never saw (protocol errors, headers too large) must not wait on
                # extproc: Envoy closes such a connection right after, and the reply would be lost.
                "response_header_mode": "SEND" if backend is not None else "SKIP",
                # extproc asks for the body only when it needs it (mode override per response).
                "response_body_mode": "NONE",
                "response_trailer_mode": "SKIP",
            },
            allow_mode_override=True,
            # The upstream filter rewrites :path and :authority for the chosen backend.
            mutation_rules={"allow_all_routing": True},
            **extra,
        ),
    }


def direct_backend(b: BindingSpec) -> BackendSpec | None:
    """The binding's only first-priority backend, if it has exactly one.

    Every first attempt goes there, so the downstream filter rewrites the request for it and its
    cluster needs no upstream ext_proc; only clusters reachable by fallback carry one.
    """
    first = min(be.priority for be in b.backends)
    candidates = [be for be in b.backends if be.priority == first]
    return candidates[0] if len(candidates) == 1 else None


# Nothing under crdgol's prefix leaves for a provider: neither the internal headers (a fallback
# attempt's filter has read them, before this one) nor what a caller sent itself (the cache's
# ``x-crdgol-cache`` directive, or any other ``x-crdgol-*``). A provider learns nothing of how the
# gateway works, and no request header of the gateway's can be echoed back by one.
_STRIP_INTERNAL_REQUEST_HEADERS: Json = {"remove_on_match": {"key_matcher": {"prefix": INTERNAL_HEADER_PREFIX}}}
# A provider's answer never carries crdgol's own headers on: whatever it sends under the prefix
# (above all ``x-crdgol-backend``, which names the backend a request is billed as) is removed as
# the answer enters Envoy, before extproc or the client sees it.
_STRIP_INTERNAL_RESPONSE_HEADERS: Json = {"remove_on_match": {"key_matcher": {"prefix": INTERNAL_HEADER_PREFIX}}}


def upstream_filters(name: str, direct: bool, settings: RenderSettings, injector: Json | None = None) -> list[Json]:
    codec = {
        "name": "envoy.filters.http.upstream_codec",
        "typed_config": typed("envoy.extensions.filters.http.upstream_codec.v3.UpstreamCodec"),
    }
    mutations: Json = {
        "request_mutations": [_STRIP_INTERNAL_REQUEST_HEADERS],
        "response_mutations": [_STRIP_INTERNAL_RESPONSE_HEADERS],
    }
    strip = {
        "name": "envoy.filters.http.header_mutation",
        "typed_config": typed("envoy.extensions.filters.http.header_mutation.v3.HeaderMutation", mutations=mutations),
    }
    if not direct:
        # Answers pass the filters in reverse: stripped first, then tagged by the attempt's filter.
        return [ext_proc_filter(settings, backend=name), strip, codec]
    # The first backend's provider credential, set by Envoy (one-message path).
    return [strip, *([injector] if injector is not None else []), codec]


def backend_cluster(b: BindingSpec, be: BackendSpec, settings: RenderSettings, stamp: str, direct: bool = False) -> Json:
    name = cluster_name(b, be, stamp)
    ep = be.endpoint
    cluster: Json = {
        "name": name,
        "type": "STATIC" if is_ip(ep.host) else "STRICT_DNS",
        "connect_timeout": "5s",
        "dns_lookup_family": "V4_PREFERRED",
        "per_connection_buffer_limit_bytes": settings.max_request_bytes,
        "load_assignment": {
            "cluster_name": name,
            "endpoints": [{"lb_endpoints": [{"endpoint": {"address": socket_address(ep.host, ep.port)}}]}],
        },
        "typed_extension_protocol_options": {
            "envoy.extensions.upstreams.http.v3.HttpProtocolOptions": typed(
                "envoy.extensions.upstreams.http.v3.HttpProtocolOptions",
                explicit_http_config={"http_protocol_options": {}},
                http_filters=upstream_filters(
                    name,
                    direct,
                    settings,
                    credential_injector(credential_secret(backend_id(b, be)), be, settings.sds_dir)
                    if direct and be.credentials and one_message(settings)
                    else None,
                ),
            )
        },
        **cluster_health(b.health, ep.host),
        # What the access log says about the backend that answered (crdgol.access_log).
        "metadata": {
            "filter_metadata": {
                CLUSTER_NAMESPACE: {
                    "backend": backend_id(b, be),
                    "provider": "anthropic" if be.provider == "anthropic" else "openai",
                    "model_served": be.model,
                }
            }
        },
    }
    if ep.tls:
        cluster["transport_socket"] = {
            "name": "envoy.transport_sockets.tls",
            "typed_config": typed(
                "envoy.extensions.transport_sockets.tls.v3.UpstreamTlsContext",
                sni=ep.host,
                common_tls_context={
                    "validation_context": {
                        "trusted_ca": {"filename": settings.ca_bundle},
                        "match_typed_subject_alt_names": [{"san_type": "DNS", "matcher": {"exact": ep.host}}],
                    }
                },
            ),
        }
    return cluster


def binding_route(b: BindingSpec, stamp: str) -> Json:
    levels = sorted({be.priority for be in b.backends})
    groups = [
        {
            "name": f"p{level}",
            "clusters": [
                {"cluster_name": cluster_name(b, be, stamp), "weight": be.weight} for be in b.backends if be.priority == level
            ],
        }
        for level in levels
    ]
    retries = len(levels) - 1 if b.retry.attempts is None else b.retry.attempts
    route: Json = {
        "inline_cluster_specifier_plugin": {
            "extension": {
                "name": "envoy.router.cluster_specifier_plugin.priority_group",
                "typed_config": typed(
                    "envoy.extensions.router.cluster_specifiers.priority_group.v3.PriorityGroupClusterSpecifier",
                    priority_groups=groups,
                ),
            }
        },
        "timeout": duration(b.request_timeout),
        # Streams may be long: the idle timeout, not the total, bounds a stalled one.
        "idle_timeout": duration(b.per_try_timeout),
    }
    if retries > 0:
        retry_on = sorted({_RETRY_ON[c] for c in b.retry.on})
        policy: Json = {
            "retry_on": ",".join(retry_on),
            "num_retries": retries,
            "per_try_timeout": duration(b.per_try_timeout),
            "refresh_cluster_on_retry": True,
        }
        if "429" in b.retry.on:
            policy["retriable_status_codes"] = [429]
        route["retry_policy"] = policy
    rid = route_id(b, stamp)
    return {
        "name": rid,
        "match": {"prefix": "/", "headers": [{"name": ROUTE_HEADER, "string_match": {"exact": rid}}]},
        "route": route,
    }


ROUTE_CONFIG = "crdgol"


def route_configuration(settings: RenderSettings, routes: list[Json]) -> Json:
    """The gateway's route table: one route per binding, then a JSON 404 for everything else."""
    not_found = {
        "name": "not-found",
        "match": {"prefix": "/"},
        "direct_response": {"status": 404, "body": {"inline_string": "no route for this request"}},
    }
    if one_message(settings):
        not_found["typed_per_filter_config"] = NO_RESPONSE_SIDE
    return {
        "name": ROUTE_CONFIG,
        "virtual_hosts": [
            {
                "name": "gateway",
                "domains": ["*"],
                "request_body_buffer_limit": settings.max_request_bytes,
                "routes": [*routes, *(model_path_routes() if one_message(settings) else []), not_found],
            }
        ],
    }


def listener(settings: RenderSettings, routes: list[Json], *, rds: bool = False, native: str = "") -> Json:
    """The gateway listener. With ``rds`` its routes come over xDS (RDS) instead of inline: a
    route change then reaches every open connection at once, where a changed listener would
    leave open connections on the old routes while they drain; the native path's program then
    comes over xDS too (ECDS), else ``native`` is it (``controller.native_path``)."""
    routing: Json = (
        {"rds": {"config_source": {"ads": {}, "resource_api_version": "V3"}, "route_config_name": ROUTE_CONFIG}}
        if rds
        else {"route_config": route_configuration(settings, routes)}
    )
    hcm = typed(
        "envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager",
        stat_prefix="crdgol",
        codec_type="AUTO",
        generate_request_id=True,
        **routing,
        http_filters=[
            *([native_filter(native, discovered=rds)] if native_enabled(settings) else []),
            ext_proc_filter(settings, backend=None),
            *([buffer_filter(settings), response_filter(settings, EXTPROC_CLUSTER)] if one_message(settings) else []),
            *(usage_filters() if settings.usage_log else []),
            {"name": "envoy.filters.http.router", "typed_config": typed("envoy.extensions.filters.http.router.v3.Router")},
        ],
        access_log=[usage_access_log(EXTPROC_CLUSTER, settings.usage_log_flush_ms)] if settings.usage_log else [],
        local_reply_config=local_replies(
            max_request_bytes=settings.max_request_bytes,
            request_headers_timeout_s=settings.request_headers_timeout_s,
            request_timeout_s=settings.request_timeout_s,
        ),
        max_request_headers_kb=settings.max_request_headers_kb,
        common_http_protocol_options={
            "max_headers_count": settings.max_request_headers,
            "idle_timeout": duration(settings.connection_idle_timeout_s),
        },
        request_headers_timeout=duration(settings.request_headers_timeout_s),
        request_timeout=duration(settings.request_timeout_s),
        # An invalid HTTP/2 stream gets its own error reply; the connection's other streams go on.
        http2_protocol_options={"override_stream_error_on_invalid_http_message": True},
    )
    if settings.access_log:
        # Beside the usage log (when rendered), never instead of it: quotas settle from that one.
        hcm["access_log"] = [*hcm["access_log"], *access_logs(settings.access_log, usage_filters=settings.usage_log)]
        # What only extproc knows (tenant, tokens, cost...) reaches the log as dynamic metadata,
        # in addition to the namespaces extproc already writes (the settle marker).
        ext = next(f for f in hcm["http_filters"] if f["name"] == "envoy.filters.http.ext_proc")["typed_config"]
        received = ext.setdefault("metadata_options", {}).setdefault("receiving_namespaces", {}).setdefault("untyped", [])
        received.append(ACCESS_NAMESPACE)
    if settings.tracing.enabled:
        hcm["tracing"] = gateway_tracing()
    return {
        "name": "crdgol-gateway",
        "address": socket_address(settings.listen_host, settings.listen_port),
        "per_connection_buffer_limit_bytes": settings.max_request_bytes,
        "filter_chains": [{"filters": [{"name": "envoy.filters.network.http_connection_manager", "typed_config": hcm}]}],
    }


def extproc_addresses(settings: RenderSettings) -> list[Json]:
    if settings.extproc_sockets:
        return [{"pipe": {"path": path}} for path in settings.extproc_sockets]
    return [socket_address(settings.extproc_host, port) for port in (settings.extproc_ports or (settings.extproc_port,))]


def grpc_cluster(name: str, addresses: list[Json], *, dns: bool = False) -> Json:
    """A cluster of HTTP/2 (gRPC) endpoints: extproc, or the controller's ADS server."""
    cluster: Json = {
        "name": name,
        "type": "STRICT_DNS" if dns else "STATIC",
        "connect_timeout": "1s",
        "typed_extension_protocol_options": {
            "envoy.extensions.upstreams.http.v3.HttpProtocolOptions": typed(
                "envoy.extensions.upstreams.http.v3.HttpProtocolOptions",
                explicit_http_config={"http2_protocol_options": {"max_concurrent_streams": 10000}},
            )
        },
        "load_assignment": {
            "cluster_name": name,
            "endpoints": [{"lb_endpoints": [{"endpoint": {"address": a}} for a in addresses]}],
        },
    }
    if dns:
        cluster["dns_lookup_family"] = "V4_PREFERRED"
    return cluster


def extproc_cluster(settings: RenderSettings) -> Json:
    return grpc_cluster(EXTPROC_CLUSTER, extproc_addresses(settings))


# Lets listeners be in-process (internal) ones: MCPServer views are (controller.mcp_render).
INTERNAL_LISTENER_EXTENSION: Json = {
    "name": "envoy.bootstrap.internal_listener",
    "typed_config": typed("envoy.extensions.bootstrap.internal_listener.v3.InternalListener"),
}
