"""Who can reach the control plane, through the real binaries.

On a cluster Envoy reaches the controller's ADS server over mutual TLS: an Envoy with the gateway's
certificate gets its config, one with a certificate from another CA gets nothing, and a rotated
Secret is followed without a restart. Standalone, the
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
from controller.bootstrap import xds_client_tls
from controller.render import RenderSettings, ads_bootstrap
from controller.xds import build_snapshot
from crdgol import devcerts
from crdgol.control_plane import ServerAuth
from crdgol.stack import Stack, envoy_binary, free_port
from tests.dataplane.test_xds import listener, wait_body

GATEWAY = "crdgol-gateway.crdgol-system.svc"
CONTROLLER = "crdgol-controller.crdgol-system.svc"


def secret_volume(folder: Path, pem: devcerts.Pem, ca: devcerts.Pem) -> None:
    """Write an identity the way the kubelet lays out a Secret volume, or update one the way it
    does on rotation: files in a timestamped folder, reached through the ``..data`` link, which is
    swapped atomically."""
    folder.mkdir(parents=True, exist_ok=True)
    version = folder / f"..{time.monotonic_ns()}"
    devcerts.write(version, pem, ca)
    (folder / "..data_tmp").symlink_to(version.name)
    os.replace(folder / "..data_tmp", folder / "..data")
    for name in ("tls.crt", "tls.key", "ca.crt"):
        if not (folder / name).is_symlink():
            (folder / name).symlink_to(f"..data/{name}")


def start_envoy(tmp_path: Path, name: str, xds_port: int, client: devcerts.Pem, ca: devcerts.Pem) -> subprocess.Popen[bytes]:
    secret_volume(tmp_path / name / "tls", client, ca)
    tls, sds = xds_client_tls(str(tmp_path / name / "tls"), str(tmp_path / name), CONTROLLER)
    for file, doc in sds.items():
        (tmp_path / name / file).write_text(json.dumps(doc))
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


async def test_envoy_follows_a_rotated_certificate_without_a_restart(tmp_path: Path) -> None:
    ca_pem, ca_key, ca_cert = devcerts.ca("first CA")
    server_dir = tmp_path / "controller"
    server = devcerts.write(server_dir, devcerts.leaf(ca_key, ca_cert, (CONTROLLER,), server=True), ca_pem)
    settings = ControllerSettings(
        host="127.0.0.1", xds_port=free_port(), policy_port=free_port(), metrics_port=0, auth=ServerAuth(tls=server, client_names=(GATEWAY,))
    )
    port = free_port()
    controller = Controller(settings)
    await controller.start()
    await controller.xds.set(build_snapshot(1, [listener(port, "first")], []))
    envoy = start_envoy(tmp_path, "gw", settings.xds_port, devcerts.leaf(ca_key, ca_cert, (GATEWAY,), server=False), ca_pem)
    try:
        assert await controller.xds.wait_acked(1, 20)
        # Both sides move to a new CA (as a renewed issuer would): the gateway's Secret volume is
        # swapped in place, the controller restarts with its new files.
        new_pem, new_key, new_cert = devcerts.ca("second CA")
        secret_volume(tmp_path / "gw" / "tls", devcerts.leaf(new_key, new_cert, (GATEWAY,), server=False), new_pem)
        await asyncio.sleep(1)  # Envoy notices the swap through its directory watch
        await controller.stop()
        devcerts.write(server_dir, devcerts.leaf(new_key, new_cert, (CONTROLLER,), server=True), new_pem)
        controller = Controller(settings)
        await controller.start()
        await controller.xds.set(build_snapshot(2, [listener(port, "second")], []))
        # Only an Envoy presenting the new certificate (and trusting the new CA) gets version 2.
        assert await controller.xds.wait_acked(2, 30)
        await wait_body(f"http://127.0.0.1:{port}/", "second")
    finally:
        envoy.terminate()
        envoy.wait(10)
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


def test_crdgol_up_puts_envoys_admin_api_on_a_private_socket(tmp_path: Path) -> None:
    # The admin API has no authentication: on a TCP port any local user could stop Envoy (over
    # and over, until the supervisor gives up) or raise its log level until it logs request
    # headers, provider credentials included. `crdgol up` puts it beside the control plane's sockets.
    from tests.conftest import running_example

    with running_example(tmp_path, "quickstart", admin_socket=True) as stack:
        admin = stack.sockets / "admin.sock"
        assert stat.S_IMODE(admin.stat().st_mode) == 0o600
        assert listening_tcp_ports(stack.pid("envoy")) == {stack.port}
        assert "crdgol-gateway" in stack.admin("/listeners")
        r = httpx.post(
            f"{stack.url}/v1/chat/completions",
            json={"model": "quickstart-chat", "messages": [{"role": "user", "content": "hi"}]},
            headers={"authorization": "Bearer sk-crdgol-quickstart"},
            timeout=30,
        )
        assert r.status_code == 200, r.text
        # The controller still reads backend health there (file mode's status).
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            binding = stack.status()["bindings"]["default/quickstart-chat"]  # type: ignore[index]
            if binding.get("backendHealth"):
                break
            time.sleep(0.2)
        assert binding.get("backendHealth") == {"primary": "healthy", "fallback": "healthy"}
