"""The policy stream: every extproc replica subscribes and receives each new snapshot.

Replicas also report their usage and their Envoy's backend health here (``Report``), for the
bindings' status. A subscriber says which version it holds; it gets the current snapshot at once if that is newer,
then every later one. Snapshots carry secrets (provider keys, HS256 secrets), so a subscriber that
has not proved who it is (``crdgol.control_plane``: a Unix socket's file permissions, or a client
certificate) is refused with PERMISSION_DENIED before anything is sent.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Callable

import grpc

from crdgol.control_plane import ServerAuth, authorizer
from crdgol.pb import policy_pb2 as pb
from crdgol.pb import policy_pb2_grpc as pb_grpc

log = logging.getLogger(__name__)


class PolicyServer(pb_grpc.PolicyServiceServicer):
    def __init__(
        self,
        authorize: Callable[[grpc.aio.ServicerContext], str | None] | None = None,
        on_report: Callable[[pb.UsageReport], None] = lambda _r: None,
    ) -> None:
        self.snapshot: pb.PolicySnapshot | None = None
        self._on_report = on_report
        self.subscribers = 0
        self.refused = 0
        self._authorize = authorize or authorizer(ServerAuth())
        self._changed = asyncio.Condition()

    async def set(self, snapshot: pb.PolicySnapshot) -> None:
        if self.snapshot is not None and snapshot.version <= self.snapshot.version:
            return
        async with self._changed:
            self.snapshot = snapshot
            self._changed.notify_all()

    async def _next(self, after: int) -> pb.PolicySnapshot:
        async with self._changed:
            await self._changed.wait_for(lambda: self.snapshot is not None and self.snapshot.version > after)
            assert self.snapshot is not None
            return self.snapshot

    async def Subscribe(
        self, request: pb.SubscribeRequest, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[pb.PolicySnapshot]:
        denied = self._authorize(context)
        if denied is not None:
            self.refused += 1
            log.warning("policy subscriber %s refused: %s", context.peer(), denied)
            await context.abort(grpc.StatusCode.PERMISSION_DENIED, "not an authorized control-plane client")
        have = request.have_version
        self.subscribers += 1
        log.info("extproc %s subscribed (has version %d)", request.subscriber or "?", have)
        try:
            while True:
                snap = await self._next(have)
                have = snap.version
                yield snap
        finally:
            self.subscribers -= 1

    async def Report(self, request: pb.UsageReport, context: grpc.aio.ServicerContext) -> pb.ReportAck:
        """An extproc replica's usage and health (``controller.binding_usage``), same proof as Subscribe."""
        denied = self._authorize(context)
        if denied is not None:
            self.refused += 1
            log.warning("usage report from %s refused: %s", context.peer(), denied)
            await context.abort(grpc.StatusCode.PERMISSION_DENIED, "not an authorized control-plane client")
        self._on_report(request)
        return pb.ReportAck()
