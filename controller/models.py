"""Typed models of the resources crdgol reads, parsed from plain manifests at the edge.

``parse_binding`` turns an AIModelBinding object (as kubectl or a YAML file gives it) into a
frozen ``BindingSpec`` or raises ``SpecError`` whose ``reason`` becomes the status condition
reason and whose message says what to fix. Secrets are parsed into ``SecretData`` and never
printed.
"""

from __future__ import annotations

import base64
import difflib
import re
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlsplit

from controller.cache_spec import CacheSpec, parse_cache
from controller.context_sources import McpSpec, parse_mcp
from controller.fields import binding_problems
from controller.health import HealthSpec, parse_health
from controller.quota_specs import (
    QuotasSpec,
    parse_money,
    parse_quotas,
    parse_tenant,
)
from controller.spec_parsing import SpecError as SpecError  # re-exported: every parser raises it
from controller.spec_parsing import as_dict as _dict
from controller.spec_parsing import as_list as _list
from controller.spec_parsing import int_in as _int
from controller.spec_parsing import parse_duration as parse_duration
from crdgol import tenancy
from crdgol.jwks_url import discovery_issuer_problem, jwks_url_problem

GROUP = "crdgol.io"
VERSION = "v1alpha1"
API_VERSION = f"{GROUP}/{VERSION}"
KINDS = ("AIModelBinding", "WorkflowSpec", "WorkflowRun", "MCPServer")  # every kind of the crdgol.io group

API_KEY_LABEL = "crdgol.io/api-key"
TENANT_ANNOTATION = "crdgol.io/tenant"
# On a Secret: the namespaces (comma-separated, or "*") whose bindings may reference it. Without it a
# Secret serves its own namespace's bindings only (the owner of a provider account says who spends it).
SHARE_ANNOTATION = "crdgol.io/share-with"
# On a shared Secret: the hosts (``host`` or ``host:port``, comma-separated) other namespaces'
# backends may send its credential to. Sharing lets them spend the account; without this list a
# borrower could point its endpoint at its own server and read the key from the request.
SHARE_HOSTS_ANNOTATION = "crdgol.io/share-hosts"
# On an API-key Secret or an AIModelBinding: the namespaces (comma-separated, or "*") whose
# bindings may serve this namespace's tenants. A binding's grant to another namespace's tenants
# is in force only once that namespace accepts it this way (controller.ownership).
ACCEPT_ANNOTATION = "crdgol.io/accept-from"

PROVIDERS = ("openai", "anthropic", "openai-compatible")
RETRY_CONDITIONS = ("connect-failure", "5xx", "429", "reset", "timeout")
_NAME = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$")
_MODEL = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._:/-]{0,127}$")


@dataclass(frozen=True, slots=True)
class SecretRef:
    name: str
    key: str
    namespace: str


@dataclass(frozen=True, slots=True)
class Endpoint:
    scheme: str
    host: str
    port: int
    path_prefix: str

    @property
    def tls(self) -> bool:
        return self.scheme == "https"


@dataclass(frozen=True, slots=True)
class PricingSpec:
    # Micro-units of the currency per million tokens.
    input_per_mtok_micros: int = 0
    output_per_mtok_micros: int = 0


@dataclass(frozen=True, slots=True)
class BackendSpec:
    name: str
    provider: str
    endpoint: Endpoint
    model: str
    credentials: SecretRef | None
    weight: int
    priority: int
    pricing: PricingSpec = field(default_factory=PricingSpec)


@dataclass(frozen=True, slots=True)
class ProfileFieldSpec:
    name: str
    claim: str = ""
    header: str = ""


@dataclass(frozen=True, slots=True)
class HistorySpec:
    enabled: bool = False
    max_turns: int = 20
    max_tokens: int = 4000
    ttl_seconds: int = 3600


@dataclass(frozen=True, slots=True)
class SnippetSpec:
    title: str
    text: str


