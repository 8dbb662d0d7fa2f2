"""The pure render of MCPServers: Envoy resources and the policy entries for /mcp.

How a request to ``/mcp`` flows through what this renders:

* the gateway listener's ext_proc (extproc) authenticates the caller, reads the JSON-RPC message,
  decides (tool permissions, the tool-call quota) and names the caller's *view*, like a binding's
  route: on the one-message path (``crdgol.request_path``) ``POST /mcp`` sends it the body alone
  (``_body_only_route``) and the view is named in dynamic metadata, whose route sets the tenant
  header; otherwise by the ``x-crdgol-route`` header;
* a view is one per namespace whose tenants may reach any MCPServer: a route on the gateway
  listener to an Envoy **internal listener** whose filter chain is Envoy's own ``mcp`` filter (it
  parses the JSON-RPC message) and ``mcp_router`` (terminal: it answers ``initialize`` and the
  list methods by fanning out to the view's servers and merging, names each tool and prompt
  ``<toolPrefix>__<name>`` and each resource ``<toolPrefix>+<uri>``, and keeps one MCP session
  per server behind a composite session id bound to the tenant). ``mcp_router`` must end a filter
  chain, so it cannot sit beside the gateway's ``router``: the internal listener gives it a chain
  of its own, in-process;
* a message for one server (``tools/call``, ``resources/read``, ``prompts/get``) skips that hop:
  extproc has already found the server, re-written the body with the server's own names and read
  the server's session out of the composite id, so each (view, server) pair has a route on the
  gateway listener straight to the server's cluster (``_server_route``), which sends the server
  its own session id and puts the client's back on the answer (SSE streams through as it comes);
* each (view, server) pair has a cluster. ``mcp_router`` builds every request to a server afresh,
  without the client's headers, so a credential cannot ride along from the gateway filter: a
  server with a credential gets Envoy's credential injector on its cluster, from an SDS secret
  (one-message path), or else an upstream ext_proc filter, told which server it is by gRPC
  metadata, with which extproc sets that server's credential (and only that one). A native filter first strips the gateway's internal headers and any client
  credential, should a later ``mcp_router`` forward them.

A view holds its own namespace's servers that grant its tenants anything first (by name), then other
namespaces' that grant them (by key) and that the view's namespace accepts grants from
(``crdgol.io/accept-from``, as for bindings: ``controller.ownership``; otherwise any namespace
could put its tools, descriptions and all, in front of another's agents, and receive their
arguments); a server whose prefix is taken in a view is left out of that view, and refused
outright (``PrefixConflict``) when that happens in its own namespace. No Envoy resource here
holds a secret: credentials go into the policy snapshot and, for the injector, into
``McpRender.credentials`` (served as SDS secrets, apart from the config).
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field

from controller.envoy_config import (
    EXTPROC_CLUSTER,
    INTERNAL_LISTENER_EXTENSION,
    RenderSettings,
    is_ip,
    socket_address,
)
from controller.envoy_json import Json, duration, typed, typed_struct
from controller.mcp_servers import McpServerSpec
from controller.models import Endpoint, SecretData, SecretRef, SpecError
from controller.one_message import BODY_ONLY, NO_RESPONSE_SIDE, one_message
from controller.quota_specs import QuotaSpec
from controller.usage_filters import USAGE_FILTER_NAMES
from crdgol import tenancy
from crdgol.mcp_contract import (
    CLIENT_SESSION_KEY,
    LIST_FILTER_HEADER,
    LIST_KEY,
    LIST_METADATA,
    MCP_PATH,
    SERVER_METADATA,
    SERVER_SESSION_KEY,
    SESSION_HEADER,
    TENANT_HEADER,
    TENANT_KEY,
    server_route,
    view_route,
)
from crdgol.pb import policy_pb2 as pb
from crdgol.request_path import ROUTE_HEADER, ROUTE_KEY, ROUTE_NAMESPACE

Resolve = Callable[[SecretRef, Mapping[str, SecretData], str, str, Endpoint | None], str]

__all__ = ["INTERNAL_LISTENER_EXTENSION", "McpRender", "render_mcp"]


@dataclass(frozen=True, slots=True)
class McpRender:
    routes: tuple[Json, ...] = ()
    listeners: tuple[Json, ...] = ()
    clusters: tuple[Json, ...] = ()
    servers: tuple[pb.McpToolServer, ...] = ()
    views: tuple[pb.McpToolView, ...] = ()
    # MCPServers that cannot be served, by "namespace/name", with the reason.
    problems: dict[str, SpecError] = field(default_factory=dict)
    # Served ones -> the namespaces whose tenants reach them (their status ``views``).
    reach: dict[str, tuple[str, ...]] = field(default_factory=dict)
    # One-message path: (SDS secret name, header value) of each server credential Envoy injects;
    # ``render`` serves them as SDS secrets with the model backends' (never in the config).
    credentials: tuple[tuple[str, str], ...] = field(default=(), repr=False)


def _credential(s: McpServerSpec, secrets: Mapping[str, SecretData], resolve: Resolve) -> str:
    if s.credentials is None:
        return ""
    value = resolve(s.credentials, secrets, "spec.credentialsRef", s.namespace, s.endpoint)
    if any(ord(c) < 0x20 or c == "\x7f" for c in value):
        raise SpecError("InvalidSecret", f"spec.credentialsRef: Secret {s.credentials.namespace}/{s.credentials.name} holds control characters")
    return f"Bearer {value}" if s.credentials_header == "authorization" else value


def _quota_pb(q: QuotaSpec) -> pb.Quota:
    return pb.Quota(limits=[pb.QuotaLimit(metric=lim.metric, amount=lim.amount, window_seconds=lim.window_seconds) for lim in q.limits])


def _server_pb(s: McpServerSpec, credential: str) -> pb.McpToolServer:
    q = s.quotas
    quotas = pb.QuotaPolicy(rate_limits_fail_open=q.rate_limits_fail_open, tenants={t: _quota_pb(v) for t, v in q.tenants})
    if q.default is not None:
        quotas.default_quota.CopyFrom(_quota_pb(q.default))
    return pb.McpToolServer(
        key=s.key,
        prefix=s.prefix,
        tenants=list(s.tenants),
        default_tools=list(s.default_tools),
        tenant_tools={t: pb.ToolList(tools=list(tools)) for t, tools in s.tenant_tools},
        quotas=quotas,
        credential_header=s.credentials_header if credential else "",
        credential_value=credential,
        url=_server_url(s),
    )


def _server_url(s: McpServerSpec) -> str:
    ep = s.endpoint
    host = f"[{ep.host}]" if ":" in ep.host else ep.host
    return f"{ep.scheme}://{host}:{ep.port}{s.path}"


def _stamp(s: McpServerSpec) -> str:
    """What a server cluster's name must change with: where it points and how it authenticates."""
    ep = s.endpoint
    text = f"{ep.scheme}://{ep.host}:{ep.port}{s.path} {s.credentials_header} {s.credentials is not None}"
    return hashlib.blake2b(text.encode(), digest_size=4).hexdigest()


