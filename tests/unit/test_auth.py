"""Authentication: API keys and JWTs (HS256, RS256 via JWKS) against a compiled policy."""

from __future__ import annotations

import base64
import hashlib
import json
from typing import Any

import jwt
import orjson
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from jwt.algorithms import RSAAlgorithm

from extproc.auth import Authenticator, Identity, credential_from_headers
from extproc.errors import Unauthenticated
from extproc.policy import JwtProvider, Policy

NOW = 1_800_000_000.0
HS_ISSUER = "https://hs.example"
RS_ISSUER = "https://rs.example"
HS_SECRET = b"an-hs256-secret-that-is-32-bytes!!"
API_KEY = "sk-test-0123456789abcdef"
NS = "team-a"  # the namespace of every identity source in these policies
ACME = ("team-a/acme",)
GLOBEX = ("team-a/globex",)


def sha(s: str) -> bytes:
    return hashlib.sha256(s.encode()).digest()


@pytest.fixture(scope="module")
def rsa_key() -> rsa.RSAPrivateKey:
    return rsa.generate_private_key(public_exponent=65537, key_size=2048)


@pytest.fixture(scope="module")
def other_rsa_key() -> rsa.RSAPrivateKey:
    return rsa.generate_private_key(public_exponent=65537, key_size=2048)


def jwks_for(*keys: tuple[str, rsa.RSAPrivateKey]) -> str:
    out = []
    for kid, key in keys:
        jwk = json.loads(RSAAlgorithm.to_jwk(key.public_key()))
        jwk["kid"] = kid
        jwk["use"] = "sig"
        out.append(jwk)
    return json.dumps({"keys": out})


def make_policy(
    rsa_key: rsa.RSAPrivateKey,
    *,
    api_keys: dict[bytes, str] | None = None,
    audiences: tuple[str, ...] = (),
    version: int = 1,
) -> Policy:
    providers = {
        HS_ISSUER: JwtProvider(
            name="hs",
            issuer=HS_ISSUER,
            audiences=audiences,
            tenant_claim="tenant",
            hs256_secret=HS_SECRET,
            jwks_json="",
            namespace=NS,
        ),
        RS_ISSUER: JwtProvider(
            name="rs",
            issuer=RS_ISSUER,
            audiences=audiences,
            tenant_claim="org.tenant",
            hs256_secret=b"",
            jwks_json=jwks_for(("k1", rsa_key)),
            namespace=NS,
        ),
    }
    keys = {sha(API_KEY): "acme"} if api_keys is None else api_keys
    return Policy(
        version=version,
        models={},
        backends={},
        api_keys={k: (f"{NS}/{t}",) for k, t in keys.items()},
        jwt_providers={i: (p,) for i, p in providers.items()},
    )


class Clock:
    def __init__(self, t: float = NOW) -> None:
        self.t = t

    def __call__(self) -> float:
        return self.t


def hs_token(**overrides: Any) -> str:
    claims: dict[str, Any] = {
        "iss": HS_ISSUER,
        "sub": "alice",
        "tenant": "acme",
        "exp": int(NOW) + 600,
        "iat": int(NOW),
    }
    claims.update(overrides)
    claims = {k: v for k, v in claims.items() if v is not None}
    return jwt.encode(claims, HS_SECRET, algorithm="HS256")


def rs_token(key: rsa.RSAPrivateKey, *, kid: str | None = "k1", **overrides: Any) -> str:
    claims: dict[str, Any] = {
        "iss": RS_ISSUER,
        "sub": "bob",
        "org": {"tenant": "globex"},
        "exp": int(NOW) + 600,
    }
    claims.update(overrides)
    headers = {"kid": kid} if kid else None
    return jwt.encode(claims, key, algorithm="RS256", headers=headers)


def b64(obj: dict[str, Any]) -> str:
    return base64.urlsafe_b64encode(orjson.dumps(obj)).rstrip(b"=").decode()


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture
def auth(rsa_key: rsa.RSAPrivateKey, clock: Clock) -> Authenticator:
    return Authenticator(make_policy(rsa_key), clock=clock)


