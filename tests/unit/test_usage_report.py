"""extproc's usage report reaches the controller every interval over one long-lived connection,
and comes back by itself after the controller was away."""

from __future__ import annotations

import asyncio
import contextlib

import grpc

from crdgol.control_plane import ClientAuth
from crdgol.pb import policy_pb2 as pb
from crdgol.pb import policy_pb2_grpc as pb_grpc
from crdgol.stack import free_port
from extproc.services import Services
from extproc.usage_report import report_forever


class Recorder(pb_grpc.PolicyServiceServicer):
    def __init__(self) -> None:
        self.peers: list[str] = []

    async def Report(self, request: pb.UsageReport, context: grpc.aio.ServicerContext) -> pb.ReportAck:
        self.peers.append(context.peer())
        return pb.ReportAck()


async def controller(port: int, recorder: Recorder) -> grpc.aio.Server:
    server = grpc.aio.server()
    pb_grpc.add_PolicyServiceServicer_to_server(recorder, server)
    server.add_insecure_port(f"127.0.0.1:{port}")
    await server.start()
    return server


async def reports(recorder: Recorder, at_least: int, within: float = 10.0) -> None:
    async with asyncio.timeout(within):
        while len(recorder.peers) < at_least:
            await asyncio.sleep(0.01)


async def test_reports_share_one_connection_and_resume_after_the_controller_returns() -> None:
    port = free_port()
    first, second = Recorder(), Recorder()
    server = await controller(port, first)
    task = asyncio.create_task(report_forever(Services(), f"127.0.0.1:{port}", ClientAuth(), interval=0.05))
    try:
        await reports(first, 5)
        assert len(set(first.peers)) == 1  # one client port: one connection for every report
        await server.stop(None)
        await asyncio.sleep(0.3)  # reports fail meanwhile, and are logged, not raised
        assert not task.done()
        server = await controller(port, second)
        await reports(second, 3)
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
        await server.stop(None)
