"""MCP tool servers behind the gateway at /mcp, through real Envoy (mcp + mcp_router) and extproc.

Two real MCP servers (the official SDK's MCPServer, streamable HTTP) on loopback; the SDK's own
ClientSession as the caller, authenticating with gateway API keys.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import httpx
import pytest
from mcp import ClientSession, MCPError
from mcp.client.streamable_http import streamable_http_client
from mcp.shared._httpx_utils import create_mcp_http_client
from prometheus_client.parser import text_string_to_metric_families

from crdgol.stack import Stack, StackSettings
from tests.mcp_tool_servers import ToolServer

BETA_TOKEN = "beta-server-token-8f2c"
KEYS = {"analyst": "sk-test-analyst", "intern": "sk-test-intern", "bot": "sk-test-bot", "outsider": "sk-test-outsider"}


def manifests(folder: Path, alpha: ToolServer, beta: ToolServer) -> None:
    docs: list[dict[str, Any]] = []
    for tenant, key in KEYS.items():
        ns = "other" if tenant == "outsider" else "default"
        docs.append(
            {
                "apiVersion": "v1",
                "kind": "Secret",
                "metadata": {"name": f"{tenant}-key", "namespace": ns, "labels": {"crdgol.io/api-key": "true"}, "annotations": {"crdgol.io/tenant": tenant}},
                "stringData": {"key": key},
            }
        )
    docs.append({"apiVersion": "v1", "kind": "Secret", "metadata": {"name": "beta-token"}, "stringData": {"token": BETA_TOKEN}})
    docs.append(
        {
            "apiVersion": "crdgol.io/v1alpha1",
            "kind": "MCPServer",
            "metadata": {"name": "alpha"},
            "spec": {
                "url": alpha.url,
                "toolPrefix": "alpha",
                # A day, not a minute: a fixed window's boundary must not fall inside the test.
                "quotas": {"tenants": {"bot": {"requests": [{"amount": 2, "per": "day"}]}}},
            },
        }
    )
    docs.append(
        {
            "apiVersion": "crdgol.io/v1alpha1",
            "kind": "MCPServer",
            "metadata": {"name": "beta"},
            "spec": {
                "url": beta.url,
                "toolPrefix": "beta",
                "credentialsRef": {"name": "beta-token", "key": "token"},
                "tools": {"default": ["echo", "steps", "visits", "add"], "tenants": {"analyst": ["*"]}},
            },
        }
    )
    (folder / "mcp.yaml").write_text("---\n".join(json.dumps(d) + "\n" for d in docs))


class Env:
    def __init__(self, stack: Stack, alpha: ToolServer, beta: ToolServer) -> None:
        self.stack, self.alpha, self.beta = stack, alpha, beta

    @property
    def url(self) -> str:
        return f"{self.stack.url}/mcp"


@pytest.fixture(scope="module")
def env(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Env]:
    folder = tmp_path_factory.mktemp("mcp-manifests")
    alpha = ToolServer("alpha")
    beta = ToolServer("beta", token=BETA_TOKEN)
    stack = Stack(StackSettings(manifests=folder, mock_port=None, metrics_port=0, quiet=True))
    try:
        manifests(folder, alpha, beta)
        stack.start()
        yield Env(stack, alpha, beta)
    finally:
        stack.stop()
        alpha.stop()
        beta.stop()


@asynccontextmanager
async def session(url: str, key: str, **kwargs: Any) -> AsyncIterator[ClientSession]:
    http = create_mcp_http_client(headers={"authorization": f"Bearer {key}"})
    async with streamable_http_client(url, http_client=http) as (read, write), ClientSession(read, write, **kwargs) as s:
        await s.initialize()
        yield s


def text(result: Any) -> str:
    return "".join(getattr(c, "text", "") for c in result.content)


async def test_tools_of_two_servers_are_listed_as_one_prefixed_set(env: Env) -> None:
    async with session(env.url, KEYS["analyst"]) as s:
        names = {t.name for t in (await s.list_tools()).tools}
    assert names == {f"{p}__{t}" for p in ("alpha", "beta") for t in ("echo", "add", "wipe", "steps", "visits")}
    # Both are Ready in the controller's status, reached from namespace default.
    status = env.stack.status()["mcpServers"]
    for key in ("default/alpha", "default/beta"):
        ready = {c["type"]: c for c in status[key]["conditions"]}["Ready"]  # type: ignore[index]
        assert ready["status"] == "True" and status[key]["views"] == ["default"]  # type: ignore[index]


async def test_a_tenant_sees_and_calls_only_the_tools_it_may(env: Env) -> None:
    async with session(env.url, KEYS["intern"]) as s:
        names = {t.name for t in (await s.list_tools()).tools}
        assert "beta__wipe" not in names and "alpha__wipe" in names and "beta__echo" in names
        assert text(await s.call_tool("beta__echo", {"text": "hi"})) == "beta:hi"
        with pytest.raises(MCPError) as refused:
            await s.call_tool("beta__wipe", {})
        assert "may not call the tool 'beta__wipe'" in str(refused.value)
        with pytest.raises(MCPError) as unknown:
            await s.call_tool("gamma__echo", {"text": "x"})
        assert "unknown tool" in str(unknown.value)
    async with session(env.url, KEYS["analyst"]) as s:
        assert text(await s.call_tool("beta__wipe", {})) == "beta: wiped"


async def test_a_refused_tool_call_is_a_json_rpc_error_with_status_403(env: Env) -> None:
    async with httpx.AsyncClient() as http:
        headers = {"authorization": f"Bearer {KEYS['intern']}", "accept": "application/json, text/event-stream"}
        r = await http.post(env.url, json={"jsonrpc": "2.0", "id": 7, "method": "tools/call", "params": {"name": "beta__wipe", "arguments": {}}}, headers=headers)
    assert r.status_code == 403
    body = r.json()
    assert body["jsonrpc"] == "2.0" and body["id"] == 7
    assert body["error"]["code"] == -32003 and body["error"]["data"]["code"] == "tool_not_allowed"


async def test_the_tool_call_quota_refuses_with_429_and_retry_after(env: Env) -> None:
    async with session(env.url, KEYS["bot"]) as s:
        for i in range(2):
            assert text(await s.call_tool("alpha__echo", {"text": str(i)})) == f"alpha:{i}"
        with pytest.raises(MCPError) as spent:
            await s.call_tool("alpha__echo", {"text": "3"})
        assert "quota exceeded" in str(spent.value)
        # Another server is another quota; another tenant is another quota.
        assert text(await s.call_tool("beta__echo", {"text": "b"})) == "beta:b"
    async with session(env.url, KEYS["intern"]) as s:
        assert text(await s.call_tool("alpha__echo", {"text": "i"})) == "alpha:i"
    async with httpx.AsyncClient() as http:
        r = await http.post(
            env.url,
            json={"jsonrpc": "2.0", "id": 1, "method": "tools/call", "params": {"name": "alpha__add", "arguments": {"a": 1, "b": 2}}},
            headers={"authorization": f"Bearer {KEYS['bot']}", "accept": "application/json, text/event-stream"},
        )
    assert r.status_code == 429 and int(r.headers["retry-after"]) >= 1
    assert r.json()["error"]["data"]["code"] == "rate_limit_exceeded"


async def test_one_mcp_session_is_kept_across_calls(env: Env) -> None:
    async with session(env.url, KEYS["analyst"]) as s:
        counts = [int(text(await s.call_tool("beta__visits", {}))) for _ in range(3)]
        assert counts == [1, 2, 3]  # the same server-side session every time
        assert int(text(await s.call_tool("alpha__visits", {}))) == 1
    async with session(env.url, KEYS["analyst"]) as s:
        assert int(text(await s.call_tool("beta__visits", {}))) == 1  # a new session starts afresh


async def test_a_session_id_is_bound_to_its_tenant(env: Env) -> None:
    hdrs = {"accept": "application/json, text/event-stream"}
    init = {"jsonrpc": "2.0", "id": 1, "method": "initialize", "params": {"protocolVersion": "2025-06-18", "capabilities": {}, "clientInfo": {"name": "t", "version": "1"}}}
    async with httpx.AsyncClient() as http:
        r = await http.post(env.url, json=init, headers={**hdrs, "authorization": f"Bearer {KEYS['analyst']}"})
        assert r.status_code == 200, r.text
        sid = r.headers["mcp-session-id"]
        call = {"jsonrpc": "2.0", "id": 2, "method": "tools/call", "params": {"name": "alpha__visits", "arguments": {}}}
        stolen = await http.post(env.url, json=call, headers={**hdrs, "authorization": f"Bearer {KEYS['intern']}", "mcp-session-id": sid})
        assert stolen.status_code == 403
        own = await http.post(env.url, json=call, headers={**hdrs, "authorization": f"Bearer {KEYS['analyst']}", "mcp-session-id": sid})
        assert own.status_code == 200 and '"result"' in own.text


async def test_progress_and_log_notifications_stream_through_as_they_happen(env: Env) -> None:
    arrived: list[tuple[float, float]] = []
    logs: list[str] = []
    t0 = time.monotonic()

    async def on_progress(progress: float, total: float | None, message: str | None) -> None:
        arrived.append((progress, time.monotonic() - t0))

    async def on_log(params: Any) -> None:
        logs.append(str(params.data))

    async with session(env.url, KEYS["analyst"], logging_callback=on_log) as s:
        t0 = time.monotonic()
        result = await s.call_tool("beta__steps", {"n": 3, "delay_ms": 400}, progress_callback=on_progress)
        done = time.monotonic() - t0
    assert text(result) == "done"
    assert [p for p, _ in arrived] == [1, 2, 3]
    # Streamed, not buffered: the first step arrived well before the answer was complete.
    assert arrived[0][1] < done - 0.6
    assert logs == ["beta step 1", "beta step 2", "beta step 3"]


async def test_no_credential_crosses_between_client_and_servers(env: Env) -> None:
    async with session(env.url, KEYS["analyst"]) as s:
        assert text(await s.call_tool("alpha__echo", {"text": "a"})) == "alpha:a"
        assert text(await s.call_tool("beta__echo", {"text": "b"})) == "beta:b"
    # beta received only its own credential; alpha received none; neither saw the client's key,
    # the other server's credential or the gateway's internal headers.
    beta_seen, alpha_seen = env.beta.seen(), env.alpha.seen()
    assert beta_seen and {r["authorization"] for r in beta_seen} == {f"Bearer {BETA_TOKEN}"}
    assert alpha_seen and {r["authorization"] for r in alpha_seen} == {""}
    for r in beta_seen + alpha_seen:
        assert not [h for h in r["headers"] if h.startswith("x-crdgol-") or h == "x-api-key"], r["headers"]
    # And the client never sees the server's credential: not in answers, not in headers.
    async with httpx.AsyncClient() as http:
        r = await http.post(
            env.url,
            json={"jsonrpc": "2.0", "id": 1, "method": "initialize", "params": {"protocolVersion": "2025-06-18", "capabilities": {}, "clientInfo": {"name": "t", "version": "1"}}},
            headers={"authorization": f"Bearer {KEYS['analyst']}", "accept": "application/json, text/event-stream"},
        )
    assert BETA_TOKEN not in r.text and BETA_TOKEN not in str(r.headers)


async def test_an_unauthenticated_client_is_refused_with_401(env: Env) -> None:
    before = len(env.alpha.seen()) + len(env.beta.seen())
    with pytest.raises(Exception):  # noqa: B017 - the SDK raises its own transport error
        async with session(env.url, "sk-wrong"):
            pass
    async with httpx.AsyncClient() as http:
        r = await http.post(env.url, json={"jsonrpc": "2.0", "id": 1, "method": "tools/list"}, headers={"accept": "application/json"})
    assert r.status_code == 401
    assert r.headers["www-authenticate"].startswith("Bearer")
    assert r.json()["error"]["code"] == -32001
    # Nothing reached a server for it.
    assert len(env.alpha.seen()) + len(env.beta.seen()) == before


async def test_a_tenant_of_a_namespace_without_servers_is_refused(env: Env) -> None:
    async with httpx.AsyncClient() as http:
        r = await http.post(
            env.url,
            json={"jsonrpc": "2.0", "id": 1, "method": "tools/list"},
            headers={"authorization": f"Bearer {KEYS['outsider']}", "accept": "application/json, text/event-stream"},
        )
    assert r.status_code == 403 and r.json()["error"]["data"]["code"] == "no_mcp_servers"


def test_tool_calls_are_metered_by_tenant_server_and_tool(env: Env) -> None:

    async def calls() -> None:
        async with session(env.url, KEYS["intern"]) as s:
            await s.call_tool("alpha__add", {"a": 2, "b": 3})
            with pytest.raises(MCPError):
                await s.call_tool("beta__wipe", {})

    asyncio.run(calls())
    text_ = httpx.get(f"http://127.0.0.1:{env.stack.metrics_port}/metrics").text
    samples = {
        (s.labels["tenant"], s.labels["server"], s.labels["tool"], s.labels["outcome"]): s.value
        for f in text_string_to_metric_families(text_)
        if f.name == "crdgol_mcp_tool_calls"
        for s in f.samples
        if s.name.endswith("_total")
    }
    assert samples[("default/intern", "default/alpha", "add", "allowed")] >= 1
    assert samples[("default/intern", "default/beta", "wipe", "forbidden")] >= 1


async def test_a_server_that_is_down_does_not_take_the_others_down(tmp_path: Path) -> None:
    alpha = ToolServer("alpha")
    dead = ToolServer("beta")
    dead.stop()  # its port is free again: nothing listens there
    (tmp_path / "keys.yaml").write_text(
        json.dumps({"apiVersion": "v1", "kind": "Secret", "metadata": {"name": "k", "labels": {"crdgol.io/api-key": "true"}, "annotations": {"crdgol.io/tenant": "analyst"}}, "stringData": {"key": KEYS["analyst"]}})
    )
    docs = [
        {"apiVersion": "crdgol.io/v1alpha1", "kind": "MCPServer", "metadata": {"name": n}, "spec": {"url": s.url, "toolPrefix": n, "timeout": "2s"}}
        for n, s in (("alpha", alpha), ("beta", dead))
    ]
    (tmp_path / "mcp.yaml").write_text("---\n".join(json.dumps(d) + "\n" for d in docs))
    stack = Stack(StackSettings(manifests=tmp_path, mock_port=None, quiet=True))
    try:
        stack.start()
        async with session(f"{stack.url}/mcp", KEYS["analyst"]) as s:
            names = {t.name for t in (await s.list_tools()).tools}
            assert names == {f"alpha__{t}" for t in ("echo", "add", "wipe", "steps", "visits")}
            assert text(await s.call_tool("alpha__echo", {"text": "up"})) == "alpha:up"
            with pytest.raises(MCPError):
                await s.call_tool("beta__echo", {"text": "down"})
    finally:
        stack.stop()
        alpha.stop()


def ext_proc_messages(env: Env) -> dict[str, int]:
    """Envoy's count of messages sent to extproc, per ext_proc filter: the gateway's, a view's
    tools/list filter, a server cluster's credential filter (by stat prefix)."""
    text_ = httpx.get(f"http://127.0.0.1:{env.stack.admin_port}/stats?filter=ext_proc", timeout=5).text
    out: dict[str, int] = {}
    for line in text_.splitlines():
        name, _, value = line.partition(": ")
        if name.endswith(".stream_msgs_sent") and value.strip().isdigit():
            where = name.removesuffix(".stream_msgs_sent").removesuffix(".ext_proc")
            out[where] = int(value)
    return out


