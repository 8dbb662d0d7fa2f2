"""The floor under a cache hit: Envoy asking a do-nothing Python ext_proc once, answered from memory.

A cache hit is one ext_proc message answered with an immediate response (``extproc.cache``). Its
throughput cannot exceed what Envoy and a Python gRPC server reach when the server does nothing
else: ``FloorEnvoy`` is bare Envoy's listener (``scenarios.bare_envoy_config``) with the pieces the
gateway's one-message path puts in front of the router (the ext_proc filter, body alone with the
request headers as attributes, and the buffer filter that holds the request until it is answered)
pointed at a grpc.aio + uvloop server (as extproc runs) that answers every body with the same
stored answer: no auth, no key, no lookup. ``benchmarks.cache`` runs it beside the real hit, so
the report shows how far the hit is from the floor and how far the floor is from the target.
"""

from __future__ import annotations

import sys
import textwrap
import time
from pathlib import Path
from typing import Any

from benchmarks import harness as hz
from controller.envoy_config import grpc_cluster
from controller.envoy_json import typed
from controller.one_message import BODY_ONLY
from crdgol.request_path import attributes

# The stored answer as the immediate response of every body; a headers message (none is expected:
# they are skipped) is let through.
SERVER = textwrap.dedent(
    """
    import sys, grpc, uvloop
    from envoy.config.core.v3 import base_pb2
    from envoy.service.ext_proc.v3 import external_processor_pb2 as ep
    from envoy.service.ext_proc.v3 import external_processor_pb2_grpc as ep_grpc
    from envoy.type.v3 import http_status_pb2

    answer = open(sys.argv[2], "rb").read()
    HIT = ep.ProcessingResponse(immediate_response=ep.ImmediateResponse(
        status=http_status_pb2.HttpStatus(code=200),
        headers=ep.HeaderMutation(set_headers=[base_pb2.HeaderValueOption(
            header=base_pb2.HeaderValue(key="content-type", raw_value=b"application/json"))]),
        body=answer,
    ))
    PASS = ep.ProcessingResponse(request_headers=ep.HeadersResponse())

    class Floor(ep_grpc.ExternalProcessorServicer):
        async def Process(self, requests, context):
            async for req in requests:
                yield HIT if req.HasField("request_body") else PASS

    async def main():
        server = grpc.aio.server()
        ep_grpc.add_ExternalProcessorServicer_to_server(Floor(), server)
        server.add_insecure_port("unix:" + sys.argv[1])
        await server.start()
        await server.wait_for_termination()

    uvloop.run(main())
    """
)
CLUSTER = "floor-extproc"


class FloorEnvoy(hz.BareEnvoy):
    """Bare Envoy plus a one-message ext_proc whose server answers every request with ``answer``."""

    def __init__(self, concurrency: int, answer: bytes) -> None:
        super().__init__(concurrency)
        self.answer = answer

    def envoy_config(self, port: int, admin: int, mock_port: int) -> dict[str, Any]:
        socket = str(self.state / "floor.sock")
        answer = self.state / "answer.json"
        answer.write_bytes(self.answer)
        proc = hz.spawn([sys.executable, "-c", SERVER, socket, str(answer)], self.state / "floor.log")
        self.procs["extproc"] = proc
        deadline = time.monotonic() + 30
        while not Path(socket).exists():  # grpc creates it once it listens
            if proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"the floor ext_proc server did not start: {(self.state / 'floor.log').read_text()[-2000:]}")
            time.sleep(0.05)
        config = super().envoy_config(port, admin, mock_port)
        hcm = config["static_resources"]["listeners"][0]["filter_chains"][0]["filters"][0]["typed_config"]
        ext_proc = {
            "name": "envoy.filters.http.ext_proc",
            "typed_config": typed(
                "envoy.extensions.filters.http.ext_proc.v3.ExternalProcessor",
                grpc_service={"envoy_grpc": {"cluster_name": CLUSTER}, "timeout": "2s"},
                processing_mode=BODY_ONLY["overrides"]["processing_mode"],
                request_attributes=attributes(),
                message_timeout="2s",
            ),
        }
        buffer = {
            "name": "envoy.filters.http.buffer",
            "typed_config": typed("envoy.extensions.filters.http.buffer.v3.Buffer", max_request_bytes=1 << 20),
        }
        hcm["http_filters"] = [ext_proc, buffer, *hcm["http_filters"]]
        config["static_resources"]["clusters"].append(grpc_cluster(CLUSTER, [{"pipe": {"path": socket}}]))
        return config


def stored_answer(mock_url: str, body: Path, path: str, headers: dict[str, str]) -> bytes:
    """The mock's answer to ``body``: what a hit on it returns."""
    import httpx

    r = httpx.post(mock_url + path, content=body.read_bytes(), headers=headers, timeout=30)
    r.raise_for_status()
    return r.content
