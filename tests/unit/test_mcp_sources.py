"""Context read from real MCP servers (the official SDK, streamable HTTP), without Envoy:
sessions kept open, the TTL cache, single flight, timeouts and the fail policies."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator

import pytest

from extproc.errors import GatewayError
from extproc.mcp_sources import (
    ContextSourceFailed,
    ContextSources,
    ContextSourceUnavailable,
    load_sdk,
)
from extproc.metrics import Metrics
from extproc.policy import McpServer, McpSource
from tests.mcp_fixture_server import McpFixture

TOKEN = "mcp-fixture-token-7f3a"


@pytest.fixture(scope="module", autouse=True)
def sdk_imported() -> None:
    """extproc imports the SDK when a policy first names an MCP source; here, once, up front."""
    load_sdk()


@pytest.fixture(scope="module")
def crm() -> Iterator[McpFixture]:
    server = McpFixture("--token", TOKEN)
    yield server
    server.stop()


@pytest.fixture(scope="module")
def slow() -> Iterator[McpFixture]:
    server = McpFixture("--delay-ms", "1500")
    yield server
    server.stop()


@pytest.fixture(scope="module")
def failing() -> Iterator[McpFixture]:
    server = McpFixture("--fail")
    yield server
    server.stop()


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def server(url: str, *, token: str = TOKEN, timeout: float = 2.0, ttl: float = 60.0) -> McpServer:
    auth = (("authorization", f"Bearer {token}"),) if token else ()
    return McpServer(name="crm", url=url, auth_headers=auth, timeout=timeout, cache_ttl=ttl)


def resource(srv: McpServer, uri: str = "crm://customers/${user.customer}", *, refuse: bool = False, max_tokens: int = 2000) -> McpSource:
    return McpSource(server=srv, title="Customer record", resource_uri=uri, refuse_on_failure=refuse, max_tokens=max_tokens)


VARS = {"tenant": "team-a/acme", "user.customer": "c-42", "model": "chat", "date": "2026-12-03", "session": ""}


def reads(metrics: Metrics, outcome: str) -> float:
    value = metrics.registry.get_sample_value("crdgol_context_source_reads_total", {"binding": "b", "server": "crm", "outcome": outcome})
    return value or 0.0


async def test_a_resource_and_a_prompt_are_read_over_one_kept_session(crm: McpFixture) -> None:
    metrics = Metrics()
    sources = ContextSources(metrics)
    srv = server(crm.url, ttl=0)
    prompt = McpSource(server=srv, title="Triage", prompt_name="triage", prompt_arguments=(("topic", "${user.customer} billing"),))
    try:
        for _ in range(3):
            got = await sources.read([resource(srv), prompt], VARS, "b")
            assert [g.title for g in got] == ["Customer record", "Triage"]
            assert got[0].text == "Customer c-42: plan gold, 2 open tickets, account manager Grace."
            assert got[1].text == "user: Triage guidance for c-42 billing: answer within one business day."
        assert sources.open_sessions == 1
        assert reads(metrics, "fetched") == 6  # ttl 0: nothing cached
        assert crm.stats()["auth"] == [f"Bearer {TOKEN}"]
    finally:
        await sources.close()
    assert sources.open_sessions == 0


async def test_a_variable_is_percent_encoded_into_the_uri(crm: McpFixture) -> None:
    sources = ContextSources(Metrics())
    try:
        got = await sources.read([resource(server(crm.url, ttl=0))], {**VARS, "user.customer": "x/../admin?y"}, "b")
        # The value stays one path segment (percent-encoded on the wire): the server matched it as
        # the {customer} variable whole, not as another path or a query of the caller's choosing.
        assert got[0].text.startswith("Customer x/../admin?y: plan gold")
        assert crm.stats()["reads"]["customer:x/../admin?y"] >= 1
    finally:
        await sources.close()


async def test_repeated_reads_within_the_ttl_fetch_once_and_concurrent_ones_share_a_fetch(crm: McpFixture) -> None:
    metrics = Metrics()
    clock = Clock()
    sources = ContextSources(metrics, clock)
    src = resource(server(crm.url, ttl=30), "crm://customers/ttl-${session}")
    before = crm.stats()["reads"].get("customer:ttl-s1", 0)
    try:
        results = await asyncio.gather(*(sources.read([src], {**VARS, "session": "s1"}, "b") for _ in range(20)))
        assert all(r[0].text.startswith("Customer ttl-s1") for r in results)
        for _ in range(10):
            await sources.read([src], {**VARS, "session": "s1"}, "b")
        assert crm.stats()["reads"]["customer:ttl-s1"] == before + 1
        clock.now += 31  # the entry has expired
        await sources.read([src], {**VARS, "session": "s1"}, "b")
        assert crm.stats()["reads"]["customer:ttl-s1"] == before + 2
        assert reads(metrics, "cached") == 10
    finally:
        await sources.close()


async def test_the_cache_is_bounded() -> None:
    sources = ContextSources(Metrics(), max_entries=3, max_bytes=100)
    key = ((("u", ()), "resource", "x", ()))
    for i in range(5):
        sources._store((key[0], "resource", f"r{i}", ()), "t" * 10, 60)
    assert len(sources._cache) == 3
    sources._store((key[0], "resource", "big", ()), "t" * 90, 60)
    assert sources._cached_bytes <= 100


async def test_a_slow_server_is_skipped_or_refuses_at_its_timeout(slow: McpFixture) -> None:
    metrics = Metrics()
    sources = ContextSources(metrics)
    srv = server(slow.url, token="", timeout=0.3, ttl=0)
    try:
        loop = asyncio.get_running_loop()
        t0 = loop.time()
        assert await sources.read([resource(srv)], VARS, "b") == []
        assert loop.time() - t0 < 1.2
        with pytest.raises(ContextSourceUnavailable) as info:
            await sources.read([resource(srv, refuse=True)], VARS, "b")
        assert info.value.status == 503 and info.value.code == "context_source_unavailable"
        assert reads(metrics, "timeout") == 2
        failures = metrics.registry.get_sample_value
        assert failures("crdgol_context_source_failures_total", {"binding": "b", "server": "crm", "fail_policy": "skip"}) == 1
        assert failures("crdgol_context_source_failures_total", {"binding": "b", "server": "crm", "fail_policy": "refuse"}) == 1
    finally:
        await sources.close()


async def test_a_failing_server_is_skipped_or_refuses_with_502(failing: McpFixture) -> None:
    sources = ContextSources(Metrics())
    srv = server(failing.url, token="", ttl=60)
    try:
        assert await sources.read([resource(srv)], VARS, "b") == []
        with pytest.raises(ContextSourceFailed) as info:
            await sources.read([resource(srv, refuse=True)], VARS, "b")
        assert info.value.status == 502
        assert "CRM database" not in info.value.message  # the server's own text stays inside
    finally:
        await sources.close()


async def test_a_wrong_credential_or_no_server_is_unreachable_and_fails_fast(crm: McpFixture) -> None:
    from crdgol.stack import free_port

    metrics = Metrics()
    sources = ContextSources(metrics)
    try:
        # A refused credential is the server answering with an error (502); no server at all is 503.
        for srv, status in ((server(crm.url, token="wrong"), 502), (server(f"http://127.0.0.1:{free_port()}/mcp"), 503)):
            with pytest.raises(GatewayError) as info:
                await sources.read([resource(srv, refuse=True)], VARS, "b")
            assert info.value.status == status
        # Within the reconnect pause a dead server costs nothing: the read fails at once.
        loop = asyncio.get_running_loop()
        t0 = loop.time()
        assert await sources.read([resource(server(f"http://127.0.0.1:{free_port()}/mcp"))], VARS, "b") == []
        assert loop.time() - t0 < 2.5
    finally:
        await sources.close()


async def test_a_source_is_cut_to_its_token_cap(crm: McpFixture) -> None:
    sources = ContextSources(Metrics())
    try:
        (got,) = await sources.read([resource(server(crm.url, ttl=0), max_tokens=5)], VARS, "b")
        assert got.text.startswith("Customer c-42: plan")
        assert got.text.endswith("[cut by the gateway to about 5 tokens]")
        assert len(got.text.split("\n")[0].encode()) <= 20
    finally:
        await sources.close()


def test_the_sdk_is_imported_only_once_a_policy_names_an_mcp_source() -> None:
    import subprocess
    import sys

    from tests.conftest import ROOT

    probe = (
        "import sys\n"
        "from extproc.services import Services\n"
        "from extproc.policy import compile_policy\n"
        "from crdgol.pb import policy_pb2 as pb\n"
        "s = Services()\n"
        "print('mcp' in sys.modules)\n"
        "snap = pb.PolicySnapshot(version=1, bindings=[pb.Binding(key='ns/b', model='m', route='r', "
        "backends=[pb.Backend(id='be', provider=pb.OPENAI, model='x', host='h')], context=pb.ContextPolicy("
        "mcp_servers=[pb.McpServer(name='crm', url='http://127.0.0.1:9/mcp')], mcp_sources=[pb.McpSource(server='crm', resource_uri='crm://x')]))])\n"
        "s.policy.offer(snap)\n"
        "s.context_sources._sdk_loading.join(30)\n"
        "print('mcp' in sys.modules)\n"
    )
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=60, cwd=ROOT, env={"PYTHONPATH": str(ROOT)})
    assert out.stdout.split() == ["False", "True"], out.stderr


async def test_a_session_broken_by_a_server_restart_is_reopened() -> None:
    from extproc import mcp_sources

    first = McpFixture()
    sources = ContextSources(Metrics())
    srv = server(first.url, token="", ttl=0)
    try:
        assert (await sources.read([resource(srv)], VARS, "b"))[0].text.startswith("Customer c-42")
        first.stop()
        assert await sources.read([resource(srv)], VARS, "b") == []  # down: skipped
        again = McpFixture(port=first.port)
        try:
            await asyncio.sleep(mcp_sources.RECONNECT_PAUSE + 0.1)
            assert (await sources.read([resource(srv)], VARS, "b"))[0].text.startswith("Customer c-42")
            assert again.stats()["total"] == 1 and sources.open_sessions == 1
        finally:
            again.stop()
    finally:
        first.stop()
        await sources.close()


async def test_an_oversized_answer_is_refused_not_buffered_and_the_session_still_serves(crm: McpFixture) -> None:
    sources = ContextSources(Metrics())
    srv = server(crm.url, ttl=0)
    try:
        with pytest.raises(GatewayError):
            await sources.read([resource(srv, "crm://huge", refuse=True)], VARS, "b")
        assert crm.stats()["reads"]["huge"] >= 1
        await asyncio.sleep(1.1)  # past the reconnect pause, if the session had to go
        assert (await sources.read([resource(srv)], VARS, "b"))[0].text.startswith("Customer c-42")
    finally:
        await sources.close()