async def test_a_tool_call_costs_extproc_one_message(env: Env) -> None:
    hdrs = {"authorization": f"Bearer {KEYS['analyst']}", "accept": "application/json, text/event-stream", "content-type": "application/json"}
    init = {"jsonrpc": "2.0", "id": 1, "method": "initialize", "params": {"protocolVersion": "2025-06-18", "capabilities": {}, "clientInfo": {"name": "t", "version": "1"}}}
    async with httpx.AsyncClient() as http:
        r = await http.post(env.url, json=init, headers=hdrs)
        sid = r.headers["mcp-session-id"]
        before = ext_proc_messages(env)
        # Spaced JSON: what goes on is extproc's re-written (shorter) body, its length set anew.
        body = b'{ "jsonrpc" : "2.0",  "id" : 2, "method" : "tools/call",  "params" : { "name" : "alpha__echo", "arguments" : { "text" : "one" } } }'
        r = await http.post(env.url, content=body, headers={**hdrs, "mcp-session-id": sid})
        time.sleep(0.1)  # Envoy counts a stream's last message after the client has its answer
        after = ext_proc_messages(env)
    assert r.status_code == 200 and "alpha:one" in r.text
    used = {k: v - before.get(k, 0) for k, v in after.items() if v != before.get(k, 0)}
    # The gateway filter only, one message (the body, the headers as attributes); no tools/list
    # filter (enabled on tools/list only).
    assert used == {"http.crdgol": 1}, used
    # A server with a credential: Envoy injects it (SDS), no ext_proc stream on its cluster. The
    # client's copies of the internal headers are dropped (no list filter, the analyst's session).
    async with httpx.AsyncClient() as http:
        before = ext_proc_messages(env)
        call = {"jsonrpc": "2.0", "id": 3, "method": "tools/call", "params": {"name": "beta__echo", "arguments": {"text": "two"}}}
        forged = {"x-crdgol-mcp-list": "1", "x-crdgol-mcp-tenant": "default/intern"}
        r = await http.post(env.url, json=call, headers={**hdrs, "mcp-session-id": sid, **forged})
        time.sleep(0.1)
        after = ext_proc_messages(env)
    assert r.status_code == 200 and "beta:two" in r.text
    assert {k: v - before.get(k, 0) for k, v in after.items() if v != before.get(k, 0)} == {"http.crdgol": 1}
    assert env.beta.seen()[-1]["authorization"] == f"Bearer {BETA_TOKEN}"


