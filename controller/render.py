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
* every backend cluster a fallback can reach runs an *upstream* ``ext_proc`` filter per attempt,
  told which backend it is by gRPC initial metadata, which rewrites the model name, swaps in the
  provider credential and translates between the OpenAI and Anthropic APIs; a binding's single
  first-priority backend is rewritten by the downstream filter instead.
* credentials never appear in the Envoy config: they travel in the policy snapshot (for the
  fallback attempts' filters) and, for a binding's first backend on the one-message path
  (``crdgol.request_path``), as SDS secrets (``RenderResult.secrets``) that the controller serves
  over the authenticated ADS stream or ``crdgol render`` writes to 0600 files.

The Envoy resources themselves are built by ``controller.envoy_config``; this module assembles
them with the policy snapshot and caches each binding's share (``RenderCache``).
"""

from __future__ import annotations

import gc
import hashlib
from collections.abc import Hashable, Iterable, Mapping
from dataclasses import dataclass, field, replace

from controller.bootstrap import ads_bootstrap
from controller.cache_spec import cache_pb
from controller.cache_spec import check_references as check_cache_references
from controller.context_sources import McpSourceSpec
from controller.envoy_config import (
    CA_BUNDLE,
    EXTPROC_CLUSTER,
    Json,
    RenderSettings,
    backend_cluster,
    backend_id,
    binding_route,
    binding_stamp,
    cluster_name,
    direct_backend,
    extproc_cluster,
    listener,
    overload_manager,
    route_id,
    socket_address,
)
from controller.mcp_render import INTERNAL_LISTENER_EXTENSION, McpRender, render_mcp
from controller.mcp_servers import McpServerSpec
from controller.models import (
    SHARE_ANNOTATION,
    SHARE_HOSTS_ANNOTATION,
    TENANT_ANNOTATION,
    BackendSpec,
    BindingSpec,
    Endpoint,
    SecretData,
    SecretRef,
    SpecError,
)
from controller.native_path import (
    binding_fields,
    lua_program,
    native_binding,
    native_route,
    versioned,
)
from controller.native_path import enabled as native_enabled
from controller.one_message import credential_value, metadata_routes, one_message
from controller.ownership import Claims, acceptances, grant_not_accepted, unaccepted
from controller.quota_specs import QuotaSpec
from controller.tracing_config import collector_cluster
from crdgol import tenancy
from crdgol.pb import policy_pb2 as pb
from crdgol.request_path import ROUTE_HEADER, credential_secret

_PROVIDER = {"openai": pb.OPENAI, "anthropic": pb.ANTHROPIC, "openai-compatible": pb.OPENAI_COMPATIBLE}


@dataclass(frozen=True, slots=True)
class EnvoyExtras:
    """Resources other parts of the controller add (the workflow engine's egress listener and its
    run API route): routes go on the gateway listener ahead of the bindings'."""

    routes: tuple[Json, ...] = ()
    listeners: tuple[Json, ...] = ()
    clusters: tuple[Json, ...] = ()


@dataclass(frozen=True, slots=True)
class RenderResult:
    envoy: Json  # a complete static bootstrap (what `crdgol render` prints)
    snapshot: pb.PolicySnapshot
    # The same resources, for xDS: what the ADS server hands Envoy (the extproc cluster is in the
    # bootstrap instead, see ``ads_bootstrap``).
    listeners: tuple[Json, ...] = ()
    clusters: tuple[Json, ...] = ()
    # The bindings' routes (also inside ``listeners``), so the controller can build a listener that
    # keeps the previous version's routes while extproc catches up (``controller.app``).
    routes: tuple[Json, ...] = ()
    # Bindings that could not be served, by "namespace/name", with the reason.
    problems: dict[str, SpecError] = field(default_factory=dict)
    accepted: tuple[str, ...] = ()
    # Other sources that contribute nothing, by "Kind namespace/name" (an API-key Secret whose
    # tenant annotation is not a tenant name), with what is wrong.
    source_problems: dict[str, str] = field(default_factory=dict)
    # MCPServers: their Envoy resources (also in ``listeners``/``clusters``/``routes``), problems
    # and the namespaces that reach each (controller.mcp_render).
    mcp: McpRender = field(default_factory=McpRender)
    # Served bindings whose grant to some other namespace is not in force (not accepted there).
    grant_problems: dict[str, SpecError] = field(default_factory=dict)
    # SDS ``Secret`` resources (provider credentials Envoy injects): served over ADS or written
    # to 0600 files, never part of ``envoy``; kept out of repr.
    secrets: tuple[Json, ...] = field(default=(), repr=False)
    # Header names context profiles read: the listener sends them to extproc with the body.
    profile_headers: tuple[str, ...] = ()
    # The native path's Lua program and tables ("": off), served over ECDS with its version
    # (controller.native_path.versioned).
    native: str = field(default="", repr=False)
    # Each served binding's backends as (name, Envoy cluster), for their health in its status
    # (read from here, not from ``snapshot``: a fresh snapshot's first read costs ~0.2 s at 5,000).
    backend_clusters: dict[str, tuple[tuple[str, str], ...]] = field(default_factory=dict)


_SECRET_TYPE = "type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.Secret"


def sds_secret(name: str, value: str) -> Json:
    """An SDS generic secret (the credential injector's header value)."""
    return {"@type": _SECRET_TYPE, "name": name, "generic_secret": {"secret": {"inline_string": value}}}


def _resolve(ref: SecretRef, secrets: Mapping[str, SecretData], what: str, namespace: str, endpoint: Endpoint | None = None) -> str:
    """The value a binding of ``namespace`` reads from a Secret it names (a provider credential
    when ``endpoint`` is where it will be sent)."""
    secret = secrets.get(f"{ref.namespace}/{ref.name}")
    if secret is None:
        raise SpecError("SecretNotFound", f"{what}: Secret {ref.namespace}/{ref.name} does not exist")
    if not secret.shared_with(namespace):
        raise SpecError(
            "CrossNamespaceReference",
            f"{what}: Secret {ref.namespace}/{ref.name} is not shared with namespace {namespace}; its owner "
            f"may annotate it {SHARE_ANNOTATION}: {namespace}",
        )
    if endpoint is not None and not secret.may_reach(namespace, endpoint):
        raise SpecError(
            "CrossNamespaceReference",
            f"{what}: Secret {ref.namespace}/{ref.name} is shared with namespace {namespace}, but not for host "
            f"{endpoint.host}:{endpoint.port}; its owner may list the hosts its credential may be sent to in "
            f"{SHARE_HOSTS_ANNOTATION}",
        )
    value = secret.data.get(ref.key)
    if not value:
        raise SpecError("SecretKeyNotFound", f"{what}: Secret {ref.namespace}/{ref.name} has no key {ref.key!r}")
    return value


def _binding_pb(b: BindingSpec, secrets: Mapping[str, SecretData], stamp: str, direct: BackendSpec | None) -> pb.Binding:
    backends = []
    for i, be in enumerate(b.backends):
        what = f"spec.backends[{i}].credentialsRef"
        key = _resolve(be.credentials, secrets, what, b.namespace, be.endpoint) if be.credentials else ""
        host = be.endpoint.host
        default_port = 443 if be.endpoint.tls else 80
        if be.endpoint.port != default_port:
            host = f"{host}:{be.endpoint.port}"
        backends.append(
            pb.Backend(
                id=backend_id(b, be),
                cluster=cluster_name(b, be, stamp),
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
                tls=be.endpoint.tls,
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
        mcp_servers=_mcp_servers_pb(b, secrets),
        mcp_sources=[_mcp_source_pb(src) for src in c.mcp.sources],
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
        route=route_id(b, stamp),
        quotas=quotas,
        cache=cache_pb(b),
    )


def _mcp_servers_pb(b: BindingSpec, secrets: Mapping[str, SecretData]) -> list[pb.McpServer]:
    """The binding's MCP servers, each credential resolved here: it travels in the snapshot only."""
    out = []
    for i, srv in enumerate(b.context.mcp.servers):
        header = value = ""
        if srv.credentials is not None:
            ref = SecretRef(srv.credentials.name, srv.credentials.key, srv.credentials.namespace)
            where = Endpoint("https", srv.host, srv.port, "")
            value = _resolve(ref, secrets, f"spec.context.mcpServers[{i}].credentialsRef", b.namespace, where)
            header = srv.credentials_header
            if header == "authorization":
                value = f"Bearer {value}"
        out.append(
            pb.McpServer(
                name=srv.name,
                url=srv.url,
                auth_header=header,
                auth_value=value,
                timeout_ms=max(1, round(srv.timeout * 1000)),
                cache_ttl_ms=round(srv.cache_ttl * 1000),
            )
        )
    return out


def _mcp_source_pb(src: McpSourceSpec) -> pb.McpSource:
    out = pb.McpSource(
        server=src.server,
        title=src.title,
        prompt_arguments=dict(src.arguments),
        refuse_on_failure=src.refuse_on_failure,
        max_tokens=src.max_tokens,
    )
    if src.resource:
        out.resource_uri = src.resource
    else:
        out.prompt_name = src.prompt
    return out


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
        secret = _resolve(j.hs256_secret, secrets, f"spec.auth.jwt[{i}].hs256SecretRef", b.namespace) if j.hs256_secret else ""
        out.append(
            pb.JwtProvider(
                name=j.name,
                issuer=j.issuer,
                audiences=list(j.audiences),
                tenant_claim=j.tenant_claim,
                hs256_secret=secret.encode(),
                jwks_json=j.jwks,
                namespace=b.namespace,
                jwks_uri=j.jwks_uri,
                discovery=j.discovery,
            )
        )
    return out


def _api_keys(secrets: Iterable[SecretData], problems: dict[str, str]) -> list[pb.ApiKey]:
    """API keys, each acting as a tenant of its Secret's own namespace (``crdgol.tenancy``)."""
    keys = []
    for s in secrets:
        if not s.is_api_key:
            continue
        name = s.annotations.get(TENANT_ANNOTATION) or s.labels.get(TENANT_ANNOTATION) or s.name
        if not tenancy.valid_name(name):
            # A tenant name cannot carry a namespace: "other/quickstart" would be another
            # namespace's tenant, which only that namespace's Secrets may name.
            problems[f"Secret {s.key}"] = (
                f"{TENANT_ANNOTATION} {name!r} is not a tenant name (letters, digits and ._@:+=-, no '/'): "
                "its keys are not loaded; a key acts as a tenant of its Secret's own namespace"
            )
            continue
        tenant = tenancy.qualified(s.namespace, name)
        for value in s.data.values():
            if value:
                keys.append(pb.ApiKey(sha256=hashlib.sha256(value.encode()).digest(), tenant=tenant, source=s.key))
    keys.sort(key=lambda k: (k.source, k.sha256))
    return keys


# --- Envoy resources -------------------------------------------------------------------------


def render(
    bindings: Iterable[BindingSpec],
    secrets: Iterable[SecretData],
    settings: RenderSettings,
    cache: RenderCache | None = None,
    extras: EnvoyExtras | None = None,
    mcp_servers: Iterable[McpServerSpec] = (),
) -> RenderResult:
    """Render every binding (and MCPServer) that can be served; the rest are reported in
    ``problems`` (``mcp.problems``)."""
    # The render allocates hundreds of thousands of small objects and frees none of them: the
    # cyclic garbage collector would only re-scan them (a third of the time at 5,000 bindings).
    enabled = gc.isenabled()
    gc.disable()
    try:
        return _render(bindings, secrets, settings, cache, extras or EnvoyExtras(), mcp_servers)
    finally:
        if enabled:
            gc.enable()


@dataclass(frozen=True, slots=True)
class _Pieces:
    """Everything one binding contributes to a render."""

    spec: BindingSpec
    binding: pb.Binding
    jwts: tuple[pb.JwtProvider, ...]
    routes: tuple[Json, ...]
    clusters: tuple[Json, ...]
    secrets: tuple[Json, ...]
    foreign: frozenset[str]  # other namespaces it grants tenants of (controller.ownership)
    native: str = ""  # its record in the native path's table (native_path.binding_fields)


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


def _secret_values(b: BindingSpec, secrets: Mapping[str, SecretData]) -> tuple[tuple[str | None, bool, frozenset[str]], ...]:
    """What a binding's cached render depends on: each named Secret value, whether it may use it,
    and the hosts its owner lets it reach."""
    refs = b.secret_refs()
    out: list[tuple[str | None, bool, frozenset[str]]] = []
    for ref in refs:
        secret = secrets.get(f"{ref.namespace}/{ref.name}") if ref is not None else None
        if secret is None or ref is None:
            out.append((None, False, frozenset()))
        else:
            out.append((secret.data.get(ref.key), secret.shared_with(b.namespace), secret.share_hosts))
    return tuple(out)


def _pieces(b: BindingSpec, secrets: Mapping[str, SecretData], settings: RenderSettings) -> _Pieces:
    direct = direct_backend(b)
    stamp = binding_stamp(b, direct)
    binding = _binding_pb(b, secrets, stamp, direct)
    lean = one_message(settings)
    injected = tuple(
        sds_secret(credential_secret(be_pb.id), credential_value(be, be_pb.api_key))
        for be, be_pb in zip(b.backends, binding.backends, strict=True)
        if lean and be is direct and be.credentials and be_pb.api_key
    )
    routes = tuple(metadata_routes(binding_route(b, stamp), direct)) if lean else (binding_route(b, stamp),)
    if lean and native_enabled(settings) and native_binding(binding):
        routes = (*routes, native_route(routes[0], binding))  # beside the plain route
    return _Pieces(
        spec=b,
        binding=binding,
        jwts=tuple(_jwt_pb(b, secrets)),
        routes=routes,
        clusters=tuple(backend_cluster(b, be, settings, stamp, direct=be is direct) for be in b.backends),
        secrets=injected,
        foreign=tenancy.foreign_namespaces(b.tenants, b.namespace),
        native=binding_fields(binding) if native_enabled(settings) else "",
    )


def _render(
    bindings: Iterable[BindingSpec],
    secrets: Iterable[SecretData],
    settings: RenderSettings,
    cache: RenderCache | None = None,
    extras: EnvoyExtras = EnvoyExtras(),
    mcp_servers: Iterable[McpServerSpec] = (),
) -> RenderResult:
    secret_map = {s.key: s for s in secrets}
    problems: dict[str, SpecError] = {}
    grant_problems: dict[str, SpecError] = {}
    served: list[tuple[BindingSpec, _Pieces]] = []
    claims = Claims()
    # Per-binding pieces do not depend on the version or the timestamp.
    stable = replace(settings, version=0, generated_at=0)
    ordered = sorted(bindings, key=lambda b: b.key)
    accepts = acceptances(ordered, secret_map.values())
    by_key = {b.key: b for b in ordered}
    for b in ordered:
        try:
            check_cache_references(b, by_key)  # the only check that reads other bindings
        except SpecError as exc:
            problems[b.key] = exc
            continue
        key = (id(b), _secret_values(b, secret_map), stable)
        pieces = cache.get(key, b) if cache is not None else None
        if pieces is None:
            try:
                pieces = _pieces(b, secret_map, settings)
            except SpecError as exc:
                problems[b.key] = exc
                continue
            except (ValueError, TypeError, OverflowError) as exc:
                # A value the parser let through but the snapshot or Envoy cannot hold: this
                # binding is refused; the others (every other namespace's) are still served.
                # The message names the error type only: protobuf's text may quote a value.
                problems[b.key] = SpecError(
                    "InvalidSpec", f"the spec could not be rendered ({type(exc).__name__}): a value is out of range"
                )
                continue
            if cache is not None:
                cache.put(key, pieces)
        refused = unaccepted(b, pieces.foreign, accepts) if pieces.foreign else frozenset()
        if refused:
            grant_problems[b.key] = grant_not_accepted(b, refused)
            pieces = _without_grants(pieces, refused)
        conflict = claims.check(b, pieces.jwts, pieces.foreign)
        if conflict is not None:
            problems[b.key] = conflict
            continue
        claims.admit(b, pieces.jwts, pieces.foreign)
        served.append((b, pieces))
    if cache is not None:
        cache.finish()

    source_problems: dict[str, str] = {}
    snapshot = pb.PolicySnapshot(
        version=settings.version,
        generated_at=settings.generated_at,
        bindings=[p.binding for _, p in served],
        api_keys=_api_keys((secret_map[k] for k in sorted(secret_map)), source_problems),
        jwt_providers=claims.providers(),
    )
    mcp = render_mcp(mcp_servers, secret_map, settings, _resolve, accepts)
    snapshot.mcp_tool_servers.extend(mcp.servers)
    snapshot.mcp_tool_views.extend(mcp.views)
    clusters: list[Json] = [*extras.clusters, *mcp.clusters]
    if settings.tracing.enabled:
        clusters.append(collector_cluster(settings.tracing, settings.ca_bundle))
    routes = [*extras.routes, *mcp.routes]
    injected: list[Json] = []
    for _, pieces in served:
        routes.extend(pieces.routes)
        clusters.extend(pieces.clusters)
        injected.extend(pieces.secrets)
    injected.extend(sds_secret(name, value) for name, value in mcp.credentials)
    profile_headers = tuple(sorted({p.header.lower() for b, _ in served for p in b.context.profile if p.header}))
    cached = {p.binding.key: p.native for _, p in served}
    native = lua_program(snapshot, settings, lambda b: cached[b.key]) if native_enabled(settings) else ""
    gateway = replace(settings, profile_headers=profile_headers)
    listeners = [listener(gateway, routes, native=native), *extras.listeners, *mcp.listeners]
    # The static config's program also knows its policy version (``native_path.versioned``).
    static = [listener(gateway, routes, native=versioned(native, settings.version)), *listeners[1:]] if native else listeners
    envoy: Json = {
        "node": {"id": "crdgol-gateway", "cluster": "crdgol"},
        "admin": {"address": socket_address("127.0.0.1", settings.admin_port)},
        "overload_manager": overload_manager(settings.max_connections),
        "static_resources": {"listeners": static, "clusters": [extproc_cluster(settings), *clusters]},
    }
    if mcp.listeners:
        # MCP views run on internal listeners (controller.mcp_render).
        envoy["bootstrap_extensions"] = [INTERNAL_LISTENER_EXTENSION]
    return RenderResult(
        envoy=envoy,
        snapshot=snapshot,
        listeners=tuple(listeners),
        clusters=tuple(clusters),
        routes=tuple(routes),
        problems=problems,
        accepted=tuple(b.key for b, _ in served),
        source_problems=source_problems,
        mcp=mcp,
        grant_problems=grant_problems,
        secrets=tuple(injected),
        profile_headers=profile_headers,
        native=native,
        backend_clusters={b.key: tuple(zip((be.name for be in b.backends), (c["name"] for c in p.clusters), strict=True)) for b, p in served},
    )


def _without_grants(pieces: _Pieces, refused: frozenset[str]) -> _Pieces:
    """``pieces`` minus the tenant patterns of the ``refused`` namespaces (a copy: cached pieces
    are shared, and the refusal depends on other namespaces' resources)."""
    served = pb.Binding()
    served.CopyFrom(pieces.binding)
    del served.tenants[:]
    served.tenants.extend(t for t in pieces.binding.tenants if tenancy.namespace_of(t) not in refused)
    return replace(pieces, binding=served, foreign=pieces.foreign - refused)


__all__ = ["CA_BUNDLE", "EXTPROC_CLUSTER", "ROUTE_HEADER", "EnvoyExtras", "RenderCache", "RenderResult", "RenderSettings", "ads_bootstrap", "render"]
