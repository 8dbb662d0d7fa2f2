"""OIDC discovery against a real identity provider on loopback (aiohttp): the issuer's configuration
document names the key set, which is fetched, cached and refreshed like a configured jwksUri; a
document that speaks for another issuer, or points keys at a URL the rule forbids, is not trusted."""

from __future__ import annotations

import asyncio
import json
import logging
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

import jwt
import pytest
from aiohttp import web
from cryptography.hazmat.primitives.asymmetric import rsa
from jwt.algorithms import RSAAlgorithm

from controller.models import SpecError, parse_binding
from crdgol.pb import policy_pb2 as pb
from extproc.errors import Unavailable
from extproc.jwks import JwksCache
from extproc.oidc_discovery import DiscoveringFetcher, discovery_url
from extproc.services import Services

KEY_1, KEY_2 = (rsa.generate_private_key(public_exponent=65537, key_size=2048) for _ in range(2))


def jwk(kid: str, key: rsa.RSAPrivateKey) -> dict[str, object]:
    return {**json.loads(RSAAlgorithm.to_jwk(key.public_key())), "kid": kid, "use": "sig", "alg": "RS256"}


def token(issuer: str, kid: str, key: rsa.RSAPrivateKey) -> str:
    now = int(time.time())
    claims = {"iss": issuer, "sub": f"user-{uuid.uuid4()}", "tenant": "acme", "iat": now, "exp": now + 600}
    return jwt.encode(claims, key, algorithm="RS256", headers={"kid": kid})


@dataclass
class Provider:
    """A real OIDC provider: a configuration document and the key sets it may point at."""

    issuer: str = ""
    base: str = ""
    document_issuer: str | None = None  # None: the issuer itself
    jwks_path: str = "/keys"
    jwks_uri: str | None = None  # None: base + jwks_path
    document_cache_control: str = "max-age=3600"
    document_status: int = 200
    keys: dict[str, list[dict[str, object]]] = field(default_factory=lambda: {"/keys": [jwk("k1", KEY_1)], "/keys-2": [jwk("k2", KEY_2)]})
    document_hits: int = 0
    key_hits: int = 0

    async def document(self, _req: web.Request) -> web.Response:
        self.document_hits += 1
        if self.document_status != 200:
            return web.Response(status=self.document_status, text="down")
        doc = {
            "issuer": self.issuer if self.document_issuer is None else self.document_issuer,
            "jwks_uri": self.jwks_uri or self.base + self.jwks_path,
            "authorization_endpoint": self.base + "/authorize",
        }
        return web.json_response(doc, headers={"cache-control": self.document_cache_control})

    async def key_set(self, req: web.Request) -> web.Response:
        self.key_hits += 1
        return web.json_response({"keys": self.keys[req.path]}, headers={"cache-control": "max-age=600"})


@dataclass
class Clock:
    now: float = 1000.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
async def idp() -> AsyncIterator[Provider]:
    p = Provider()
    app = web.Application()
    app.router.add_get("/realm/.well-known/openid-configuration", p.document)
    app.router.add_get("/keys", p.key_set)
    app.router.add_get("/keys-2", p.key_set)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    p.base = f"http://127.0.0.1:{runner.addresses[0][1]}"
    p.issuer = p.base + "/realm"
    try:
        yield p
    finally:
        await runner.cleanup()


def services_for(issuer: str, clock: Clock) -> Services:
    fetcher = DiscoveringFetcher(clock=clock)
    cache = JwksCache(fetch=fetcher.fetch, clock=clock, min_refresh=10.0, retry_after_error=10.0, timeout=2.0, request_wait=0.5)
    services = Services(jwks=cache)
    snap = pb.PolicySnapshot(
        version=1,
        jwt_providers=[pb.JwtProvider(name="idp", issuer=issuer, tenant_claim="tenant", discovery=True, namespace="team-a")],
    )
    assert services.policy.offer(snap)
    return services


async def settle() -> None:
    for _ in range(50):
        await asyncio.sleep(0.01)


async def test_a_token_is_verified_with_keys_found_through_the_issuers_discovery_document(idp: Provider) -> None:
    services = services_for(idp.issuer, Clock())
    for _ in range(4):
        identity = await services.authenticate(token(idp.issuer, "k1", KEY_1))
        assert identity.tenants == ("team-a/acme",)
    assert (idp.document_hits, idp.key_hits) == (1, 1)


