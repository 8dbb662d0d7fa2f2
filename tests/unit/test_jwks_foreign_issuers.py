"""Other namespaces declaring a caller's issuer with slow key servers of their own cannot hold
the caller's first request past Envoy's 2 s answer (503 ``policy_unavailable`` there): the
gateway waits for their key sets together, at most once the request wait, not one after another."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator

import jwt
import pytest
from aiohttp import web
from cryptography.hazmat.primitives.asymmetric import rsa
from jwt.algorithms import RSAAlgorithm

from crdgol.pb import policy_pb2 as pb
from extproc.jwks import JwksCache
from extproc.services import Services

ISSUER = "https://idp.example"
KEY = rsa.generate_private_key(public_exponent=65537, key_size=2048)
JWKS = {"keys": [{**json.loads(RSAAlgorithm.to_jwk(KEY.public_key())), "kid": "k1", "use": "sig", "alg": "RS256"}]}
ATTACKERS = ("team-x", "team-y", "team-z")
REQUEST_WAIT = 1.0  # JwksCache's default


@pytest.fixture
async def key_servers() -> AsyncIterator[tuple[str, list[str]]]:
    """The victim's key server (fast) and one slow one per attacking namespace."""

    async def fast(_req: web.Request) -> web.Response:
        return web.json_response(JWKS)

    async def slow(_req: web.Request) -> web.Response:
        await asyncio.sleep(4.0)
        return web.json_response({"keys": []})

    app = web.Application()
    app.router.add_get("/victim", fast)
    for ns in ATTACKERS:
        app.router.add_get(f"/{ns}", slow)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    base = f"http://127.0.0.1:{runner.addresses[0][1]}"
    try:
        yield f"{base}/victim", [f"{base}/{ns}" for ns in ATTACKERS]
    finally:
        await runner.cleanup()


async def test_slow_foreign_key_servers_delay_a_callers_first_request_at_most_once(key_servers: tuple[str, list[str]]) -> None:
    victim, attackers = key_servers
    services = Services(jwks=JwksCache(request_wait=REQUEST_WAIT))
    providers = [pb.JwtProvider(name="idp", issuer=ISSUER, tenant_claim="tenant", jwks_uri=victim, namespace="team-a")]
    providers += [pb.JwtProvider(name="idp", issuer=ISSUER, tenant_claim="tenant", jwks_uri=uri, namespace=ns) for ns, uri in zip(ATTACKERS, attackers, strict=True)]
    assert services.policy.offer(pb.PolicySnapshot(version=1, jwt_providers=providers))
    now = int(time.time())
    token = jwt.encode({"iss": ISSUER, "sub": "ada", "tenant": "acme", "iat": now, "exp": now + 600}, KEY, algorithm="RS256", headers={"kid": "k1"})
    started = time.monotonic()
    identity = await services.authenticate(token)
    took = time.monotonic() - started
    assert identity.tenants == ("team-a/acme",)
    assert took < REQUEST_WAIT + 0.5, f"the first request waited {took:.1f}s for other namespaces' key servers"
