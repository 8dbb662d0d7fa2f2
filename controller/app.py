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
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
from aiohttp import web
from envoy.service.discovery.v3 import ads_pb2_grpc
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

from controller.filemode import FolderReader
from controller.policy_server import PolicyServer
from controller.render import RenderResult, RenderSettings
from controller.state import ControllerState
from controller.workflow.host import WorkflowHost, WorkflowSettings
from controller.workflow.runner import WorkflowMetrics
from controller.xds import Encoder, XdsServer
from crdgol.pb import policy_pb2_grpc as pb_grpc

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class ControllerSettings:
    render: RenderSettings = field(default_factory=RenderSettings)
    host: str = "127.0.0.1"
    xds_port: int = 18000
    policy_port: int = 18001
    metrics_port: int = 9103  # 0 = off
    manifests: Path | None = None
    status_file: Path | None = None
    interval: float = 0.2
    workflows: WorkflowSettings | None = None  # file mode: run WorkflowSpecs from the folder


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
        self.xds = XdsServer()
        self.policy = PolicyServer()
        self.metrics = ControllerMetrics()
        self.problems: dict[str, str] = {}  # file-level problems (file mode)
        self._server: grpc.aio.Server | None = None
        self._runner: web.AppRunner | None = None
        self._lock = asyncio.Lock()
        self._nacks_seen = 0
        self._encoder = Encoder()
        self.workflows = WorkflowHost(settings.workflows, WorkflowMetrics(self.metrics.registry)) if settings.workflows else None

    async def publish(self) -> RenderResult:
        """Render the current state and hand any new version to Envoy and extproc."""
        async with self._lock:
            started = time.perf_counter()
            result = self.state.rebuild()
            self.metrics.render_seconds.observe(time.perf_counter() - started)
            version = result.snapshot.version
            if self.xds.snapshot is None or self.xds.snapshot.version < version:
                try:
                    # Encoding a large config takes a while: keep the event loop serving meanwhile.
                    snap = await asyncio.to_thread(self._encoder.snapshot, version, result.listeners, result.clusters)
                except Exception:  # a render Envoy's protos reject must not take the controller down
                    log.exception("config version %d does not serialise; keeping version %s", version, self.xds.snapshot and self.xds.snapshot.version)
                else:
                    await self.xds.set(snap)
                    await self.policy.set(result.snapshot)
            self._observe()
            self.write_status()
            return result

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
            "envoy": {n: {"acked": dict(s.acked), "lastNack": s.last_nack} for n, s in self.xds.nodes.items()},
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
        for port in (s.xds_port, s.policy_port):
            if not server.add_insecure_port(f"{s.host}:{port}"):
                raise OSError(f"cannot listen on {s.host}:{port}")
        await server.start()
        self._server = server
        if s.metrics_port:
            self._runner = await self._http()
        if self.workflows is not None:
            await self.workflows.serve_api()
        log.info("controller serving xDS on %s:%d and policy on %s:%d", s.host, s.xds_port, s.host, s.policy_port)

    async def _http(self) -> web.AppRunner:
        async def metrics(_r: web.Request) -> web.Response:
            self._observe()
            return web.Response(body=generate_latest(self.metrics.registry), content_type="text/plain", charset="utf-8")

        async def status(_r: web.Request) -> web.Response:
            return web.json_response(self.status_doc())

        app = web.Application()
        app.router.add_get("/metrics", metrics)
        app.router.add_get("/status", status)
        app.router.add_get("/healthz", lambda _r: _ok())
        runner = web.AppRunner(app, access_log=None)
        await runner.setup()
        await web.TCPSite(runner, self.settings.host, self.settings.metrics_port).start()
        return runner

    async def stop(self) -> None:
        if self.workflows is not None:
            await self.workflows.close()
        if self._server is not None:
            await self._server.stop(2)
        if self._runner is not None:
            await self._runner.cleanup()

    async def run_file_mode(self, folder: Path, stop: asyncio.Event) -> None:
        reader = FolderReader(folder)
        while not stop.is_set():
            if reader.changed():
                bindings, secrets, others = reader.read()
                self.problems = dict(reader.problems)
                before = {k: (s.conditions) for k, s in self.state.statuses().items()}
                self.state.replace_all(bindings, secrets)
                result = await self.publish()
                if self.workflows is not None:
                    # Workflows name bindings: accept them against what is served, then add
                    # their Envoy resources (egress listener, run API route).
                    self.workflows.sync(others, secrets, {b.key: b.model for b in result.snapshot.bindings})
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
