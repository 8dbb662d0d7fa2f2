"""extproc's subscription to the controller's policy stream.

Keeps the last good snapshot while the controller is away and reconnects with capped
exponential backoff (0.1 s doubling to 5 s, with jitter), telling the controller which version it
holds so nothing is resent needlessly. The snapshot carries provider keys, so it is only taken from
a controller that proved who it is: over a Unix socket (file permissions), or over mutual TLS (our
client certificate, the controller's checked against the control plane's CA). Certificates are
re-read at every reconnect, so a rotated Secret is picked up without a restart.
"""

from __future__ import annotations

import asyncio
import logging
import random
import socket

import grpc

from crdgol.control_plane import ClientAuth, channel_credentials, is_unix_target
from crdgol.pb import policy_pb2 as pb
from crdgol.pb import policy_pb2_grpc as pb_grpc
from extproc.services import Services

log = logging.getLogger(__name__)


def channel(target: str, auth: ClientAuth) -> grpc.aio.Channel:
    """A channel to the controller: plain on a Unix socket, mutual TLS over TCP when configured."""
    if is_unix_target(target) or auth.tls is None:
        return grpc.aio.insecure_channel(target)
    options = [("grpc.ssl_target_name_override", auth.server_name)] if auth.server_name else []
    return grpc.aio.secure_channel(target, channel_credentials(auth.tls), options=options)


async def follow(
    services: Services, target: str, auth: ClientAuth | None = None, *, initial_backoff: float = 0.1, max_backoff: float = 5.0
) -> None:
    """Run until cancelled: subscribe, install every snapshot, reconnect on failure."""
    backoff = initial_backoff
    name = f"{socket.gethostname()}:{id(services):x}"
    while True:
        try:
            async with channel(target, auth or ClientAuth()) as ch:
                stub = pb_grpc.PolicyServiceStub(ch)  # type: ignore[no-untyped-call]
                call = stub.Subscribe(pb.SubscribeRequest(have_version=services.current.version, subscriber=name))
                async for snap in call:
                    backoff = initial_backoff
                    if services.policy.offer(snap):
                        services.metrics.policy_version.set(snap.version)
                        services.authenticator()  # built now: remote JWKS fetched before the first token
        except asyncio.CancelledError:
            raise
        except OSError as exc:
            log.error("policy stream credentials unreadable (%s); keeping version %d", exc, services.current.version)
        except grpc.aio.AioRpcError as exc:
            if exc.code() == grpc.StatusCode.PERMISSION_DENIED:
                log.error("the controller at %s refused this extproc (%s): check its client certificate", target, exc.details())
            log.warning(
                "policy stream from %s lost (%s); keeping version %d, retrying in %.1fs",
                target,
                exc.code().name,
                services.current.version,
                backoff,
            )
        await asyncio.sleep(backoff * (0.5 + random.random() / 2))
        backoff = min(max_backoff, backoff * 2)
