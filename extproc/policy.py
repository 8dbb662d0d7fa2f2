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
from dataclasses import dataclass, field

from crdgol.pb import policy_pb2 as pb
from extproc.quota import Limit, Price, Window, normalize_limits
from extproc.quota_store import FailPolicy

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
class ContextPolicy:
    system_template: str = ""
    profile: tuple[ProfileField, ...] = ()
    history: HistoryPolicy = field(default_factory=HistoryPolicy)
    knowledge: tuple[Snippet, ...] = ()
    max_context_tokens: int = 0

    @property
    def active(self) -> bool:
        return bool(self.system_template or self.profile or self.knowledge or self.history.enabled)


@dataclass(frozen=True, slots=True)
class Backend:
    id: str
    api: Api
    model: str
    host: str
    path_prefix: str
    # The header that carries the provider credential, precomputed; () when there is none.
    auth_headers: tuple[tuple[str, str], ...]
    weight: int
    priority: int
    price: Price | None = None

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
class Binding:
    key: str
    model: str
    backends: tuple[Backend, ...]
    tenants: frozenset[str]
    context: ContextPolicy
    route: str
    quotas: QuotaPolicy = field(default_factory=QuotaPolicy)
    # The first attempt's backend when it is fixed (the only one at the first priority).
    primary: Backend | None = None
    # The dearest backend's price: what a reservation assumes before Envoy picks the backend.
    max_price: Price | None = None

    def allows(self, tenant: str) -> bool:
        return not self.tenants or tenant in self.tenants


@dataclass(frozen=True, slots=True)
class JwtProvider:
    name: str
    issuer: str
    audiences: tuple[str, ...]
    tenant_claim: str
    hs256_secret: bytes
    jwks_json: str

    def __repr__(self) -> str:
        return f"JwtProvider(name={self.name!r}, issuer={self.issuer!r})"


@dataclass(frozen=True, slots=True)
class Policy:
    version: int
    bindings: dict[str, Binding]  # by model name
    backends: dict[str, tuple[Binding, Backend]]  # by backend id
    api_keys: dict[bytes, str]  # sha256(key) -> tenant
    jwt_providers: dict[str, JwtProvider]  # by issuer
    generated_at: float = 0.0

    @staticmethod
    def empty() -> Policy:
        return Policy(version=0, bindings={}, backends={}, api_keys={}, jwt_providers={})


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


def compile_policy(snap: pb.PolicySnapshot) -> Policy:
    """Compile a snapshot into lookup tables. Raises ValueError on an inconsistent snapshot."""
    bindings: dict[str, Binding] = {}
    backends: dict[str, tuple[Binding, Backend]] = {}
    for b in snap.bindings:
        if b.model in bindings:
            raise ValueError(f"model {b.model!r} is claimed by {bindings[b.model].key} and {b.key}")
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
        )
        bindings[b.model] = binding
        for be_c in compiled_backends:
            backends[be_c.id] = (binding, be_c)
    api_keys = {k.sha256: k.tenant for k in snap.api_keys}
    providers = {
        p.issuer: JwtProvider(
            name=p.name,
            issuer=p.issuer,
            audiences=tuple(p.audiences),
            tenant_claim=p.tenant_claim or "tenant",
            hs256_secret=p.hs256_secret,
            jwks_json=p.jwks_json,
        )
        for p in snap.jwt_providers
    }
    return Policy(
        version=snap.version,
        bindings=bindings,
        backends=backends,
        api_keys=api_keys,
        jwt_providers=providers,
        generated_at=float(snap.generated_at or time.time()),
    )


class PolicyHolder:
    """Holds the policy in force. Reads are a plain attribute load; updates swap it whole."""

    def __init__(self, policy: Policy | None = None) -> None:
        self.current = policy or Policy.empty()

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
        self.current = compiled
        log.info("policy version %d in force: %d bindings", compiled.version, len(compiled.bindings))
        return True
