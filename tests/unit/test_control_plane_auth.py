"""The control plane serves nobody who has not proved who they are.

The controller's policy stream (provider keys, HS256 secrets) and its ADS server (Envoy's whole
config) run here over real gRPC on loopback, with mutual TLS from freshly issued certificates or on
Unix sockets. A client without the credential is refused and receives no snapshot; the right one
receives it.
"""

from __future__ import annotations

import asyncio
import os
import socket
import stat
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

import grpc
import pytest
from envoy.service.discovery.v3 import ads_pb2_grpc, discovery_pb2

from controller.app import Controller, ControllerSettings
from controller.xds import CDS, build_snapshot
from crdgol import cli, devcerts
from crdgol.control_plane import ClientAuth, ServerAuth, TlsFiles, channel_credentials, private_dir
from crdgol.pb import policy_pb2 as pb
from crdgol.pb import policy_pb2_grpc as pb_grpc
from crdgol.stack import free_port
from extproc.policy_client import follow
from extproc.services import Services

GATEWAY = "crdgol-gateway.crdgol-system.svc"
SECRET = "an-hs256-secret-of-some-tenant"


@dataclass
class Pki:
    server: TlsFiles
    client: TlsFiles  # signed by the control plane's CA, named GATEWAY
    stranger: TlsFiles  # signed by the same CA, under another name
    forged: TlsFiles  # named GATEWAY, but signed by another CA
    other_ca: Path  # that other CA's certificate


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    root = tmp_path_factory.mktemp("pki")
    ca_pem, ca_key, ca_cert = devcerts.ca()
    other_pem, other_key, other_cert = devcerts.ca("someone else's CA")
    (root / "other-ca.crt").write_bytes(other_pem.cert)
    server = devcerts.leaf(ca_key, ca_cert, ("localhost", "127.0.0.1"), server=True)
    return Pki(
        server=devcerts.write(root / "server", server, ca_pem),
        client=devcerts.write(root / "client", devcerts.leaf(ca_key, ca_cert, (GATEWAY,), server=False), ca_pem),
        stranger=devcerts.write(root / "stranger", devcerts.leaf(ca_key, ca_cert, ("other-app.default.svc",), server=False), ca_pem),
        # The forged identity trusts our CA (so it could check the server) but presents a foreign certificate.
        forged=devcerts.write(root / "forged", devcerts.leaf(other_key, other_cert, (GATEWAY,), server=False), ca_pem),
        other_ca=root / "other-ca.crt",
    )


def snapshot(version: int) -> pb.PolicySnapshot:
    snap = pb.PolicySnapshot(version=version)
    snap.jwt_providers.add(issuer="https://issuer.example", hs256_secret=SECRET.encode(), namespace="default")
    return snap


async def serving(settings: ControllerSettings) -> Controller:
    controller = Controller(settings)
    await controller.start()
    await controller.policy.set(snapshot(7))
    await controller.xds.set(build_snapshot(7, [], []))
    return controller


@pytest.fixture
async def mtls(pki: Pki) -> AsyncIterator[Controller]:
    settings = ControllerSettings(
        xds_port=free_port(), policy_port=free_port(), metrics_port=0, auth=ServerAuth(tls=pki.server, client_names=(GATEWAY,))
    )
    controller = await serving(settings)
    yield controller
    await controller.stop()


def _channel(target: str, files: TlsFiles | None) -> grpc.aio.Channel:
    if files is None:
        return grpc.aio.insecure_channel(target)
    return grpc.aio.secure_channel(target, channel_credentials(files))


async def subscribe(target: str, files: TlsFiles | None) -> tuple[list[pb.PolicySnapshot], grpc.StatusCode | None]:
    """What a policy subscriber receives (at most one snapshot) and the status it ended with."""
    got: list[pb.PolicySnapshot] = []
    async with _channel(target, files) as channel:
        try:
            async for snap in pb_grpc.PolicyServiceStub(channel).Subscribe(pb.SubscribeRequest(), timeout=5):  # type: ignore[no-untyped-call]
                got.append(snap)
                break
        except grpc.aio.AioRpcError as exc:
            return got, exc.code()
    return got, None


