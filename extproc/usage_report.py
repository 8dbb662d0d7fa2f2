"""extproc's report to the controller: what it counted per binding and backend, and what its Envoy
says about each backend's health, for the bindings' status on a cluster.

Nothing on the request path: the counts are read from extproc's own Prometheus registry (the
series ``/metrics`` serves: requests from ``gen_ai_server_request_duration``, tokens from
``crdgol_tokens``, money from ``crdgol_spend``), so the report and the metrics cannot disagree.
They are cumulative since the process started; the controller turns them into usage over its
window (``controller.binding_usage``). Health comes from Envoy's admin ``/clusters`` on the pod's
loopback (``--envoy-admin``), which only a process beside Envoy can reach.

The report goes every ``interval`` seconds over the control plane extproc already trusts (the
policy stream's channel: Unix socket or mutual TLS). A failed report is logged (at most once a
minute) and simply sent again, whole, at the next tick, on a new channel.
"""

from __future__ import annotations

import asyncio
import logging
import os
import socket
import time
from collections import defaultdict
from collections.abc import Iterable

import aiohttp
import grpc
from prometheus_client import CollectorRegistry

from crdgol.control_plane import ClientAuth
from crdgol.envoy_health import backend_health
from crdgol.pb import policy_pb2 as pb
from crdgol.pb import policy_pb2_grpc as pb_grpc
from extproc.policy_client import channel
from extproc.services import Services

log = logging.getLogger(__name__)

__all__ = ["build_report", "envoy_health", "report_forever", "usage_from"]


def usage_from(registry: CollectorRegistry) -> list[pb.BackendUsage]:
    """Cumulative usage per (binding, backend) from extproc's metrics; requests without a binding
    (refused before one was chosen) are not any binding's."""
    rows: dict[tuple[str, str], pb.BackendUsage] = defaultdict(pb.BackendUsage)
    for family in registry.collect():
        for sample in family.samples:
            labels = sample.labels
            binding = labels.get("binding", "")
            if not binding:
                continue
            row = rows[binding, labels.get("backend", "")]
            match sample.name:
                case "gen_ai_server_request_duration_seconds_count":
                    n = int(sample.value)
                    row.requests += n
                    status = labels.get("http_response_status_code", "0")
                    if not status.isdigit() or int(status) >= 500 or int(status) < 200:
                        row.failed += n
                case "crdgol_tokens_total":
                    if labels.get("type") == "input":
                        row.input_tokens += int(sample.value)
                    elif labels.get("type") == "output":
                        row.output_tokens += int(sample.value)
                case "crdgol_spend_total":
                    row.spend += sample.value
    out = []
    for (binding, backend), row in sorted(rows.items()):
        row.binding, row.backend = binding, backend
        out.append(row)
    return out


async def envoy_health(admin_url: str, timeout: float = 2.0) -> list[pb.ClusterHealth]:
    """Envoy's verdict per cluster from its admin API; [] when it cannot be read."""
    try:
        async with (
            aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=timeout)) as session,
            session.get(f"{admin_url.rstrip('/')}/clusters?format=json") as rsp,
        ):
            doc = await rsp.json(content_type=None)
    except (aiohttp.ClientError, TimeoutError, ValueError):
        return []
    if not isinstance(doc, dict):
        return []
    return [pb.ClusterHealth(cluster=name, healthy=v.healthy, reason=v.reason) for name, v in sorted(backend_health(doc).items())]


def build_report(reporter: str, started_at: float, usage: Iterable[pb.BackendUsage], health: Iterable[pb.ClusterHealth]) -> pb.UsageReport:
    return pb.UsageReport(reporter=reporter, started_at=started_at, usage=list(usage), health=list(health))


async def report_forever(
    services: Services,
    target: str,
    auth: ClientAuth,
    *,
    interval: float = 10.0,
    envoy_admin: str = "",
    started_at: float | None = None,
) -> None:
    """Report every ``interval`` seconds until cancelled."""
    started = time.time() if started_at is None else started_at
    reporter = f"{socket.gethostname()}:{os.getpid()}:{int(started)}"
    warned_at = float("-inf")
    # One channel for every report (gRPC reconnects it by itself); a new one after a failure, so
    # credentials rotated on disk are read again.
    ch: grpc.aio.Channel | None = None
    try:
        while True:
            await asyncio.sleep(interval)
            health = await envoy_health(envoy_admin) if envoy_admin else []
            report = build_report(reporter, started, usage_from(services.metrics.registry), health)
            try:
                ch = ch or channel(target, auth)
                stub = pb_grpc.PolicyServiceStub(ch)  # type: ignore[no-untyped-call]
                await stub.Report(report, timeout=5)
            except (grpc.aio.AioRpcError, OSError) as exc:
                if ch is not None:
                    await ch.close()
                    ch = None
                now = time.monotonic()
                if now - warned_at >= 60:
                    warned_at = now
                    what = exc.code().name if isinstance(exc, grpc.aio.AioRpcError) else type(exc).__name__
                    log.warning("usage report to %s failed (%s); sending it again in %.0fs", target, what, interval)
    finally:
        if ch is not None:
            await ch.close()
