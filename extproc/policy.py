"""The policy extproc enforces: a PolicySnapshot compiled once into frozen lookup tables.

Compilation does every piece of work that does not depend on the request (hashing tables,
JWKS parsing, per-backend header values), so the hot path only does dictionary look-ups.
A ``PolicyHolder`` swaps compiled policies atomically; a snapshot that fails to compile or is not
newer than the current one is refused and the last good policy stays in force.
"""

from __future__ import annotations

import enum
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from crdgol import tenancy
from crdgol.pb import policy_pb2 as pb
from extproc.quota import Limit, Price, Window, normalize_limits
from extproc.quota_store import FailPolicy

if TYPE_CHECKING:
    from extproc.mcp_policy import McpPolicy

log = logging.getLogger(__name__)


class Api(enum.Enum):
    """The wire format a client or a backend speaks."""

    OPENAI = "openai"
    ANTHROPIC = "anthropic"


@dataclass(frozen=True, slots=True)
class ProfileField:
    name: str
    claim: str = ""
    header: str = ""


@dataclass(frozen=True, slots=True)
class HistoryPolicy:
    enabled: bool = False
    max_turns: int = 0
    max_tokens: int = 0
    ttl_seconds: int = 0


@dataclass(frozen=True, slots=True)
class Snippet:
    title: str
    text: str


@dataclass(frozen=True, slots=True)
class McpServer:
    """An MCP server (the real protocol, streamable HTTP) a binding reads context from."""

    name: str
    url: str
    # The credential header, precomputed; () when there is none.
    auth_headers: tuple[tuple[str, str], ...]
    timeout: float  # seconds, per read (connecting included)
    cache_ttl: float  # seconds; 0 = not cached

    @property
    def session_key(self) -> tuple[str, tuple[tuple[str, str], ...]]:
        """Bindings naming the same endpoint with the same credential share one client session."""
        return (self.url, self.auth_headers)

    def __repr__(self) -> str:  # never print the credential
        return f"McpServer(name={self.name!r}, url={self.url!r})"


@dataclass(frozen=True, slots=True)
class McpSource:
    """One read per request from an MCP server: a resource by URI template, or a prompt."""

    server: McpServer
    title: str
    resource_uri: str = ""
    prompt_name: str = ""
    prompt_arguments: tuple[tuple[str, str], ...] = ()
    refuse_on_failure: bool = False
    max_tokens: int = 2000


@dataclass(frozen=True, slots=True)
class ContextPolicy:
    system_template: str = ""
    profile: tuple[ProfileField, ...] = ()
    history: HistoryPolicy = field(default_factory=HistoryPolicy)
    knowledge: tuple[Snippet, ...] = ()
    max_context_tokens: int = 0
    mcp_sources: tuple[McpSource, ...] = ()

    @property
    def active(self) -> bool:
        return bool(self.system_template or self.profile or self.knowledge or self.history.enabled or self.mcp_sources)


@dataclass(frozen=True, slots=True)
class Backend:
    id: str  # stable, for metrics and logs
    api: Api
    model: str
    host: str
    path_prefix: str
    # The header that carries the provider credential, precomputed; () when there is none.
    auth_headers: tuple[tuple[str, str], ...]
    weight: int
    priority: int
    price: Price | None = None
    # The Envoy cluster that reaches it (the id plus the binding's stamp; see policy.proto).
    cluster: str = ""
    tls: bool = False

    def __repr__(self) -> str:  # never print the credential
        return f"Backend(id={self.id!r}, api={self.api.value}, model={self.model!r}, host={self.host!r})"


@dataclass(frozen=True, slots=True)
class QuotaRule:
    limits: tuple[Limit, ...]
    default_max_tokens: int


@dataclass(frozen=True, slots=True)
class QuotaPolicy:
    default: QuotaRule | None = None
    tenants: dict[str, QuotaRule] = field(default_factory=dict)
    fail: FailPolicy = field(default_factory=FailPolicy)

    def rule_for(self, tenant: str) -> QuotaRule | None:
        return self.tenants.get(tenant, self.default)