class TestCredentialFromHeaders:
    def test_a_bearer_token_is_taken_from_authorization(self) -> None:
        assert credential_from_headers("Bearer abc", None) == "abc"
        assert credential_from_headers("bearer   abc  ", None) == "abc"

    def test_x_api_key_is_used_when_there_is_no_authorization(self) -> None:
        assert credential_from_headers(None, "abc") == "abc"
        assert credential_from_headers("", "abc") == "abc"

    def test_authorization_wins_over_x_api_key(self) -> None:
        assert credential_from_headers("Bearer one", "two") == "one"

    def test_no_credential_says_the_api_key_is_missing(self) -> None:
        with pytest.raises(Unauthenticated, match="missing API key"):
            credential_from_headers(None, None)
        with pytest.raises(Unauthenticated, match="missing API key"):
            credential_from_headers("  ", "")

    @pytest.mark.parametrize("header", ["Basic dXNlcjpwYXNz", "Bearer", "Bearer a b", "token"])
    def test_a_malformed_authorization_header_is_rejected_clearly(self, header: str) -> None:
        with pytest.raises(Unauthenticated, match="malformed Authorization header") as exc:
            credential_from_headers(header, "fallback")
        assert "dXNlcjpwYXNz" not in exc.value.message


class TestApiKeys:
    def test_a_known_api_key_is_accepted(self, auth: Authenticator) -> None:
        ident = auth.authenticate(API_KEY)
        assert ident == Identity(ACME, "apikey:" + sha(API_KEY).hex()[:8], "api_key", {}, principal="key:" + sha(API_KEY).hex()[:32])
        assert ident.claims == {}

    def test_the_subject_never_contains_the_key(self, auth: Authenticator) -> None:
        assert API_KEY not in auth.authenticate(API_KEY).subject

    def test_an_unknown_api_key_is_rejected_without_echoing_it(self, auth: Authenticator) -> None:
        with pytest.raises(Unauthenticated, match="invalid API key") as exc:
            auth.authenticate("sk-wrong-key")
        assert "sk-wrong-key" not in exc.value.message
        assert exc.value.status == 401

    def test_an_empty_credential_is_rejected(self, auth: Authenticator) -> None:
        with pytest.raises(Unauthenticated, match="missing API key"):
            auth.authenticate("")

    def test_an_absurdly_long_credential_is_rejected(self, auth: Authenticator) -> None:
        with pytest.raises(Unauthenticated, match="too long"):
            auth.authenticate("x" * 100_000)

    def test_a_rotated_policy_drops_the_old_key(self, rsa_key: rsa.RSAPrivateKey) -> None:
        old = Authenticator(make_policy(rsa_key))
        new = Authenticator(make_policy(rsa_key, api_keys={sha("sk-new"): "acme"}, version=2))
        assert old.authenticate(API_KEY).tenants == ACME
        assert new.authenticate("sk-new").tenants == ACME
        with pytest.raises(Unauthenticated, match="invalid API key"):
            new.authenticate(API_KEY)