def _cluster_name(view: str, s: McpServerSpec) -> str:
    return f"crdgol-mcp.{view}.{s.namespace}.{s.name}.{_stamp(s)}"


_LIST_MODE: Json = {
    "request_header_mode": "SEND",
    "request_body_mode": "NONE",
    "request_trailer_mode": "SKIP",
    "response_header_mode": "SEND",
    "response_body_mode": "BUFFERED",
    "response_trailer_mode": "SKIP",
}


def _ext_proc(settings: RenderSettings, metadata: tuple[str, str], *, response: bool) -> Json:
    """An ext_proc filter that sends extproc the request headers and, with ``response``, the
    response headers and the whole response body; told what it is by gRPC ``metadata``."""
    timeout = f"{settings.extproc_timeout_ms / 1000:.3f}s"
    return {
        "name": "envoy.filters.http.ext_proc",
        "typed_config": typed(
            "envoy.extensions.filters.http.ext_proc.v3.ExternalProcessor",
            grpc_service={"envoy_grpc": {"cluster_name": EXTPROC_CLUSTER}, "timeout": timeout, "initial_metadata": [{"key": metadata[0], "value": metadata[1]}]},
            failure_mode_allow=False,  # fail closed: no credential, no unfiltered list
            status_on_error={"code": 503},
            message_timeout=timeout,
            processing_mode=_LIST_MODE if response else {**_LIST_MODE, "response_header_mode": "SKIP", "response_body_mode": "NONE"},
        ),
    }


