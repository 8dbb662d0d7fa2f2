"""The pure render: (bindings, secrets, settings) -> Envoy resources + the extproc policy snapshot.

Nothing here does I/O. The same input gives byte-identical output (everything is sorted, the
version and timestamp come from the settings), so golden files are stable. Envoy resources are
built as Python data and serialised by the caller; no logic lives in YAML templates.

How a request flows through what this renders:

* the listener's HTTP filter chain is ``ext_proc`` (downstream: auth, quota, context, usage) then
  ``router``. extproc names the binding by setting the ``x-crdgol-route`` request header and
  clearing the route cache; each binding has one route matching that header.
* the route picks a backend cluster with the ``priority_group`` cluster specifier: one group per
  backend priority, weighted within the group, the next group on each retry
  (``refresh_cluster_on_retry``).
* every backend cluster runs an *upstream* ``ext_proc`` filter per attempt, told which backend it
  is by gRPC initial metadata, which rewrites the model name, swaps in the provider credential and
  translates between the OpenAI and Anthropic APIs. So each fallback attempt gets its own model
  name and credentials.
* credentials never appear here: they travel only in the policy snapshot.
"""

from __future__ import annotations

import functools
import gc
import hashlib
import ipaddress
from collections.abc import Hashable, Iterable, Mapping
from dataclasses import dataclass, field, replace
from typing import Any

from controller.models import BackendSpec, BindingSpec, QuotaSpec, SecretData, SecretRef, SpecError
from crdgol.pb import policy_pb2 as pb

ROUTE_HEADER = "x-crdgol-route"
BACKEND_METADATA = "x-crdgol-backend"
EXTPROC_CLUSTER = "crdgol-extproc"
CA_BUNDLE = "/etc/ssl/certs/ca-certificates.crt"

_PROVIDER = {"openai": pb.OPENAI, "anthropic": pb.ANTHROPIC, "openai-compatible": pb.OPENAI_COMPATIBLE}
_RETRY_ON = {
    "connect-failure": "connect-failure",
    "5xx": "5xx",
    "reset": "reset",
    "timeout": "gateway-error",
    "429": "retriable-status-codes",
}

Json = dict[str, Any]


@dataclass(frozen=True, slots=True)
class RenderSettings:
    listen_host: str = "127.0.0.1"
    listen_port: int = 8080
    admin_port: int = 9901
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
    version: int = 1
    generated_at: int = 0
    ca_bundle: str = CA_BUNDLE


def _overload_manager(max_connections: int) -> Json:
    """A cap on downstream connections, so a flood cannot exhaust the gateway's file descriptors."""
    return {
        "resource_monitors": [
            {
                "name": "envoy.resource_monitors.global_downstream_max_connections",
                "typed_config": _any(
                    "envoy.extensions.resource_monitors.downstream_connections.v3.DownstreamConnectionsConfig",
                    max_active_downstream_connections=max_connections,
                ),
            }
        ]
    }


@dataclass(frozen=True, slots=True)
class RenderResult:
    envoy: Json  # a complete static bootstrap (what `crdgol render` prints)
    snapshot: pb.PolicySnapshot
    # The same resources, for xDS: what the ADS server hands Envoy (the extproc cluster is in the
    # bootstrap instead, see ``ads_bootstrap``).
    listeners: tuple[Json, ...] = ()
    clusters: tuple[Json, ...] = ()
    # Bindings that could not be served, by "namespace/name", with the reason.
    problems: dict[str, SpecError] = field(default_factory=dict)
    accepted: tuple[str, ...] = ()


def _any(type_name: str, **fields: Any) -> Json:
    return {"@type": f"type.googleapis.com/{type_name}", **fields}


def _duration(seconds: float) -> str:
    return f"{seconds:.3f}s"


def route_id(b: BindingSpec) -> str:
    return f"{b.namespace}.{b.name}"


def backend_id(b: BindingSpec, be: BackendSpec) -> str:
    return f"crdgol-be.{b.namespace}.{b.name}.{be.name}"


