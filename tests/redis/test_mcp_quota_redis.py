"""The tool-call quota of an MCPServer, shared by three extproc replicas through one real Redis."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Iterator

import httpx
import pytest

from crdgol.stack import Stack, StackSettings
from tests.mcp_tool_servers import ToolServer
from tests.redis.conftest import RedisServer

KEY = "sk-redis-mcp"
HEADERS = {"authorization": f"Bearer {KEY}", "accept": "application/json, text/event-stream"}


@pytest.fixture(scope="module")
def gateway(tmp_path_factory: pytest.TempPathFactory, redis_server: RedisServer) -> Iterator[Stack]:
    folder = tmp_path_factory.mktemp("redis-mcp")
    tools = ToolServer("alpha")
    docs = [
        {
            "apiVersion": "v1",
            "kind": "Secret",
            "metadata": {"name": "k", "labels": {"crdgol.io/api-key": "true"}, "annotations": {"crdgol.io/tenant": "t1"}},
            "stringData": {"key": KEY},
        },
        {
            "apiVersion": "crdgol.io/v1alpha1",
            "kind": "MCPServer",
            "metadata": {"name": "alpha"},
            "spec": {"url": tools.url, "toolPrefix": "alpha", "quotas": {"default": {"requests": [{"amount": 5, "per": "day"}]}}},
        },
    ]
    (folder / "all.yaml").write_text("---\n".join(json.dumps(d) + "\n" for d in docs))
    stack = Stack(StackSettings(manifests=folder, mock_port=None, quiet=True, redis_url=redis_server.url, extproc_replicas=3))
    try:
        stack.start()
        yield stack
    finally:
        stack.stop()
        tools.stop()


async def calls(url: str, n: int) -> list[int]:
    init = {"jsonrpc": "2.0", "id": 0, "method": "initialize", "params": {"protocolVersion": "2025-06-18", "capabilities": {}, "clientInfo": {"name": "t", "version": "1"}}}
    async with httpx.AsyncClient(timeout=30, limits=httpx.Limits(max_connections=n)) as c:
        r = await c.post(url, json=init, headers=HEADERS)
        assert r.status_code == 200, r.text
        session = {**HEADERS, "mcp-session-id": r.headers["mcp-session-id"]}
        await c.post(url, json={"jsonrpc": "2.0", "method": "notifications/initialized"}, headers=session)
        body = {"jsonrpc": "2.0", "method": "tools/call", "params": {"name": "alpha__add", "arguments": {"a": 1, "b": 2}}}
        rs = await asyncio.gather(*(c.post(url, json={**body, "id": i + 1}, headers=session) for i in range(n)))
    return [r.status_code for r in rs]


def test_twelve_concurrent_tool_calls_across_three_replicas_get_exactly_the_quota(gateway: Stack) -> None:
    codes = asyncio.run(calls(f"{gateway.url}/mcp", 12))
    assert codes.count(200) == 5, codes
    assert codes.count(429) == 7, codes


def test_a_session_ended_on_one_replica_is_ended_on_every_replica(gateway: Stack) -> None:
    """The registry of MCP sessions (``extproc.mcp_sessions``) is in Redis: after a DELETE
    answered by one replica, every replica answers 404 for the id."""

    async def run() -> tuple[int, list[int]]:
        init = {"jsonrpc": "2.0", "id": 0, "method": "initialize", "params": {"protocolVersion": "2025-06-18", "capabilities": {}, "clientInfo": {"name": "t", "version": "1"}}}
        url = f"{gateway.url}/mcp"
        async with httpx.AsyncClient(timeout=30, limits=httpx.Limits(max_connections=8)) as c:
            r = await c.post(url, json=init, headers=HEADERS)
            session = {**HEADERS, "mcp-session-id": r.headers["mcp-session-id"]}
            await c.post(url, json={"jsonrpc": "2.0", "method": "notifications/initialized"}, headers=session)
            ended = (await c.delete(url, headers=session)).status_code
            ping = {"jsonrpc": "2.0", "method": "tools/list"}
            # Eight at once on fresh connections: Envoy spreads them over the three replicas.
            rs = await asyncio.gather(*(c.post(url, json={**ping, "id": i + 1}, headers=session) for i in range(8)))
        return ended, [r.status_code for r in rs]

    ended, later = asyncio.run(run())
    assert ended == 200 and later == [404] * 8
