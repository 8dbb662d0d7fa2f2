"""Remote JWKS: an issuer's keys fetched from a real key server on loopback, which rotates them,
goes down, and is probed with forged key ids."""

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

from crdgol.jwks_url import jwks_url_problem
from crdgol.pb import policy_pb2 as pb
from extproc.errors import Unauthenticated, Unavailable
from extproc.jwks import JwksCache, fetch_jwks, max_age
from extproc.services import Services

ISSUER = "https://idp.example"


def new_key() -> rsa.RSAPrivateKey:
    return rsa.generate_private_key(public_exponent=65537, key_size=2048)


KEY_1, KEY_2, ATTACKER = new_key(), new_key(), new_key()


def jwk(kid: str, key: rsa.RSAPrivateKey) -> dict[str, object]:
    return {**json.loads(RSAAlgorithm.to_jwk(key.public_key())), "kid": kid, "use": "sig", "alg": "RS256"}


def token(kid: str, key: rsa.RSAPrivateKey, tenant: str = "acme") -> str:
    now = int(time.time())
    claims = {"iss": ISSUER, "sub": f"user-{uuid.uuid4()}", "tenant": tenant, "iat": now, "exp": now + 600}
    return jwt.encode(claims, key, algorithm="RS256", headers={"kid": kid})


@dataclass
class KeyServer:
    """A real HTTP key server: what it publishes, how long it says to cache it, whether it is up."""

    keys: list[dict[str, object]] = field(default_factory=lambda: [jwk("k1", KEY_1)])
    cache_control: str = "public, max-age=600"
    status: int = 200
    delay: float = 0.0
    hits: int = 0
    url: str = ""

    async def handle(self, _req: web.Request) -> web.Response:
        self.hits += 1
        await asyncio.sleep(self.delay)
        if self.status != 200:
            return web.Response(status=self.status, text="down")
        return web.json_response({"keys": self.keys}, headers={"cache-control": self.cache_control})

    async def redirect(self, _req: web.Request) -> web.Response:
        raise web.HTTPFound("http://example.com/jwks.json")


@dataclass
class Clock:
    now: float = 1000.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
async def server() -> AsyncIterator[KeyServer]:
    ks = KeyServer()
    app = web.Application()
    app.router.add_get("/jwks.json", ks.handle)
    app.router.add_get("/moved", ks.redirect)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = runner.addresses[0][1]
    ks.url = f"http://127.0.0.1:{port}/jwks.json"
    try:
        yield ks
    finally:
        await runner.cleanup()


def services_for(uri: str, clock: Clock) -> Services:
    services = Services(jwks=JwksCache(clock=clock, min_refresh=10.0, retry_after_error=10.0, timeout=2.0, request_wait=0.3))
    snap = pb.PolicySnapshot(
        version=1,
        jwt_providers=[pb.JwtProvider(name="idp", issuer=ISSUER, tenant_claim="tenant", jwks_uri=uri, namespace="team-a")],
    )
    assert services.policy.offer(snap)
    return services


async def settle() -> None:
    """Let background fetches (started off the request path) finish."""
    for _ in range(50):
        await asyncio.sleep(0.01)


async def test_a_token_is_verified_with_keys_fetched_from_the_issuers_url_once_for_many_requests(server: KeyServer) -> None:
    services = services_for(server.url, Clock())
    for _ in range(5):
        identity = await services.authenticate(token("k1", KEY_1))
        assert identity.tenants == ("team-a/acme",)
    assert server.hits == 1


async def test_a_new_policy_starts_fetching_its_keys_before_the_first_token(server: KeyServer) -> None:
    services = services_for(server.url, Clock())
    services.authenticator()  # what extproc does when a policy arrives
    await settle()
    assert server.hits == 1
    await services.authenticate(token("k1", KEY_1))
    assert server.hits == 1


async def test_cache_control_sets_the_lifetime_and_a_stale_set_keeps_serving_while_it_refreshes(server: KeyServer) -> None:
    server.cache_control = "max-age=120"
    clock = Clock()
    services = services_for(server.url, clock)
    await services.authenticate(token("k1", KEY_1))
    clock.now += 119
    await services.authenticate(token("k1", KEY_1))
    await settle()
    assert server.hits == 1
    clock.now += 2  # past max-age: answered from the stale set at once, refreshed behind it
    started = time.monotonic()
    await services.authenticate(token("k1", KEY_1))
    assert time.monotonic() - started < 0.05
    await settle()
    assert server.hits == 2


async def test_a_rotated_key_is_fetched_as_soon_as_a_token_names_it(server: KeyServer) -> None:
    services = services_for(server.url, Clock())
    await services.authenticate(token("k1", KEY_1))
    server.keys = [jwk("k2", KEY_2)]  # the issuer rotates: k1 is gone, k2 signs
    identity = await services.authenticate(token("k2", KEY_2))
    assert identity.tenants == ("team-a/acme",) and server.hits == 2
    with pytest.raises(Unauthenticated, match="'kid'"):
        await services.authenticate(token("k1", KEY_1))  # k1 no longer published (and no refetch yet)


