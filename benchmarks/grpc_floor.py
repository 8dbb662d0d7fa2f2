"""The floor under any Python ext_proc: CPU per stream of a processor that does nothing.

Envoy opens one gRPC stream per HTTP request and exchanges one message per phase. This runs a
trivial ExternalProcessor (every message answered with a prebuilt pass-through response) on
grpc.aio (the server crdgol uses) and on the thread-pool grpc server, over TCP and a Unix socket,
drives it with ``--streams`` streams of ``--messages`` messages each (16 at a time), and reports
the server's CPU per stream. No crdgol code runs in the server, so this is the cost of the Python
gRPC stack itself: the ceiling it puts on requests per core, whatever the policy does.

    .venv/bin/python -m benchmarks.grpc_floor [--streams 4000] [--messages 4]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import subprocess
import sys
import tempfile
import time
from concurrent import futures
from pathlib import Path

import grpc
from envoy.config.core.v3 import base_pb2
from envoy.service.ext_proc.v3 import external_processor_pb2 as ep
from envoy.service.ext_proc.v3 import external_processor_pb2_grpc as epg

RESULTS = Path(__file__).resolve().parent / "results"
_RESP = ep.ProcessingResponse(request_headers=ep.HeadersResponse())


class _Aio(epg.ExternalProcessorServicer):  # type: ignore[misc]
    async def Process(self, it, ctx):  # type: ignore[no-untyped-def]
        async for _req in it:
            yield _RESP


class _Sync(epg.ExternalProcessorServicer):  # type: ignore[misc]
    def Process(self, it, ctx):  # type: ignore[no-untyped-def]
        for _req in it:
            yield _RESP


def _serve(kind: str, addr: str) -> None:
    if kind == "aio":

        async def main() -> None:
            s = grpc.aio.server()
            epg.add_ExternalProcessorServicer_to_server(_Aio(), s)
            s.add_insecure_port(addr)
            await s.start()
            await s.wait_for_termination()

        import uvloop

        uvloop.run(main())
    else:
        s = grpc.server(futures.ThreadPoolExecutor(max_workers=32))
        epg.add_ExternalProcessorServicer_to_server(_Sync(), s)
        s.add_insecure_port(addr)
        s.start()
        s.wait_for_termination()


def _request() -> ep.ProcessingRequest:
    headers = [base_pb2.HeaderValue(key=f"x-header-{i}", raw_value=b"v" * 24) for i in range(12)]
    return ep.ProcessingRequest(request_headers=ep.HttpHeaders(headers=base_pb2.HeaderMap(headers=headers)))


async def _drive(addr: str, streams: int, messages: int, concurrency: int = 16) -> float:
    req = _request()
    async with grpc.aio.insecure_channel(addr) as ch:
        stub = epg.ExternalProcessorStub(ch)
        sem = asyncio.Semaphore(concurrency)

        async def one() -> None:
            async with sem:
                call = stub.Process()
                for _ in range(messages):
                    await call.write(req)
                    await call.read()
                await call.done_writing()

        start = time.perf_counter()
        await asyncio.gather(*(one() for _ in range(streams)))
        return time.perf_counter() - start


def _cpu(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def measure(kind: str, transport: str, streams: int, messages: int) -> dict[str, float | str]:
    tmp = tempfile.mkdtemp(prefix="crdgol-floor-")
    if transport == "unix":
        addr = f"unix:{tmp}/s.sock"
    else:
        import socket

        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            addr = f"127.0.0.1:{s.getsockname()[1]}"
    server = subprocess.Popen([sys.executable, "-m", "benchmarks.grpc_floor", "--serve", kind, addr])
    try:
        time.sleep(1.0)
        asyncio.run(_drive(addr, 200, messages))  # warm up
        c0 = _cpu(server.pid)
        elapsed = asyncio.run(_drive(addr, streams, messages))
        cpu = _cpu(server.pid) - c0
    finally:
        server.terminate()
        server.wait(10)
    per_stream_us = cpu / streams * 1e6
    return {
        "server": kind,
        "transport": transport,
        "streams": streams,
        "messages_per_stream": messages,
        "elapsed_s": round(elapsed, 2),
        "server_cpu_s": round(cpu, 2),
        "cpu_per_stream_us": round(per_stream_us),
        "cpu_per_message_us": round(per_stream_us / messages),
        "streams_per_core_s": round(1e6 / per_stream_us) if per_stream_us else 0,
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--streams", type=int, default=4000)
    p.add_argument("--messages", type=int, default=4, help="messages per stream (crdgol's downstream filter: 4)")
    p.add_argument("--serve", nargs=2, metavar=("KIND", "ADDR"), help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.serve:
        _serve(*args.serve)
        return 0
    rows = []
    for kind, transport in (("aio", "tcp"), ("aio", "unix"), ("sync", "tcp")):
        print(f"grpc floor: {kind} over {transport}, {args.streams} streams x {args.messages} messages ...", flush=True)
        row = measure(kind, transport, args.streams, args.messages)
        print(f"  {row['cpu_per_stream_us']} us CPU per stream -> at most {row['streams_per_core_s']} requests/s per core", flush=True)
        rows.append(row)
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "grpc_floor.json").write_text(json.dumps({"nproc": os.cpu_count(), "rows": rows}, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
