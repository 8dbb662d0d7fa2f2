"""The controller process: desired state -> render -> xDS (Envoy) and the policy stream (extproc).

``Controller`` owns the state and the two gRPC services and publishes every new render to both.
File mode (``run_file_mode``) feeds it from a folder; the kopf operator (``controller.operator``)
feeds it from the Kubernetes API. ``/metrics`` and ``/status`` are served over HTTP.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

import aiohttp
import grpc
from aiohttp import web
from envoy.service.discovery.v3 import ads_pb2_grpc
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

from controller.binding_usage import UsageBook, refresh_usage
from controller.envoy_config import Json, listener, route_configuration
from controller.filemode import FolderReader
from controller.health import backend_health
from controller.mcp_servers import KIND as MCP_SERVER_KIND
from controller.native_path import lua_program, native_extension, versioned
from controller.policy_server import PolicyServer
from controller.render import RenderResult, RenderSettings
from controller.state import ControllerState
from controller.workflow.cost import prices_by_namespace
from controller.workflow.host import WorkflowHost, WorkflowSettings
from controller.workflow.runner import WorkflowMetrics
from controller.xds import ECDS, Encoder, XdsServer
from crdgol.control_plane import (
    InsecureControlPlane,
    ServerAuth,
    authorizer,
    is_loopback,
    private_socket,
    server_credentials,
)
from crdgol.pb import policy_pb2 as pb
from crdgol.pb import policy_pb2_grpc as pb_grpc

if TYPE_CHECKING:
    from controller.run_tracing import RunTracer

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class ControllerSettings:
    render: RenderSettings = field(default_factory=RenderSettings)
    host: str = "127.0.0.1"
    xds_port: int = 18000
    policy_port: int = 18001
    # Unix sockets for ADS and the policy stream instead of the TCP ports (standalone: 0600 files
    # in a 0700 folder); TCP ports are served only with mutual TLS, or in plaintext on loopback.
    xds_socket: str = ""
    policy_socket: str = ""
    auth: ServerAuth = field(default_factory=ServerAuth)
    metrics_port: int = 9103  # 0 = off
    manifests: Path | None = None
    status_file: Path | None = None
    interval: float = 0.2
    workflows: WorkflowSettings | None = None  # file mode: run WorkflowSpecs from the folder
    # Rollout ordering (see Controller._roll_out): how long to wait for Envoy's ACK before the
    # policy goes out anyway, and how long the previous version's routes stay in Envoy.
    ack_timeout: float = 5.0
    ack_settle: float = 0.1
    retire_after: float = 10.0
    # How often file mode reads backend health from Envoy's admin API (0 = never).
    health_interval: float = 1.0
    # Bindings' status.usage on a cluster (controller.binding_usage): over this many seconds,
    # written at most every usage_interval seconds.
    usage_window: float = 3600.0
    usage_interval: float = 30.0


class ControllerMetrics:
    def __init__(self) -> None:
        r = self.registry = CollectorRegistry()
        self.version = Gauge("crdgol_controller_config_version", "Version of the config last published.", registry=r)
        self.bindings = Gauge("crdgol_controller_bindings", "AIModelBindings by state.", ["state"], registry=r)
        self.render_seconds = Histogram("crdgol_controller_render_seconds", "Time to render the whole config.", registry=r)
        self.nacks = Counter("crdgol_xds_nacks", "Configs Envoy rejected.", registry=r)
        self.subscribers = Gauge("crdgol_policy_subscribers", "extproc replicas subscribed to the policy stream.", registry=r)


class Controller:
    def __init__(self, settings: ControllerSettings, clock: Callable[[], float] = time.time) -> None:
        self.settings = settings
        self.state = ControllerState(settings.render, clock=clock)
        self.xds = XdsServer(authorizer(settings.auth))
        self.usage = UsageBook(settings.usage_window)
        self.policy = PolicyServer(authorizer(settings.auth), on_report=self._on_report)
        self.metrics = ControllerMetrics()
        self.problems: dict[str, str] = {}  # file-level problems (file mode)
        self._server: grpc.aio.Server | None = None
        self._runner: web.AppRunner | None = None
        self._lock = asyncio.Lock()
        self._nacks_seen = 0
        self._encoder = Encoder()
        self.workflows = WorkflowHost(settings.workflows, WorkflowMetrics(self.metrics.registry)) if settings.workflows else None
        # Each workflow run a trace (controller.run_tracing), in file mode here and on a cluster by
        # the operator's runner; the SDK is loaded only when tracing is on.
        self.run_tracer: RunTracer | None = None
        self._stop_tracing: Callable[[], None] | None = None
        if settings.render.tracing.enabled:
            from controller.run_tracing import RunTracer
            from crdgol import tracing

            tracer, self._stop_tracing = tracing.start(settings.render.tracing)
            self.run_tracer = RunTracer(tracer)
        if self.workflows is not None:
            self.workflows.runner.tracer = self.run_tracer
        self._live: RenderResult | None = None  # the render whose policy extproc was given
        # While it answers True, renders are not rolled out (``controller.initial_sync``).
        self.hold_rollout: Callable[[], bool] = lambda: False
        self._tasks: set[asyncio.Task[None]] = set()

    def _on_report(self, report: pb.UsageReport) -> None:
        """An extproc replica's report: its usage, and (on a cluster) its Envoy's backend health."""
        self.usage.record(report)
        if report.health:  # replicas beside an Envoy they can read (file mode reads it itself)
            health = self.usage.health()
            if health != self.state.backend_health:
                self.state.backend_health = health  # written to status at the next status sync

    async def publish(self) -> RenderResult:
        """Render the current state and hand any new version to Envoy and extproc."""
        async with self._lock:
            started = time.perf_counter()
            result = self.state.rebuild()
            self.metrics.render_seconds.observe(time.perf_counter() - started)
            version = result.snapshot.version
            if (self.policy.snapshot is None or self.policy.snapshot.version < version) and not self.hold_rollout():
                await self._roll_out(result)
            self._observe()
            self.write_status()
            return result

    async def _roll_out(self, result: RenderResult) -> None:
        """Envoy first, then extproc, so no request is routed to something extproc does not know.

        Route and cluster names carry a stamp of what they mean (``envoy_config.binding_stamp``),
        so the old and the new version's routes can live side by side. Envoy gets both and ACKs;
        only then does extproc get the new policy (whose routes Envoy now has), while requests
        extproc routed under the old policy still find their routes and clusters. The old ones are
        dropped ``retire_after`` seconds later, and extproc keeps the previous policy's backends
        for attempts still running (``PolicyHolder.backend``).
        """
        version = result.snapshot.version
        old = self._live
        routes = {str(r["name"]): r for r in (old.routes if old else ())} | {str(r["name"]): r for r in result.routes}
        clusters = {str(c["name"]): c for c in (old.clusters if old else ())} | {str(c["name"]): c for c in result.clusters}
        secrets = {str(c["name"]): c for c in (old.secrets if old else ())} | {str(c["name"]): c for c in result.secrets}
        headers = tuple(sorted({*(old.profile_headers if old else ()), *result.profile_headers}))
        if not await self._send_envoy(version, list(routes.values()), list(clusters.values()), list(secrets.values()), headers, versioned(result.native, version)):
            return
        if not await self.xds.wait_all_acked(version, self.settings.ack_timeout):
            log.warning("Envoy has not ACKed config version %d in %.0fs; publishing the policy anyway", version, self.settings.ack_timeout)
            if result.native and self.xds.nacked(ECDS, version):
                # Envoy kept the native program it had, whose key table may still hold a key this
                # policy revokes: replace it with one that decides nothing (every call to extproc,
                # which gets the new policy below) until a later program is taken.
                log.error("Envoy refused the native path's program of version %d: every call goes to extproc until one is taken", version)
                closed = lua_program(pb.PolicySnapshot(), self.settings.render)
                await self._send_envoy(
                    self.state.reserve_version(), list(routes.values()), list(clusters.values()), list(secrets.values()), headers, versioned(closed, version)
                )
                await self.xds.wait_all_acked(self.state.version, self.settings.ack_timeout)
        elif self.xds.nodes:
            # Envoy ACKs on its main thread and then hands the new routes to its workers; give
            # them a moment before extproc starts naming the new routes.
            await asyncio.sleep(self.settings.ack_settle)
        await self.policy.set(result.snapshot)
        self._live = result
        if old is not None and (len(routes) != len(result.routes) or len(clusters) != len(result.clusters)):
            task = asyncio.create_task(self._retire(result))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)

    async def _retire(self, live: RenderResult) -> None:
        """Drop the previous version's routes and clusters once nothing can be using them."""
        await asyncio.sleep(self.settings.retire_after)
        async with self._lock:
            if self._live is live:
                await self._send_envoy(
                    self.state.reserve_version(), list(live.routes), list(live.clusters), list(live.secrets), live.profile_headers, versioned(live.native, live.snapshot.version)
                )
                self._observe()
                self.write_status()

    async def _send_envoy(
        self, version: int, routes: list[Json], clusters: list[Json], secrets: list[Json], profile_headers: tuple[str, ...], native: str = ""
    ) -> bool:
        """Secrets, clusters, the listener (routes by RDS), the route table and the native path's
        program (ECDS; before extproc gets the policy, so a removed key stops natively first), as
        one xDS version."""
        rs = replace(self.settings.render, profile_headers=profile_headers)
        # Plus any listener of its own the workflow engine adds (the egress listener), and the
        # MCPServer views' internal listeners.
        mcp = self.state.result.mcp.listeners if self.state.result is not None else ()
        listeners = [listener(rs, [], rds=True), *self.state.extras.listeners, *mcp]
        tables = [route_configuration(rs, routes)]
        try:
            # Encoding a large config takes a while: keep the event loop serving meanwhile.
            extensions = [native_extension(native)] if native else []
            snap = await asyncio.to_thread(self._encoder.snapshot, version, listeners, clusters, tables, secrets, extensions)
        except Exception:  # a render Envoy's protos reject must not take the controller down
            log.exception("config version %d does not serialise; keeping version %s", version, self.xds.snapshot and self.xds.snapshot.version)
            return False
        await self.xds.set(snap)
        return True

    async def refresh_health(self) -> None:
        """Read each backend's health from Envoy's admin API into the bindings' status."""
        sock = self.settings.render.admin_socket
        url = f"http://{'localhost' if sock else f'127.0.0.1:{self.settings.render.admin_port}'}/clusters?format=json"
        connector = aiohttp.UnixConnector(path=sock) if sock else None
        try:
            async with (
                aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=1), connector=connector) as session,
                session.get(url) as rsp,
            ):
                doc = await rsp.json()
        except (aiohttp.ClientError, TimeoutError, ValueError):
            return  # no Envoy (yet): the status simply says nothing about health
        health = backend_health(doc)
        if health != self.state.backend_health:
            self.state.backend_health = health
            self.write_status()

    def _observe(self) -> None:
        m = self.metrics
        m.version.set(self.state.version)
        statuses = self.state.statuses().values()
        m.bindings.labels("ready").set(sum(1 for s in statuses if s.ready))
        m.bindings.labels("not_ready").set(sum(1 for s in statuses if not s.ready))
        m.subscribers.set(self.policy.subscribers)
        if self.xds.nacks > self._nacks_seen:
            m.nacks.inc(self.xds.nacks - self._nacks_seen)
            self._nacks_seen = self.xds.nacks

    def status_doc(self) -> dict[str, Any]:
        now = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
        return {
            "version": self.state.version,
            "bindings": {k: s.to_k8s(now) for k, s in self.state.statuses().items()},
            "files": dict(self.problems),
            # Sources that contribute nothing (an API-key Secret naming no valid tenant), and
            # resources crdgol cannot serve (an unknown crdgol.io kind), with what is wrong.
            "sources": dict(self.state.result.source_problems) if self.state.result else {},
            "envoy": {n: {"acked": dict(s.acked), "lastNack": s.last_nack} for n, s in self.xds.nodes.items()},
            "mcpServers": {
                k: s.to_k8s(now)
                for k, s in self.state.mcp.statuses(self.state.result.mcp if self.state.result else None, self.state.version).items()
            },
            **({"workflows": self.workflows.status_doc()} if self.workflows is not None else {}),
        }

    def write_status(self) -> None:
        path = self.settings.status_file
        if path is None:
            return
        tmp = path.with_suffix(path.suffix + ".tmp")
        tmp.write_text(json.dumps(self.status_doc(), indent=2, sort_keys=True) + "\n")
        os.replace(tmp, path)

    async def start(self) -> None:
        s = self.settings
        server = grpc.aio.server(options=[("grpc.max_send_message_length", 256 * 1024 * 1024)])
        ads_pb2_grpc.add_AggregatedDiscoveryServiceServicer_to_server(self.xds, server)
        pb_grpc.add_PolicyServiceServicer_to_server(self.policy, server)  # type: ignore[no-untyped-call]
        where = []
        for port, sock in ((s.xds_port, s.xds_socket), (s.policy_port, s.policy_socket)):
            if sock:
                Path(sock).unlink(missing_ok=True)  # a socket left by a killed controller
                bound, where_ = server.add_insecure_port(f"unix:{sock}"), f"unix:{sock}"
            elif s.auth.tls is not None:
                bound, where_ = server.add_secure_port(f"{s.host}:{port}", server_credentials(s.auth.tls)), f"{s.host}:{port} (mutual TLS)"
            elif is_loopback(s.host):
                bound, where_ = server.add_insecure_port(f"{s.host}:{port}"), f"{s.host}:{port} (plaintext, loopback)"
            else:
                raise InsecureControlPlane(f"refusing to serve the control plane in plaintext on {s.host}:{port}: configure mutual TLS")
            if not bound:
                raise OSError(f"cannot listen on {where_}")
            where.append(where_)
        await server.start()
        for sock in (s.xds_socket, s.policy_socket):
            if sock:
                private_socket(sock)
        self._server = server
        if s.metrics_port:
            self._runner = await self._http()
        if self.workflows is not None:
            await self.workflows.serve_api()
        log.info("controller serving xDS on %s and policy on %s", *where)

    async def _http(self) -> web.AppRunner:
        async def metrics(_r: web.Request) -> web.Response:
            self._observe()
            return web.Response(body=generate_latest(self.metrics.registry), content_type="text/plain", charset="utf-8")

        async def status(_r: web.Request) -> web.Response:
            return web.json_response(self.status_doc())

        app = web.Application()
        app.router.add_get("/metrics", metrics)
        if self.settings.manifests is not None:
            # File mode only: on a cluster this port is open to every pod (for Prometheus), and each
            # binding's status is already on the binding, behind RBAC.
            app.router.add_get("/status", status)
        async def healthz(_r: web.Request) -> web.Response:
            return await _ok()

        app.router.add_get("/healthz", healthz)
        runner = web.AppRunner(app, access_log=None)
        await runner.setup()
        await web.TCPSite(runner, self.settings.host, self.settings.metrics_port).start()
        return runner

    async def stop(self) -> None:
        if self.workflows is not None:
            await self.workflows.close()
        for task in list(self._tasks):
            task.cancel()
        if self._server is not None:
            await self._server.stop(2)
        if self._runner is not None:
            await self._runner.cleanup()
        if self._stop_tracing is not None:
            await asyncio.to_thread(self._stop_tracing)  # flushes the spans still batched

    async def run_file_mode(self, folder: Path, stop: asyncio.Event) -> None:
        reader = FolderReader(folder)
        health_at = usage_at = 0.0
        while not stop.is_set():
            if self.settings.health_interval and time.monotonic() - health_at >= self.settings.health_interval:
                health_at = time.monotonic()
                await self.refresh_health()
            if time.monotonic() - usage_at >= self.settings.usage_interval:  # extproc's reports
                usage_at = time.monotonic()
                if refresh_usage(self.state, self.usage):
                    self.write_status()
            if reader.changed():
                bindings, secrets, others = reader.read()
                self.problems = dict(reader.problems)
                before = {k: (s.conditions) for k, s in self.state.statuses().items()}
                self.state.replace_all(bindings, secrets)
                self.state.mcp.replace_all([d for d in others if d.get("kind") == MCP_SERVER_KIND])
                sources_before = dict(self.state.result.source_problems) if self.state.result else {}
                if self.workflows is not None and self.state.result is None:
                    # A (re)started controller's first config must already hold what the workflows
                    # add (the run API's route, the egress listener), which Envoy kept from the
                    # previous controller: a config without them would drop them while resumed
                    # runs call through them (a connection refused, an attempt lost). So the
                    # workflows are accepted against a render that is not rolled out first.
                    self.state.extras = self.workflows.extras()
                    first = self.state.rebuild().snapshot.bindings
                    self.workflows.sync(others, secrets, {b.key: b.model for b in first}, prices_by_namespace(first))
                    self.state.extras = self.workflows.extras()
                await self.publish()
                if self.state.result is not None:
                    for where, what in self.state.result.source_problems.items():
                        if sources_before.get(where) != what:
                            log.error("%s: %s", where, what)
                if self.workflows is not None and self.state.result is not None:
                    # Workflows name bindings: accept them against what is served, then add
                    # their Envoy resources (egress listener, run API route).
                    served = {b.key: b.model for b in self.state.result.snapshot.bindings}
                    self.workflows.sync(others, secrets, served, prices_by_namespace(self.state.result.snapshot.bindings))
                    self.state.extras = self.workflows.extras()
                    await self.publish()
                for key, st in self.state.statuses().items():
                    if before.get(key) != st.conditions:
                        for c in st.conditions:
                            if c.status != "True":
                                log.error("AIModelBinding %s: %s=%s %s: %s", key, c.type, c.status, c.reason, c.message)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), self.settings.interval)


async def _ok() -> web.Response:
    return web.Response(text="ok\n")


async def serve_file_mode(settings: ControllerSettings, stop: asyncio.Event | None = None) -> None:
    assert settings.manifests is not None
    controller = Controller(settings)
    await controller.start()
    stop = stop or asyncio.Event()
    import signal

    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        with contextlib.suppress(NotImplementedError, RuntimeError):
            loop.add_signal_handler(sig, stop.set)
    try:
        await controller.run_file_mode(settings.manifests, stop)
    finally:
        await controller.stop()
