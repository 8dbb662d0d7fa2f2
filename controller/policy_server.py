"""The policy stream: every extproc replica subscribes and receives each new snapshot.

A subscriber says which version it holds; it gets the current snapshot at once if that is newer,
then every later one. Snapshots carry secrets, so this service listens on loopback or inside the
pod network only (see deploy/).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator

import grpc

from crdgol.pb import policy_pb2 as pb
from crdgol.pb import policy_pb2_grpc as pb_grpc

log = logging.getLogger(__name__)


class PolicyServer(pb_grpc.PolicyServiceServicer):
    def __init__(self) -> None:
        self.snapshot: pb.PolicySnapshot | None = None
        self.subscribers = 0
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
