"""Who is calling: API keys and JWTs turned into an ``Identity``, or a 401.

Contract
--------
* ``credential_from_headers`` picks the credential out of ``Authorization: Bearer <x>`` or
  ``x-api-key: <x>`` (Authorization wins when both are sent) and refuses a missing or malformed one.
* ``Authenticator`` is built once per policy version; its constructor does all the work that does
  not depend on the request (API-key table, JWKS parsed into key objects by ``kid``), so
  ``authenticate`` is a SHA-256 and a dict lookup for API keys, and one signature check per JWT
  (then an LRU hit until the token expires).
* An issuer may name a ``jwksUri`` instead of inline keys: its keys come from the process-wide
  ``extproc.jwks.JwksCache``. ``authenticate`` never waits: when that issuer's keys are not there
  yet, or the token names a ``kid`` they lack, it raises ``KeysPending``; the async caller
  (``Services.authenticate``) waits for the refresh that allows and asks again with
  ``final=True``, which refuses instead (401 for an unknown kid, 503 when the key server was
  never reached).
* Every refusal is ``Unauthenticated`` with a message the caller can act on. No message or log line
  ever contains the presented key or token: they are credentials, and error bodies and logs leave
  the trust boundary.

JWT rules: the unverified ``iss`` picks the provider (unknown issuer: 401); HMAC providers accept
exactly HS256, JWKS providers exactly RS256 (``none`` and algorithm confusion are impossible because
the algorithm list passed to pyjwt is fixed by the provider, never by the token); ``exp`` is
required; ``exp``/``nbf``/``iat`` are checked against the injected clock with ``leeway``; the
audience is checked when the provider lists audiences; the tenant comes from the provider's
``tenant_claim`` and a token without it is refused.

Tenancy (``crdgol.tenancy``): every identity source belongs to a namespace and acts only as
tenants of that namespace. An API key acts as the qualified tenant its Secret names; a JWT issuer
is declared per namespace (several namespaces may declare the same issuer, each with its own keys),
and a token acts as ``namespace/<claim>`` for every declaration whose keys verify it. A claim that
is not a tenant name (``other/quickstart``, ``*``) is refused. Which of an identity's tenants a
request acts as is decided by the binding it calls (``Identity.acting_as``).
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import json
import logging
import math
import re
import time
from collections import OrderedDict
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any

import jwt
import orjson
from cryptography.hazmat.primitives.asymmetric.rsa import RSAPublicKey

from crdgol import tenancy
from extproc.errors import GatewayError, Unauthenticated, Unavailable
from extproc.jwks import JwksCache, parse_jwks
from extproc.oidc_discovery import discovery_source
from extproc.policy import JwtProvider, Policy

log = logging.getLogger(__name__)

__all__ = ["Authenticator", "Identity", "KeysPending", "credential_from_headers", "jwt_principal", "lookup_claim"]

_EMPTY_CLAIMS: Mapping[str, object] = MappingProxyType({})

# Three base64url segments; the signature may be empty so that an unsigned ("alg": "none") token
# is still routed to the JWT path and refused with a JWT-specific message.
_JWT_SHAPE = re.compile(r"[A-Za-z0-9_-]+\.[A-Za-z0-9_-]+\.[A-Za-z0-9_-]*")

# Real credentials are a few hundred bytes (RS256 JWTs ~1 KiB); anything far larger is refused
# before hashing or parsing so a client cannot make us chew on megabytes per request.
MAX_CREDENTIAL_LENGTH = 16 * 1024

_MISSING = "missing API key: send 'Authorization: Bearer <key>' or 'x-api-key: <key>'"


@dataclass(frozen=True, slots=True)
class Identity:
    """An authenticated caller.

    ``tenants`` are the qualified tenants (``namespace/name``) the credential may act as, sorted;
    ``tenant`` is the one it acts as once the binding it calls is known (``acting_as``), "" before.
    ``subject`` is the JWT ``sub``, or ``apikey:<first 8 hex of sha256(key)>`` for API keys: enough
    to tell keys apart in logs and metrics, useless for recovering the key. ``principal`` is the
    caller itself, for what belongs to it alone (session history): ``jwt:`` and 128 bits of
    sha256(issuer, sub) (a ``sub`` is unique only per issuer), or ``key:`` and 128 bits of
    sha256(key) — never the key, and never a value a caller can choose to match another's.
    """

    tenants: tuple[str, ...]
    subject: str
    method: str  # "api_key" | "jwt"
    # Read-only view of the verified claims ({} for API keys). Excluded from the hash: mappings
    # are not hashable, and tenants+subject+method already identify the caller.
    claims: Mapping[str, object] = field(default_factory=lambda: _EMPTY_CLAIMS, hash=False)
    tenant: str = ""
    principal: str = ""

    def acting_as(self, tenant: str) -> Identity:
        """This caller acting as ``tenant``, which must be one of its ``tenants``."""
        if tenant not in self.tenants:
            raise ValueError("an identity can only act as one of its own tenants")
        return Identity(self.tenants, self.subject, self.method, self.claims, tenant, self.principal)


def credential_from_headers(authorization: str | None, x_api_key: str | None) -> str:
    """Return the bearer token or the ``x-api-key`` value; raise ``Unauthenticated`` otherwise.

    An empty header counts as absent. A non-empty Authorization header that is not
    ``Bearer <credential>`` is an error even when ``x-api-key`` is also present: silently falling
    back would hide a client misconfiguration behind a confusing "invalid key".
    """
    if authorization is not None and authorization.strip():
        scheme, _, rest = authorization.strip().partition(" ")
        if scheme.lower() != "bearer":
            raise Unauthenticated(
                "malformed Authorization header: only the Bearer scheme is supported; "
                "send 'Authorization: Bearer <key>'"
            )
        token = rest.strip()
        if not token or any(c.isspace() for c in token):
            raise Unauthenticated(
                "malformed Authorization header: expected 'Bearer <key>' with a single "
                "credential after 'Bearer'"
            )
        return token
    if x_api_key is not None and x_api_key.strip():
        return x_api_key.strip()
    raise Unauthenticated(_MISSING)


class KeysPending(Exception):
    """A token needs remote keys that are not (yet) in the cache: ``(uri, kid)`` pairs to refresh
    (``kid`` None: the key set was never fetched)."""

    def __init__(self, wanted: tuple[tuple[str, str | None], ...]) -> None:
        super().__init__("JWKS refresh needed")
        self.wanted = wanted


@dataclass(frozen=True, slots=True)
class _Verifier:
    """One JWT provider, precompiled: the only algorithm it accepts and its key material."""

    issuer: str
    algorithm: str  # "HS256" | "RS256" | "" (no usable keys)
    hmac_key: bytes
    rsa_keys: Mapping[str, RSAPublicKey]  # by kid ("" for a key published without a kid)
    audiences: tuple[str, ...]
    tenant_claim: str
    namespace: str  # its tokens act as tenants of this namespace only
    jwks_uri: str = ""  # keys from this URL or discovery source (extproc.jwks) instead of rsa_keys


class Authenticator:
    """Authenticates credentials against one compiled policy. Build a new one per policy version.

    A rotated policy therefore drops removed API keys and providers at once, and the JWT cache
    (which lives on the instance) cannot outlive the keys that verified its entries.
    """

    def __init__(
        self,
        policy: Policy,
        *,
        clock: Callable[[], float] = time.time,
        leeway: float = 30.0,
        cache_size: int = 10_000,
        jwks: JwksCache | None = None,
    ) -> None:
        self._clock = clock
        self._jwks = jwks
        self._leeway = float(leeway)
        self._cache_size = max(0, cache_size)
        # digest -> (digest, tenant): keeping the stored digest lets authenticate() confirm the
        # match with hmac.compare_digest against the table's own bytes.
        self._api_keys: dict[bytes, tuple[bytes, tuple[str, ...]]] = {
            bytes(d): (bytes(d), tuple(sorted(t))) for d, t in policy.api_keys.items()
        }
        # By issuer: one verifier per namespace that declares it.
        self._verifiers: dict[str, tuple[_Verifier, ...]] = {}
        # Configuration problems found while compiling the providers (bad JWKS, no keys). The
        # affected issuer refuses every token; callers may surface these or refuse the policy.
        self.problems: list[str] = []
        for issuer, providers in policy.jwt_providers.items():
            self._verifiers[issuer] = tuple(self._compile_provider(p) for p in providers)
        # sha256(token) -> (expires_at, identity). Bounded LRU; see _cache_put.
        self._jwt_cache: OrderedDict[bytes, tuple[float, Identity]] = OrderedDict()

    # ------------------------------------------------------------------ construction

    def remote_jwks(self) -> tuple[str, ...]:
        """The JWKS URLs this policy's issuers name (to fetch ahead of the first token)."""
        return tuple(sorted({v.jwks_uri for vs in self._verifiers.values() for v in vs if v.jwks_uri}))

    def _compile_provider(self, p: JwtProvider) -> _Verifier:
        # A discovered issuer's keys are cached under a source name of their own (not a URL).
        source = discovery_source(p.issuer) if p.discovery else p.jwks_uri
        if source:
            if self._jwks is None:
                self._problem(f"JWT provider {p.name!r} ({p.issuer}): remote keys, but no key fetcher")
            return _Verifier(
                issuer=p.issuer,
                algorithm="RS256" if self._jwks is not None else "",
                hmac_key=b"",
                rsa_keys=MappingProxyType({}),
                audiences=tuple(p.audiences),
                tenant_claim=p.tenant_claim or "tenant",
                namespace=p.namespace,
                jwks_uri=source,
            )
        rsa_keys: dict[str, RSAPublicKey] = {}
        if p.jwks_json:
            try:
                rsa_keys = _parse_jwks(p.jwks_json)
            except ValueError as exc:
                self._problem(f"JWT provider {p.name!r} ({p.issuer}): unusable JWKS: {exc}")
        # A provider is either HMAC or JWKS, never both: the algorithm is fixed here, from the
        # operator's configuration, so the token's own "alg" header can never choose the key type.
        if p.jwks_json:
            if not rsa_keys:
                self._problem(f"JWT provider {p.name!r} ({p.issuer}): JWKS has no RS256 keys")
            if p.hs256_secret:
                self._problem(
                    f"JWT provider {p.name!r} ({p.issuer}): both a JWKS and an HS256 secret are "
                    "set; using the JWKS (RS256) only"
                )
            algorithm = "RS256" if rsa_keys else ""
        elif p.hs256_secret:
            algorithm = "HS256"
        else:
            self._problem(f"JWT provider {p.name!r} ({p.issuer}): no HS256 secret and no JWKS")
            algorithm = ""
        return _Verifier(
            issuer=p.issuer,
            algorithm=algorithm,
            hmac_key=bytes(p.hs256_secret) if algorithm == "HS256" else b"",
            rsa_keys=MappingProxyType(rsa_keys),
            audiences=tuple(p.audiences),
            tenant_claim=p.tenant_claim or "tenant",
            namespace=p.namespace,
        )

    def _problem(self, message: str) -> None:
        self.problems.append(message)
        log.error("%s", message)

    # ------------------------------------------------------------------ hot path

    def authenticate(self, credential: str, *, final: bool = False) -> Identity:
        """Return the caller's identity or raise ``Unauthenticated`` (``Unavailable`` when an
        issuer's remote keys could never be fetched). Raises ``KeysPending`` unless ``final``."""
        if not credential:
            raise Unauthenticated(_MISSING)
        if len(credential) > MAX_CREDENTIAL_LENGTH:
            raise Unauthenticated("credential too long: send a valid API key or JWT")
        digest = hashlib.sha256(credential.encode("utf-8", "surrogatepass")).digest()

        # Why a dict lookup keyed by the SHA-256 digest does not leak the key: the lookup's timing
        # (hash-bucket probe, then a byte comparison that may exit early) depends only on the
        # *digest* of what the caller sent, never on the stored keys' plaintext. Learning that a
        # stored digest starts with the same bytes as sha256(guess) does not help build a key:
        # the caller cannot steer digest bytes one at a time (that would need SHA-256 preimages),
        # so the byte-at-a-time search that timing attacks rely on is impossible. compare_digest
        # below re-checks the match in constant time as defence in depth.
        entry = self._api_keys.get(digest)
        if entry is not None and hmac.compare_digest(entry[0], digest):
            return Identity(
                tenants=entry[1],
                subject="apikey:" + digest[:4].hex(),
                method="api_key",
                claims=_EMPTY_CLAIMS,
                principal="key:" + digest[:16].hex(),
            )

        if _JWT_SHAPE.fullmatch(credential):
            return self._authenticate_jwt(credential, digest, final)
        raise Unauthenticated(
            "invalid API key: it is not known to this gateway (it may have been revoked or "
            "rotated); check the key you are sending or ask your administrator for a new one"
        )

    def _authenticate_jwt(self, token: str, digest: bytes, final: bool) -> Identity:
        now = self._clock()
        cached = self._jwt_cache.get(digest)
        if cached is not None:
            if now < cached[0]:
                self._jwt_cache.move_to_end(digest)
                return cached[1]
            del self._jwt_cache[digest]

        header, unverified = _unverified_parts(token)
        issuer = unverified.get("iss")
        if not isinstance(issuer, str) or not issuer:
            raise Unauthenticated("invalid token: it has no 'iss' (issuer) claim")
        verifiers = self._verifiers.get(issuer)
        if not verifiers:
            log.info("JWT refused: unknown issuer %r", issuer[:200])
            raise Unauthenticated(
                "invalid token: its issuer is not trusted by this gateway; use a token from a "
                "configured identity provider"
            )
        # Each namespace that declares the issuer verifies with its own keys; the token acts as a
        # tenant of every namespace whose declaration accepts it, and of no other.
        accepted: list[tuple[_Verifier, dict[str, Any], str, float]] = []
        first_error: GatewayError | None = None
        pending: list[tuple[str, str | None]] = []
        for verifier in verifiers:
            try:
                accepted.append((verifier, *self._verify(verifier, token, header, now, final)))
            except KeysPending as exc:
                pending.extend(exc.wanted)
            except (Unauthenticated, Unavailable) as exc:
                first_error = first_error or exc
        if pending:
            # Even when another namespace accepted: the identity (cached until the token expires)
            # must hold every tenant the token acts as, so wait for the missing keys once.
            raise KeysPending(tuple(pending))
        if not accepted:
            assert first_error is not None
            raise first_error
        claims, exp = accepted[0][1], min(a[3] for a in accepted)
        subject = claims.get("sub")
        if not isinstance(subject, str) or not subject:
            raise Unauthenticated("invalid token: it has no 'sub' (subject) claim")

        identity = Identity(
            tenants=tuple(sorted({tenancy.qualified(v.namespace, name) for v, _, name, _ in accepted})),
            subject=subject,
            method="jwt",
            claims=MappingProxyType(claims),
            principal=jwt_principal(issuer, subject),
        )
        self._cache_put(digest, exp + self._leeway, identity)
        return identity

    def _verify(
        self, verifier: _Verifier, token: str, header: Mapping[str, Any], now: float, final: bool
    ) -> tuple[dict[str, Any], str, float]:
        """One declaration's verdict on a token: (claims, tenant name, exp) or ``Unauthenticated``."""
        if not verifier.algorithm:
            raise Unauthenticated(
                "invalid token: the identity provider for this issuer has no usable signing keys; "
                "contact the gateway operator"
            )
        alg = header.get("alg")
        if alg != verifier.algorithm:
            # Covers "none", HS256 tokens aimed at an RS256 provider (signed with the public key),
            # and anything else the provider is not configured for.
            raise Unauthenticated(
                f"invalid token: tokens from this issuer must be signed with {verifier.algorithm}"
            )
        key: bytes | RSAPublicKey
        if verifier.algorithm == "HS256":
            key = verifier.hmac_key
        elif verifier.jwks_uri:
            key = self._remote_key(verifier, header.get("kid"), final)
        else:
            key = _pick_rsa_key(verifier.rsa_keys, header.get("kid"))

        try:
            claims: dict[str, Any] = jwt.decode(
                token,
                key,
                algorithms=[verifier.algorithm],
                audience=list(verifier.audiences) if verifier.audiences else None,
                issuer=verifier.issuer,
                options={
                    # Times are checked below against the injected clock (pyjwt reads the wall
                    # clock itself, which tests and replay cannot control).
                    "verify_exp": False,
                    "verify_nbf": False,
                    "verify_iat": False,
                    "verify_aud": bool(verifier.audiences),
                },
            )
        except jwt.InvalidAudienceError:
            raise Unauthenticated(
                "invalid token: its audience ('aud') is not accepted by this gateway; request a "
                "token for one of the configured audiences"
            ) from None
        except jwt.MissingRequiredClaimError as exc:
            raise Unauthenticated(f"invalid token: it has no '{exc.claim}' claim") from None
        except jwt.InvalidSignatureError:
            raise Unauthenticated("invalid token: its signature does not verify") from None
        except jwt.InvalidIssuerError:
            raise Unauthenticated("invalid token: its issuer is not trusted") from None
        except jwt.InvalidTokenError as exc:
            # pyjwt's messages describe the defect, never the token itself; capped because a few
            # echo header values the client chose.
            raise Unauthenticated(f"invalid token: {str(exc)[:200]}") from None
        except jwt.PyJWTError:
            raise Unauthenticated("invalid token: it could not be verified") from None

        exp = _numeric_claim(claims, "exp")
        if exp is None:
            raise Unauthenticated(
                "invalid token: it has no 'exp' claim; the gateway only accepts tokens that expire"
            )
        if exp <= now - self._leeway:
            raise Unauthenticated("token expired: obtain a new token from your identity provider")
        nbf = _numeric_claim(claims, "nbf")
        if nbf is not None and nbf > now + self._leeway:
            raise Unauthenticated("token not yet valid ('nbf' is in the future); check clocks")
        iat = _numeric_claim(claims, "iat")
        if iat is not None and iat > now + self._leeway:
            raise Unauthenticated("token not yet valid ('iat' is in the future); check clocks")

        tenant = lookup_claim(claims, verifier.tenant_claim)
        if not isinstance(tenant, str) or not tenant:
            raise Unauthenticated(
                f"invalid token: it has no '{verifier.tenant_claim}' claim naming your tenant; "
                "ask your identity provider administrator to add it"
            )
        if not tenancy.valid_name(tenant):
            # "other-namespace/name" would name a tenant this issuer's namespace does not own.
            raise Unauthenticated(
                f"invalid token: its '{verifier.tenant_claim}' claim is not a tenant name (letters, "
                "digits and ._@:+=-, no '/')"
            )
        return claims, tenant, exp

    def _remote_key(self, verifier: _Verifier, kid: object, final: bool) -> RSAPublicKey:
        assert self._jwks is not None  # a remote verifier has an algorithm only with a cache
        keys = self._jwks.keys(verifier.jwks_uri)
        if keys is None:
            if not final:
                raise KeysPending(((verifier.jwks_uri, None),))
            raise Unavailable(
                "the identity provider's signing keys could not be fetched yet; retry shortly",
                code="jwks_unavailable",
            )
        if isinstance(kid, str) and kid and kid not in keys and not final:
            raise KeysPending(((verifier.jwks_uri, kid),))
        return _pick_rsa_key(keys, kid)

    def _cache_put(self, digest: bytes, expires_at: float, identity: Identity) -> None:
        if self._cache_size == 0:
            return
        self._jwt_cache[digest] = (expires_at, identity)
        self._jwt_cache.move_to_end(digest)
        while len(self._jwt_cache) > self._cache_size:
            self._jwt_cache.popitem(last=False)


