"""A tool call through the gateway's /mcp vs the same call straight to the MCP server.

    .venv/bin/python -m benchmarks.mcp_tools [--calls 400] [--out benchmarks/results]

One real MCP server (the official SDK's MCPServer, streamable HTTP, an ``add`` tool) on loopback;
the gateway (controller, extproc, Envoy: ``crdgol.stack.Stack``) serving it as an MCPServer twice,
once without and once with a credential (which adds extproc's upstream ext_proc on the server's
cluster). One MCP client session per path (the SDK's ClientSession), calls one at a time (c1),
the paths interleaved call by call so drift hits all alike. Reports p50/p90/p99 per path and the
added latency (gateway minus direct, per percentile) in ``mcp_tools.json``/``.md``.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import subprocess
import sys
import tempfile
import textwrap
import time
from pathlib import Path
from typing import Any

from mcp import ClientSession
from mcp.client.streamable_http import streamable_http_client
from mcp.shared._httpx_utils import create_mcp_http_client

from crdgol.stack import Stack, StackSettings, free_port

TOKEN = "bench-server-token"
KEY = "sk-bench-mcp"

SERVER = textwrap.dedent(
    """
    import sys, uvicorn
    from mcp.server.mcpserver import MCPServer
    app = MCPServer("bench", log_level="WARNING")

    @app.tool()
    def add(a: int, b: int) -> int:
        return a + b

    inner = app.streamable_http_app()
    token = sys.argv[2]

    async def asgi(scope, receive, send):
        # Accepts requests without a credential or with the right one (both setups share it).
        auth = dict(scope.get("headers") or []).get(b"authorization")
        if scope["type"] == "http" and auth not in (None, ("Bearer " + token).encode()):
            await send({"type": "http.response.start", "status": 401, "headers": []})
            await send({"type": "http.response.body", "body": b""})
            return
        await inner(scope, receive, send)

    uvicorn.run(asgi, host="127.0.0.1", port=int(sys.argv[1]), log_level="warning")
    """
)


def manifests(folder: Path, url: str) -> None:
    docs: list[dict[str, Any]] = [
        {
            "apiVersion": "v1",
            "kind": "Secret",
            "metadata": {"name": "bench-key", "labels": {"crdgol.io/api-key": "true"}, "annotations": {"crdgol.io/tenant": "bench"}},
            "stringData": {"key": KEY},
        },
        {"apiVersion": "v1", "kind": "Secret", "metadata": {"name": "bench-token"}, "stringData": {"token": TOKEN}},
        {"apiVersion": "crdgol.io/v1alpha1", "kind": "MCPServer", "metadata": {"name": "plain"}, "spec": {"url": url, "toolPrefix": "plain"}},
        {
            "apiVersion": "crdgol.io/v1alpha1",
            "kind": "MCPServer",
            "metadata": {"name": "keyed"},
            "spec": {"url": url, "toolPrefix": "keyed", "credentialsRef": {"name": "bench-token", "key": "token"}},
        },
    ]
    (folder / "mcp.yaml").write_text("---\n".join(json.dumps(d) + "\n" for d in docs))


def pct(values: list[float], p: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(p / 100 * (len(ordered) - 1)))]


async def measure(direct_url: str, gateway_url: str, calls: int, warmup: int) -> dict[str, list[float]]:
    paths = {"direct": (direct_url, "add", ""), "gateway": (gateway_url, "plain__add", KEY), "gateway_credential": (gateway_url, "keyed__add", KEY)}
    times: dict[str, list[float]] = {name: [] for name in paths}
    sessions: dict[str, ClientSession] = {}
    stacks = []
    try:
        for name, (url, _, key) in paths.items():
            http = create_mcp_http_client(headers={"authorization": f"Bearer {key}"} if key else None)
            cm = streamable_http_client(url, http_client=http)
            read, write = await cm.__aenter__()
            s = ClientSession(read, write)
            await s.__aenter__()
            await s.initialize()
            stacks.append((cm, s))
            sessions[name] = s
        for i in range(warmup + calls):
            for name, (_, tool, _) in paths.items():
                t0 = time.perf_counter()
                result = await sessions[name].call_tool(tool, {"a": i, "b": 1})
                elapsed = time.perf_counter() - t0
                if result.is_error or result.structured_content != {"result": i + 1}:
                    raise RuntimeError(f"{name}: a wrong answer {result}")
                if i >= warmup:
                    times[name].append(elapsed * 1000)
    finally:
        for cm, s in reversed(stacks):
            await s.__aexit__(None, None, None)
            await cm.__aexit__(None, None, None)
    return times


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--calls", type=int, default=400)
    p.add_argument("--warmup", type=int, default=30)
    p.add_argument("--out", type=Path, default=Path(__file__).resolve().parent / "results")
    args = p.parse_args()
    port = free_port()
    server = subprocess.Popen([sys.executable, "-c", SERVER, str(port), TOKEN], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    folder = Path(tempfile.mkdtemp(prefix="crdgol-bench-mcp-"))
    manifests(folder, f"http://127.0.0.1:{port}/mcp")
    stack = Stack(StackSettings(manifests=folder, mock_port=None, quiet=True, envoy_concurrency=1, access_log="off"))
    try:
        time.sleep(1.0)
        stack.start()
        times = asyncio.run(measure(f"http://127.0.0.1:{port}/mcp", f"{stack.url}/mcp", args.calls, args.warmup))
    finally:
        stack.stop()
        server.terminate()
        server.wait(10)
    summary: dict[str, Any] = {"calls": args.calls, "unit": "ms"}
    for name, values in times.items():
        summary[name] = {f"p{q}": round(pct(values, q), 3) for q in (50, 90, 99)} | {"mean": round(statistics.fmean(values), 3)}
    for name in ("gateway", "gateway_credential"):
        summary[f"added_{name}"] = {q: round(summary[name][q] - summary["direct"][q], 3) for q in ("p50", "p90", "p99")}
    summary["target_added_p50_ms"] = 2.0
    summary["meets_target"] = summary["added_gateway"]["p50"] <= 2.0 and summary["added_gateway_credential"]["p50"] <= 2.0
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "mcp_tools.json").write_text(json.dumps(summary, indent=2) + "\n")
    rows = [
        "| path | p50 ms | p90 ms | p99 ms |",
        "|---|---:|---:|---:|",
        *(f"| {n} | {summary[n]['p50']} | {summary[n]['p90']} | {summary[n]['p99']} |" for n in ("direct", "gateway", "gateway_credential")),
        *(f"| added by the gateway ({n.removeprefix('added_')}) | {summary[n]['p50']} | {summary[n]['p90']} | {summary[n]['p99']} |" for n in ("added_gateway", "added_gateway_credential")),
    ]
    text = f"# MCP tool call through /mcp vs direct ({args.calls} calls each, c1, interleaved)\n\n" + "\n".join(rows) + "\n"
    (args.out / "mcp_tools.md").write_text(text)
    print(text)
    return 0 if summary["meets_target"] else 1


if __name__ == "__main__":
    raise SystemExit(main())
