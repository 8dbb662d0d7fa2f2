"""The extproc gRPC server: Envoy's ExternalProcessor service, gRPC health, /metrics.

Each ext_proc stream is one HTTP request (downstream filter), one upstream attempt (upstream
filter, identified by the ``x-crdgol-backend`` gRPC metadata) or the response side of a
one-message request (the response filter, ``x-crdgol-response``; ``extproc.response_side``). Shutdown is graceful: health turns
NOT_SERVING, new streams are refused, open ones get ``grace`` seconds to finish.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path

import grpc
from aiohttp import web
from envoy.service.accesslog.v3 import als_pb2_grpc
from envoy.service.ext_proc.v3 import external_processor_pb2 as ep
from envoy.service.ext_proc.v3 import external_processor_pb2_grpc as ep_grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from crdgol.control_plane import ClientAuth, private_socket
from crdgol.mcp_contract import LIST_METADATA as MCP_LIST_METADATA
from crdgol.mcp_contract import SERVER_METADATA as MCP_SERVER_METADATA
from crdgol.pb import policy_pb2 as pb
from crdgol.request_path import BACKEND_METADATA, RESPONSE_STREAM_METADATA
from crdgol.usage_log import USAGE_LOG_METADATA
from extproc import phases
from extproc.errors import GatewayError
from extproc.gateway import Downstream
from extproc.mcp_gateway import ServerCredential, ToolListFilter
from extproc.phases import Handler, Headers, Reply
from extproc.response_side import ResponseStream
from extproc.services import Services
from extproc.upstream import Attempt
from extproc.usage_log import UsageLog

log = logging.getLogger(__name__)



@dataclass(frozen=True, slots=True)
class ServerSettings:
    host: str = "127.0.0.1"
    port: int = 9002
    metrics_port: int = 9102  # 0 disables the /metrics endpoint
    grace: float = 10.0
    policy_file: Path | None = None
    policy_server: str = ""  # host:port (mutual TLS) or unix:PATH of the controller's policy stream
    policy_auth: ClientAuth = field(default_factory=ClientAuth)
    socket: str = ""  # also listen on this Unix domain socket (Envoy on the same host); with port 0, only there
    # Usage and backend health to the controller, for the bindings' status (extproc.usage_report):
    # every report_interval seconds (0 = never), health from Envoy's admin at envoy_admin ("" = none).
    report_interval: float = 10.0
    envoy_admin: str = ""


class _Failing(Handler):
    """An attempt that cannot be served: refuses at its first message."""

    def __init__(self, exc: GatewayError) -> None:
        self.exc = exc

    async def request_headers(self, headers: Headers, end_of_stream: bool) -> Reply:
        raise self.exc


class Processor(ep_grpc.ExternalProcessorServicer):  # type: ignore[misc]
    def __init__(self, services: Services) -> None:
        self.services = services
        self._streams = services.metrics.streams

    def _on_error(self, _exc: BaseException) -> None:
        self.services.metrics.handler_errors.inc()

    def handler_for(self, context: grpc.aio.ServicerContext) -> tuple[str, Handler]:
        backend = traceparent = tracestate = ""
        usage_log = False
        for key, value in context.invocation_metadata() or ():
            if key == MCP_SERVER_METADATA:
                # The upstream filter of an MCP server's cluster: that server's credential.
                return "mcp-server", ServerCredential(self.services, value if isinstance(value, str) else value.decode())
            if key == MCP_LIST_METADATA:
                return "mcp-list", ToolListFilter(self.services)
            if key == BACKEND_METADATA:
                backend = value if isinstance(value, str) else value.decode()
            elif key == USAGE_LOG_METADATA:
                usage_log = True
            elif key == RESPONSE_STREAM_METADATA:
                return "response", ResponseStream(self.services)
            elif key == "traceparent":  # Envoy's span for this stream (tracing on)
                traceparent = value if isinstance(value, str) else value.decode()
            elif key == "tracestate":
                tracestate = value if isinstance(value, str) else value.decode()
        if not backend:
            return "downstream", Downstream(self.services, usage_log=usage_log, traceparent=traceparent, tracestate=tracestate)
        try:
            return "upstream", Attempt(self.services, backend)
        except GatewayError as exc:
            return "upstream", _Failing(exc)

    async def Process(
        self, request_iterator: AsyncIterator[ep.ProcessingRequest], context: grpc.aio.ServicerContext
    ) -> AsyncIterator[ep.ProcessingResponse]:
        role, handler = self.handler_for(context)
        gauge = self._streams.labels(role)
        gauge.inc()
        try:
            async for resp in phases.run(
                request_iterator,
                handler,
                self._on_error,
                self.services.capacity,
                count_stream=role == "downstream",
            ):
                yield resp
        finally:
            gauge.dec()


def load_policy_file(services: Services, path: Path) -> None:
    snap = pb.PolicySnapshot()
    snap.ParseFromString(path.read_bytes())
    if services.policy.offer(snap):
        services.metrics.policy_version.set(snap.version)
        services.authenticator()  # built now: remote JWKS fetched before the first token


async def _metrics_app(services: Services, port: int, host: str) -> web.AppRunner:
    async def metrics(_req: web.Request) -> web.Response:
        return web.Response(body=services.metrics.render(), content_type="text/plain", charset="utf-8")

    async def healthz(_req: web.Request) -> web.Response:
        return web.Response(text=f"ok policy={services.current.version}\n")

    app = web.Application()
    app.router.add_get("/metrics", metrics)
    app.router.add_get("/healthz", healthz)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    await web.TCPSite(runner, host, port).start()
    return runner


async def serve(settings: ServerSettings, services: Services, stop: asyncio.Event | None = None) -> None:
    """Serve until ``stop`` is set (or SIGTERM/SIGINT), then drain and return."""
    if settings.policy_file is not None:
        load_policy_file(services, settings.policy_file)
    # Before gRPC starts its threads: their malloc arenas are created with these settings.
    services.capacity.tune_malloc()
    server = grpc.aio.server(
        options=[
            ("grpc.max_concurrent_streams", 100_000),
            ("grpc.max_receive_message_length", 64 * 1024 * 1024),
            ("grpc.max_send_message_length", 64 * 1024 * 1024),
        ]
    )
    ep_grpc.add_ExternalProcessorServicer_to_server(Processor(services), server)
    als_pb2_grpc.add_AccessLogServiceServicer_to_server(UsageLog(services), server)
    health_servicer = health.aio.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    capacity = services.capacity
    services.metrics.watch_capacity(capacity)
    lag_watch = asyncio.create_task(capacity.watch_lag())
    runner = await _metrics_app(services, settings.metrics_port, settings.host) if settings.metrics_port else None
    stop = stop or asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        with contextlib.suppress(NotImplementedError, RuntimeError):
            loop.add_signal_handler(sig, stop.set)
    follower = reporter = None
    if settings.policy_server:
        from extproc.policy_client import follow

        follower = asyncio.create_task(follow(services, settings.policy_server, settings.policy_auth))
        if settings.report_interval > 0:
            from extproc.usage_report import report_forever

            reporter = asyncio.create_task(
                report_forever(services, settings.policy_server, settings.policy_auth, interval=settings.report_interval, envoy_admin=settings.envoy_admin)
            )
        # Bind nothing before a policy is in force: meanwhile Envoy cannot connect and fails closed
        # with a 503, where an empty policy would tell a good key it is unknown (401).
        while services.current.version == 0 and not stop.is_set():
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), 0.02)
    # A policy naming MCP context sources started importing the SDK in a thread: serve once it has.
    await services.context_sources.sdk_ready(only_if_started=True)
    bound = 0
    if settings.port or not settings.socket:
        bound = server.add_insecure_port(f"{settings.host}:{settings.port}")
        if not bound:
            raise OSError(f"cannot listen on {settings.host}:{settings.port}")
    if settings.socket:
        Path(settings.socket).unlink(missing_ok=True)
        server.add_insecure_port(f"unix:{settings.socket}")
    await server.start()
    if settings.socket:
        private_socket(settings.socket)
    await health_servicer.set("", health_pb2.HealthCheckResponse.SERVING)
    log.info(
        "extproc listening on %s (policy version %d)%s",
        " and ".join(([f"{settings.host}:{bound}"] if bound else []) + ([f"unix:{settings.socket}"] if settings.socket else [])),
        services.current.version,
        f", metrics on :{settings.metrics_port}/metrics" if runner else "",
    )
    if settings.policy_file is not None:
        with contextlib.suppress(NotImplementedError, RuntimeError):
            loop.add_signal_handler(signal.SIGHUP, load_policy_file, services, settings.policy_file)
    await stop.wait()
    for task in (follower, reporter):
        if task is not None:
            task.cancel()
    log.info("extproc draining open streams (up to %.0fs)", settings.grace)
    await health_servicer.enter_graceful_shutdown()
    await server.stop(settings.grace)
    lag_watch.cancel()
    await services.context_sources.close()
    await services.cache.aclose()  # the semantic cache's embeddings client
    await services.mcp_sessions.aclose()  # the client that ends MCP sessions on their servers
    if runner is not None:
        await runner.cleanup()
    log.info("extproc stopped")
