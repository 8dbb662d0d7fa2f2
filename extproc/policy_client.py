"""extproc's subscription to the controller's policy stream.

Keeps the last good snapshot while the controller is away and reconnects with capped
exponential backoff (0.1 s doubling to 5 s, with jitter), telling the controller which version it
holds so nothing is resent needlessly.
"""

from __future__ import annotations

import asyncio
import logging
import random
import socket

import grpc

from crdgol.pb import policy_pb2 as pb
from crdgol.pb import policy_pb2_grpc as pb_grpc
from extproc.services import Services

log = logging.getLogger(__name__)


async def follow(services: Services, target: str, *, initial_backoff: float = 0.1, max_backoff: float = 5.0) -> None:
    """Run until cancelled: subscribe, install every snapshot, reconnect on failure."""
    backoff = initial_backoff
    name = f"{socket.gethostname()}:{id(services):x}"
    while True:
        try:
            async with grpc.aio.insecure_channel(target) as channel:
                stub = pb_grpc.PolicyServiceStub(channel)  # type: ignore[no-untyped-call]
                call = stub.Subscribe(pb.SubscribeRequest(have_version=services.current.version, subscriber=name))
                async for snap in call:
                    backoff = initial_backoff
                    if services.policy.offer(snap):
                        services.metrics.policy_version.set(snap.version)
        except asyncio.CancelledError:
            raise
        except grpc.aio.AioRpcError as exc:
            log.warning(
                "policy stream from %s lost (%s); keeping version %d, retrying in %.1fs",
                target,
                exc.code().name,
                services.current.version,
                backoff,
            )
        await asyncio.sleep(backoff * (0.5 + random.random() / 2))
        backoff = min(max_backoff, backoff * 2)