@dataclass(frozen=True, slots=True)
class ContextSpec:
    system_prompt: str = ""
    profile: tuple[ProfileFieldSpec, ...] = ()
    history: HistorySpec = field(default_factory=HistorySpec)
    knowledge: tuple[SnippetSpec, ...] = ()
    max_context_tokens: int = 0
    # Context read from MCP servers per request (controller.context_sources).
    mcp: McpSpec = field(default_factory=McpSpec)


@dataclass(frozen=True, slots=True)
class JwtSpec:
    name: str
    issuer: str
    audiences: tuple[str, ...]
    tenant_claim: str
    hs256_secret: SecretRef | None
    jwks: str
    jwks_uri: str = ""
    discovery: bool = False  # keys from <issuer>/.well-known/openid-configuration


@dataclass(frozen=True, slots=True)
class RetrySpec:
    on: tuple[str, ...] = ("connect-failure", "5xx", "429", "reset")
    # Retries after the first attempt; None means one per fallback priority level.
    attempts: int | None = None


@dataclass(frozen=True, slots=True)
class BindingSpec:
    namespace: str
    name: str
    generation: int
    model: str
    backends: tuple[BackendSpec, ...]
    # Qualified tenant patterns ("ns/name", "ns/*"): who may call the model (crdgol.tenancy).
    tenants: tuple[str, ...]
    context: ContextSpec
    jwt: tuple[JwtSpec, ...]
    request_timeout: float
    per_try_timeout: float
    retry: RetrySpec
    quotas: QuotasSpec = field(default_factory=QuotasSpec)
    health: HealthSpec = field(default_factory=HealthSpec)
    cache: CacheSpec | None = None
    # Namespaces whose grants this binding's namespace accepts (ACCEPT_ANNOTATION).
    accept_from: frozenset[str] = frozenset()

    @property
    def key(self) -> str:
        return f"{self.namespace}/{self.name}"

    def secret_refs(self) -> list[SecretRef | None]:
        """Every Secret reference, in a fixed order (None where a backend or issuer names none)."""
        mcp = [SecretRef(m.credentials.name, m.credentials.key, m.credentials.namespace) if m.credentials else None for m in self.context.mcp.servers]
        return [b.credentials for b in self.backends] + [j.hs256_secret for j in self.jwt] + mcp


@dataclass(frozen=True, slots=True)
class SecretData:
    namespace: str
    name: str
    data: dict[str, str] = field(repr=False)
    labels: dict[str, str] = field(default_factory=dict)
    annotations: dict[str, str] = field(default_factory=dict)
    # Namespaces (or "*") its owner shares it with (SHARE_ANNOTATION), parsed once.
    share_with: frozenset[str] = frozenset()
    # Hosts another namespace's backend may send its credential to (SHARE_HOSTS_ANNOTATION).
    share_hosts: frozenset[str] = frozenset()
    # Namespaces whose grants this (API-key) Secret's namespace accepts (ACCEPT_ANNOTATION).
    accept_from: frozenset[str] = frozenset()

    @property
    def key(self) -> str:
        return f"{self.namespace}/{self.name}"

    @property
    def is_api_key(self) -> bool:
        return self.labels.get(API_KEY_LABEL, "").lower() == "true"

    def shared_with(self, namespace: str) -> bool:
        """Whether a binding of ``namespace`` may use this Secret (its own, or shared by its owner)."""
        return namespace == self.namespace or namespace in self.share_with or "*" in self.share_with

    def may_reach(self, namespace: str, endpoint: Endpoint) -> bool:
        """Whether a backend of ``namespace`` may send this Secret's credential to ``endpoint``."""
        if namespace == self.namespace:
            return True
        return endpoint.host in self.share_hosts or f"{endpoint.host}:{endpoint.port}" in self.share_hosts


def kind_problem(doc: dict[str, Any]) -> str:
    """What is wrong with a document's crdgol.io kind or version ("" when it is one of ours)."""
    api, kind = str(doc.get("apiVersion") or ""), doc.get("kind")
    if not api.startswith(f"{GROUP}/"):
        return ""
    if api != API_VERSION:
        return f"apiVersion {api!r} is not served: use {API_VERSION}"
    if kind not in KINDS:
        guess = difflib.get_close_matches(str(kind), KINDS, n=1, cutoff=0.6)
        hint = f"; did you mean {guess[0]}?" if guess else f"; crdgol.io kinds are {', '.join(KINDS)}"
        return f"kind {kind!r} is not a crdgol.io kind{hint}"
    return ""