class TestJwtHs256:
    def test_a_valid_token_is_accepted(self, auth: Authenticator) -> None:
        ident = auth.authenticate(hs_token())
        assert (ident.tenants, ident.subject, ident.method) == (ACME, "alice", "jwt")
        assert ident.claims["iss"] == HS_ISSUER

    def test_an_expired_token_is_rejected(self, auth: Authenticator) -> None:
        with pytest.raises(Unauthenticated, match="expired"):
            auth.authenticate(hs_token(exp=int(NOW) - 31))

    def test_expiry_allows_the_leeway(self, auth: Authenticator) -> None:
        assert auth.authenticate(hs_token(exp=int(NOW) - 10)).tenants == ACME

    def test_a_token_used_before_nbf_is_rejected(self, auth: Authenticator) -> None:
        with pytest.raises(Unauthenticated, match="not yet valid"):
            auth.authenticate(hs_token(nbf=int(NOW) + 120))

    def test_a_token_without_exp_is_rejected(self, auth: Authenticator) -> None:
        with pytest.raises(Unauthenticated, match="'exp'"):
            auth.authenticate(hs_token(exp=None))

    def test_a_token_signed_with_another_secret_is_rejected(self, auth: Authenticator) -> None:
        forged = jwt.encode(
            {"iss": HS_ISSUER, "sub": "x", "tenant": "acme", "exp": int(NOW) + 60},
            b"some-other-secret-of-32-bytes-long!",
            algorithm="HS256",
        )
        with pytest.raises(Unauthenticated, match="signature"):
            auth.authenticate(forged)

    def test_an_unknown_issuer_is_rejected(self, auth: Authenticator) -> None:
        with pytest.raises(Unauthenticated, match="issuer is not trusted"):
            auth.authenticate(hs_token(iss="https://evil.example"))

    def test_a_missing_tenant_claim_is_rejected(self, auth: Authenticator) -> None:
        with pytest.raises(Unauthenticated, match="'tenant' claim"):
            auth.authenticate(hs_token(tenant=None))

    def test_a_wrong_audience_is_rejected(self, rsa_key: rsa.RSAPrivateKey, clock: Clock) -> None:
        auth = Authenticator(make_policy(rsa_key, audiences=("gateway",)), clock=clock)
        assert auth.authenticate(hs_token(aud="gateway")).tenants == ACME
        with pytest.raises(Unauthenticated, match="audience"):
            auth.authenticate(hs_token(aud="somebody-else"))
        with pytest.raises(Unauthenticated, match="'aud'"):
            auth.authenticate(hs_token())

    def test_any_audience_is_accepted_when_the_provider_lists_none(
        self, auth: Authenticator
    ) -> None:
        assert auth.authenticate(hs_token(aud="whatever")).tenants == ACME

    def test_the_token_never_appears_in_the_error(self, auth: Authenticator) -> None:
        token = hs_token(exp=int(NOW) - 3600)
        with pytest.raises(Unauthenticated) as exc:
            auth.authenticate(token)
        assert token not in exc.value.message
        assert token.split(".")[2] not in exc.value.message


class TestJwtRs256:
    def test_a_valid_token_is_accepted_with_the_tenant_from_a_nested_claim(
        self, auth: Authenticator, rsa_key: rsa.RSAPrivateKey
    ) -> None:
        ident = auth.authenticate(rs_token(rsa_key))
        assert (ident.tenants, ident.subject, ident.method) == (GLOBEX, "bob", "jwt")

    def test_the_only_key_is_used_when_the_token_has_no_kid(
        self, auth: Authenticator, rsa_key: rsa.RSAPrivateKey
    ) -> None:
        assert auth.authenticate(rs_token(rsa_key, kid=None)).tenants == GLOBEX

    def test_an_unknown_kid_is_rejected(
        self, auth: Authenticator, rsa_key: rsa.RSAPrivateKey
    ) -> None:
        with pytest.raises(Unauthenticated, match="'kid'"):
            auth.authenticate(rs_token(rsa_key, kid="k2"))

    def test_the_key_is_chosen_by_kid(
        self, rsa_key: rsa.RSAPrivateKey, other_rsa_key: rsa.RSAPrivateKey, clock: Clock
    ) -> None:
        policy = make_policy(rsa_key)
        (provider,) = policy.jwt_providers[RS_ISSUER]
        policy.jwt_providers[RS_ISSUER] = (
            JwtProvider(
                name=provider.name,
                issuer=RS_ISSUER,
                audiences=(),
                tenant_claim="org.tenant",
                hs256_secret=b"",
                jwks_json=jwks_for(("k1", rsa_key), ("k2", other_rsa_key)),
                namespace=NS,
            ),
        )
        auth = Authenticator(policy, clock=clock)
        assert auth.authenticate(rs_token(other_rsa_key, kid="k2")).tenants == GLOBEX
        with pytest.raises(Unauthenticated, match="signature"):
            auth.authenticate(rs_token(other_rsa_key, kid="k1"))
        with pytest.raises(Unauthenticated, match="no 'kid'"):
            auth.authenticate(rs_token(rsa_key, kid=None))

    def test_a_token_signed_by_a_foreign_key_is_rejected(
        self, auth: Authenticator, other_rsa_key: rsa.RSAPrivateKey
    ) -> None:
        with pytest.raises(Unauthenticated, match="signature"):
            auth.authenticate(rs_token(other_rsa_key))

    def test_a_missing_tenant_claim_is_rejected(
        self, auth: Authenticator, rsa_key: rsa.RSAPrivateKey
    ) -> None:
        with pytest.raises(Unauthenticated, match=r"'org\.tenant' claim"):
            auth.authenticate(rs_token(rsa_key, org={}))