async def test_forged_key_ids_cannot_make_the_gateway_hammer_the_key_server(server: KeyServer) -> None:
    clock = Clock()
    services = services_for(server.url, clock)
    await services.authenticate(token("k1", KEY_1))
    forged = [token(f"forged-{i}", ATTACKER) for i in range(30)]
    results = await asyncio.gather(*(services.authenticate(t) for t in forged), return_exceptions=True)
    assert all(isinstance(r, Unauthenticated) for r in results), results
    assert server.hits == 2  # one refresh for the first unknown kid, none for the other 29
    clock.now += 5
    with pytest.raises(Unauthenticated):
        await services.authenticate(token("forged-x", ATTACKER))
    assert server.hits == 2
    clock.now += 6  # the refresh interval passed: one more look
    with pytest.raises(Unauthenticated):
        await services.authenticate(token("forged-y", ATTACKER))
    assert server.hits == 3
    # A key that really verifies still needs the issuer's own key: an attacker's kid never does.
    await services.authenticate(token("k1", KEY_1))


async def test_while_the_key_server_is_down_the_last_good_keys_stay_in_force(server: KeyServer, caplog: pytest.LogCaptureFixture) -> None:
    server.cache_control = "max-age=60"
    clock = Clock()
    services = services_for(server.url, clock)
    await services.authenticate(token("k1", KEY_1))
    server.status = 503
    clock.now += 3600
    with caplog.at_level(logging.WARNING, logger="extproc.jwks"):
        for _ in range(3):
            identity = await services.authenticate(token("k1", KEY_1))
            assert identity.tenants == ("team-a/acme",)
        await settle()
    assert server.hits == 2  # one failed refresh; the next waits retry_after_error
    assert any("keeping the last good set" in r.getMessage() for r in caplog.records)
    server.status = 200
    server.keys = [jwk("k1", KEY_1), jwk("k2", KEY_2)]
    clock.now += 11
    await services.authenticate(token("k1", KEY_1))
    await settle()
    assert server.hits == 3
    await services.authenticate(token("k2", KEY_2))
    assert server.hits == 3  # the refreshed set already had k2


async def test_an_issuer_whose_keys_were_never_fetched_answers_503_not_401(server: KeyServer) -> None:
    server.status = 500
    services = services_for(server.url, Clock())
    with pytest.raises(Unavailable) as err:
        await services.authenticate(token("k1", KEY_1))
    assert err.value.status == 503 and err.value.code == "jwks_unavailable"
    assert server.hits == 1
    with pytest.raises(Unavailable):
        await services.authenticate(token("k1", KEY_1))
    assert server.hits == 1  # not retried before retry_after_error


async def test_a_slow_key_server_holds_a_request_only_briefly_and_the_fetch_goes_on(server: KeyServer) -> None:
    server.delay = 0.8
    services = services_for(server.url, Clock())
    started = time.monotonic()
    with pytest.raises(Unavailable):
        await services.authenticate(token("k1", KEY_1))
    assert time.monotonic() - started < 0.6  # request_wait, not the fetch's own timeout
    await asyncio.sleep(0.8)
    identity = await services.authenticate(token("k1", KEY_1))
    assert identity.tenants == ("team-a/acme",) and server.hits == 1


async def test_a_key_server_that_redirects_or_answers_garbage_is_not_trusted(server: KeyServer) -> None:
    with pytest.raises(ValueError, match="HTTP 302"):
        await fetch_jwks(server.url.replace("/jwks.json", "/moved"), 2.0)
    server.keys = [{"kty": "RSA", "kid": "bad", "n": "!!", "e": "AQAB"}]
    with pytest.raises(ValueError, match="not a valid RSA JWK"):
        await fetch_jwks(server.url, 2.0)
    server.keys = [{"kty": "EC", "kid": "ec", "crv": "P-256", "x": "a", "y": "b"}]
    with pytest.raises(ValueError, match="no RS256 signing keys"):
        await fetch_jwks(server.url, 2.0)


def test_only_https_urls_or_loopback_http_may_serve_keys() -> None:
    assert jwks_url_problem("https://login.example.com/.well-known/jwks.json") == ""
    assert jwks_url_problem("http://127.0.0.1:8080/jwks") == ""
    assert jwks_url_problem("http://localhost/jwks") == ""
    assert jwks_url_problem("http://[::1]:9/jwks") == ""
    assert "https" in jwks_url_problem("http://idp.example.com/jwks")
    assert "https" in jwks_url_problem("http://10.0.0.1/jwks")
    assert "credentials" in jwks_url_problem("https://user:pw@idp.example.com/jwks")
    assert jwks_url_problem("file:///etc/passwd")
    assert jwks_url_problem("https://idp.example.com:99999/jwks")


async def test_the_fetcher_itself_refuses_a_url_the_rule_forbids() -> None:
    with pytest.raises(ValueError, match="refused URL"):
        await fetch_jwks("http://idp.example.com/jwks", 1.0)


def test_cache_control_is_read_for_max_age_and_no_store() -> None:
    assert max_age("public, max-age=3600") == 3600
    assert max_age('max-age="90", must-revalidate') == 90
    assert max_age("no-store") == 0 and max_age("no-cache, max-age=60") == 0
    assert max_age("") is None and max_age("s-maxage=5") is None