def parse_endpoint(raw: object, what: str) -> Endpoint:
    text = str(raw or "")
    # A status message may quote the URL, but never a credential written into it.
    shown = re.sub(r"//[^/@]*@", "//***@", text)
    try:
        parts = urlsplit(text)
        explicit_port = parts.port
    except ValueError:  # a port out of range, a broken IPv6 literal
        raise SpecError("InvalidEndpoint", f"{what}: {shown!r} is not a valid URL") from None
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise SpecError("InvalidEndpoint", f"{what}: {shown!r} is not an http(s) URL")
    if parts.username or parts.password or parts.query or parts.fragment:
        raise SpecError("InvalidEndpoint", f"{what}: put credentials in credentialsRef, not in the URL; no query or fragment")
    if any(c.isspace() or ord(c) < 0x20 or c == "\x7f" for c in parts.path):
        raise SpecError("InvalidEndpoint", f"{what}: the path may not hold spaces or control characters")
    port = explicit_port or (443 if parts.scheme == "https" else 80)
    path = parts.path.rstrip("/")
    # "/v1" is where both APIs live; a prefix before it (Azure-style proxies) is kept.
    if path.endswith("/v1"):
        path = path[: -len("/v1")]
    return Endpoint(parts.scheme, parts.hostname, port, path)


def _secret_ref(raw: object, namespace: str, what: str) -> SecretRef | None:
    if raw is None:
        return None
    if not isinstance(raw, dict) or not raw.get("name") or not raw.get("key"):
        raise SpecError("InvalidSecretRef", f"{what}: needs 'name' and 'key'")
    # Another namespace's Secret is only usable when its owner shares it (SHARE_ANNOTATION,
    # checked at render): naming it here grants nothing by itself.
    return SecretRef(str(raw["name"]), str(raw["key"]), str(raw.get("namespace") or namespace))


def _backend(raw: object, i: int, namespace: str) -> BackendSpec:
    b = _dict(raw, f"spec.backends[{i}]")
    what = f"spec.backends[{i}]"
    name = str(b.get("name") or f"backend-{i}")
    if not _NAME.fullmatch(name):
        raise SpecError("InvalidSpec", f"{what}.name: {name!r} must be a DNS label")
    provider = b.get("provider")
    if provider not in PROVIDERS:
        raise SpecError("InvalidProvider", f"{what}.provider: must be one of {', '.join(PROVIDERS)}, got {provider!r}")
    model = str(b.get("model") or "")
    if not model:
        raise SpecError("InvalidSpec", f"{what}.model: the upstream model name is required")
    pricing = _dict(b.get("pricing"), f"{what}.pricing")
    return BackendSpec(
        name=name,
        provider=str(provider),
        endpoint=parse_endpoint(b.get("endpoint"), f"{what}.endpoint"),
        model=model,
        credentials=_secret_ref(b.get("credentialsRef"), namespace, f"{what}.credentialsRef"),
        weight=_int(b.get("weight", 1), f"{what}.weight", 1, 10_000),
        priority=_int(b.get("priority", 0), f"{what}.priority", 0, 16),
        pricing=PricingSpec(
            input_per_mtok_micros=parse_money(pricing.get("inputPerMillion", "0"), f"{what}.pricing.inputPerMillion"),
            output_per_mtok_micros=parse_money(pricing.get("outputPerMillion", "0"), f"{what}.pricing.outputPerMillion"),
        ),
    )


# Request headers a profile may not copy into the prompt: the caller's own credentials.
_CREDENTIAL_HEADERS = frozenset({"authorization", "proxy-authorization", "x-api-key", "cookie", "api-key"})


