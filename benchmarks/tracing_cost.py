"""What OpenTelemetry tracing costs: full-policy throughput with tracing off and on, in one run.

    python -m benchmarks.tracing_cost [--seconds 8] [--rounds 2] [--connections 16] [--baseline PATH]

Starts the full-policy gateway (benchmarks/manifests/full, 1 KB prompts, sessions as in the
benchmark) with tracing off, then on (every request traced, spans exported over OTLP/gRPC to a
receiver this script runs), alternating ``rounds`` times so drift on a shared machine hits all
alike. With ``--baseline PATH`` (a checkout without tracing, e.g. /work/main) a third mode runs that
tree's code with the same settings, so "tracing off" can be compared with "no tracing code at all".
Prints requests/s of each mode and the ratios as JSON; the spread of the off rounds is the noise.
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import tempfile
import threading
from concurrent import futures
from pathlib import Path

import grpc
from opentelemetry.proto.collector.trace.v1 import trace_service_pb2 as ts
from opentelemetry.proto.collector.trace.v1 import trace_service_pb2_grpc as ts_grpc

from benchmarks import harness as hz
from benchmarks import scenarios as sc
from crdgol.stack import Stack, StackSettings, free_port


class Receiver(ts_grpc.TraceServiceServicer):
    """An OTLP/gRPC receiver that counts spans and keeps nothing."""

    def __init__(self) -> None:
        self.spans = 0
        self._lock = threading.Lock()

    def Export(self, request: ts.ExportTraceServiceRequest, context: grpc.ServicerContext) -> ts.ExportTraceServiceResponse:
        n = sum(len(ss.spans) for rs in request.resource_spans for ss in rs.scope_spans)
        with self._lock:
            self.spans += n
        return ts.ExportTraceServiceResponse()


def measure(mode: str, body: Path, seconds: float, connections: int, collector: str, baseline: str) -> float:
    root = Path(tempfile.mkdtemp(prefix="crdgol-bench-tr-"))
    try:
        mock_port = free_port()
        folder = root / "manifests"
        folder.mkdir()
        for src in sorted((sc.MANIFESTS / "full").glob("*.yaml")):
            text = src.read_text().replace(f"127.0.0.1:{sc.MANIFEST_MOCK_PORT}", f"127.0.0.1:{mock_port}")
            (folder / src.name).write_text(text)
        env = {"OTEL_TRACES_EXPORTER": "none"}
        if mode == "on":
            env = {"OTEL_EXPORTER_OTLP_ENDPOINT": collector}
        elif mode == "baseline":
            env["PYTHONPATH"] = baseline
        stack = Stack(
            StackSettings(
                manifests=folder, mock_port=mock_port, mock_args=hz.MOCK_ARGS, metrics_port=free_port(),
                state_dir=root / "state", quiet=True, access_log="off", env=env,
            )
        )
        stack.start()
        try:
            setup = sc.SETUPS["full"]
            argv = hz.wrk_argv(
                f"{stack.url}/v1/chat/completions", body, sc.request_headers(setup),
                connections=connections, duration=1, sessions=setup.sessions,
            )
            hz.run_wrk(argv, 30)  # warm-up
            argv = hz.wrk_argv(
                f"{stack.url}/v1/chat/completions", body, sc.request_headers(setup),
                connections=connections, duration=seconds, sessions=setup.sessions,
            )
            res = hz.run_wrk(argv, seconds + 30)
            if res.non_2xx:
                raise RuntimeError(f"{res.non_2xx} non-2xx answers with tracing {mode}")
            return res.rps
        finally:
            stack.stop()
    finally:
        shutil.rmtree(root, ignore_errors=True)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else "")
    p.add_argument("--seconds", type=float, default=8.0)
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--connections", type=int, default=16)
    p.add_argument("--baseline", default="", help="a checkout without tracing, run as a third mode")
    args = p.parse_args(argv)
    receiver = Receiver()
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
    ts_grpc.add_TraceServiceServicer_to_server(receiver, server)  # type: ignore[no-untyped-call]
    port = free_port()
    server.add_insecure_port(f"127.0.0.1:{port}")
    server.start()
    modes = ["off", "on", *(["baseline"] if args.baseline else [])]
    runs: dict[str, list[float]] = {m: [] for m in modes}
    try:
        with tempfile.TemporaryDirectory() as tmp:
            body = Path(tmp) / "body.json"
            body.write_text(json.dumps(sc.chat_body(sc.PROMPT_SIZES["1k"])))
            for _ in range(args.rounds):
                for mode in modes:
                    rps = measure(mode, body, args.seconds, args.connections, f"http://127.0.0.1:{port}", args.baseline)
                    print(f"  tracing {mode}: {rps:.0f} req/s", flush=True)
                    runs[mode].append(rps)
    finally:
        server.stop(0)
    off = statistics.mean(runs["off"])
    out: dict[str, object] = {"connections": args.connections, **{f"rps_{m}": r for m, r in runs.items()}}
    out["ratio_on_vs_off"] = round(statistics.mean(runs["on"]) / off, 3)
    out["spans_received"] = receiver.spans
    if args.baseline:
        out["ratio_off_vs_baseline"] = round(off / statistics.mean(runs["baseline"]), 3)
    print(json.dumps(out))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
