"""Who can reach the control plane, through the real binaries.

On a cluster Envoy reaches the controller's ADS server over mutual TLS: an Envoy with the gateway's
certificate gets its config, one with a certificate from another CA gets nothing. Standalone, the
controller and extproc listen on no TCP port but their metrics: ADS, the policy stream and
ext_proc are Unix sockets only their owner may open.
"""

from __future__ import annotations

import asyncio
import json
import os
import stat
import subprocess
import time
from pathlib import Path

import httpx

from controller.app import Controller, ControllerSettings
from controller.envoy_config import xds_client_tls
from controller.render import RenderSettings, ads_bootstrap
from controller.xds import build_snapshot
from crdgol import devcerts
from crdgol.control_plane import ServerAuth
from crdgol.stack import Stack, envoy_binary, free_port
from tests.dataplane.test_xds import listener, wait_body

GATEWAY = "crdgol-gateway.crdgol-system.svc"
CONTROLLER = "crdgol-controller.crdgol-system.svc"


def start_envoy(tmp_path: Path, name: str, xds_port: int, client: devcerts.Pem, ca: devcerts.Pem) -> subprocess.Popen[bytes]:
    files = devcerts.write(tmp_path / name, client, ca)
    tls = xds_client_tls(str(files.cert), str(files.key), str(files.ca), CONTROLLER)
    boot = ads_bootstrap(RenderSettings(admin_port=free_port()), "127.0.0.1", xds_port, node_id=name, xds_tls=tls)
    (tmp_path / f"{name}.json").write_text(json.dumps(boot))
    return subprocess.Popen(
        [envoy_binary(), "-c", str(tmp_path / f"{name}.json"), "--disable-hot-restart", "--log-level", "error", "--base-id", str(free_port())]
    )


async def test_envoy_gets_its_config_over_mutual_tls_and_an_envoy_with_a_foreign_certificate_gets_none(tmp_path: Path) -> None:
    ca_pem, ca_key, ca_cert = devcerts.ca()
    _, other_key, other_cert = devcerts.ca("another CA")
    server = devcerts.write(tmp_path / "controller", devcerts.leaf(ca_key, ca_cert, (CONTROLLER,), server=True), ca_pem)
    settings = ControllerSettings(
        host="127.0.0.1", xds_port=free_port(), policy_port=free_port(), metrics_port=0, auth=ServerAuth(tls=server, client_names=(GATEWAY,))
    )
    controller = Controller(settings)
    await controller.start()
    good_port, bad_port = free_port(), free_port()
    await controller.xds.set(build_snapshot(1, [listener(good_port, "served")], []))
    good = start_envoy(tmp_path, "good", settings.xds_port, devcerts.leaf(ca_key, ca_cert, (GATEWAY,), server=False), ca_pem)
    # Trusts our CA (so it would accept the controller) but presents a certificate another CA signed.
    bad = start_envoy(tmp_path, "bad", settings.xds_port, devcerts.leaf(other_key, other_cert, (GATEWAY,), server=False), ca_pem)
    try:
        assert await controller.xds.wait_acked(1, 20)
        await wait_body(f"http://127.0.0.1:{good_port}/", "served")
        assert set(controller.xds.nodes) == {"good"}
        # The bad Envoy keeps retrying; it never becomes a node and never gets a listener.
        await controller.xds.set(build_snapshot(2, [listener(good_port, "served"), {**listener(bad_port, "leak"), "name": "l2"}], []))
        assert await controller.xds.wait_acked(2, 10)
        await asyncio.sleep(2)
        assert set(controller.xds.nodes) == {"good"}
        async with httpx.AsyncClient() as c:
            assert (await c.get(f"http://127.0.0.1:{bad_port}/")).text == "leak"  # served by the good Envoy...
        assert bad.poll() is None  # ...while the bad one runs, configless
        assert controller.xds.refused == 0  # refused at the handshake: its stream never began
    finally:
        for proc in (good, bad):
            proc.terminate()
            proc.wait(10)
        await controller.stop()


def listening_tcp_ports(pid: int) -> set[int]:
    """TCP ports the process ``pid`` listens on (from /proc, no extra tools)."""
    inodes = set()
    for fd in Path(f"/proc/{pid}/fd").iterdir():
        try:
            target = os.readlink(fd)
        except OSError:
            continue
        if target.startswith("socket:["):
            inodes.add(target[8:-1])
    ports = set()
    for table in ("tcp", "tcp6"):
        for line in Path(f"/proc/{pid}/net/{table}").read_text().splitlines()[1:]:
            fields = line.split()
            if fields[3] == "0A" and fields[9] in inodes:  # 0A: LISTEN
                ports.add(int(fields[1].rsplit(":", 1)[1], 16))
    return ports


def test_the_standalone_control_plane_is_on_private_unix_sockets_only(quickstart: Stack) -> None:
    assert stat.S_IMODE(quickstart.sockets.stat().st_mode) == 0o700
    sockets = {p.name: stat.S_IMODE(p.stat().st_mode) for p in quickstart.sockets.iterdir()}
    assert sockets == {"xds.sock": 0o600, "policy.sock": 0o600, "extproc-0.sock": 0o600}
    # The controller's TCP port is its /metrics and /status; extproc's is its /metrics.
    assert listening_tcp_ports(quickstart.pid("controller")) == {quickstart.controller_port}
    assert listening_tcp_ports(quickstart.pid("extproc")) == {quickstart.metrics_port}
    envoy = listening_tcp_ports(quickstart.pid("envoy"))
    assert envoy == {quickstart.port, quickstart.admin_port}
    # And the gateway serves through all that.
    r = httpx.post(
        f"{quickstart.url}/v1/chat/completions",
        json={"model": "quickstart-chat", "messages": [{"role": "user", "content": "hi"}]},
        headers={"authorization": "Bearer sk-crdgol-quickstart"},
        timeout=30,
    )
    assert r.status_code == 200, r.text


def test_the_data_plane_keeps_serving_while_the_controller_is_away_and_follows_it_when_it_returns(quickstart: Stack) -> None:
    body = {"model": "quickstart-chat", "messages": [{"role": "user", "content": "hi"}]}
    headers = {"authorization": "Bearer sk-crdgol-quickstart"}
    version = quickstart.policy_version()
    controller = quickstart.procs["controller"]
    controller.kill()
    controller.wait(10)
    # Envoy keeps its xDS config and extproc its policy: requests keep being answered.
    for _ in range(5):
        r = httpx.post(f"{quickstart.url}/v1/chat/completions", json=body, headers=headers, timeout=30)
        assert r.status_code == 200, r.text
    assert quickstart.policy_version() == version
    quickstart.respawn("controller")
    # A change made after the restart reaches extproc (versions keep rising across restarts).
    binding = quickstart.settings.manifests / "binding.yaml"
    binding.write_text(binding.read_text().replace("quickstart-chat", "renamed-chat"))
    quickstart.wait_policy(version + 1, timeout=20)
    deadline = time.monotonic() + 10
    while True:  # Envoy's new route may land a moment after extproc's policy
        r = httpx.post(f"{quickstart.url}/v1/chat/completions", json={**body, "model": "renamed-chat"}, headers=headers, timeout=30)
        if r.status_code == 200 or time.monotonic() > deadline:
            break
        time.sleep(0.1)
    assert r.status_code == 200, r.text