def _context(raw: object, namespace: str) -> ContextSpec:
    c = _dict(raw, "spec.context")
    profile = []
    for i, p in enumerate(_list(c.get("profile"), "spec.context.profile")):
        p = _dict(p, f"spec.context.profile[{i}]")
        name, claim, header = str(p.get("name") or ""), str(p.get("claim") or ""), str(p.get("header") or "")
        if not name or bool(claim) == bool(header):
            raise SpecError("InvalidContext", f"spec.context.profile[{i}]: needs a name and exactly one of claim or header")
        if header.lower() in _CREDENTIAL_HEADERS or header.startswith(":"):
            # The value would be copied into the prompt (and the session history) sent upstream.
            raise SpecError("InvalidContext", f"spec.context.profile[{i}].header: {header!r} carries a credential or is not a header")
        profile.append(ProfileFieldSpec(name, claim, header.lower()))
    h = _dict(c.get("history"), "spec.context.history")
    history = HistorySpec(
        # A history object turns history on unless it says otherwise (the same whether or not the
        # API server filled in its defaults).
        enabled=c.get("history") is not None and h.get("enabled", True) is not False,
        max_turns=_int(h.get("maxTurns", 20), "spec.context.history.maxTurns", 1, 1000),
        max_tokens=_int(h.get("maxTokens", 4000), "spec.context.history.maxTokens", 1, 1_000_000),
        ttl_seconds=int(parse_duration(h.get("ttl", "1h"), "spec.context.history.ttl")),
    )
    knowledge = []
    for i, s in enumerate(_list(c.get("knowledge"), "spec.context.knowledge")):
        s = _dict(s, f"spec.context.knowledge[{i}]")
        if not s.get("text"):
            raise SpecError("InvalidContext", f"spec.context.knowledge[{i}].text is required")
        knowledge.append(SnippetSpec(str(s.get("title") or f"snippet {i + 1}"), str(s["text"])))
    template = str(c.get("systemPrompt") or "")
    _check_template(template)
    return ContextSpec(
        system_prompt=template,
        profile=tuple(profile),
        history=history,
        knowledge=tuple(knowledge),
        max_context_tokens=_int(c.get("maxContextTokens", 0), "spec.context.maxContextTokens", 0, 2_000_000),
        mcp=parse_mcp(c, namespace),
    )


_VAR = re.compile(r"\$\{([^}]*)\}")
_KNOWN_VAR = re.compile(r"(tenant|date|model|user\.[A-Za-z0-9_-]+)(:-.*)?", re.S)


def _check_template(template: str) -> None:
    for m in _VAR.finditer(template):
        if not _KNOWN_VAR.fullmatch(m.group(1)):  # fullmatch: "$" would allow a trailing newline
            raise SpecError(
                "InvalidTemplate",
                f"spec.context.systemPrompt: unknown variable ${{{m.group(1)}}}; use ${{tenant}}, ${{date}}, ${{model}} or ${{user.<field>}}, each with an optional :-default",
            )
    if template.count("${") != len(_VAR.findall(template)):
        raise SpecError("InvalidTemplate", "spec.context.systemPrompt: an unterminated ${ (write $$ for a literal $)")


def _jwt(raw: object, i: int, namespace: str) -> JwtSpec:
    j = _dict(raw, f"spec.auth.jwt[{i}]")
    what = f"spec.auth.jwt[{i}]"
    issuer = str(j.get("issuer") or "")
    if not issuer:
        raise SpecError("InvalidAuth", f"{what}.issuer is required")
    secret = _secret_ref(j.get("hs256SecretRef"), namespace, f"{what}.hs256SecretRef")
    jwks = j.get("jwks") or ""
    if isinstance(jwks, dict):
        import json

        jwks = json.dumps(jwks, sort_keys=True)
    jwks_uri = str(j.get("jwksUri") or "")
    discovery = j.get("discovery", False)
    if not isinstance(discovery, bool):
        raise SpecError("InvalidAuth", f"{what}.discovery must be true or false")
    if [bool(secret), bool(jwks), bool(jwks_uri), discovery].count(True) != 1:
        raise SpecError("InvalidAuth", f"{what}: give exactly one of hs256SecretRef, jwks, jwksUri or discovery: true")
    if jwks_uri:
        problem = jwks_url_problem(jwks_uri)
        if problem:
            raise SpecError("InvalidAuth", f"{what}.jwksUri: {problem}")
    if discovery:
        problem = discovery_issuer_problem(issuer)
        if problem:
            raise SpecError("InvalidAuth", f"{what}.issuer (discovery: true): {problem}")
    audiences = j.get("audiences") or []
    return JwtSpec(
        name=str(j.get("name") or issuer),
        issuer=issuer,
        audiences=tuple(str(a) for a in _list(audiences, f"{what}.audiences")),
        tenant_claim=str(j.get("tenantClaim") or "tenant"),
        hs256_secret=secret,
        jwks=str(jwks),
        jwks_uri=jwks_uri,
        discovery=discovery,
    )