@dataclass(frozen=True, slots=True)
class CacheRule:
    """A binding's response cache (``extproc.cache``); see ``CachePolicy`` in policy.proto."""

    ttl_seconds: int
    max_entry_bytes: int
    shared: bool = False
    streaming: bool = True
    non_streaming: bool = True
    max_temperature: float | None = None
    semantic: bool = False
    embedding_binding: str = ""  # "namespace/name"
    threshold: float = 0.95
    max_entries: int = 1000


def _cache_rule(c: pb.CachePolicy) -> CacheRule | None:
    if not c.enabled:
        return None
    return CacheRule(
        ttl_seconds=max(1, c.ttl_seconds),
        max_entry_bytes=max(1, c.max_entry_bytes),
        shared=c.shared,
        streaming=c.streaming,
        non_streaming=c.non_streaming,
        max_temperature=c.max_temperature if c.HasField("max_temperature") else None,
        semantic=c.semantic,
        embedding_binding=c.embedding_binding,
        threshold=c.threshold,
        max_entries=max(1, c.max_entries),
    )


@dataclass(frozen=True, slots=True)
class Binding:
    key: str  # "namespace/name"
    model: str
    backends: tuple[Backend, ...]
    # Qualified tenant patterns ("ns/name", "ns/*"), see crdgol.tenancy.
    tenants: frozenset[str]
    context: ContextPolicy
    route: str
    quotas: QuotaPolicy = field(default_factory=QuotaPolicy)
    # The first attempt's backend when it is fixed (the only one at the first priority).
    primary: Backend | None = None
    # The dearest backend's price: what a reservation assumes before Envoy picks the backend.
    max_price: Price | None = None
    cache: CacheRule | None = None

    @property
    def namespace(self) -> str:
        return tenancy.namespace_of(self.key)

    def allows(self, tenant: str) -> bool:
        """Whether the qualified ``tenant`` may call this binding."""
        return tenancy.granted(self.tenants, tenant)


@dataclass(frozen=True, slots=True)
class JwtProvider:
    name: str
    issuer: str
    audiences: tuple[str, ...]
    tenant_claim: str
    hs256_secret: bytes
    jwks_json: str
    # The declaring binding's namespace: its tokens act as tenants of this namespace only.
    namespace: str = ""
    # Where the RS256 keys are fetched from (extproc.jwks), instead of ``jwks_json``.
    jwks_uri: str = ""
    # The keys are found by OIDC discovery from ``issuer`` (extproc.oidc_discovery).
    discovery: bool = False

    def __repr__(self) -> str:
        return f"JwtProvider(name={self.name!r}, issuer={self.issuer!r}, namespace={self.namespace!r})"


@dataclass(frozen=True, slots=True)
class Resolution:
    """Which binding a call reaches and as which tenant (``Policy.resolution``)."""

    binding: Binding | None
    tenant: str  # "": refused (403) when there is a binding
    ambiguous: bool = False  # refused because the caller's namespaces lead to different bindings


