"""A JWT caller at ``/mcp`` whose issuer's keys come from a remote JWKS is authenticated as on the
model endpoints: its first request waits for the key set (or gets a JSON 503 while the key server
was never reached), instead of failing inside extproc."""

from __future__ import annotations

import json
import time
from collections.abc import AsyncIterator

import jwt
import orjson
import pytest
from aiohttp import web
from cryptography.hazmat.primitives.asymmetric import rsa
from jwt.algorithms import RSAAlgorithm

from crdgol.mcp_contract import TENANT_HEADER
from crdgol.pb import policy_pb2 as pb
from crdgol.request_path import ROUTE_HEADER
from extproc.jwks import JwksCache
from extproc.policy import PolicyHolder, compile_policy
from extproc.services import Services
from tests.unit.test_mcp_servers import body_msg, call, drive, headers_msg, rendered, server

ISSUER = "https://idp.example"
KEY = rsa.generate_private_key(public_exponent=65537, key_size=2048)
JWKS = {"keys": [{**json.loads(RSAAlgorithm.to_jwk(KEY.public_key())), "kid": "k1", "use": "sig", "alg": "RS256"}]}


@pytest.fixture
async def jwks_url() -> AsyncIterator[str]:
    async def keys(_req: web.Request) -> web.Response:
        return web.json_response(JWKS)

    app = web.Application()
    app.router.add_get("/jwks.json", keys)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    try:
        yield f"http://127.0.0.1:{runner.addresses[0][1]}/jwks.json"
    finally:
        await runner.cleanup()


async def test_a_jwt_caller_of_a_remote_jwks_issuer_reaches_its_tools(jwks_url: str) -> None:
    snapshot = rendered(server(tools={"default": ["lookup"]})).snapshot
    snapshot.version = 1
    snapshot.jwt_providers.append(pb.JwtProvider(name="idp", issuer=ISSUER, tenant_claim="tenant", jwks_uri=jwks_url, namespace="default"))
    services = Services(policy=PolicyHolder(compile_policy(snapshot)), jwks=JwksCache())
    now = int(time.time())
    token = jwt.encode({"iss": ISSUER, "sub": "ada", "tenant": "intern", "iat": now, "exp": now + 600}, KEY, algorithm="RS256", headers={"kid": "k1"})
    out = await drive(services, headers_msg("POST", token), body_msg(call("crm__lookup")))
    assert not out[-1].HasField("immediate_response"), orjson.loads(out[-1].immediate_response.body)
    forwarded = {h.header.key: h.header.raw_value.decode() for h in out[1].request_body.response.header_mutation.set_headers}
    assert forwarded[ROUTE_HEADER] == "crdgol-mcp.default~crm" and forwarded[TENANT_HEADER] == "default/intern"