def _jwts(raw: object, namespace: str) -> tuple[JwtSpec, ...]:
    jwts = tuple(_jwt(j, i, namespace) for i, j in enumerate(_list(raw, "spec.auth.jwt")))
    issuers = [j.issuer for j in jwts]
    for i, issuer in enumerate(issuers):
        if issuer in issuers[:i]:
            raise SpecError("JwtIssuerConflict", f"spec.auth.jwt[{i}].issuer: {issuer!r} is declared twice")
    return jwts


def parse_binding(obj: dict[str, Any]) -> BindingSpec:
    """The typed spec of an AIModelBinding object, or ``SpecError`` saying what to fix.

    Never anything but ``SpecError``: a value of a type no check expected (a list where a word
    belongs, say) refuses this binding instead of raising through the controller, which would stop
    every namespace's bindings from being served.
    """
    try:
        return _parse_binding(obj)
    except SpecError:
        raise
    except (TypeError, ValueError, OverflowError, AttributeError, KeyError) as exc:
        raise SpecError(
            "InvalidSpec", f"a field has a value of the wrong type or out of range ({type(exc).__name__}); check it against the CRD"
        ) from None


def _parse_binding(obj: dict[str, Any]) -> BindingSpec:
    unknown = binding_problems(obj)
    if unknown:
        more = f" (and {len(unknown) - 3} more)" if len(unknown) > 3 else ""
        raise SpecError("UnknownField", "; ".join(unknown[:3]) + more)
    meta = _dict(obj.get("metadata"), "metadata")
    name = str(meta.get("name") or "")
    namespace = str(meta.get("namespace") or "default")
    if not _NAME.fullmatch(name):
        raise SpecError("InvalidSpec", f"metadata.name: {name!r} must be a DNS label")
    if not tenancy.valid_namespace(namespace):
        # "a/b" would make its tenants read as tenants of namespace "a" (crdgol.tenancy).
        raise SpecError("InvalidSpec", f"metadata.namespace: {namespace!r} must be a DNS label")
    spec = _dict(obj.get("spec"), "spec")
    model = str(spec.get("model") or "")
    if not _MODEL.fullmatch(model):
        raise SpecError("InvalidModel", f"spec.model: {model!r} must be 1-128 characters of letters, digits and ._:/-")
    raw_backends = _list(spec.get("backends"), "spec.backends")
    if not raw_backends:
        raise SpecError("NoBackends", "spec.backends: at least one backend is required")
    backends = tuple(_backend(b, i, namespace) for i, b in enumerate(raw_backends))
    names = [b.name for b in backends]
    if len(set(names)) != len(names):
        raise SpecError("InvalidSpec", "spec.backends: backend names must be unique")
    auth = _dict(spec.get("auth"), "spec.auth")
    timeouts = _dict(spec.get("timeouts"), "spec.timeouts")
    retry = _dict(spec.get("retry"), "spec.retry")
    # YAML 1.1 (PyYAML, kubectl) reads an unquoted `on:` key as the boolean true.
    raw_on = retry.get("on", retry.get(True, list(RetrySpec().on)))  # type: ignore[call-overload]
    on = tuple(str(x) for x in _list(raw_on, "spec.retry.on"))
    for cond in on:
        if cond not in RETRY_CONDITIONS:
            raise SpecError("InvalidSpec", f"spec.retry.on: {cond!r} is not one of {', '.join(RETRY_CONDITIONS)}")
    attempts = retry.get("attempts")
    return BindingSpec(
        namespace=namespace,
        name=name,
        generation=int(meta.get("generation") or 1),
        model=model,
        backends=backends,
        tenants=_tenants(spec.get("tenants"), namespace),
        context=_context(spec.get("context"), namespace),
        jwt=_jwts(auth.get("jwt"), namespace),
        request_timeout=parse_duration(timeouts.get("request", "120s"), "spec.timeouts.request"),
        per_try_timeout=parse_duration(timeouts.get("perTry", "60s"), "spec.timeouts.perTry"),
        retry=RetrySpec(on=on, attempts=None if attempts is None else _int(attempts, "spec.retry.attempts", 0, 10)),
        quotas=_check_budget(parse_quotas(spec.get("quotas"), namespace), backends),
        health=parse_health(spec.get("health")),
        cache=parse_cache(spec.get("cache")),
        accept_from=_names(_dict(meta.get("annotations"), "metadata.annotations").get(ACCEPT_ANNOTATION)),
    )


