"""The semantic cache's embeddings call, from extproc itself (which every tenant shares), to the
backend of a binding's author: its answer must not fill extproc's memory. Real HTTP over
loopback (an unbounded read took in about 1.2 GB in the call's 2 s)."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from dataclasses import dataclass

import pytest
from aiohttp import web

from extproc.cache_semantic import Embedder, EmbeddingFailed
from extproc.policy import Api, Backend

CREDENTIAL = "sk-embeddings-owner-7c1e"
CAP = 4 * 1024 * 1024  # far more than any embeddings answer (a few KiB of floats)


@dataclass
class Server:
    port: int = 0
    served: int = 0


@pytest.fixture
async def server() -> AsyncIterator[Server]:
    s = Server()

    async def endless(request: web.Request) -> web.StreamResponse:
        resp = web.StreamResponse(headers={"content-type": "application/json"})
        await resp.prepare(request)
        await resp.write(b'{"data": [{"embedding": [')
        try:
            while True:
                await resp.write(b"0.1," * 16384)
                s.served += 65536
                await asyncio.sleep(0)
        except (ConnectionResetError, RuntimeError):
            pass  # the client hung up
        return resp

    app = web.Application()
    app.router.add_post("/endless/v1/embeddings", endless)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    s.port = runner.addresses[0][1]
    try:
        yield s
    finally:
        await runner.cleanup()


def backend(port: int, prefix: str) -> Backend:
    return Backend(
        id="b", api=Api.OPENAI, model="embed", host=f"127.0.0.1:{port}", path_prefix=prefix,
        auth_headers=(("authorization", f"Bearer {CREDENTIAL}"),), weight=1, priority=0,
    )


async def test_an_embeddings_answer_without_end_is_not_read_past_a_bound(server: Server) -> None:
    embedder = Embedder(timeout=2.0)
    try:
        with pytest.raises(EmbeddingFailed):
            await embedder.embed(backend(server.port, "/endless"), "hello")
    finally:
        await embedder.aclose()
    assert server.served <= CAP + 1024 * 1024, f"extproc read {server.served} bytes of one embeddings answer"