async def test_internal_headers_a_client_sends_have_no_effect(env: Env) -> None:
    """The tenant a session is bound to, and the tools/list mark, come from extproc alone."""
    hdrs = {"accept": "application/json, text/event-stream"}
    init = {"jsonrpc": "2.0", "id": 1, "method": "initialize", "params": {"protocolVersion": "2025-06-18", "capabilities": {}, "clientInfo": {"name": "t", "version": "1"}}}
    async with httpx.AsyncClient() as http:
        r = await http.post(env.url, json=init, headers={**hdrs, "authorization": f"Bearer {KEYS['analyst']}"})
        sid = r.headers["mcp-session-id"]
        call = {"jsonrpc": "2.0", "id": 2, "method": "tools/call", "params": {"name": "alpha__visits", "arguments": {}}}
        # The intern claims to be the analyst that owns the session: still refused.
        forged = {**hdrs, "authorization": f"Bearer {KEYS['intern']}", "mcp-session-id": sid, "x-crdgol-mcp-tenant": "default/analyst"}
        assert (await http.post(env.url, json=call, headers=forged)).status_code == 403
        # A tools/list without the mark it claims still lists only what the intern may call.
        init_i = await http.post(env.url, json=init, headers={**hdrs, "authorization": f"Bearer {KEYS['intern']}"})
        listed = await http.post(
            env.url,
            json={"jsonrpc": "2.0", "id": 3, "method": "tools/list"},
            headers={**hdrs, "authorization": f"Bearer {KEYS['intern']}", "mcp-session-id": init_i.headers["mcp-session-id"], "x-crdgol-mcp-list": ""},
        )
    assert listed.status_code == 200 and "beta__echo" in listed.text and "beta__wipe" not in listed.text