@dataclass(frozen=True, slots=True)
class Policy:
    version: int
    # model name -> the bindings serving it (one per namespace at most), by key.
    models: dict[str, tuple[Binding, ...]]
    backends: dict[str, tuple[Binding, Backend]]  # by backend id and by Envoy cluster name
    api_keys: dict[bytes, tuple[str, ...]]  # sha256(key) -> the qualified tenants it acts as
    jwt_providers: dict[str, tuple[JwtProvider, ...]]  # by issuer: one declaration per namespace
    generated_at: float = 0.0
    # MCP tool servers behind /mcp (None: none).
    mcp: McpPolicy | None = None
    bindings: dict[str, Binding] = field(default_factory=dict)  # by key ("namespace/name")
    # Tenants the policy names (API keys, bindings' tenant lists, quota entries): the only ones
    # that get a metrics label of their own (``metric_tenant``).
    known_tenants: frozenset[str] = frozenset()

    @staticmethod
    def empty() -> Policy:
        return Policy(version=0, models={}, backends={}, api_keys={}, jwt_providers={})

    def metric_tenant(self, tenant: str) -> str:
        """``tenant`` as a metrics label: itself when the policy names it, else ``namespace/*``.

        A JWT issuer's owner can sign any tenant claim, and each distinct label value is a new
        series held forever: labels stay bounded by the policy (its tenants and namespaces), never
        by what tokens say. ``*`` never occurs in a tenant name, so the catch-all cannot collide.
        """
        if not tenant or tenant in self.known_tenants:
            return tenant
        return tenancy.qualified(tenancy.namespace_of(tenant), tenancy.WILDCARD)

    def resolve(self, model: str, tenants: tuple[str, ...]) -> tuple[Binding | None, str]:
        """``(binding, tenant)`` of ``resolution``: the binding a caller reaches, and as whom."""
        r = self.resolution(model, tenants)
        return r.binding, r.tenant

    def resolution(self, model: str, tenants: tuple[str, ...]) -> Resolution:
        """The binding a caller acting as one of ``tenants`` reaches for ``model``, and as whom.

        For each of the caller's tenants, a binding of the tenant's own namespace comes first (so
        no other namespace can take a model name from its owner), then one of another namespace
        that grants the tenant. Returns the binding and tenant; tenant "" when the caller's own
        namespace serves the model but not to this tenant (403), or when the call is ambiguous
        (``ambiguous``, 403, below); no binding when nothing the caller may see serves it (404:
        another namespace's models are not revealed).

        A credential that acts in several namespaces (a JWT whose issuer several namespaces
        declare with the same keys) is served only when those namespaces lead it to one binding.
        When they lead to different ones the call is refused (403): a JWKS is public, so any
        namespace can declare the victim's issuer with it, and picking either binding by a rule
        (say, the first namespace by name) would let that namespace receive the victim's requests.
        """
        candidates = self.models.get(model, ())
        if not candidates:
            return Resolution(None, "")
        denied: Binding | None = None
        reached: dict[str, tuple[Binding, str]] = {}  # binding key -> (binding, as which tenant)
        for tenant in tenants:
            own = tenancy.namespace_of(tenant)
            pick: Binding | None = None
            for b in candidates:
                if b.namespace == own:
                    if b.allows(tenant):
                        pick = b
                    else:
                        denied = denied or b
                    break
            if pick is None and not any(b.namespace == own for b in candidates):
                pick = next((b for b in candidates if b.allows(tenant)), None)
            if pick is not None and pick.key not in reached:
                reached[pick.key] = (pick, tenant)
        if len(reached) == 1:
            return Resolution(*next(iter(reached.values())))
        if reached:
            # Ambiguous: refuse rather than choose (see above).
            return Resolution(next(iter(reached.values()))[0], "", ambiguous=True)
        return Resolution(denied, "")

    def visible(self, tenants: tuple[str, ...]) -> list[Binding]:
        """The bindings a caller acting as ``tenants`` reaches, one per model, by model name."""
        out = []
        for model in sorted(self.models):
            binding, tenant = self.resolve(model, tenants)
            if binding is not None and tenant:
                out.append(binding)
        return out


_PROVIDER_API = {
    pb.OPENAI: Api.OPENAI,
    pb.OPENAI_COMPATIBLE: Api.OPENAI,
    pb.ANTHROPIC: Api.ANTHROPIC,
}


def _auth_headers(api: Api, api_key: str) -> tuple[tuple[str, str], ...]:
    if not api_key:
        return ()
    if api is Api.ANTHROPIC:
        return (("x-api-key", api_key),)
    return (("authorization", f"Bearer {api_key}"),)


def _limit(q: pb.QuotaLimit) -> Limit:
    if q.metric == "concurrent":
        return Limit("concurrent", q.amount)
    if q.period_seconds:
        return Limit(q.metric, q.amount, period_seconds=q.period_seconds)
    return Limit(q.metric, q.amount, Window(q.window_seconds))


def _quota_rule(q: pb.Quota) -> QuotaRule:
    return QuotaRule(normalize_limits(_limit(x) for x in q.limits), q.default_max_tokens or 1024)


