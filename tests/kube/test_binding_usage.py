"""A binding's status on a cluster carries its usage and its backends' health, from what the
extproc replicas report over the control plane (real gRPC to the controller's policy port)."""

from __future__ import annotations

import asyncio
import time
from typing import Any

from crdgol.control_plane import ClientAuth
from crdgol.pb import policy_pb2 as pb
from crdgol.pb import policy_pb2_grpc as pb_grpc
from extproc.metrics import Metrics, RequestLabels
from extproc.policy_client import channel
from extproc.usage_report import build_report, usage_from
from tests.kube.conftest import BINDINGS, Cluster
from tests.kube.test_operator import binding, secret


class Replica:
    """One extproc replica's counters (its real metrics registry) and its reports."""

    def __init__(self, name: str, started_at: float) -> None:
        self.metrics = Metrics()
        self.name, self.started_at = name, started_at

    def serve(self, backend: str, *, n: int, status: int = 200, tokens: tuple[int, int] = (10, 5), cost: float = 0.0) -> None:
        labels = RequestLabels("default/team-a", "default/chat", backend, "chat", "chat", "gpt-4o")
        for _ in range(n):
            self.metrics.record_usage(labels, *tokens)
            self.metrics.record_duration(labels, status, 0.05)
            if cost:
                self.metrics.spend.labels(labels.tenant, labels.binding, backend).inc(cost)

    async def report(self, cluster: Cluster, health: list[pb.ClusterHealth] | None = None) -> None:
        report = build_report(self.name, self.started_at, usage_from(self.metrics.registry), health or [])
        async with channel(f"127.0.0.1:{cluster.controller.settings.policy_port}", ClientAuth()) as ch:
            await pb_grpc.PolicyServiceStub(ch).Report(report, timeout=5)  # type: ignore[no-untyped-call]


async def served(cluster: Cluster) -> tuple[str, str]:
    await cluster.create(secret("provider", {"apiKey": "sk-upstream-1"}))
    await cluster.create(binding("chat"))
    await cluster.wait_condition("chat", "Ready", "True", "Served")
    result = cluster.controller.state.result
    assert result is not None
    (b,) = [b for b in result.snapshot.bindings if b.key == "default/chat"]
    return b.backends[0].id, b.backends[0].cluster


async def status(cluster: Cluster) -> dict[str, Any]:
    obj = await cluster.get(BINDINGS, "default", "chat")
    return dict(obj.get("status") or {})


async def test_the_status_sums_what_every_replica_served_and_says_what_it_cost(cluster: Cluster) -> None:
    backend, _ = await served(cluster)
    one, two = Replica("gw-1:1:0", time.time() - 60), Replica("gw-2:1:0", time.time() - 60)
    one.serve(backend, n=3, cost=0.0015)
    two.serve(backend, n=2, status=503, tokens=(7, 0))
    await one.report(cluster)
    await two.report(cluster)

    async def usage() -> dict[str, Any] | None:
        u = (await status(cluster)).get("usage")
        return u if u and u["requests"] == 5 else None

    u = await cluster.eventually(usage, 5, "status.usage with 5 requests")
    assert (u["failedRequests"], u["inputTokens"], u["outputTokens"], u["windowSeconds"]) == (2, 3 * 10 + 2 * 7, 3 * 5, 3600)
    assert u["spend"] == "0.004500"
    # The conditions the controller writes are still there beside it.
    assert (await cluster.condition("chat", "Ready"))["status"] == "True"

    # More traffic on one replica: the figures follow at the next timer tick.
    one.serve(backend, n=1, cost=0.0015)
    await one.report(cluster)
    await cluster.eventually(lambda: _with(status(cluster), lambda s: (s.get("usage") or {}).get("requests") == 6), 5, "6 requests")


async def _with(doc: Any, ok: Any) -> Any:
    value = await doc
    return value if ok(value) else None


async def test_unchanged_figures_are_not_written_again(cluster: Cluster) -> None:
    backend, _ = await served(cluster)
    replica = Replica("gw-1:1:0", time.time())
    replica.serve(backend, n=1)
    await replica.report(cluster)
    await cluster.eventually(lambda: _with(status(cluster), lambda s: "usage" in s), 5, "usage")
    await asyncio.sleep(0.5)
    version = (await cluster.get(BINDINGS, "default", "chat"))["metadata"]["resourceVersion"]
    await replica.report(cluster)  # the same counts again
    await asyncio.sleep(1.0)  # three refresh intervals
    assert (await cluster.get(BINDINGS, "default", "chat"))["metadata"]["resourceVersion"] == version


async def test_a_backend_one_replicas_envoy_ejected_is_unhealthy_in_status(cluster: Cluster) -> None:
    backend, envoy_cluster = await served(cluster)
    replica = Replica("gw-1:1:0", time.time())
    replica.serve(backend, n=1)
    await replica.report(cluster, [pb.ClusterHealth(cluster=envoy_cluster, healthy=False, reason="ejected")])
    healthy = await cluster.wait_condition("chat", "BackendsHealthy", "False", timeout=10)
    assert "primary" in healthy["message"]
    assert (await status(cluster))["backendHealth"] == {"primary": "ejected"}
    await replica.report(cluster, [pb.ClusterHealth(cluster=envoy_cluster, healthy=True)])
    await cluster.wait_condition("chat", "BackendsHealthy", "True", timeout=10)
    assert (await status(cluster))["backendHealth"] == {"primary": "healthy"}