async def test_other_methods_and_an_empty_body_are_refused(env: Env) -> None:
    auth = {"authorization": f"Bearer {KEYS['analyst']}", "accept": "application/json, text/event-stream"}
    async with httpx.AsyncClient() as http:
        # GET (a standalone stream, which the gateway does not offer): Envoy's 405, for anyone.
        for headers in (auth, {"accept": "application/json"}):
            got = await http.get(env.url, headers=headers)
            assert got.status_code == 405 and got.headers["allow"] == "POST, DELETE"
            assert got.json()["error"]["code"] == "method_not_allowed"
        # No body: nothing for extproc to decide on, and nothing reaches a server.
        before = len(env.alpha.seen()) + len(env.beta.seen())
        empty = await http.post(env.url, headers={**auth, "content-type": "application/json"})
        assert empty.status_code == 400 and "body is empty" in empty.text
        assert len(env.alpha.seen()) + len(env.beta.seen()) == before


async def test_resources_and_prompts_are_federated_like_tools(env: Env) -> None:
    async with session(env.url, KEYS["intern"]) as s:
        assert {str(r.uri) for r in (await s.list_resources()).resources} == {"alpha+note://greeting", "beta+note://greeting"}
        templates = {t.uri_template for t in (await s.list_resource_templates()).resource_templates}
        assert templates == {"alpha+note://items/{item}", "beta+note://items/{item}"}
        assert {p.name for p in (await s.list_prompts()).prompts} == {"alpha__review", "beta__review"}
        read = await s.read_resource("beta+note://greeting")
        assert [getattr(c, "text", "") for c in read.contents] == ["beta: hello"]
        item = await s.read_resource("alpha+note://items/42")
        assert [getattr(c, "text", "") for c in item.contents] == ["alpha: item 42"]
        prompt = await s.get_prompt("alpha__review", {"code": "x = 1"})
        assert [getattr(m.content, "text", "") for m in prompt.messages] == ["alpha reviews x = 1"]
        with pytest.raises(MCPError) as unknown:
            await s.read_resource("gamma+note://greeting")
        assert "unknown resource" in str(unknown.value)
    # beta's credential went with each of its requests, none to the client.
    assert {r["authorization"] for r in env.beta.seen()} == {f"Bearer {BETA_TOKEN}"}