def quota_policy(q: pb.QuotaPolicy) -> QuotaPolicy:
    """A quota policy as extproc applies it (bindings and MCP tool servers alike)."""
    return _quota_policy(q)


def _quota_policy(q: pb.QuotaPolicy) -> QuotaPolicy:
    return QuotaPolicy(
        default=_quota_rule(q.default_quota) if q.HasField("default_quota") else None,
        tenants={t: _quota_rule(v) for t, v in q.tenants.items()},
        fail=FailPolicy(rate_limits_open=q.rate_limits_fail_open, budgets_open=q.budgets_fail_open),
    )


def _price(be: pb.Backend) -> Price | None:
    if not be.input_per_mtok_micros and not be.output_per_mtok_micros:
        return None
    return Price(be.input_per_mtok_micros, be.output_per_mtok_micros)


def _mcp_sources(key: str, ctx: pb.ContextPolicy) -> tuple[McpSource, ...]:
    servers = {
        s.name: McpServer(
            name=s.name,
            url=s.url,
            auth_headers=((s.auth_header.lower(), s.auth_value),) if s.auth_header and s.auth_value else (),
            timeout=(s.timeout_ms or 1000) / 1000,
            cache_ttl=s.cache_ttl_ms / 1000,
        )
        for s in ctx.mcp_servers
    }
    out = []
    for src in ctx.mcp_sources:
        server = servers.get(src.server)
        if server is None:
            raise ValueError(f"binding {key}: an MCP source names the undeclared server {src.server!r}")
        out.append(
            McpSource(
                server=server,
                title=src.title,
                resource_uri=src.resource_uri,
                prompt_name=src.prompt_name,
                prompt_arguments=tuple(sorted(src.prompt_arguments.items())),
                refuse_on_failure=src.refuse_on_failure,
                max_tokens=src.max_tokens or 2000,
            )
        )
    return tuple(out)