# ---------------------------------------------------------------------- helpers


def _b64url_json(segment: str) -> dict[str, Any]:
    try:
        raw = base64.urlsafe_b64decode(segment + "=" * (-len(segment) % 4))
        value = orjson.loads(raw)
    except (binascii.Error, ValueError, orjson.JSONDecodeError):
        raise Unauthenticated("malformed token: it is not a valid JWT") from None
    if not isinstance(value, dict):
        raise Unauthenticated("malformed token: it is not a valid JWT")
    return value


def _unverified_parts(token: str) -> tuple[dict[str, Any], dict[str, Any]]:
    """Header and payload, *unverified*: only used to pick the provider and the key."""
    head, payload, _ = token.split(".")
    return _b64url_json(head), _b64url_json(payload)


def _pick_rsa_key(keys: Mapping[str, RSAPublicKey], kid: object) -> RSAPublicKey:
    if isinstance(kid, str) and kid:
        key = keys.get(kid)
        if key is None:
            raise Unauthenticated(
                "invalid token: its signing key ('kid') is not published by the issuer; if the "
                "issuer rotated keys recently, retry after the gateway picks up the new JWKS"
            )
        return key
    if len(keys) == 1:
        return next(iter(keys.values()))
    raise Unauthenticated(
        "invalid token: it has no 'kid' header and the issuer publishes several keys"
    )


