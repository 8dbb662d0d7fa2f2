"""MCP sessions across the gateway at /mcp, through real Envoy and extproc, with real SDK servers
and the SDK's own client: kept across calls, ended by DELETE on every server (later requests get
404), refused to another tenant however its id is spelt, GET answered 405 (no standalone stream)
without harm to the SDK client, and a tool call taken straight to its server with its own session.
"""

from __future__ import annotations

import asyncio
import base64
import json
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import httpx
import httpx2
from mcp import ClientSession
from mcp.client.streamable_http import streamable_http_client
from prometheus_client.parser import text_string_to_metric_families

from extproc.mcp_sessions import parse_session_id
from tests.dataplane.test_mcp_gateway import BETA_TOKEN, KEYS, Env, env, text

__all__ = ["env"]  # the module's fixture: one stack with the two servers


INIT = {"jsonrpc": "2.0", "id": 1, "method": "initialize", "params": {"protocolVersion": "2025-06-18", "capabilities": {}, "clientInfo": {"name": "t", "version": "1"}}}
ACCEPT = {"accept": "application/json, text/event-stream"}


def messages(env: Env, method: str, status: str) -> float:
    text_ = httpx.get(f"http://127.0.0.1:{env.stack.metrics_port}/metrics").text
    return sum(
        s.value
        for f in text_string_to_metric_families(text_)
        if f.name == "crdgol_mcp_messages"
        for s in f.samples
        if s.name.endswith("_total") and s.labels == {"method": method, "status": status}
    )


async def test_the_sdk_client_keeps_its_session_while_its_get_stream_is_refused_with_405(env: Env) -> None:
    """The gateway offers no standalone server-to-client stream: the SDK's GET gets 405 (as the
    transport allows a server to answer), the SDK retries it once a second later, gives up, and
    the session goes on serving calls, streamed answers included."""
    before = messages(env, "GET", "405")
    async with sdk_session_with_id(env.url, KEYS["analyst"]) as (s, _, answers):
        first = int(text(await s.call_tool("beta__visits", {})))
        await asyncio.sleep(1.5)  # past the SDK's retry of its GET stream
        second = int(text(await s.call_tool("beta__visits", {})))
        assert text(await s.call_tool("beta__steps", {"n": 2, "delay_ms": 10})) == "done"
        gets = [status for method, status in answers if method == "GET"]
    assert (first, second) == (1, 2)
    assert gets == [405, 405]
    # Envoy answered them: no ext_proc stream for a request that needs no decision.
    assert messages(env, "GET", "405") == before


@asynccontextmanager
async def sdk_session_with_id(url: str, key: str) -> AsyncIterator[tuple[ClientSession, list[str], list[tuple[str, int]]]]:
    """An SDK session whose Mcp-Session-Id the test can read (from the initialize answer), and
    the (method, status) of every answer its client got."""
    ids: list[str] = []
    answers: list[tuple[str, int]] = []

    async def seen(response: httpx2.Response) -> None:
        answers.append((response.request.method, response.status_code))
        if sid := response.headers.get("mcp-session-id"):
            ids.append(sid)

    http = httpx2.AsyncClient(headers={"authorization": f"Bearer {key}"}, event_hooks={"response": [seen]}, timeout=30)
    async with http, streamable_http_client(url, http_client=http) as (read, write), ClientSession(read, write) as s:
        await s.initialize()
        yield s, ids, answers


async def test_closing_an_sdk_session_ends_it_on_every_server_and_its_id_then_gets_404(env: Env) -> None:
    alpha_before, beta_before = len(env.alpha.seen()), len(env.beta.seen())
    async with sdk_session_with_id(env.url, KEYS["analyst"]) as (s, ids, _):
        assert int(text(await s.call_tool("alpha__visits", {}))) == 1
        assert int(text(await s.call_tool("beta__visits", {}))) == 1
        sid = ids[0]
    # On leaving, the SDK sent DELETE /mcp: the gateway ended the session on both servers, each
    # with its own session id (and beta with its credential).
    composite = parse_session_id(sid)
    assert composite is not None and composite.subject == "default/analyst" and dict(composite.servers).keys() == {"alpha", "beta"}
    ended = {
        name: [r for r in server.seen()[before:] if r["method"] == "DELETE"]
        for name, server, before in (("alpha", env.alpha, alpha_before), ("beta", env.beta, beta_before))
    }
    assert [r["session"] for r in ended["alpha"]] == [dict(composite.servers)["alpha"]]
    assert [(r["session"], r["authorization"]) for r in ended["beta"]] == [(dict(composite.servers)["beta"], f"Bearer {BETA_TOKEN}")]
    async with httpx.AsyncClient() as http:
        # The servers no longer know their sessions...
        direct = await http.post(
            env.alpha.url, json={"jsonrpc": "2.0", "id": 5, "method": "ping"}, headers={**ACCEPT, "mcp-session-id": dict(composite.servers)["alpha"]}
        )
        assert direct.status_code == 404
        # ...and the gateway answers 404 for the id, as the spec says, to any later request.
        call = {"jsonrpc": "2.0", "id": 6, "method": "tools/call", "params": {"name": "alpha__visits", "arguments": {}}}
        later = await http.post(env.url, json=call, headers={**ACCEPT, "authorization": f"Bearer {KEYS['analyst']}", "mcp-session-id": sid})
        assert later.status_code == 404 and later.json()["error"]["data"]["code"] == "session_not_found"
        again = await http.delete(env.url, headers={**ACCEPT, "authorization": f"Bearer {KEYS['analyst']}", "mcp-session-id": sid})
        assert again.status_code == 404