async def test_a_rotation_refetches_the_keys_and_the_document_only_when_it_expires(idp: Provider) -> None:
    idp.document_cache_control = "max-age=120"
    clock = Clock()
    services = services_for(idp.issuer, clock)
    await services.authenticate(token(idp.issuer, "k1", KEY_1))
    idp.keys["/keys"] = [jwk("k1", KEY_1), jwk("k2", KEY_2)]
    clock.now += 20
    assert (await services.authenticate(token(idp.issuer, "k2", KEY_2))).tenants == ("team-a/acme",)
    assert (idp.document_hits, idp.key_hits) == (1, 2)  # unknown kid: keys again, document cached
    # The provider moves its keys; once the document's max-age is over, the new jwks_uri is used.
    idp.jwks_path = "/keys-2"
    idp.keys["/keys-2"] = [jwk("k3", KEY_1)]
    clock.now += 121
    assert (await services.authenticate(token(idp.issuer, "k3", KEY_1))).tenants == ("team-a/acme",)
    assert idp.document_hits == 2


async def test_a_document_that_names_another_issuer_is_not_trusted(idp: Provider, caplog: pytest.LogCaptureFixture) -> None:
    idp.document_issuer = idp.issuer + "/"  # exact match required: not even a trailing slash differs
    services = services_for(idp.issuer, Clock())
    with caplog.at_level(logging.WARNING, logger="extproc.jwks"), pytest.raises(Unavailable) as err:
        await services.authenticate(token(idp.issuer, "k1", KEY_1))
    assert err.value.status == 503 and err.value.code == "jwks_unavailable"
    assert idp.key_hits == 0
    assert any("different issuer" in r.getMessage() for r in caplog.records)


async def test_a_discovered_jwks_uri_must_pass_the_url_rule(idp: Provider) -> None:
    idp.jwks_uri = "http://keys.attacker.example/keys"  # clear text to a remote host: swappable keys
    services = services_for(idp.issuer, Clock())
    with pytest.raises(Unavailable):
        await services.authenticate(token(idp.issuer, "k1", KEY_1))
    assert idp.document_hits == 1 and idp.key_hits == 0


async def test_while_the_document_is_unavailable_the_last_good_one_still_leads_to_the_keys(idp: Provider) -> None:
    idp.document_cache_control = "max-age=60"
    clock = Clock()
    services = services_for(idp.issuer, clock)
    await services.authenticate(token(idp.issuer, "k1", KEY_1))
    idp.document_status = 503
    idp.keys["/keys"] = [jwk("k1", KEY_1), jwk("k2", KEY_2)]
    clock.now += 3600
    assert (await services.authenticate(token(idp.issuer, "k2", KEY_2))).tenants == ("team-a/acme",)
    await settle()
    assert idp.document_hits == 2 and idp.key_hits == 2


def test_the_document_url_drops_one_terminating_slash_of_the_issuer() -> None:
    assert discovery_url("https://idp.example/realm/") == "https://idp.example/realm/.well-known/openid-configuration"
    assert discovery_url("https://idp.example") == "https://idp.example/.well-known/openid-configuration"


def binding(jwt_entry: dict[str, object]) -> dict[str, object]:
    return {
        "apiVersion": "crdgol.io/v1alpha1",
        "kind": "AIModelBinding",
        "metadata": {"name": "b", "namespace": "team-a"},
        "spec": {
            "model": "m",
            "backends": [{"name": "main", "provider": "openai-compatible", "endpoint": "https://llm.example/v1", "model": "x"}],
            "auth": {"jwt": [jwt_entry]},
        },
    }


@pytest.mark.parametrize(
    ("entry", "message"),
    [
        ({"issuer": "https://idp.example", "discovery": True, "jwksUri": "https://idp.example/keys"}, "exactly one of"),
        ({"issuer": "http://idp.example", "discovery": True}, "must use https"),
        ({"issuer": "https://idp.example?tenant=x", "discovery": True}, "?query"),
        ({"issuer": "https://idp.example", "discovery": "yes"}, "true or false"),
    ],
)
def test_the_controller_refuses_a_discovery_issuer_it_could_not_trust(entry: dict[str, object], message: str) -> None:
    with pytest.raises(SpecError) as err:
        parse_binding(binding(entry))
    assert message in str(err.value)


def test_the_controller_accepts_an_https_issuer_with_discovery() -> None:
    spec = parse_binding(binding({"issuer": "https://idp.example/realm", "discovery": True}))
    assert spec.jwt[0].discovery and not spec.jwt[0].jwks_uri