def _resolve(ref: SecretRef, secrets: Mapping[str, SecretData], what: str) -> str:
    secret = secrets.get(f"{ref.namespace}/{ref.name}")
    if secret is None:
        raise SpecError("SecretNotFound", f"{what}: Secret {ref.namespace}/{ref.name} does not exist")
    value = secret.data.get(ref.key)
    if not value:
        raise SpecError("SecretKeyNotFound", f"{what}: Secret {ref.namespace}/{ref.name} has no key {ref.key!r}")
    return value


def _binding_pb(b: BindingSpec, secrets: Mapping[str, SecretData]) -> pb.Binding:
    backends = []
    direct = direct_backend(b)
    for i, be in enumerate(b.backends):
        key = _resolve(be.credentials, secrets, f"spec.backends[{i}].credentialsRef") if be.credentials else ""
        host = be.endpoint.host
        default_port = 443 if be.endpoint.tls else 80
        if be.endpoint.port != default_port:
            host = f"{host}:{be.endpoint.port}"
        backends.append(
            pb.Backend(
                id=backend_id(b, be),
                provider=_PROVIDER[be.provider],
                model=be.model,
                host=host,
                path_prefix=be.endpoint.path_prefix,
                api_key=key,
                weight=be.weight,
                priority=be.priority,
                input_per_mtok_micros=be.pricing.input_per_mtok_micros,
                output_per_mtok_micros=be.pricing.output_per_mtok_micros,
                direct=be is direct,
            )
        )
    c = b.context
    context = pb.ContextPolicy(
        system_template=c.system_prompt,
        profile=[
            pb.ProfileField(name=p.name, claim=p.claim) if p.claim else pb.ProfileField(name=p.name, header=p.header)
            for p in c.profile
        ],
        history=pb.HistoryPolicy(
            enabled=c.history.enabled,
            max_turns=c.history.max_turns,
            max_tokens=c.history.max_tokens,
            ttl_seconds=c.history.ttl_seconds,
        ),
        knowledge=[pb.Snippet(title=s.title, text=s.text) for s in c.knowledge],
        max_context_tokens=c.max_context_tokens,
    )
    q = b.quotas
    quotas = pb.QuotaPolicy(
        rate_limits_fail_open=q.rate_limits_fail_open,
        budgets_fail_open=q.budgets_fail_open,
        tenants={t: _quota_pb(spec) for t, spec in q.tenants},
    )
    if q.default is not None:
        quotas.default_quota.CopyFrom(_quota_pb(q.default))
    return pb.Binding(
        key=b.key,
        model=b.model,
        backends=backends,
        tenants=sorted(b.tenants),
        context=context,
        route=route_id(b),
        quotas=quotas,
    )


def _quota_pb(q: QuotaSpec) -> pb.Quota:
    return pb.Quota(
        limits=[
            pb.QuotaLimit(metric=lim.metric, amount=lim.amount, window_seconds=lim.window_seconds, period_seconds=lim.period_seconds)
            for lim in q.limits
        ],
        default_max_tokens=q.default_max_tokens,
    )


def _jwt_pb(b: BindingSpec, secrets: Mapping[str, SecretData]) -> list[pb.JwtProvider]:
    out = []
    for i, j in enumerate(b.jwt):
        secret = _resolve(j.hs256_secret, secrets, f"spec.auth.jwt[{i}].hs256SecretRef") if j.hs256_secret else ""
        out.append(
            pb.JwtProvider(
                name=j.name,
                issuer=j.issuer,
                audiences=list(j.audiences),
                tenant_claim=j.tenant_claim,
                hs256_secret=secret.encode(),
                jwks_json=j.jwks,
            )
        )
    return out


def _api_keys(secrets: Iterable[SecretData]) -> list[pb.ApiKey]:
    keys = []
    for s in secrets:
        if not s.is_api_key:
            continue
        tenant = s.annotations.get("crdgol.io/tenant") or s.labels.get("crdgol.io/tenant") or s.name
        for value in s.data.values():
            if value:
                keys.append(pb.ApiKey(sha256=hashlib.sha256(value.encode()).digest(), tenant=tenant, source=s.key))
    keys.sort(key=lambda k: (k.source, k.sha256))
    return keys