async def test_a_session_is_kept_across_calls_until_delete_over_raw_http(env: Env) -> None:
    hdrs = {**ACCEPT, "authorization": f"Bearer {KEYS['intern']}"}
    async with httpx.AsyncClient() as http:
        r = await http.post(env.url, json=INIT, headers=hdrs)
        hdrs["mcp-session-id"] = r.headers["mcp-session-id"]
        assert (await http.post(env.url, json={"jsonrpc": "2.0", "method": "notifications/initialized"}, headers=hdrs)).status_code == 202
        call = {"jsonrpc": "2.0", "id": 2, "method": "tools/call", "params": {"name": "beta__visits", "arguments": {}}}
        counts = [int(json.loads((await http.post(env.url, json=call, headers=hdrs)).text.split("data: ")[-1])["result"]["content"][0]["text"]) for _ in range(3)]
        assert counts == [1, 2, 3]
        # Another tenant cannot end it.
        other = {**hdrs, "authorization": f"Bearer {KEYS['analyst']}"}
        assert (await http.delete(env.url, headers=other)).status_code == 403
        assert (await http.delete(env.url, headers=hdrs)).status_code == 200
        gone = await http.post(env.url, json=call, headers=hdrs)
    assert gone.status_code == 404 and gone.json()["id"] == 2


async def test_another_tenant_cannot_reach_a_session_by_re_encoding_its_id(env: Env) -> None:
    """mcp_router's session id is plain base64 with the tenant inside: re-encoded with the other
    tenant's name it would pass mcp_router's own check. The gateway binds each server session to
    the tenant that used it first."""
    async with httpx.AsyncClient() as http:
        owner = {**ACCEPT, "authorization": f"Bearer {KEYS['analyst']}"}
        r = await http.post(env.url, json=INIT, headers=owner)
        sid = r.headers["mcp-session-id"]
        call = {"jsonrpc": "2.0", "id": 2, "method": "tools/call", "params": {"name": "alpha__visits", "arguments": {}}}
        assert (await http.post(env.url, json=call, headers={**owner, "mcp-session-id": sid})).status_code == 200
        route, _, servers = base64.b64decode(sid).decode().split("@")
        forged = base64.b64encode(f"{route}@{base64.b64encode(b'default/intern').decode()}@{servers}".encode()).decode()
        thief = {**ACCEPT, "authorization": f"Bearer {KEYS['intern']}", "mcp-session-id": forged}
        refused = await http.post(env.url, json=call, headers=thief)
        assert refused.status_code == 403 and refused.json()["error"]["data"]["code"] == "session_not_yours"
        assert (await http.delete(env.url, headers=thief)).status_code == 403
        # The owner's session is untouched.
        assert (await http.post(env.url, json=call, headers={**owner, "mcp-session-id": sid})).status_code == 200
        # An id the gateway cannot read is no session at all.
        junk = await http.post(env.url, json=call, headers={**owner, "mcp-session-id": "not-a-session"})
        assert junk.status_code == 404


def view_requests(env: Env) -> int:
    """Requests the default namespace's view (the internal listener running mcp_router) got."""
    text_ = httpx.get(f"http://127.0.0.1:{env.stack.admin_port}/stats?filter=crdgol_mcp_default.downstream_rq_total", timeout=5).text
    return sum(int(line.rpartition(": ")[2]) for line in text_.splitlines() if line.startswith("http.crdgol_mcp_default.downstream_rq_total"))


def usage_log_entries(env: Env) -> int:
    """Entries Envoy's usage access logger wrote to extproc (after its 20 ms flush)."""
    time.sleep(0.5)
    text_ = httpx.get(f"http://127.0.0.1:{env.stack.admin_port}/stats?filter=grpc_access_log", timeout=5).text
    return sum(int(line.rpartition(": ")[2]) for line in text_.splitlines() if line.split(":")[0].endswith("logs_written"))


async def test_a_tool_call_goes_straight_to_its_server_and_answers_with_the_clients_session_id(env: Env) -> None:
    hdrs = {**ACCEPT, "authorization": f"Bearer {KEYS['analyst']}"}
    async with httpx.AsyncClient() as http:
        r = await http.post(env.url, json=INIT, headers=hdrs)
        sid = r.headers["mcp-session-id"]
        composite = parse_session_id(sid)
        assert composite is not None
        before, logged = view_requests(env), usage_log_entries(env)
        call = {"jsonrpc": "2.0", "id": 2, "method": "tools/call", "params": {"name": "beta__echo", "arguments": {"text": "x"}}}
        r = await http.post(env.url, json=call, headers={**hdrs, "mcp-session-id": sid})
        assert r.status_code == 200 and "beta:x" in r.text
        # The client gets back its own id, never the server's; the server got its own.
        assert r.headers["mcp-session-id"] == sid
        assert env.beta.seen()[-1]["session"] == dict(composite.servers)["beta"]
        # No hop through the view's internal listener for a call; a tools/list takes it.
        assert view_requests(env) == before
        # And no usage access-log entry for extproc (nothing to settle in a tool call).
        assert usage_log_entries(env) == logged
        await http.post(env.url, json={"jsonrpc": "2.0", "id": 3, "method": "tools/list"}, headers={**hdrs, "mcp-session-id": sid})
        assert view_requests(env) == before + 1