def _names(raw: object) -> frozenset[str]:
    """A comma-separated annotation value as a set of names."""
    return frozenset(n.strip() for n in str(raw or "").split(",") if n.strip())




def _tenants(raw: object, namespace: str) -> tuple[str, ...]:
    """Qualified tenant patterns (see ``crdgol.tenancy``); none given means the own namespace."""
    patterns = {
        parse_tenant(tenancy.parse_pattern, t, namespace, f"spec.tenants[{i}]") for i, t in enumerate(_list(raw, "spec.tenants"))
    }
    return tuple(sorted(patterns)) if patterns else (tenancy.qualified(namespace, tenancy.WILDCARD),)


def _check_budget(quotas: QuotasSpec, backends: tuple[BackendSpec, ...]) -> QuotasSpec:
    rules = ([quotas.default] if quotas.default else []) + [q for _, q in quotas.tenants]
    if any(lim.metric == "cost_micros" for q in rules for lim in q.limits):
        unpriced = [b.name for b in backends if not (b.pricing.input_per_mtok_micros or b.pricing.output_per_mtok_micros)]
        if unpriced:
            raise SpecError("InvalidQuota", f"a money budget needs pricing on every backend; missing on {', '.join(unpriced)}")
    return quotas


def parse_secret(obj: dict[str, Any]) -> SecretData:
    meta = _dict(obj.get("metadata"), "metadata")
    data: dict[str, str] = {}
    for k, v in _dict(obj.get("data"), "data").items():
        try:
            data[str(k)] = base64.b64decode(str(v), validate=True).decode()
        except (ValueError, UnicodeDecodeError) as exc:
            raise SpecError("InvalidSecret", f"data.{k} is not valid base64 of UTF-8 text") from exc
    for k, v in _dict(obj.get("stringData"), "stringData").items():
        data[str(k)] = str(v)
    annotations = {str(k): str(v) for k, v in _dict(meta.get("annotations"), "metadata.annotations").items()}
    namespace = str(meta.get("namespace") or "default")
    if not tenancy.valid_namespace(namespace):
        # An API key in "a/b" would act as a tenant of namespace "a" (crdgol.tenancy).
        raise SpecError("InvalidSecret", f"metadata.namespace: {namespace!r} must be a DNS label")
    return SecretData(
        namespace=namespace,
        name=str(meta.get("name") or ""),
        data=data,
        labels={str(k): str(v) for k, v in _dict(meta.get("labels"), "metadata.labels").items()},
        annotations=annotations,
        share_with=frozenset(n.strip() for n in annotations.get(SHARE_ANNOTATION, "").split(",") if n.strip()),
        share_hosts=frozenset(h.strip().lower() for h in annotations.get(SHARE_HOSTS_ANNOTATION, "").split(",") if h.strip()),
        accept_from=_names(annotations.get(ACCEPT_ANNOTATION)),
    )
