"""A key set that reaches the gateway in several pieces (chunked transfer, TLS records, slow
links: any real identity provider with a large JWKS) is read whole, and an oversized one is
still refused."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator

import pytest
from aiohttp import web
from cryptography.hazmat.primitives.asymmetric import rsa
from jwt.algorithms import RSAAlgorithm

from extproc.jwks import MAX_JWKS_BYTES, fetch_jwks
from extproc.oidc_discovery import fetch_configuration


def _jwk(kid: str) -> dict[str, object]:
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    return {**json.loads(RSAAlgorithm.to_jwk(key.public_key())), "kid": kid, "use": "sig", "alg": "RS256"}


KEYS = [_jwk(f"k{i}") for i in range(3)]


async def _serve(body: bytes, piece: int) -> AsyncIterator[str]:
    async def handle(request: web.Request) -> web.StreamResponse:
        resp = web.StreamResponse(headers={"content-type": "application/json"})
        await resp.prepare(request)
        for i in range(0, len(body), piece):
            await resp.write(body[i : i + piece])
            await asyncio.sleep(0.02)  # each piece arrives on its own, as over a real network
        await resp.write_eof()
        return resp

    app = web.Application()
    app.router.add_get("/jwks.json", handle)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
    try:
        yield f"http://127.0.0.1:{port}/jwks.json"
    finally:
        await runner.cleanup()


@pytest.fixture
async def chunked_url() -> AsyncIterator[str]:
    async for url in _serve(json.dumps({"keys": KEYS}).encode(), 500):
        yield url


@pytest.fixture
async def oversized_url() -> AsyncIterator[str]:
    body = json.dumps({"keys": KEYS, "padding": "x" * MAX_JWKS_BYTES}).encode()
    async for url in _serve(body, 64 * 1024):
        yield url


async def test_a_key_set_that_arrives_in_pieces_is_read_whole(chunked_url: str) -> None:
    fetched = await fetch_jwks(chunked_url, 5.0)
    assert sorted(fetched.keys) == ["k0", "k1", "k2"]


async def test_a_key_set_over_the_size_limit_is_refused_even_when_it_arrives_in_pieces(oversized_url: str) -> None:
    with pytest.raises(ValueError, match="larger than"):
        await fetch_jwks(oversized_url, 5.0)


@pytest.fixture
async def chunked_issuer() -> AsyncIterator[str]:
    """An identity provider whose discovery document arrives in pieces of 40 bytes."""
    issuer = ""

    async def document(request: web.Request) -> web.StreamResponse:
        body = json.dumps({"issuer": issuer, "jwks_uri": f"{issuer}/jwks.json", "padding": "x" * 400}).encode()
        resp = web.StreamResponse(headers={"content-type": "application/json"})
        await resp.prepare(request)
        for i in range(0, len(body), 40):
            await resp.write(body[i : i + 40])
            await asyncio.sleep(0.01)
        await resp.write_eof()
        return resp

    app = web.Application()
    app.router.add_get("/.well-known/openid-configuration", document)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    issuer = f"http://127.0.0.1:{site._server.sockets[0].getsockname()[1]}"  # type: ignore[union-attr]
    try:
        yield issuer
    finally:
        await runner.cleanup()


async def test_a_discovery_document_that_arrives_in_pieces_is_read_whole(chunked_issuer: str) -> None:
    jwks_uri, _ = await fetch_configuration(chunked_issuer, 5.0)
    assert jwks_uri == f"{chunked_issuer}/jwks.json"