async def ads(target: str, files: TlsFiles | None) -> tuple[list[discovery_pb2.DiscoveryResponse], grpc.StatusCode | None]:
    """What an ADS client asking for clusters receives (at most one response) and how it ended."""
    got: list[discovery_pb2.DiscoveryResponse] = []

    async def requests() -> AsyncIterator[discovery_pb2.DiscoveryRequest]:
        yield discovery_pb2.DiscoveryRequest(type_url=CDS)
        await asyncio.sleep(10)

    async with _channel(target, files) as channel:
        try:
            async for resp in ads_pb2_grpc.AggregatedDiscoveryServiceStub(channel).StreamAggregatedResources(requests(), timeout=5):
                got.append(resp)
                break
        except grpc.aio.AioRpcError as exc:
            return got, exc.code()
    return got, None


async def test_the_gateways_certificate_gets_the_policy_and_the_envoy_config(mtls: Controller, pki: Pki) -> None:
    policy, status = await subscribe(f"localhost:{mtls.settings.policy_port}", pki.client)
    assert status is None and [s.version for s in policy] == [7]
    assert policy[0].jwt_providers[0].hs256_secret == SECRET.encode()
    config, status = await ads(f"localhost:{mtls.settings.xds_port}", pki.client)
    assert status is None and [r.version_info for r in config] == ["7"]


@pytest.mark.parametrize("who", ["plaintext", "forged", "stranger"])
async def test_a_client_without_the_credential_gets_no_policy_and_no_config(mtls: Controller, pki: Pki, who: str) -> None:
    files = {"plaintext": None, "forged": pki.forged, "stranger": pki.stranger}[who]
    for port in (mtls.settings.policy_port, mtls.settings.xds_port):
        policy, status = await subscribe(f"localhost:{port}", files)
        assert policy == []
        # No TLS or a foreign certificate: the handshake fails. A certificate our CA signed for
        # another name: the call is refused.
        assert status == (grpc.StatusCode.PERMISSION_DENIED if who == "stranger" else grpc.StatusCode.UNAVAILABLE)
        config, status = await ads(f"localhost:{port}", files)
        assert config == []
        assert status == (grpc.StatusCode.PERMISSION_DENIED if who == "stranger" else grpc.StatusCode.UNAVAILABLE)
    assert mtls.policy.subscribers == 0
    assert not mtls.xds.nodes


async def report(target: str, files: TlsFiles | None) -> grpc.StatusCode | None:
    """How a usage report (claiming 1000 requests for a binding) ends."""
    usage = pb.BackendUsage(binding="team-a/chat", backend="b", requests=1000)
    async with _channel(target, files) as channel:
        try:
            await pb_grpc.PolicyServiceStub(channel).Report(pb.UsageReport(reporter="r", started_at=time.time(), usage=[usage]), timeout=5)  # type: ignore[no-untyped-call]
        except grpc.aio.AioRpcError as exc:
            return exc.code()
    return None


@pytest.mark.parametrize("who", ["plaintext", "forged", "stranger"])
async def test_only_the_gateways_certificate_may_report_usage_for_the_status(mtls: Controller, pki: Pki, who: str) -> None:
    files = {"plaintext": None, "forged": pki.forged, "stranger": pki.stranger}[who]
    status = await report(f"localhost:{mtls.settings.policy_port}", files)
    assert status == (grpc.StatusCode.PERMISSION_DENIED if who == "stranger" else grpc.StatusCode.UNAVAILABLE)
    assert mtls.usage.usage("team-a/chat") is None
    assert await report(f"localhost:{mtls.settings.policy_port}", pki.client) is None
    usage = mtls.usage.usage("team-a/chat")
    assert usage is not None and usage.requests == 1000