def compile_policy(snap: pb.PolicySnapshot) -> Policy:
    """Compile a snapshot into lookup tables. Raises ValueError on an inconsistent snapshot."""
    bindings: dict[str, Binding] = {}
    models: dict[str, list[Binding]] = {}
    backends: dict[str, tuple[Binding, Backend]] = {}
    for b in snap.bindings:
        if b.key in bindings:
            raise ValueError(f"binding {b.key} appears twice")
        if any(tenancy.namespace_of(o.key) == tenancy.namespace_of(b.key) for o in models.get(b.model, ())):
            raise ValueError(f"model {b.model!r} is served twice in the namespace of {b.key}")
        if not b.backends:
            raise ValueError(f"binding {b.key} has no backends")
        ctx = b.context
        context = ContextPolicy(
            system_template=ctx.system_template,
            profile=tuple(
                ProfileField(f.name, claim=f.claim, header=f.header.lower()) for f in ctx.profile
            ),
            history=HistoryPolicy(
                enabled=ctx.history.enabled,
                max_turns=ctx.history.max_turns,
                max_tokens=ctx.history.max_tokens,
                ttl_seconds=ctx.history.ttl_seconds,
            ),
            knowledge=tuple(Snippet(s.title, s.text) for s in ctx.knowledge),
            max_context_tokens=ctx.max_context_tokens,
            mcp_sources=_mcp_sources(b.key, ctx),
        )
        compiled_backends = []
        direct = [be.id for be in b.backends if be.direct]
        for be in b.backends:
            api = _PROVIDER_API.get(be.provider)
            if api is None:
                raise ValueError(f"backend {be.id} of {b.key} has no provider")
            compiled_backends.append(
                Backend(
                    id=be.id,
                    api=api,
                    model=be.model,
                    host=be.host,
                    path_prefix=be.path_prefix.rstrip("/"),
                    auth_headers=_auth_headers(api, be.api_key),
                    weight=be.weight or 1,
                    priority=be.priority,
                    price=_price(be),
                    cluster=be.cluster or be.id,
                    tls=be.tls,
                )
            )
        prices = [be_c.price for be_c in compiled_backends if be_c.price is not None]
        try:
            quotas = _quota_policy(b.quotas)
        except ValueError as exc:
            raise ValueError(f"binding {b.key}: {exc}") from None
        binding = Binding(
            key=b.key,
            model=b.model,
            backends=tuple(compiled_backends),
            tenants=frozenset(b.tenants),
            context=context,
            route=b.route,
            quotas=quotas,
            primary=next((c for c in compiled_backends if c.id in direct), None),
            max_price=Price(
                max(p.input_per_mtok_micros for p in prices), max(p.output_per_mtok_micros for p in prices)
            )
            if prices
            else None,
            cache=_cache_rule(b.cache),
        )
        bindings[b.key] = binding
        models.setdefault(b.model, []).append(binding)
        for be_c in compiled_backends:
            backends[be_c.id] = backends[be_c.cluster] = (binding, be_c)
    api_keys: dict[bytes, tuple[str, ...]] = {}
    for k in snap.api_keys:
        if tenancy.SEPARATOR not in k.tenant:
            raise ValueError(f"API key from {k.source} names no namespace for its tenant")
        api_keys[k.sha256] = (*api_keys.get(k.sha256, ()), k.tenant)
    providers: dict[str, tuple[JwtProvider, ...]] = {}
    for p in snap.jwt_providers:
        if not p.namespace:
            raise ValueError(f"JWT issuer {p.issuer!r} names no namespace for its tenants")
        provider = JwtProvider(
            name=p.name,
            issuer=p.issuer,
            audiences=tuple(p.audiences),
            tenant_claim=p.tenant_claim or "tenant",
            hs256_secret=p.hs256_secret,
            jwks_json=p.jwks_json,
            namespace=p.namespace,
            jwks_uri=p.jwks_uri,
            discovery=p.discovery,
        )
        providers[p.issuer] = (*providers.get(p.issuer, ()), provider)
    return Policy(
        version=snap.version,
        models={m: tuple(sorted(bs, key=lambda b: b.key)) for m, bs in models.items()},
        backends=backends,
        api_keys=api_keys,
        jwt_providers=providers,
        generated_at=float(snap.generated_at or time.time()),
        mcp=_compile_mcp(snap),
        bindings=bindings,
        known_tenants=frozenset(
            t
            for t in (
                *(t for ts in api_keys.values() for t in ts),
                *(t for b in bindings.values() for t in b.tenants),
                *(t for b in bindings.values() for t in b.quotas.tenants),
            )
            if not t.endswith(tenancy.SEPARATOR + tenancy.WILDCARD)
        ),
    )


def _compile_mcp(snap: pb.PolicySnapshot) -> McpPolicy:
    from extproc.mcp_policy import compile_mcp  # it builds on this module's quota policy

    return compile_mcp(snap)


class PolicyHolder:
    """Holds the policy in force. Reads are a plain attribute load; updates swap it whole."""

    def __init__(self, policy: Policy | None = None) -> None:
        self.current = policy or Policy.empty()
        # The policy before the current one: attempts Envoy routed under it may still be running
        # (the controller keeps its routes in Envoy until every extproc has the new policy).
        self.previous = self.current
        # Called with each policy that comes into force (extproc.mcp_sources prepares its client).
        self.on_change: list[Callable[[Policy], None]] = []

    def backend(self, name: str) -> tuple[Binding, Backend] | None:
        """A backend by id or Envoy cluster name, in the current policy or the one before."""
        return self.current.backends.get(name) or self.previous.backends.get(name)

    def offer(self, snap: pb.PolicySnapshot) -> bool:
        """Install ``snap`` if it is newer and compiles; keep the last good policy otherwise."""
        if snap.version <= self.current.version:
            log.info("ignoring policy version %d (have %d)", snap.version, self.current.version)
            return False
        try:
            compiled = compile_policy(snap)
        except ValueError as exc:
            log.error("refusing policy version %d: %s (keeping %d)", snap.version, exc, self.current.version)
            return False
        self.previous, self.current = self.current, compiled
        log.info("policy version %d in force: %d models", compiled.version, len(compiled.models))
        for listener in self.on_change:
            listener(compiled)
        return True
