"""A caller over its quota costs the binding's MCP servers nothing: the request is refused
before the gateway reads context for it (a tenant's rate limit also bounds the load it puts on
the servers its model reads from)."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import pytest

from controller.manifests import load_folder
from controller.render import RenderSettings, render
from extproc.mcp_sources import load_sdk
from extproc.policy import PolicyHolder, compile_policy
from extproc.services import Services
from tests.mcp_fixture_server import McpFixture
from tests.unit.request_path import (
    KEY,
    MANIFESTS,
    T0,
    RecordingStore,
    chat,
    downstream,
    drive,
    request_body,
    request_headers,
)

LIMIT = 2  # requests a minute


@pytest.fixture(scope="module")
def crm() -> Iterator[McpFixture]:
    load_sdk()
    server = McpFixture()
    yield server
    server.stop()


def services_for(folder: Path, crm_url: str) -> Services:
    binding = {
        "apiVersion": "crdgol.io/v1alpha1",
        "kind": "AIModelBinding",
        "metadata": {"name": "ctx", "namespace": "ns"},
        "spec": {
            "model": "ctx",
            "tenants": ["acme"],
            "backends": [
                {"name": "a", "provider": "openai-compatible", "endpoint": "http://127.0.0.1:9/v1", "model": "up-gpt", "credentialsRef": {"name": "provider", "key": "apiKey"}}
            ],
            "quotas": {"tenants": {"acme": {"requests": [{"amount": LIMIT, "per": "minute"}]}}},
            "context": {
                "profile": [{"name": "customer", "header": "x-customer-id"}],
                "mcpServers": [{"name": "crm", "url": crm_url, "cacheTTL": "0s"}],
                "mcpSources": [{"server": "crm", "resource": "crm://customers/${user.customer}"}],
            },
        },
    }
    (folder / "secrets.yaml").write_text(MANIFESTS)
    (folder / "bindings.yaml").write_text(json.dumps(binding) + "\n")
    m = load_folder(folder)
    result = render(m.bindings, m.secrets, RenderSettings())
    assert not result.problems, result.problems
    return Services(policy=PolicyHolder(compile_policy(result.snapshot)), quotas=RecordingStore(), wall=lambda: T0)


async def test_requests_refused_for_quota_read_no_context_from_mcp_servers(crm: McpFixture, tmp_path: Path) -> None:
    services = services_for(tmp_path, crm.url)
    try:
        for i in range(LIMIT):
            run = await drive(downstream(services), [request_headers(**{"x-customer-id": f"c-{i}"}), request_body(chat("ctx"))], services=services)
            assert run.status() == 0, run.error()  # sent on
        before = crm.stats()["total"]
        assert before == LIMIT
        for i in range(5):
            run = await drive(downstream(services), [request_headers(key=KEY, **{"x-customer-id": f"over-{i}"}), request_body(chat("ctx"))], services=services)
            assert run.status() == 429
        assert crm.stats()["total"] == before, "a request refused for quota made the gateway read an MCP server"
    finally:
        await services.context_sources.close()
