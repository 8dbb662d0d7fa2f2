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
* credentials never appear in the Envoy resources: they travel only in the policy snapshot.

The Envoy resources themselves are built by ``controller.envoy_config``; this module assembles
them with the policy snapshot and caches each binding's share (``RenderCache``).
"""

from __future__ import annotations

import gc
import hashlib
from collections.abc import Hashable, Iterable, Mapping
from dataclasses import dataclass, field, replace

from controller.envoy_config import (
    CA_BUNDLE,
    EXTPROC_CLUSTER,
    ROUTE_HEADER,
    Json,
    RenderSettings,
    ads_bootstrap,
    backend_cluster,
    backend_id,
    binding_route,
    direct_backend,
    extproc_cluster,
    listener,
    overload_manager,
    route_id,
    socket_address,
)
from controller.models import BindingSpec, QuotaSpec, SecretData, SecretRef, SpecError
from crdgol.pb import policy_pb2 as pb

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
    # Bindings that could not be served, by "namespace/name", with the reason.
    problems: dict[str, SpecError] = field(default_factory=dict)
    accepted: tuple[str, ...] = ()


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


def render(
    bindings: Iterable[BindingSpec],
    secrets: Iterable[SecretData],
    settings: RenderSettings,
    cache: RenderCache | None = None,
    extras: EnvoyExtras | None = None,
) -> RenderResult:
    """Render every binding that can be served; the rest are reported in ``problems``."""
    # The render allocates hundreds of thousands of small objects and frees none of them: the
    # cyclic garbage collector would only re-scan them (a third of the time at 5,000 bindings).
    enabled = gc.isenabled()
    gc.disable()
    try:
        return _render(bindings, secrets, settings, cache, extras or EnvoyExtras())
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
        route=binding_route(b),
        clusters=tuple(backend_cluster(b, be, settings, direct=be is direct) for be in b.backends),
    )


def _render(
    bindings: Iterable[BindingSpec],
    secrets: Iterable[SecretData],
    settings: RenderSettings,
    cache: RenderCache | None = None,
    extras: EnvoyExtras = EnvoyExtras(),
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
    clusters: list[Json] = list(extras.clusters)
    routes = list(extras.routes)
    for _, pieces in served:
        routes.append(pieces.route)
        clusters.extend(pieces.clusters)
    listeners = [listener(settings, routes), *extras.listeners]
    envoy: Json = {
        "node": {"id": "crdgol-gateway", "cluster": "crdgol"},
        "admin": {"address": socket_address("127.0.0.1", settings.admin_port)},
        "overload_manager": overload_manager(settings.max_connections),
        "static_resources": {"listeners": listeners, "clusters": [extproc_cluster(settings), *clusters]},
    }
    return RenderResult(
        envoy=envoy,
        snapshot=snapshot,
        listeners=tuple(listeners),
        clusters=tuple(clusters),
        problems=problems,
        accepted=tuple(b.key for b, _ in served),
    )

__all__ = ["CA_BUNDLE", "EXTPROC_CLUSTER", "ROUTE_HEADER", "EnvoyExtras", "RenderCache", "RenderResult", "RenderSettings", "ads_bootstrap", "render"]