async def test_a_tenant_sees_and_reads_only_the_resources_and_prompts_of_servers_it_reaches(tmp_path: Path) -> None:
    alpha, gamma = ToolServer("alpha"), ToolServer("gamma")
    docs: list[dict[str, Any]] = [
        {"apiVersion": "v1", "kind": "Secret", "metadata": {"name": t, "labels": {"crdgol.io/api-key": "true"}, "annotations": {"crdgol.io/tenant": t}}, "stringData": {"key": KEYS[t]}}
        for t in ("analyst", "intern")
    ]
    docs += [
        {"apiVersion": "crdgol.io/v1alpha1", "kind": "MCPServer", "metadata": {"name": "alpha"}, "spec": {"url": alpha.url, "toolPrefix": "alpha"}},
        {"apiVersion": "crdgol.io/v1alpha1", "kind": "MCPServer", "metadata": {"name": "gamma"}, "spec": {"url": gamma.url, "toolPrefix": "gamma", "tenants": ["analyst"]}},
    ]
    (tmp_path / "mcp.yaml").write_text("---\n".join(json.dumps(d) + "\n" for d in docs))
    stack = Stack(StackSettings(manifests=tmp_path, mock_port=None, quiet=True))
    try:
        stack.start()
        url = f"{stack.url}/mcp"
        async with session(url, KEYS["intern"]) as s:
            assert {str(r.uri) for r in (await s.list_resources()).resources} == {"alpha+note://greeting"}
            assert {p.name for p in (await s.list_prompts()).prompts} == {"alpha__review"}
            reached = len(gamma.seen())
            with pytest.raises(MCPError):
                await s.read_resource("gamma+note://greeting")
            with pytest.raises(MCPError):
                await s.get_prompt("gamma__review", {"code": "x"})
            assert len(gamma.seen()) == reached  # refused at the gateway
        async with session(url, KEYS["analyst"]) as s:
            assert {str(r.uri) for r in (await s.list_resources()).resources} == {"alpha+note://greeting", "gamma+note://greeting"}
            read = await s.read_resource("gamma+note://greeting")
            assert [getattr(c, "text", "") for c in read.contents] == ["gamma: hello"]
    finally:
        stack.stop()
        alpha.stop()
        gamma.stop()
