"""On a cluster Envoy's admin shares the gateway pod's loopback with extproc, whose MCP client
POSTs to whatever URL a binding names (an MCP client's first request is a POST), and with the
egress listener workflow http-request steps go through: the admin the deploy bootstrap configures
must answer harmless reads only, so that a binding or workflow author in any namespace cannot
stop, drain or fail the gateway every namespace shares, nor read its config. Real Envoy, the deploy
ConfigMap's admin block, and the real MCP client extproc uses."""

from __future__ import annotations

import json
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from crdgol.stack import envoy_binary, free_port, stop_process, wait_http
from extproc.mcp_sources import ContextSources, load_sdk
from extproc.metrics import Metrics
from extproc.policy import McpServer, McpSource
from tests.unit.test_deploy import bootstrap

# What the admin destroys when POSTed to: the availability of the whole gateway.
MUTATING = ("/quitquitquit", "/healthcheck/fail", "/drain_listeners")


@pytest.fixture
def admin(tmp_path: Path) -> Iterator[tuple[str, subprocess.Popen[bytes]]]:
    block = bootstrap()["admin"]
    port = free_port()
    block["address"]["socket_address"] = {"address": "127.0.0.1", "port_value": port}
    config = tmp_path / "envoy.json"
    config.write_text(json.dumps({"admin": block}))
    proc = subprocess.Popen([envoy_binary(), "-c", str(config), "--disable-hot-restart", "--log-level", "error"], start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    try:
        wait_http(f"{url}/ready", (200,), 30, proc)
        yield url, proc
    finally:
        stop_process(proc)


async def test_an_mcp_source_naming_the_admin_cannot_stop_drain_or_fail_the_gateway(admin: tuple[str, subprocess.Popen[bytes]]) -> None:
    url, proc = admin
    load_sdk()
    sources = ContextSources(Metrics())
    try:
        for path in MUTATING:
            server = McpServer(name="hostile", url=url + path, auth_headers=(), timeout=1.0, cache_ttl=0.0)
            read = await sources.read([McpSource(server=server, title="x", resource_uri="x://y")], {}, "authors/hostile")
            assert read == []  # skipped: the admin refused it
    finally:
        await sources.close()
    time.sleep(0.5)
    assert proc.poll() is None, "Envoy exited"
    info = httpx.get(f"{url}/server_info", timeout=5).json()
    assert info["state"] == "LIVE"
    for path in MUTATING:
        assert httpx.post(url + path, timeout=5).status_code == 403


def test_the_reads_the_deployment_relies_on_still_answer(admin: tuple[str, subprocess.Popen[bytes]]) -> None:
    url, _ = admin
    # extproc's --envoy-admin (backend health), the :19001 route Prometheus scrapes, and the probe.
    for path in ("/clusters?format=json", "/stats/prometheus", "/ready", "/stats?filter=server"):
        assert httpx.get(url + path, timeout=5).status_code == 200, path


def test_the_config_which_holds_the_run_apis_token_is_not_readable(admin: tuple[str, subprocess.Popen[bytes]]) -> None:
    # A workflow http-request step reaches the pod's loopback through the egress listener, and
    # its output (the answer's body) lands in the run's status.
    url, _ = admin
    for path in ("/config_dump", "/config_dump?include_eds", "/listeners?format=json", "/runtime"):
        assert httpx.get(url + path, timeout=5).status_code == 403, path