def credential_secret(s: McpServerSpec) -> str:
    """The SDS secret name of a server's credential (the header value Envoy injects)."""
    return f"crdgol-mcp-credential.{s.namespace}.{s.name}"


def _credential_injector(s: McpServerSpec, settings: RenderSettings) -> Json:
    """Sets the server's credential on each of its requests from its SDS secret (over ADS, or
    from its file in ``settings.sds_dir``): no ext_proc stream per server request."""
    secret = credential_secret(s)
    sds: Json = (
        {"path_config_source": {"path": f"{settings.sds_dir}/{secret}.json"}, "resource_api_version": "V3"}
        if settings.sds_dir
        else {"ads": {}, "resource_api_version": "V3"}
    )
    return {
        "name": "envoy.filters.http.credential_injector",
        "typed_config": typed(
            "envoy.extensions.filters.http.credential_injector.v3.CredentialInjector",
            overwrite=True,
            credential={
                "name": "envoy.http.injected_credentials.generic",
                "typed_config": typed(
                    "envoy.extensions.http.injected_credentials.generic.v3.Generic",
                    credential={"name": secret, "sds_config": sds},
                    header=s.credentials_header,
                ),
            },
        ),
    }


def _server_cluster(view: str, s: McpServerSpec, has_credential: bool, settings: RenderSettings) -> Json:
    name = _cluster_name(view, s)
    ep = s.endpoint
    strip = [TENANT_HEADER, ROUTE_HEADER, "authorization", "x-api-key"]
    cluster: Json = {
        "name": name,
        "type": "STATIC" if is_ip(ep.host) else "STRICT_DNS",
        "connect_timeout": "5s",
        "dns_lookup_family": "V4_PREFERRED",
        "load_assignment": {"cluster_name": name, "endpoints": [{"lb_endpoints": [{"endpoint": {"address": socket_address(ep.host, ep.port)}}]}]},
        "typed_extension_protocol_options": {
            "envoy.extensions.upstreams.http.v3.HttpProtocolOptions": typed(
                "envoy.extensions.upstreams.http.v3.HttpProtocolOptions",
                explicit_http_config={"http_protocol_options": {}},
                http_filters=[
                    {
                        "name": "envoy.filters.http.header_mutation",
                        "typed_config": typed(
                            "envoy.extensions.filters.http.header_mutation.v3.HeaderMutation",
                            mutations={"request_mutations": [{"remove": h} for h in strip]},
                        ),
                    },
                    # Envoy sets the server's credential on each of its requests (one-message
                    # path: from an SDS secret; else extproc does, on a stream per request).
                    *(
                        [_credential_injector(s, settings) if one_message(settings) else _ext_proc(settings, (SERVER_METADATA, s.key), response=False)]
                        if has_credential
                        else []
                    ),
                    {"name": "envoy.filters.http.upstream_codec", "typed_config": typed("envoy.extensions.filters.http.upstream_codec.v3.UpstreamCodec")},
                ],
            )
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
                        "trusted_ca": {"filename": "/etc/ssl/certs/ca-certificates.crt"},
                        "match_typed_subject_alt_names": [{"san_type": "DNS", "matcher": {"exact": ep.host}}],
                    }
                },
            ),
        }
    return cluster


