"""The MCP session registry and the composite session id of Envoy's mcp_router (extproc.mcp_sessions)."""

from __future__ import annotations

import base64

from extproc.mcp_policy import ToolServer
from extproc.mcp_sessions import ENTRY_TTL, MemorySessionRegistry, entry_key, parse_session_id
from extproc.policy import QuotaPolicy


def b64(text: str) -> str:
    return base64.b64encode(text.encode()).decode()


def composite(subject: str, **servers: str) -> str:
    """An id as mcp_router builds it: base64 of route@base64(subject)@server:base64(session),..."""
    return b64(f"@{b64(subject)}@" + ",".join(f"{name}:{b64(sid)}" for name, sid in servers.items()))


def test_a_composite_id_reads_as_its_tenant_and_each_servers_session() -> None:
    parsed = parse_session_id(composite("default/analyst", alpha="a-1", beta="b-2"))
    assert parsed is not None and parsed.subject == "default/analyst"
    assert dict(parsed.servers) == {"alpha": "a-1", "beta": "b-2"}
    assert parse_session_id(composite("default/analyst")) is not None  # servers without sessions


def test_an_id_that_is_not_mcp_routers_reads_as_no_session() -> None:
    for junk in ("", "not-a-session", b64("no at signs"), b64("a@b@c@d"), b64(f"@{b64('t')}@alpha:%%%")):
        assert parse_session_id(junk) is None, junk


def test_an_id_naming_a_server_twice_or_carrying_an_unsendable_session_is_refused() -> None:
    # Plain base64 that any caller writes: one request must not claim thousands of registry keys
    # (or fan out as many DELETEs), nor smuggle a header line to a server.
    repeated = b64(f"@{b64('default/analyst')}@" + ",".join(f"alpha:{b64(str(i))}" for i in range(3)))
    assert parse_session_id(repeated) is None
    for bad in ("a\r\nX-Injected: 1", "x" * 257, "caf\u00e9"):
        assert parse_session_id(composite("default/analyst", alpha=bad)) is None, bad
    assert parse_session_id(composite("default/analyst", alpha="x" * 256)) is not None


def server(key: str) -> ToolServer:
    return ToolServer(key, key.split("/")[1], frozenset(), frozenset(), {}, QuotaPolicy(), "", "")


async def test_a_server_session_belongs_to_the_tenant_that_used_it_first() -> None:
    reg = MemorySessionRegistry()
    keys = [entry_key(server("default/alpha"), "a-1")]
    assert await reg.claim(keys, "default/analyst", 0.0) == "ok"
    assert await reg.claim(keys, "default/analyst", 10.0) == "ok"
    assert await reg.claim(keys, "default/intern", 20.0) == "foreign"
    # Any id naming it, alongside sessions of one's own, is still refused.
    mine = [entry_key(server("default/beta"), "b-9")]
    assert await reg.claim(mine, "default/intern", 20.0) == "ok"
    assert await reg.claim(mine + keys, "default/intern", 21.0) == "foreign"
    # The same session id at another server is another session.
    assert await reg.claim([entry_key(server("default/beta"), "a-1")], "default/intern", 22.0) == "ok"


async def test_an_ended_session_stays_ended_for_everyone_until_its_entry_expires() -> None:
    reg = MemorySessionRegistry()
    keys = [entry_key(server("default/alpha"), "a-1")]
    await reg.claim(keys, "default/analyst", 0.0)
    await reg.end(keys, 5.0)
    assert await reg.claim(keys, "default/analyst", 6.0) == "ended"
    assert await reg.claim(keys, "default/intern", 6.0) == "ended"
    assert await reg.claim(keys, "default/intern", 5.0 + ENTRY_TTL + 1) == "ok"


async def test_the_memory_registry_is_bounded_and_drops_the_least_recently_used() -> None:
    reg = MemorySessionRegistry(limit=3)
    keys = [entry_key(server("default/alpha"), f"s-{i}") for i in range(4)]
    for i, k in enumerate(keys[:3]):
        await reg.claim([k], "default/analyst", float(i))
    await reg.claim([keys[0]], "default/analyst", 3.0)  # used again: now the most recent
    await reg.claim([keys[3]], "default/analyst", 4.0)
    assert len(reg.entries) == 3 and keys[1] not in reg.entries and keys[0] in reg.entries


async def test_when_the_shared_store_is_unreachable_requests_go_on_and_the_failure_is_counted() -> None:
    from crdgol.stack import free_port
    from extproc.mcp_sessions import McpSessions, RedisSessionRegistry
    from extproc.redis_client import RedisClient

    client = RedisClient.from_url(f"redis://127.0.0.1:{free_port()}/0", connect_timeout=0.2)  # nothing listens there
    failures: list[int] = []
    sessions = McpSessions(RedisSessionRegistry(client, timeout=0.3))
    sessions.on_store_error = lambda: failures.append(1)
    keys = [entry_key(server("default/alpha"), "a-1")]
    assert await sessions.claim(keys, "default/analyst", 0.0) == "ok"
    await sessions.end(keys, 1.0)
    assert len(failures) == 2
    await client.aclose()