async def test_a_rotated_certificate_is_served_to_new_connections_without_a_restart(mtls: Controller, pki: Pki, tmp_path: Path) -> None:
    # A new CA and server certificate replace the files (as a renewed Secret does); clients that
    # trust only the new CA now connect, clients that trust only the old one no longer do.
    ca_pem, ca_key, ca_cert = devcerts.ca("renewed CA")
    renewed_client = devcerts.write(tmp_path / "client", devcerts.leaf(ca_key, ca_cert, (GATEWAY,), server=False), ca_pem)
    old = {p: p.read_bytes() for p in (pki.server.cert, pki.server.key, pki.server.ca)}
    try:
        server = devcerts.leaf(ca_key, ca_cert, ("localhost",), server=True)
        pki.server.cert.write_bytes(server.cert)
        pki.server.key.write_bytes(server.key)
        pki.server.ca.write_bytes(ca_pem.cert)
        os.utime(pki.server.cert, (1, 1))  # a distinct mtime even within the clock's resolution
        policy, status = await subscribe(f"localhost:{mtls.settings.policy_port}", renewed_client)
        assert status is None and [s.version for s in policy] == [7]
        policy, status = await subscribe(f"localhost:{mtls.settings.policy_port}", pki.client)
        assert policy == [] and status == grpc.StatusCode.UNAVAILABLE
    finally:
        for path, data in old.items():
            path.write_bytes(data)
        os.utime(pki.server.cert, None)


async def test_extproc_follows_the_policy_over_mutual_tls_and_refuses_a_controller_it_cannot_verify(mtls: Controller, pki: Pki) -> None:
    services = Services()
    task = asyncio.create_task(follow(services, f"localhost:{mtls.settings.policy_port}", ClientAuth(tls=pki.client)))
    try:
        for _ in range(200):
            if services.current.version == 7:
                break
            await asyncio.sleep(0.02)
        assert services.current.version == 7
    finally:
        task.cancel()
    # An extproc told to trust another CA takes no policy from a controller that CA did not sign
    # (as it would refuse an impostor controller).
    distrustful = Services()
    auth = ClientAuth(tls=TlsFiles(cert=pki.client.cert, key=pki.client.key, ca=pki.other_ca))
    task = asyncio.create_task(follow(distrustful, f"localhost:{mtls.settings.policy_port}", auth))
    try:
        await asyncio.sleep(1.0)
        assert distrustful.current.version == 0
    finally:
        task.cancel()


async def test_unix_sockets_are_the_owners_alone(tmp_path: Path) -> None:
    folder = tmp_path / "sockets"
    folder.mkdir(mode=0o700)
    settings = ControllerSettings(
        xds_socket=str(folder / "xds.sock"), policy_socket=str(folder / "policy.sock"), metrics_port=0
    )
    controller = await serving(settings)
    try:
        for sock in (settings.xds_socket, settings.policy_socket):
            assert stat.S_IMODE(os.stat(sock).st_mode) == 0o600
        policy, status = await subscribe(f"unix:{settings.policy_socket}", None)
        assert status is None and [s.version for s in policy] == [7]
        if os.geteuid() == 0:
            # Another user (nobody) cannot connect even where it may reach the file: its mode stops it.
            os.chmod(tmp_path, 0o711)
            os.chmod(folder, 0o711)
            try:
                for sock in (settings.xds_socket, settings.policy_socket):
                    assert connect_as_nobody(sock) == "refused"
            finally:
                os.chmod(folder, 0o700)
                os.chmod(tmp_path, 0o700)
    finally:
        await controller.stop()


def connect_as_nobody(path: str) -> str:
    """Try to connect to a Unix socket as uid/gid 65534, in a forked child (no exec needed)."""
    pid = os.fork()
    if pid == 0:  # the child: plain syscalls only, then leave without running any cleanup
        code = 1
        try:
            os.setgroups([])
            os.setgid(65534)
            os.setuid(65534)
            with socket.socket(socket.AF_UNIX) as s:
                s.connect(path)
            code = 0
        except PermissionError:
            code = 13
        finally:
            os._exit(code)
    _, status = os.waitpid(pid, 0)
    return {0: "connected", 13: "refused"}.get(os.waitstatus_to_exitcode(status), "error")