# --- Envoy resources -------------------------------------------------------------------------


def _socket(host: str, port: int) -> Json:
    return {"socket_address": {"address": host, "port_value": port}}


@functools.lru_cache(maxsize=4096)
def _is_ip(host: str) -> bool:
    # Cached: ipaddress is slow on hostnames (it fails through the IPv6 parser), and a config
    # names few distinct hosts.
    try:
        ipaddress.ip_address(host)
    except ValueError:
        return False
    return True


def _ext_proc(settings: RenderSettings, *, backend: str | None) -> Json:
    grpc: Json = {
        "envoy_grpc": {"cluster_name": EXTPROC_CLUSTER},
        "timeout": f"{settings.extproc_timeout_ms / 1000:.3f}s",
    }
    if backend is not None:
        grpc["initial_metadata"] = [{"key": BACKEND_METADATA, "value": backend}]
    return {
        "name": "envoy.filters.http.ext_proc",
        "typed_config": _any(
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
                "response_header_mode": "SEND",
                # extproc asks for the body only when it needs it (mode override per response).
                "response_body_mode": "NONE",
                "response_trailer_mode": "SKIP",
            },
            allow_mode_override=True,
            # The upstream filter rewrites :path and :authority for the chosen backend.
            mutation_rules={"allow_all_routing": True},
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


_INTERNAL_REQUEST_HEADERS = ("x-crdgol-route", "x-crdgol-client-api", "x-crdgol-body-api")


def _upstream_filters(name: str, direct: bool, settings: RenderSettings) -> list[Json]:
    codec = {
        "name": "envoy.filters.http.upstream_codec",
        "typed_config": _any("envoy.extensions.filters.http.upstream_codec.v3.UpstreamCodec"),
    }
    if not direct:
        return [_ext_proc(settings, backend=name), codec]
    # The request was already rewritten downstream; only crdgol's own headers must not leave.
    strip = {
        "name": "envoy.filters.http.header_mutation",
        "typed_config": _any(
            "envoy.extensions.filters.http.header_mutation.v3.HeaderMutation",
            mutations={"request_mutations": [{"remove": h} for h in _INTERNAL_REQUEST_HEADERS]},
        ),
    }
    return [strip, codec]


def _backend_cluster(b: BindingSpec, be: BackendSpec, settings: RenderSettings, direct: bool = False) -> Json:
    name = backend_id(b, be)
    ep = be.endpoint
    cluster: Json = {
        "name": name,
        "type": "STATIC" if _is_ip(ep.host) else "STRICT_DNS",
        "connect_timeout": "5s",
        "dns_lookup_family": "V4_PREFERRED",
        "per_connection_buffer_limit_bytes": settings.max_request_bytes,
        "load_assignment": {
            "cluster_name": name,
            "endpoints": [{"lb_endpoints": [{"endpoint": {"address": _socket(ep.host, ep.port)}}]}],
        },
        "typed_extension_protocol_options": {
            "envoy.extensions.upstreams.http.v3.HttpProtocolOptions": _any(
                "envoy.extensions.upstreams.http.v3.HttpProtocolOptions",
                explicit_http_config={"http_protocol_options": {}},
                http_filters=_upstream_filters(name, direct, settings),
            )
        },
    }
    if ep.tls:
        cluster["transport_socket"] = {
            "name": "envoy.transport_sockets.tls",
            "typed_config": _any(
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


def _binding_route(b: BindingSpec) -> Json:
    levels = sorted({be.priority for be in b.backends})
    groups = [
        {
            "name": f"p{level}",
            "clusters": [
                {"cluster_name": backend_id(b, be), "weight": be.weight} for be in b.backends if be.priority == level
            ],
        }
        for level in levels
    ]
    retries = len(levels) - 1 if b.retry.attempts is None else b.retry.attempts
    route: Json = {
        "inline_cluster_specifier_plugin": {
            "extension": {
                "name": "envoy.router.cluster_specifier_plugin.priority_group",
                "typed_config": _any(
                    "envoy.extensions.router.cluster_specifiers.priority_group.v3.PriorityGroupClusterSpecifier",
                    priority_groups=groups,
                ),
            }
        },
        "timeout": _duration(b.request_timeout),
        # Streams may be long: the idle timeout, not the total, bounds a stalled one.
        "idle_timeout": _duration(b.per_try_timeout),
    }
    if retries > 0:
        retry_on = sorted({_RETRY_ON[c] for c in b.retry.on})
        policy: Json = {
            "retry_on": ",".join(retry_on),
            "num_retries": retries,
            "per_try_timeout": _duration(b.per_try_timeout),
            "refresh_cluster_on_retry": True,
        }
        if "429" in b.retry.on:
            policy["retriable_status_codes"] = [429]
        route["retry_policy"] = policy
    return {
        "name": b.key,
        "match": {"prefix": "/", "headers": [{"name": ROUTE_HEADER, "string_match": {"exact": route_id(b)}}]},
        "route": route,
    }


def _error_format(type_: str, code: str, message: str = "%LOCAL_REPLY_BODY%") -> Json:
    return {
        "json_format": {"error": {"message": message, "type": type_, "code": code}},
        "content_type": "application/json",
    }


def _local_replies() -> Json:
    """Envoy's own error replies become OpenAI-shaped JSON, so SDKs raise the right exception.

    Matched by status, so extproc's immediate responses with these statuses are rewritten too:
    extproc sends them with the bare message (``extproc.errors.ENVOY_WRAPPED_STATUSES``).
    """

    def by_status(code: int, type_: str, err_code: str, message: str = "%LOCAL_REPLY_BODY%") -> Json:
        return {
            "filter": {"status_code_filter": {"comparison": {"op": "EQ", "value": {"default_value": code, "runtime_key": f"crdgol.local_reply.{code}"}}}},
            "body_format_override": _error_format(type_, err_code, message),
        }

    return {
        "mappers": [
            by_status(413, "invalid_request_error", "request_too_large", "request body is larger than the gateway accepts"),
            by_status(502, "server_error", "bad_gateway"),
            by_status(503, "server_error", "upstream_unavailable"),
            by_status(504, "server_error", "upstream_timeout"),
            by_status(500, "server_error", "internal_error"),
        ]
    }


def _listener(settings: RenderSettings, routes: list[Json]) -> Json:
    not_found = {
        "name": "not-found",
        "match": {"prefix": "/"},
        "direct_response": {
            "status": 404,
            "body": {
                "inline_string": '{"error":{"message":"no route for this request","type":"not_found_error","code":"not_found"}}'
            },
        },
        "response_headers_to_add": [{"header": {"key": "content-type", "value": "application/json"}, "append_action": "OVERWRITE_IF_EXISTS_OR_ADD"}],
    }
    hcm = _any(
        "envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager",
        stat_prefix="crdgol",
        codec_type="AUTO",
        generate_request_id=True,
        route_config={
            "name": "crdgol",
            "virtual_hosts": [
                {
                    "name": "gateway",
                    "domains": ["*"],
                    "request_body_buffer_limit": settings.max_request_bytes,
                    "routes": [*routes, not_found],
                }
            ],
        },
        http_filters=[
            _ext_proc(settings, backend=None),
            {"name": "envoy.filters.http.router", "typed_config": _any("envoy.extensions.filters.http.router.v3.Router")},
        ],
        local_reply_config=_local_replies(),
    )
    return {
        "name": "crdgol-gateway",
        "address": _socket(settings.listen_host, settings.listen_port),
        "per_connection_buffer_limit_bytes": settings.max_request_bytes,
        "filter_chains": [{"filters": [{"name": "envoy.filters.network.http_connection_manager", "typed_config": hcm}]}],
    }


def _extproc_addresses(settings: RenderSettings) -> list[Json]:
    if settings.extproc_sockets:
        return [{"pipe": {"path": path}} for path in settings.extproc_sockets]
    return [_socket(settings.extproc_host, port) for port in (settings.extproc_ports or (settings.extproc_port,))]


def _extproc_cluster(settings: RenderSettings) -> Json:
    return {
        "name": EXTPROC_CLUSTER,
        "type": "STATIC",
        "connect_timeout": "1s",
        "typed_extension_protocol_options": {
            "envoy.extensions.upstreams.http.v3.HttpProtocolOptions": _any(
                "envoy.extensions.upstreams.http.v3.HttpProtocolOptions",
                explicit_http_config={"http2_protocol_options": {"max_concurrent_streams": 10000}},
            )
        },
        "load_assignment": {
            "cluster_name": EXTPROC_CLUSTER,
            "endpoints": [
                {
                    "lb_endpoints": [{"endpoint": {"address": a}} for a in _extproc_addresses(settings)]
                }
            ],
        },
    }


def render(
    bindings: Iterable[BindingSpec],
    secrets: Iterable[SecretData],
    settings: RenderSettings,
    cache: RenderCache | None = None,
) -> RenderResult:
    """Render every binding that can be served; the rest are reported in ``problems``."""
    # The render allocates hundreds of thousands of small objects and frees none of them: the
    # cyclic garbage collector would only re-scan them (a third of the time at 5,000 bindings).
    enabled = gc.isenabled()
    gc.disable()
    try:
        return _render(bindings, secrets, settings, cache)
    finally:
        if enabled:
            gc.enable()


@dataclass(frozen=True, slots=True)
class _Pieces:
    """Everything one binding contributes to a render."""

    spec: BindingSpec
    binding: pb.Binding
    jwts: tuple[pb.JwtProvider, ...]
    route: Json
    clusters: tuple[Json, ...]


class RenderCache:
    """Per-binding render results, reused while the binding, the Secret values it names and the
    render settings are unchanged: after one change among thousands of bindings, only that one is
    rendered again. The output is the same with or without the cache; callers must not mutate it.
    """

    def __init__(self) -> None:
        self._entries: dict[Hashable, _Pieces] = {}
        self._used: dict[Hashable, _Pieces] = {}

    def get(self, key: Hashable, spec: BindingSpec) -> _Pieces | None:
        hit = self._entries.get(key)
        # Keys name the spec by identity (hashing a whole spec costs more than rendering it); the
        # entry holds the spec, so its id cannot be reused while the entry lives.
        if hit is None or hit.spec is not spec:
            return None
        self._used[key] = hit
        return hit

    def put(self, key: Hashable, pieces: _Pieces) -> None:
        self._used[key] = pieces

    def finish(self) -> None:
        """Keep only what the last render used, so the cache never outgrows the config."""
        self._entries, self._used = self._used, {}


def _secret_values(b: BindingSpec, secrets: Mapping[str, SecretData]) -> tuple[str | None, ...]:
    refs = [be.credentials for be in b.backends] + [j.hs256_secret for j in b.jwt]
    out: list[str | None] = []
    for ref in refs:
        secret = secrets.get(f"{ref.namespace}/{ref.name}") if ref is not None else None
        out.append(secret.data.get(ref.key) if secret is not None and ref is not None else None)
    return tuple(out)


def _pieces(b: BindingSpec, secrets: Mapping[str, SecretData], settings: RenderSettings) -> _Pieces:
    direct = direct_backend(b)
    return _Pieces(
        spec=b,
        binding=_binding_pb(b, secrets),
        jwts=tuple(_jwt_pb(b, secrets)),
        route=_binding_route(b),
        clusters=tuple(_backend_cluster(b, be, settings, direct=be is direct) for be in b.backends),
    )


def _render(
    bindings: Iterable[BindingSpec], secrets: Iterable[SecretData], settings: RenderSettings, cache: RenderCache | None = None
) -> RenderResult:
    secret_map = {s.key: s for s in secrets}
    problems: dict[str, SpecError] = {}
    served: list[tuple[BindingSpec, _Pieces]] = []
    owners: dict[str, str] = {}
    # Per-binding pieces do not depend on the version or the timestamp.
    stable = replace(settings, version=0, generated_at=0)
    for b in sorted(bindings, key=lambda b: b.key):
        if b.model in owners:
            problems[b.key] = SpecError(
                "ModelConflict", f"model {b.model!r} is already served by AIModelBinding {owners[b.model]}"
            )
            continue
        key = (id(b), _secret_values(b, secret_map), stable)
        pieces = cache.get(key, b) if cache is not None else None
        if pieces is None:
            try:
                pieces = _pieces(b, secret_map, settings)
            except SpecError as exc:
                problems[b.key] = exc
                continue
            if cache is not None:
                cache.put(key, pieces)
        served.append((b, pieces))
        owners[b.model] = b.key
    if cache is not None:
        cache.finish()

    providers: dict[str, pb.JwtProvider] = {}
    for b, pieces in served:
        for j in pieces.jwts:
            if j.issuer in providers and providers[j.issuer] != j:
                problems.setdefault(
                    b.key, SpecError("JwtIssuerConflict", f"issuer {j.issuer!r} is configured differently elsewhere")
                )
            providers.setdefault(j.issuer, j)

    snapshot = pb.PolicySnapshot(
        version=settings.version,
        generated_at=settings.generated_at,
        bindings=[p.binding for _, p in served],
        api_keys=_api_keys(secret_map[k] for k in sorted(secret_map)),
        jwt_providers=[providers[i] for i in sorted(providers)],
    )
    clusters: list[Json] = []
    routes = []
    for _, pieces in served:
        routes.append(pieces.route)
        clusters.extend(pieces.clusters)
    listeners = [_listener(settings, routes)]
    envoy: Json = {
        "node": {"id": "crdgol-gateway", "cluster": "crdgol"},
        "admin": {"address": _socket("127.0.0.1", settings.admin_port)},
        "overload_manager": _overload_manager(settings.max_connections),
        "static_resources": {"listeners": listeners, "clusters": [_extproc_cluster(settings), *clusters]},
    }
    return RenderResult(
        envoy=envoy,
        snapshot=snapshot,
        listeners=tuple(listeners),
        clusters=tuple(clusters),
        problems=problems,
        accepted=tuple(b.key for b, _ in served),
    )


XDS_CLUSTER = "crdgol-xds"


def ads_bootstrap(settings: RenderSettings, xds_host: str, xds_port: int, node_id: str = "crdgol-gateway") -> Json:
    """An Envoy bootstrap that takes listeners and clusters from the controller's ADS server."""
    ads = {"ads": {}, "resource_api_version": "V3"}
    return {
        "node": {"id": node_id, "cluster": "crdgol"},
        "admin": {"address": _socket("127.0.0.1", settings.admin_port)},
        "overload_manager": _overload_manager(settings.max_connections),
        "dynamic_resources": {
            "ads_config": {
                "api_type": "GRPC",
                "transport_api_version": "V3",
                "grpc_services": [{"envoy_grpc": {"cluster_name": XDS_CLUSTER}}],
                "set_node_on_first_message_only": True,
            },
            "lds_config": ads,
            "cds_config": ads,
        },
        "static_resources": {
            "clusters": [
                # extproc sits beside Envoy (a sidecar, or the same host): static, never sent over CDS.
                _extproc_cluster(settings),
                {
                    "name": XDS_CLUSTER,
                    "type": "STATIC" if _is_ip(xds_host) else "STRICT_DNS",
                    "connect_timeout": "1s",
                    "typed_extension_protocol_options": {
                        "envoy.extensions.upstreams.http.v3.HttpProtocolOptions": _any(
                            "envoy.extensions.upstreams.http.v3.HttpProtocolOptions",
                            explicit_http_config={"http2_protocol_options": {}},
                        )
                    },
                    "load_assignment": {
                        "cluster_name": XDS_CLUSTER,
                        "endpoints": [{"lb_endpoints": [{"endpoint": {"address": _socket(xds_host, xds_port)}}]}],
                    },
                }
            ]
        },
    }