def _view_listener(view: str, members: list[McpServerSpec], settings: RenderSettings) -> Json:
    servers = []
    for s in members:
        ep = s.endpoint
        default_port = 443 if ep.tls else 80
        servers.append(
            {
                "name": s.prefix,
                "mcp_cluster": {
                    "cluster": _cluster_name(view, s),
                    "path": s.path,
                    "timeout": duration(s.timeout),
                    "host_rewrite_literal": ep.host if ep.port == default_port else f"{ep.host}:{ep.port}",
                },
            }
        )
    hcm = typed(
        "envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager",
        stat_prefix=f"crdgol_mcp_{view}",
        route_config={
            "name": f"crdgol-mcp.{view}",
            "virtual_hosts": [
                {
                    "name": "mcp",
                    "domains": ["*"],
                    # mcp_router picks the server itself; the routes only say whether extproc reads
                    # the answer (a tools/list, to filter it by the tenant's permissions).
                    "routes": [
                        {
                            "match": {"prefix": "/", "headers": [{"name": LIST_FILTER_HEADER, "present_match": True}]},
                            "route": {"cluster": _cluster_name(view, members[0]), "timeout": "0s"},
                            "typed_per_filter_config": {
                                "envoy.filters.http.ext_proc": typed(
                                    "envoy.config.route.v3.FilterConfig",
                                    disabled=False,
                                    config=typed("envoy.extensions.filters.http.ext_proc.v3.ExtProcPerRoute", overrides={"processing_mode": _LIST_MODE}),
                                )
                            },
                        },
                        {"match": {"prefix": "/"}, "route": {"cluster": _cluster_name(view, members[0]), "timeout": "0s"}},
                    ],
                }
            ],
        },
        http_filters=[
            {**_ext_proc(settings, (LIST_METADATA, "1"), response=True), "disabled": True},
            {"name": "envoy.filters.http.mcp", "typed_config": typed_struct("envoy.extensions.filters.http.mcp.v3.Mcp")},
            {
                "name": "envoy.filters.http.mcp_router",
                "typed_config": typed_struct(
                    "envoy.extensions.filters.http.mcp_router.v3.McpRouter",
                    servers=servers,
                    # A session is bound to the tenant that opened it: another tenant presenting
                    # its id is refused (403), so a leaked session id is no way into it.
                    session_identity={"identity": {"header": {"name": TENANT_HEADER}}, "validation": {"mode": "ENFORCE"}},
                ),
            },
        ],
    )
    return {"name": f"crdgol-mcp.{view}", "internal_listener": {}, "filter_chains": [{"filters": [{"name": "envoy.filters.network.http_connection_manager", "typed_config": hcm}]}]}


def _view_cluster(view: str) -> Json:
    name = f"crdgol-mcp-view.{view}"
    return {
        "name": name,
        "connect_timeout": "1s",
        "load_assignment": {
            "cluster_name": name,
            "endpoints": [{"lb_endpoints": [{"endpoint": {"address": {"envoy_internal_address": {"server_listener_name": f"crdgol-mcp.{view}"}}}}]}],
        },
    }


def _metadata_value(key: str) -> str:
    return f"%DYNAMIC_METADATA({ROUTE_NAMESPACE}:{key})%"


def _view_route(view: str, members: list[McpServerSpec], settings: RenderSettings) -> Json:
    route = view_route(view)
    out: Json = {
        "name": route,
        "match": {"prefix": "/", "headers": [{"name": ROUTE_HEADER, "string_match": {"exact": route}}]},
        # A tool call may stream for as long as its server's timeout allows.
        "route": {"cluster": f"crdgol-mcp-view.{view}", "timeout": "0s", "idle_timeout": duration(max(s.timeout for s in members))},
    }
    if settings.usage_log:
        # The gateway listener's usage filters look for model usage: nothing to find in MCP answers.
        out["typed_per_filter_config"] = {
            name: typed("envoy.config.route.v3.FilterConfig", disabled=True)
            for name in USAGE_FILTER_NAMES
        }
    if one_message(settings):
        # extproc names the view in dynamic metadata (its answer to the body sets no header), and
        # the route sets the tenant and the list mark from it, after removing whatever of them,
        # and of the client's credential, the client sent (Envoy removes before it adds).
        out["match"] = {
            "prefix": "/",
            "dynamic_metadata": [{"filter": ROUTE_NAMESPACE, "path": [{"key": ROUTE_KEY}], "value": {"string_match": {"exact": route}}}],
        }
        out["request_headers_to_remove"] = ["authorization", "x-api-key", ROUTE_HEADER, TENANT_HEADER, LIST_FILTER_HEADER]
        out["request_headers_to_add"] = [
            # An empty value (no list mark) adds no header.
            {"header": {"key": h, "value": _metadata_value(k)}, "append_action": "OVERWRITE_IF_EXISTS_OR_ADD"}
            for h, k in ((TENANT_HEADER, TENANT_KEY), (LIST_FILTER_HEADER, LIST_KEY))
        ]
        # The answer is the MCP server's (or mcp_router's): nothing for the response filter.
        out["typed_per_filter_config"] = {**out.get("typed_per_filter_config", {}), **NO_RESPONSE_SIDE}
    return out


