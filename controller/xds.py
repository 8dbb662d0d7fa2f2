"""The ADS server Envoy's bootstrap points at (state-of-the-world, xDS v3).

It serves clusters (CDS), listeners (LDS), route tables (RDS), the provider credentials the
clusters inject (SDS: ``Secret`` resources, only over this authenticated stream, never in a
config file) and the native path's filter config (ECDS, ``controller.native_path``). On every change it sends secrets first, then clusters, then listeners, so a
cluster never waits for a secret and a route never names a cluster Envoy does not have yet. Each response has a version and a nonce; a request echoing the nonce is an
ACK, or a NACK when it carries ``error_detail``. A NACKed version is reported (log, metric, and
``last_nack``) and not resent; Envoy keeps serving the last version it accepted. A stream from a
peer that has not proved who it is (``crdgol.control_plane``) is refused before anything is sent.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import grpc
from envoy.config.cluster.v3 import cluster_pb2
from envoy.config.core.v3 import extension_pb2
from envoy.config.listener.v3 import listener_pb2
from envoy.config.route.v3 import route_components_pb2, route_pb2
from envoy.extensions.access_loggers.filters.cel.v3 import cel_pb2  # noqa: F401 (registers the Any type)
from envoy.extensions.access_loggers.grpc.v3 import als_pb2  # noqa: F401 (the usage access log)
from envoy.extensions.common.matching.v3 import extension_matcher_pb2  # noqa: F401 (the response filter)
from envoy.extensions.filters.common.matcher.action.v3 import skip_action_pb2  # noqa: F401
from envoy.extensions.filters.http.buffer.v3 import buffer_pb2  # noqa: F401
from envoy.extensions.filters.http.credential_injector.v3 import credential_injector_pb2  # noqa: F401
from envoy.extensions.filters.http.ext_proc.v3 import ext_proc_pb2  # noqa: F401
from envoy.extensions.filters.http.header_mutation.v3 import header_mutation_pb2  # noqa: F401
from envoy.extensions.filters.http.json_to_metadata.v3 import json_to_metadata_pb2  # noqa: F401
from envoy.extensions.filters.http.lua.v3 import lua_pb2  # noqa: F401 (the native path)
from envoy.extensions.filters.http.router.v3 import router_pb2  # noqa: F401
from envoy.extensions.filters.http.upstream_codec.v3 import upstream_codec_pb2  # noqa: F401
from envoy.extensions.filters.network.http_connection_manager.v3 import http_connection_manager_pb2
from envoy.extensions.http.injected_credentials.generic.v3 import generic_pb2  # noqa: F401
from envoy.extensions.transport_sockets.tls.v3 import (
    secret_pb2,
    tls_pb2,  # noqa: F401
)
from envoy.extensions.upstreams.http.v3 import http_protocol_options_pb2  # noqa: F401
from envoy.service.discovery.v3 import ads_pb2_grpc, discovery_pb2
from envoy.type.matcher.v3 import http_inputs_pb2  # noqa: F401
from google.protobuf import any_pb2, json_format
from xds.type.v3 import typed_struct_pb2  # noqa: F401 (sse_to_metadata, missing from xds-protos, goes as a TypedStruct)

from crdgol.control_plane import ServerAuth, authorizer
from crdgol.pb import envoy_priority_group_pb2  # noqa: F401 (priority_group, missing from xds-protos)

log = logging.getLogger(__name__)

CDS = "type.googleapis.com/envoy.config.cluster.v3.Cluster"
LDS = "type.googleapis.com/envoy.config.listener.v3.Listener"
RDS = "type.googleapis.com/envoy.config.route.v3.RouteConfiguration"
SDS = "type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.Secret"
# HTTP filter configs of their own (ECDS): the native path's program and tables (controller.native_path).
ECDS = "type.googleapis.com/envoy.config.core.v3.TypedExtensionConfig"
ORDER = (SDS, CDS, LDS, RDS, ECDS)


# RetryPolicy.refresh_cluster_on_retry (Envoy 1.39+) is newer than the pinned xds-protos, so it is
# written as a raw field: number 14, varint true. Checked against Envoy 1.40's own /config_dump.
_REFRESH_CLUSTER_ON_RETRY = bytes([14 << 3, 1])


def to_any(resource: dict[str, Any], message: type[Any]) -> any_pb2.Any:
    """A rendered resource (Python data) as the protobuf Any Envoy receives."""
    msg = json_format.ParseDict(resource, message())
    packed = any_pb2.Any()
    packed.Pack(msg)
    return packed


def _route_pb(route: dict[str, Any]) -> route_components_pb2.Route:
    action = route.get("route")
    policy = action.get("retry_policy") if action else None
    refresh = bool(policy and policy.get("refresh_cluster_on_retry"))
    if refresh:
        assert action is not None and policy is not None
        trimmed = {k: v for k, v in policy.items() if k != "refresh_cluster_on_retry"}
        route = {**route, "route": {**action, "retry_policy": trimmed}}
    msg = json_format.ParseDict(route, route_components_pb2.Route())
    if refresh:
        msg.route.retry_policy.MergeFromString(_REFRESH_CLUSTER_ON_RETRY)
    return msg


class Encoder:
    """Rendered resources -> protobuf, reusing every cluster and route that did not change.

    Parsing Python data into protobuf is the slow part of publishing (about 0.5 ms per cluster);
    a change to one binding re-encodes only that binding's clusters and route.
    """

    def __init__(self) -> None:
        self._clusters: dict[str, tuple[dict[str, Any], any_pb2.Any]] = {}
        self._routes: dict[str, tuple[dict[str, Any], route_components_pb2.Route]] = {}

    def cluster(self, cluster: dict[str, Any], cache: dict[str, tuple[dict[str, Any], any_pb2.Any]]) -> any_pb2.Any:
        name = str(cluster["name"])
        hit = self._clusters.get(name)
        packed = hit[1] if hit is not None and hit[0] == cluster else to_any(cluster, cluster_pb2.Cluster)
        cache[name] = (cluster, packed)
        return packed

    def route(self, route: dict[str, Any], cache: dict[str, tuple[dict[str, Any], route_components_pb2.Route]]) -> route_components_pb2.Route:
        name = str(route.get("name", ""))
        hit = self._routes.get(name) if name else None
        msg = hit[1] if hit is not None and hit[0] == route else _route_pb(route)
        if name:
            cache[name] = (route, msg)
        return msg

    def listener(self, listener: dict[str, Any], routes_cache: dict[str, tuple[dict[str, Any], route_components_pb2.Route]]) -> any_pb2.Any:
        # Parse the listener without its routes, then put the (cached) route messages in.
        held: dict[tuple[int, int], list[list[dict[str, Any]]]] = {}
        chains = []
        for ci, chain in enumerate(listener.get("filter_chains", [])):
            filters = []
            for fi, f in enumerate(chain.get("filters", [])):
                rc = f.get("typed_config", {}).get("route_config")
                if rc is not None:
                    held[(ci, fi)] = [vh.get("routes", []) for vh in rc.get("virtual_hosts", [])]
                    vhs = [{k: v for k, v in vh.items() if k != "routes"} for vh in rc.get("virtual_hosts", [])]
                    f = {**f, "typed_config": {**f["typed_config"], "route_config": {**rc, "virtual_hosts": vhs}}}
                filters.append(f)
            chains.append({**chain, "filters": filters})
        msg = json_format.ParseDict({**listener, "filter_chains": chains}, listener_pb2.Listener())
        for (ci, fi), per_vh in held.items():
            typed = msg.filter_chains[ci].filters[fi].typed_config
            hcm = http_connection_manager_pb2.HttpConnectionManager()
            typed.Unpack(hcm)
            for vi, routes in enumerate(per_vh):
                hcm.route_config.virtual_hosts[vi].routes.extend(self.route(r, routes_cache) for r in routes)
            typed.Pack(hcm)
        packed = any_pb2.Any()
        packed.Pack(msg)
        return packed

    def route_config(self, rc: dict[str, Any], routes_cache: dict[str, tuple[dict[str, Any], route_components_pb2.Route]]) -> any_pb2.Any:
        vhs = rc.get("virtual_hosts", [])
        bare = {**rc, "virtual_hosts": [{k: v for k, v in vh.items() if k != "routes"} for vh in vhs]}
        msg = json_format.ParseDict(bare, route_pb2.RouteConfiguration())
        for vi, vh in enumerate(vhs):
            msg.virtual_hosts[vi].routes.extend(self.route(r, routes_cache) for r in vh.get("routes", []))
        packed = any_pb2.Any()
        packed.Pack(msg)
        return packed

    def snapshot(
        self,
        version: int,
        listeners: Sequence[dict[str, Any]],
        clusters: Sequence[dict[str, Any]],
        route_configs: Sequence[dict[str, Any]] = (),
        secrets: Sequence[dict[str, Any]] = (),
        extensions: Sequence[dict[str, Any]] = (),
    ) -> XdsSnapshot:
        cluster_cache: dict[str, tuple[dict[str, Any], any_pb2.Any]] = {}
        route_cache: dict[str, tuple[dict[str, Any], route_components_pb2.Route]] = {}
        snap = XdsSnapshot(
            version=version,
            resources={
                CDS: tuple(self.cluster(c, cluster_cache) for c in clusters),
                LDS: tuple(self.listener(listener, route_cache) for listener in listeners),
                RDS: tuple(self.route_config(rc, route_cache) for rc in route_configs),
                SDS: tuple(to_any({k: v for k, v in secret.items() if k != "@type"}, secret_pb2.Secret) for secret in secrets),
                ECDS: tuple(to_any(e, extension_pb2.TypedExtensionConfig) for e in extensions),
            },
        )
        # Keep only what this snapshot uses, so the caches never outgrow the config.
        self._clusters, self._routes = cluster_cache, route_cache
        return snap


@dataclass(frozen=True, slots=True)
class XdsSnapshot:
    version: int
    resources: dict[str, tuple[any_pb2.Any, ...]]


def build_snapshot(version: int, listeners: Sequence[dict[str, Any]], clusters: Sequence[dict[str, Any]]) -> XdsSnapshot:
    """Encode one snapshot from scratch (see ``Encoder`` to reuse unchanged resources)."""
    return Encoder().snapshot(version, listeners, clusters)


@dataclass
class NodeState:
    acked: dict[str, int] = field(default_factory=dict)
    last_nack: str = ""
    nacked: dict[str, int] = field(default_factory=dict)  # type -> the last version it refused


class XdsServer(ads_pb2_grpc.AggregatedDiscoveryServiceServicer):  # type: ignore[misc]
    def __init__(self, authorize: Callable[[grpc.aio.ServicerContext], str | None] | None = None) -> None:
        self.snapshot: XdsSnapshot | None = None
        self.nodes: dict[str, NodeState] = {}
        self.nacks = 0
        self.refused = 0
        self._authorize = authorize or authorizer(ServerAuth())
        self._changed = asyncio.Condition()
        self._nonces = itertools.count(1)
        self._acked = asyncio.Condition()

    async def set(self, snapshot: XdsSnapshot) -> None:
        if self.snapshot is not None and snapshot.version <= self.snapshot.version:
            return
        async with self._changed:
            self.snapshot = snapshot
            self._changed.notify_all()

    def _has_acked(self, node: NodeState, version: int) -> bool:
        # Clusters and listeners always; routes when the node subscribed to them (RDS).
        return all(node.acked.get(t, 0) >= version for t in (CDS, LDS)) and all(v >= version for v in node.acked.values())

    async def _wait_acked(self, done: Callable[[], bool], timeout: float) -> bool:
        async with self._acked:
            try:
                await asyncio.wait_for(self._acked.wait_for(done), timeout)
            except TimeoutError:
                return False
        return True

    async def wait_acked(self, version: int, timeout: float) -> bool:
        """Wait until some connected Envoy has ACKed ``version`` of every type (for tests/benchmarks)."""
        return await self._wait_acked(lambda: any(self._has_acked(n, version) for n in self.nodes.values()), timeout)

    async def wait_all_acked(self, version: int, timeout: float) -> bool:
        """Wait until every connected Envoy has ACKed ``version`` (or newer) of every type it
        asked for. True at once when no Envoy is connected (nothing can route yet); False on
        timeout, e.g. when an Envoy NACKed it."""
        return await self._wait_acked(lambda: all(self._has_acked(n, version) for n in self.nodes.values()), timeout)

    def nacked(self, type_url: str, version: int) -> bool:
        """Whether a connected Envoy refused ``version`` (or a newer one) of ``type_url``: it
        keeps serving the last one it took."""
        return any(n.nacked.get(type_url, 0) >= version for n in self.nodes.values())

    async def _next(self, after: int) -> XdsSnapshot:
        """Wait for a snapshot newer than ``after``."""
        async with self._changed:
            await self._changed.wait_for(lambda: self.snapshot is not None and self.snapshot.version > after)
            assert self.snapshot is not None
            return self.snapshot

    def _response(self, type_url: str, snap: XdsSnapshot, sent: dict[str, tuple[int, str]]) -> discovery_pb2.DiscoveryResponse:
        nonce = str(next(self._nonces))
        sent[type_url] = (snap.version, nonce)
        return discovery_pb2.DiscoveryResponse(
            version_info=str(snap.version), resources=list(snap.resources[type_url]), type_url=type_url, nonce=nonce
        )

    async def StreamAggregatedResources(
        self, request_iterator: AsyncIterator[discovery_pb2.DiscoveryRequest], context: grpc.aio.ServicerContext
    ) -> AsyncIterator[discovery_pb2.DiscoveryResponse]:
        denied = self._authorize(context)
        if denied is not None:
            self.refused += 1
            log.warning("xDS client %s refused: %s", context.peer(), denied)
            await context.abort(grpc.StatusCode.PERMISSION_DENIED, "not an authorized control-plane client")
        out: asyncio.Queue[discovery_pb2.DiscoveryResponse | None] = asyncio.Queue()
        sent: dict[str, tuple[int, str]] = {}  # type -> (version, nonce) last sent
        wanted: set[str] = set()
        asked: dict[str, tuple[str, ...]] = {}
        node = NodeState()
        node_id = ""

        async def read() -> None:
            nonlocal node_id
            try:
                async for req in request_iterator:
                    if req.node.id and not node_id:
                        node_id = req.node.id
                        self.nodes[node_id] = node
                    t = req.type_url
                    if t not in ORDER:
                        continue
                    wanted.add(t)
                    last = sent.get(t)
                    # Secrets are asked for by name, one more with each cluster that injects one: a
                    # request naming a new one is answered at once, even when it also ACKs.
                    names = tuple(sorted(req.resource_names))
                    more = t == SDS and names != asked.get(t, names)
                    asked[t] = names
                    if last is not None and req.response_nonce == last[1]:
                        if req.HasField("error_detail") and req.error_detail.code != 0:
                            self.nacks += 1
                            node.last_nack = req.error_detail.message
                            node.nacked[t] = last[0]
                            # Envoy quotes the whole resource; the first and last lines say what is wrong.
                            lines = req.error_detail.message.strip().splitlines()
                            brief = lines[0] if len(lines) < 3 else f"{lines[0]} ... {lines[-1]}"
                            log.error("Envoy %s rejected %s version %d (keeping the last good one): %s", node_id, t.rsplit(".", 1)[-1], last[0], brief)
                        else:
                            node.acked[t] = last[0]
                            async with self._acked:
                                self._acked.notify_all()
                        if not more:
                            continue
                    # A first request, or one from a reconnected Envoy: send what we have.
                    snap = self.snapshot
                    if snap is not None and (more or last is None or last[0] < snap.version or req.version_info != str(snap.version)):
                        await out.put(self._response(t, snap, sent))
            finally:
                await out.put(None)

        async def watch() -> None:
            seen = self.snapshot.version if self.snapshot else 0
            while True:
                snap = await self._next(seen)
                seen = snap.version
                for t in ORDER:  # secrets, then clusters, then listeners
                    if t in wanted:
                        await out.put(self._response(t, snap, sent))

        reader = asyncio.create_task(read())
        watcher = asyncio.create_task(watch())
        try:
            while (resp := await out.get()) is not None:
                yield resp
        finally:
            reader.cancel()
            watcher.cancel()
            if node_id and self.nodes.get(node_id) is node:
                del self.nodes[node_id]