class TestAlgorithmAttacks:
    def test_alg_none_is_rejected(self, auth: Authenticator) -> None:
        claims = {"iss": HS_ISSUER, "sub": "x", "tenant": "acme", "exp": int(NOW) + 60}
        unsigned = f"{b64({'alg': 'none', 'typ': 'JWT'})}.{b64(claims)}."
        with pytest.raises(Unauthenticated, match="must be signed with HS256"):
            auth.authenticate(unsigned)
        with pytest.raises(Unauthenticated):
            auth.authenticate(unsigned + "c2ln")

    def test_hs256_signed_with_the_public_key_is_rejected(
        self, auth: Authenticator, rsa_key: rsa.RSAPrivateKey
    ) -> None:
        pem = rsa_key.public_key().public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
        )
        claims = {"iss": RS_ISSUER, "sub": "x", "org": {"tenant": "t"}, "exp": int(NOW) + 60}
        # pyjwt refuses to sign with a PEM as an HMAC secret, so forge the signature by hand.
        import hmac as _hmac

        signing_input = f"{b64({'alg': 'HS256', 'typ': 'JWT', 'kid': 'k1'})}.{b64(claims)}"
        sig = _hmac.new(pem, signing_input.encode(), hashlib.sha256).digest()
        forged = signing_input + "." + base64.urlsafe_b64encode(sig).rstrip(b"=").decode()
        with pytest.raises(Unauthenticated, match="must be signed with RS256"):
            auth.authenticate(forged)

    def test_rs256_is_not_accepted_for_an_hmac_provider(
        self, auth: Authenticator, rsa_key: rsa.RSAPrivateKey
    ) -> None:
        token = jwt.encode(
            {"iss": HS_ISSUER, "sub": "x", "tenant": "acme", "exp": int(NOW) + 60},
            rsa_key,
            algorithm="RS256",
        )
        with pytest.raises(Unauthenticated, match="must be signed with HS256"):
            auth.authenticate(token)

    def test_a_garbage_jwt_shaped_credential_is_rejected(self, auth: Authenticator) -> None:
        with pytest.raises(Unauthenticated, match="malformed token"):
            auth.authenticate("aaaa.bbbb.cccc")


class TestJwtCache:
    def test_a_verified_token_is_served_from_the_cache_until_it_expires(
        self, rsa_key: rsa.RSAPrivateKey, clock: Clock, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        auth = Authenticator(make_policy(rsa_key), clock=clock, leeway=0)
        token = hs_token(exp=int(NOW) + 100)
        first = auth.authenticate(token)
        calls = 0
        real_decode = jwt.decode

        def counting_decode(*args: Any, **kwargs: Any) -> Any:
            nonlocal calls
            calls += 1
            return real_decode(*args, **kwargs)

        monkeypatch.setattr(jwt, "decode", counting_decode)
        assert auth.authenticate(token) is first
        assert calls == 0
        clock.t = NOW + 100
        with pytest.raises(Unauthenticated, match="expired"):
            auth.authenticate(token)
        assert calls == 1

    def test_the_cache_is_bounded(self, rsa_key: rsa.RSAPrivateKey, clock: Clock) -> None:
        auth = Authenticator(make_policy(rsa_key), clock=clock, cache_size=3)
        for i in range(10):
            auth.authenticate(hs_token(sub=f"user{i}"))
        assert len(auth._jwt_cache) == 3


class TestProviderConfiguration:
    def test_a_bad_jwks_is_reported_and_its_issuer_refuses_tokens(
        self, rsa_key: rsa.RSAPrivateKey, clock: Clock
    ) -> None:
        policy = make_policy(rsa_key)
        policy.jwt_providers[RS_ISSUER] = (
            JwtProvider(
                name="rs",
                issuer=RS_ISSUER,
                audiences=(),
                tenant_claim="tenant",
                hs256_secret=b"",
                jwks_json="{not json",
                namespace=NS,
            ),
        )
        auth = Authenticator(policy, clock=clock)
        assert auth.problems and "rs" in auth.problems[0]
        with pytest.raises(Unauthenticated, match="no usable signing keys"):
            auth.authenticate(rs_token(rsa_key))
        # The rest of the policy keeps working.
        assert auth.authenticate(API_KEY).tenants == ACME
        assert auth.authenticate(hs_token()).tenants == ACME