def test_the_command_line_refuses_an_unauthenticated_control_plane(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(["controller", "--manifests", str(tmp_path), "--metrics-port", "0"]) == 2
    assert "without authentication" in capsys.readouterr().err
    with pytest.raises(SystemExit, match="needs all three"):
        cli.main(["controller", "--manifests", str(tmp_path), "--tls-cert", "x.pem"])
    assert cli.main(["extproc", "--policy-server", "crdgol-controller:18001", "--metrics-port", "0"]) == 2
    assert "neither authenticated nor encrypted" in capsys.readouterr().err


def test_crdgol_certs_writes_a_working_pair_of_identities_with_private_keys(tmp_path: Path) -> None:
    assert cli.main(["certs", "--out", str(tmp_path), "--days", "2"]) == 0
    for side in ("controller", "gateway"):
        assert stat.S_IMODE((tmp_path / side / "tls.key").stat().st_mode) == 0o600
        assert (tmp_path / side / "ca.crt").read_bytes() == (tmp_path / "controller" / "ca.crt").read_bytes()
    # The gateway's identity is the one the controller's deploy/ flags accept.
    from cryptography import x509

    cert = x509.load_pem_x509_certificate((tmp_path / "gateway" / "tls.crt").read_bytes())
    names = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value.get_values_for_type(x509.DNSName)
    assert names == [devcerts.GATEWAY_NAME]


def test_a_socket_folder_someone_else_owns_or_points_to_is_refused(tmp_path: Path) -> None:
    mine = private_dir(tmp_path / "mine")
    assert stat.S_IMODE(mine.stat().st_mode) == 0o700
    (tmp_path / "link").symlink_to(mine)
    with pytest.raises(PermissionError, match="not a folder of ours"):
        private_dir(tmp_path / "link")
    if os.geteuid() == 0:
        theirs = tmp_path / "theirs"
        theirs.mkdir(mode=0o777)
        os.chown(theirs, 65534, 65534)
        with pytest.raises(PermissionError, match="owned by uid 65534"):
            private_dir(theirs)


async def test_extproc_takes_no_request_before_it_holds_a_policy(tmp_path: Path) -> None:
    from extproc.server import ServerSettings, serve

    folder = private_dir(tmp_path / "s")
    extproc_socket, policy_socket = str(folder / "extproc.sock"), str(folder / "policy.sock")
    stop = asyncio.Event()
    settings = ServerSettings(port=0, socket=extproc_socket, metrics_port=0, policy_server=f"unix:{policy_socket}", grace=1)
    server = asyncio.create_task(serve(settings, Services(), stop))
    controller = None
    try:
        # No controller yet: nothing accepts connections, so Envoy fails closed (503) instead of
        # extproc answering good keys from an empty policy.
        await asyncio.sleep(1.0)
        with socket.socket(socket.AF_UNIX) as s, pytest.raises(OSError):
            s.connect(extproc_socket)
        controller = await serving(ControllerSettings(xds_socket=str(folder / "xds.sock"), policy_socket=policy_socket, metrics_port=0))
        for _ in range(300):
            if os.path.exists(extproc_socket):
                try:
                    with socket.socket(socket.AF_UNIX) as s:
                        s.connect(extproc_socket)
                    break
                except OSError:
                    pass
            await asyncio.sleep(0.02)
        else:
            raise AssertionError("extproc never opened its socket after the policy arrived")
        assert stat.S_IMODE(os.stat(extproc_socket).st_mode) == 0o600
    finally:
        stop.set()
        await asyncio.wait_for(server, 10)
        if controller is not None:
            await controller.stop()


@pytest.mark.parametrize("file_mode", [False, True])
async def test_the_status_of_every_namespace_is_served_over_http_in_file_mode_only(tmp_path: Path, file_mode: bool) -> None:
    # On a cluster the metrics port is open to every pod (for Prometheus), and each binding's
    # status is already on the binding, behind RBAC: /status there would tell any pod every
    # namespace's models, Secret names and problems.
    import aiohttp

    folder = private_dir(tmp_path / "sockets")
    port = free_port()
    settings = ControllerSettings(
        xds_socket=str(folder / "xds.sock"),
        policy_socket=str(folder / "policy.sock"),
        metrics_port=port,
        manifests=tmp_path if file_mode else None,
    )
    controller = await serving(settings)
    try:
        async with aiohttp.ClientSession() as s:
            async with s.get(f"http://127.0.0.1:{port}/status") as r:
                assert r.status == (200 if file_mode else 404)
            async with s.get(f"http://127.0.0.1:{port}/metrics") as r:
                assert r.status == 200
    finally:
        await controller.stop()