def _server_route(view: str, s: McpServerSpec, settings: RenderSettings) -> Json:
    """A ``tools/call`` extproc admitted, straight to its server's cluster: no internal listener,
    no ``mcp_router`` (whose part in a call extproc already did: the server, the tool name without
    its prefix, the server's own session from the composite id). The route sends the server its
    session id and puts the client's composite id back on the answer (``crdgol.mcp_contract``)."""
    ep = s.endpoint
    route = server_route(view, s.prefix)
    default_port = 443 if ep.tls else 80
    out: Json = {
        "name": route,
        "match": {"prefix": "/", "headers": [{"name": ROUTE_HEADER, "string_match": {"exact": route}}]},
        "route": {
            "cluster": _cluster_name(view, s),
            "regex_rewrite": {"pattern": {"regex": "^.*$"}, "substitution": s.path},
            "host_rewrite_literal": ep.host if ep.port == default_port else f"{ep.host}:{ep.port}",
            # A tool call may stream for as long as its server's timeout allows.
            "timeout": "0s",
            "idle_timeout": duration(s.timeout),
        },
        "request_headers_to_remove": ["authorization", "x-api-key", TENANT_HEADER, LIST_FILTER_HEADER],
        # The server's own session id never reaches the client: it gets back the id it sent. Nor
        # does a server's challenge for the gateway's credential (a client would answer it).
        "response_headers_to_remove": [SESSION_HEADER, "www-authenticate"],
        "response_headers_to_add": [
            {"header": {"key": SESSION_HEADER, "value": _metadata_value(CLIENT_SESSION_KEY)}, "append_action": "OVERWRITE_IF_EXISTS_OR_ADD"}
        ],
        "typed_per_filter_config": {
            name: typed("envoy.config.route.v3.FilterConfig", disabled=True)
            for name in USAGE_FILTER_NAMES
        }
        if settings.usage_log
        else {},
    }
    if one_message(settings):
        out["match"] = {
            "prefix": "/",
            "dynamic_metadata": [{"filter": ROUTE_NAMESPACE, "path": [{"key": ROUTE_KEY}], "value": {"string_match": {"exact": route}}}],
        }
        # extproc's body answer sets no header: the server's session comes from the metadata,
        # after the client's composite id (and credential, and internal headers) are removed.
        out["request_headers_to_remove"] = [*out["request_headers_to_remove"], ROUTE_HEADER, SESSION_HEADER]
        out["request_headers_to_add"] = [
            {"header": {"key": SESSION_HEADER, "value": _metadata_value(SERVER_SESSION_KEY)}, "append_action": "OVERWRITE_IF_EXISTS_OR_ADD"}
        ]
        out["typed_per_filter_config"] = {**out["typed_per_filter_config"], **NO_RESPONSE_SIDE}
    return out


def _get_route(settings: RenderSettings) -> Json:
    """``GET /mcp`` asks for a standalone server-to-client stream, which the gateway does not
    offer (``mcp_router`` answers GET 405 too): Envoy answers 405 itself, as the MCP transport
    allows a server to, before any ext_proc stream (the SDK clients try it after each
    ``initialize``, and once more a second later). The body is the gateway's local-reply shape."""
    out: Json = {
        "name": "crdgol-mcp-get",
        "match": {"safe_regex": {"regex": f"{MCP_PATH}/?"}, "headers": [{"name": ":method", "string_match": {"exact": "GET"}}]},
        "direct_response": {"status": 405},
        "response_headers_to_add": [{"header": {"key": "allow", "value": "POST, DELETE"}, "append_action": "OVERWRITE_IF_EXISTS_OR_ADD"}],
        "typed_per_filter_config": {"envoy.filters.http.ext_proc": typed("envoy.extensions.filters.http.ext_proc.v3.ExtProcPerRoute", disabled=True)},
    }
    if one_message(settings):
        out["typed_per_filter_config"] = {**out["typed_per_filter_config"], **NO_RESPONSE_SIDE}
    return out