def _parse_jwks(text: str) -> dict[str, RSAPublicKey]:
    """Parse an inline JWKS (or a single JWK) into RSA public keys by kid. Raises ValueError."""
    try:
        doc = json.loads(text)
    except json.JSONDecodeError as exc:
        raise ValueError(f"not JSON ({exc.msg})") from None
    return parse_jwks(doc)


def _numeric_claim(claims: Mapping[str, Any], name: str) -> float | None:
    """A NumericDate claim as float; None when absent. A malformed value is a 401."""
    if name not in claims:
        return None
    value = claims[name]
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        raise Unauthenticated(f"invalid token: its '{name}' claim is not a number")
    return float(value)


def jwt_principal(issuer: str, subject: str) -> str:
    """A JWT caller's ``Identity.principal``: its issuer and subject, hashed (both may be long,
    and a subject is often an e-mail address, which has no business in a store's key names)."""
    both = json.dumps([issuer, subject]).encode("utf-8", "surrogatepass")  # injective: no separator to forge
    return "jwt:" + hashlib.sha256(both).digest()[:16].hex()


def lookup_claim(claims: Mapping[str, Any], name: str) -> object:
    """``claims[name]``; failing that, a dotted path (``org.tenant``) into nested objects."""
    if name in claims:
        return claims[name]
    node: object = claims
    for part in name.split("."):
        if not isinstance(node, Mapping) or part not in node:
            return None
        node = node[part]
    return node
