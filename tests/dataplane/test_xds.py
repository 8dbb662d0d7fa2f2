"""The ADS server against a real Envoy: versions and nonces ACKed, a bad config NACKed and the
last good one kept serving."""

from __future__ import annotations

import asyncio
import json
import subprocess
from pathlib import Path

import grpc
import httpx
from envoy.service.discovery.v3 import ads_pb2_grpc

from controller.render import RenderSettings, ads_bootstrap
from controller.xds import XdsServer, build_snapshot
from crdgol.stack import envoy_binary, free_port


def listener(port: int, body: str, stat_prefix: str = "t") -> dict[str, object]:
    hcm = {
        "@type": "type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager",
        "stat_prefix": stat_prefix,
        "route_config": {
            "virtual_hosts": [
                {"name": "v", "domains": ["*"], "routes": [{"match": {"prefix": "/"}, "direct_response": {"status": 200, "body": {"inline_string": body}}}]}
            ]
        },
        "http_filters": [{"name": "envoy.filters.http.router", "typed_config": {"@type": "type.googleapis.com/envoy.extensions.filters.http.router.v3.Router"}}],
    }
    return {
        "name": "l",
        "address": {"socket_address": {"address": "127.0.0.1", "port_value": port}},
        "filter_chains": [{"filters": [{"name": "envoy.filters.network.http_connection_manager", "typed_config": hcm}]}],
    }


def cluster(name: str, port: int) -> dict[str, object]:
    return {
        "name": name,
        "type": "STATIC",
        "connect_timeout": "1s",
        "load_assignment": {"cluster_name": name, "endpoints": [{"lb_endpoints": [{"endpoint": {"address": {"socket_address": {"address": "127.0.0.1", "port_value": port}}}}]}]},
    }


async def wait_body(url: str, want: str, timeout: float = 10) -> None:
    deadline = asyncio.get_running_loop().time() + timeout
    async with httpx.AsyncClient() as c:
        while True:
            try:
                if (await c.get(url)).text == want:
                    return
            except httpx.HTTPError:
                pass
            assert asyncio.get_running_loop().time() < deadline, f"never saw {want!r}"
            await asyncio.sleep(0.05)


async def test_envoy_acks_good_configs_nacks_a_bad_one_and_keeps_the_last_good(tmp_path: Path) -> None:
    xds_port, listen_port, admin_port = free_port(), free_port(), free_port()
    xds = XdsServer()
    server = grpc.aio.server()
    ads_pb2_grpc.add_AggregatedDiscoveryServiceServicer_to_server(xds, server)
    server.add_insecure_port(f"127.0.0.1:{xds_port}")
    await server.start()
    boot = tmp_path / "boot.json"
    boot.write_text(json.dumps(ads_bootstrap(RenderSettings(admin_port=admin_port), "127.0.0.1", xds_port)))
    envoy = subprocess.Popen([envoy_binary(), "-c", str(boot), "--disable-hot-restart", "--log-level", "error"])
    try:
        await xds.set(build_snapshot(1, [listener(listen_port, "one")], [cluster("a", 1)]))
        assert await xds.wait_acked(1, 15)
        await wait_body(f"http://127.0.0.1:{listen_port}/", "one")

        await xds.set(build_snapshot(2, [listener(listen_port, "two")], [cluster("a", 1), cluster("b", 2)]))
        assert await xds.wait_acked(2, 10)
        await wait_body(f"http://127.0.0.1:{listen_port}/", "two")

        # Version 3's listener breaks Envoy's own validation (an empty stat_prefix): NACKed.
        await xds.set(build_snapshot(3, [listener(listen_port, "three", stat_prefix="")], [cluster("a", 1)]))
        assert not await xds.wait_acked(3, 3)
        assert xds.nacks >= 1
        node = next(iter(xds.nodes.values()))
        assert "StatPrefix" in node.last_nack
        assert node.acked["type.googleapis.com/envoy.config.listener.v3.Listener"] == 2
        async with httpx.AsyncClient() as c:
            assert (await c.get(f"http://127.0.0.1:{listen_port}/")).text == "two"  # last good serves
            dump = (await c.get(f"http://127.0.0.1:{admin_port}/config_dump?resource=dynamic_listeners")).json()
        listeners = [d for d in dump["configs"] if d.get("name") == "l"]
        assert "StatPrefix" in listeners[0]["error_state"]["details"]

        # A fixed config is taken again.
        await xds.set(build_snapshot(4, [listener(listen_port, "four")], [cluster("a", 1)]))
        assert await xds.wait_acked(4, 10)
        await wait_body(f"http://127.0.0.1:{listen_port}/", "four")
    finally:
        envoy.terminate()
        envoy.wait(10)
        await server.stop(1)