def _body_only_route() -> Json:
    """``POST /mcp`` before extproc has answered: extproc gets the body alone, with the caller's
    credential and content type as request attributes (one message); its answer names the view.
    A request still here at the router was never answered by extproc: it had no body (400)."""
    return {
        "name": "crdgol-mcp",
        "match": {"safe_regex": {"regex": f"{MCP_PATH}/?"}, "headers": [{"name": ":method", "string_match": {"exact": "POST"}}]},
        "direct_response": {"status": 400, "body": {"inline_string": "the request body is empty: send one JSON-RPC message"}},
        "typed_per_filter_config": {"envoy.filters.http.ext_proc": BODY_ONLY, **NO_RESPONSE_SIDE},
    }


def render_mcp(
    specs: Iterable[McpServerSpec],
    secrets: Mapping[str, SecretData],
    settings: RenderSettings,
    resolve: Resolve,
    accepts: Mapping[str, frozenset[str]] | None = None,
) -> McpRender:
    """Every MCPServer that can be served, federated per namespace view; the rest in ``problems``.
    ``accepts``: namespace -> the namespaces whose grants it accepts (``ownership.acceptances``)."""
    accepted_by = accepts or {}
    problems: dict[str, SpecError] = {}
    credentials: dict[str, str] = {}
    ordered = sorted(specs, key=lambda s: s.key)
    ok: list[McpServerSpec] = []
    for s in ordered:
        try:
            credentials[s.key] = _credential(s, secrets, resolve)
        except SpecError as exc:
            problems[s.key] = exc
            continue
        ok.append(s)
    views: dict[str, list[McpServerSpec]] = {}
    for view in sorted({tenancy.namespace_of(p) for s in ok for p in s.tenants}):
        reaching = [
            s
            for s in ok
            if any(tenancy.namespace_of(p) == view for p in s.tenants)
            and (s.namespace == view or {s.namespace, tenancy.WILDCARD} & accepted_by.get(view, frozenset()))
        ]
        # Its own namespace's servers first: no other namespace can take a prefix from its owner.
        reaching.sort(key=lambda s: (s.namespace != view, s.key))
        taken: dict[str, McpServerSpec] = {}
        for s in reaching:
            first = taken.get(s.prefix)
            if first is None:
                taken[s.prefix] = s
            elif s.namespace == view and first.namespace == view:
                problems[s.key] = SpecError(
                    "PrefixConflict", f"spec.toolPrefix: {s.prefix!r} is already used by MCPServer {first.key} in this namespace"
                )
        views[view] = list(taken.values())
    served = {s.key for s in ok if s.key not in problems}
    routes: list[Json] = []
    listeners: list[Json] = []
    clusters: list[Json] = []
    view_pbs: list[pb.McpToolView] = []
    reach: dict[str, list[str]] = {}
    for view, members in views.items():
        members = [s for s in members if s.key in served]
        if not members:
            continue
        routes.extend(_server_route(view, s, settings) for s in members)
        routes.append(_view_route(view, members, settings))
        listeners.append(_view_listener(view, members, settings))
        clusters.append(_view_cluster(view))
        clusters.extend(_server_cluster(view, s, bool(credentials[s.key]), settings) for s in members)
        view_pbs.append(pb.McpToolView(namespace=view, route=view_route(view), servers=[s.key for s in members]))
        for s in members:
            reach.setdefault(s.key, []).append(view)
    if routes:
        routes.append(_get_route(settings))
    if routes and one_message(settings):
        # After the views' routes: a request extproc answered matches its view first.
        routes.append(_body_only_route())
    return McpRender(
        routes=tuple(routes),
        listeners=tuple(listeners),
        clusters=tuple(clusters),
        servers=tuple(_server_pb(s, credentials[s.key]) for s in ok if s.key in served),
        views=tuple(view_pbs),
        problems=problems,
        reach={k: tuple(v) for k, v in reach.items()},
        credentials=tuple((credential_secret(s), credentials[s.key]) for s in ok if s.key in served and credentials[s.key])
        if one_message(settings)
        else (),
    )
