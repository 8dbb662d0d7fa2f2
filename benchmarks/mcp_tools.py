"""A tool call through the gateway's /mcp vs the same call straight to the MCP server.

    .venv/bin/python -m benchmarks.mcp_tools [--calls 400] [--out benchmarks/results]

One real MCP server (the official SDK's MCPServer, streamable HTTP, an ``add`` tool) on loopback;
the gateway (controller, extproc, Envoy: ``crdgol.stack.Stack``) serving it as an MCPServer twice,
once without and once with a credential (which adds extproc's upstream ext_proc on the server's
cluster). One MCP client session per path (the SDK's ClientSession), calls one at a time (c1),
the paths interleaved call by call (in an order rotated each round) so drift hits all alike. Reports p50/p90/p99 per path and the
added latency (gateway minus direct, per percentile) in ``mcp_tools.json``/``.md``.

Two reference paths split the cost: ``envoy_proxy``, a plain Envoy HTTP proxy in front of the
server (what any proxy adds), and ``envoy_only``, the gateway's rendered Envoy config run
statically without its ext_proc (the /mcp route pinned to the view, the tenant header added by the
route): what Envoy's internal listener and mcp_router add, apart from what extproc adds.

An A/B of the request path, interleaved like the rest: ``gateway`` is the gateway as it runs (one
ext_proc message per /mcp request: the body, with the caller's credential as request attributes),
``gateway_two_messages`` the same render with ``one_message`` off (request headers, then body: the
path before), a second Envoy on the same extproc and policy.

``null_extproc`` is the floor of any decision in a Python ext_proc server: ``envoy_only`` plus the
gateway's ext_proc filter (body only, with the same request attributes) to a gRPC server
(``grpc.aio`` on uvloop, like extproc, in a process of its own, on a Unix socket) that answers each message
at once with no change: one stream, one message, nothing decided. ``null_extproc_proxy`` is the
same filter in front of the plain proxy (``envoy_proxy``): the floor of a tool call that goes
straight to its server, as the gateway's do since the internal listener left the call path.

``--ab-tree DIR`` adds ``gateway_ab``: the gateway of another source tree (a checkout of an earlier
commit, its protos built), started in a process of its own with the same settings, interleaved
call by call with the rest: an A/B of two versions in the same minutes.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import subprocess
import sys
import tempfile
import textwrap
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

from mcp import ClientSession
from mcp.client.streamable_http import streamable_http_client
from mcp.shared._httpx_utils import create_mcp_http_client

from controller.envoy_config import grpc_cluster
from controller.manifests import load_folder
from controller.one_message import BODY_ONLY
from controller.render import RenderSettings, render
from crdgol.cli import write_sds_files
from crdgol.mcp_contract import TENANT_HEADER, view_route
from crdgol.stack import Stack, StackSettings, envoy_binary, free_port, stop_process, wait_http

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


# A do-nothing ext_proc server (grpc.aio, as extproc): every message answered at once, unchanged.
NULL_EXTPROC = textwrap.dedent(
    """
    import sys, grpc, uvloop
    from envoy.service.ext_proc.v3 import external_processor_pb2 as ep
    from envoy.service.ext_proc.v3 import external_processor_pb2_grpc as ep_grpc

    class Null(ep_grpc.ExternalProcessorServicer):
        async def Process(self, requests, context):
            async for req in requests:
                kind = req.WhichOneof("request")
                yield ep.ProcessingResponse(**{kind: ep.HeadersResponse() if kind.endswith("headers") else ep.BodyResponse()}) \
                    if not kind.endswith("trailers") else ep.ProcessingResponse(**{kind: ep.TrailersResponse()})

    async def main():
        server = grpc.aio.server()
        ep_grpc.add_ExternalProcessorServicer_to_server(Null(), server)
        server.add_insecure_port("unix:" + sys.argv[1])
        await server.start()
        await server.wait_for_termination()

    uvloop.run(main())  # as extproc runs
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


def envoy_only_config(
    folder: Path, port: int, proxy_port: int, admin_port: int, null_port: int, null_socket: str, null_proxy_port: int
) -> dict[str, Any]:
    """The gateway's rendered config without its ext_proc: /mcp goes straight to the view. Plus,
    on ``proxy_port``, a plain HTTP proxy to the server (what any proxy in front of it adds), and
    on ``null_port`` the same as ``port`` with the gateway's ext_proc filter, body only, to the
    do-nothing server on ``null_socket``."""
    m = load_folder(folder)
    # The injected server credential from an SDS file (a static config has no ADS to serve it).
    sds = folder.parent / f"{folder.name}-sds"
    result = render(m.bindings, m.secrets, RenderSettings(listen_port=port, admin_port=admin_port, sds_dir=str(sds)), mcp_servers=m.mcp_servers)
    write_sds_files(sds, result.secrets)
    config = result.envoy
    gateway = config["static_resources"]["listeners"][0]
    proxy = json.loads(json.dumps(gateway))
    proxy["name"], proxy["address"]["socket_address"]["port_value"] = "plain-proxy", proxy_port
    (server_cluster,) = [c["name"] for c in config["static_resources"]["clusters"] if c["name"].startswith("crdgol-mcp.default.default.plain.")]
    proxy_hcm = proxy["filter_chains"][0]["filters"][0]["typed_config"]
    proxy_hcm["http_filters"] = [f for f in proxy_hcm["http_filters"] if f["name"] == "envoy.filters.http.router"]
    proxy_hcm["access_log"] = []
    proxy_hcm["route_config"] = {"virtual_hosts": [{"name": "p", "domains": ["*"], "routes": [{"match": {"prefix": "/"}, "route": {"cluster": server_cluster, "timeout": "0s"}}]}]}
    config["static_resources"]["listeners"].append(proxy)
    null = json.loads(json.dumps(gateway))
    null["name"], null["address"]["socket_address"]["port_value"] = "null-extproc", null_port
    config["static_resources"]["listeners"].append(null)
    null_proxy = json.loads(json.dumps(null))
    null_proxy["name"], null_proxy["address"]["socket_address"]["port_value"] = "null-extproc-proxy", null_proxy_port
    null_proxy_hcm = null_proxy["filter_chains"][0]["filters"][0]["typed_config"]
    null_proxy_hcm["route_config"] = json.loads(json.dumps(proxy_hcm["route_config"]))
    config["static_resources"]["listeners"].append(null_proxy)
    config["static_resources"]["clusters"].append(grpc_cluster("null-extproc", [{"pipe": {"path": null_socket}}]))
    hcm = gateway["filter_chains"][0]["filters"][0]["typed_config"]
    hcm["http_filters"] = [f for f in hcm["http_filters"] if f["name"] != "envoy.filters.http.ext_proc"]
    hcm["access_log"] = []
    null_hcm = null["filter_chains"][0]["filters"][0]["typed_config"]
    null_hcm["access_log"] = []
    null_proxy_hcm["access_log"] = []
    for f in [*null_hcm["http_filters"], *null_proxy_hcm["http_filters"]]:
        if f["name"] == "envoy.filters.http.ext_proc":
            # As the gateway's /mcp route has it: the body alone, the headers as attributes.
            f["typed_config"]["grpc_service"]["envoy_grpc"]["cluster_name"] = "null-extproc"
            f["typed_config"]["processing_mode"] = BODY_ONLY["overrides"]["processing_mode"]
    for h in (hcm, null_hcm):
        for route in h["route_config"]["virtual_hosts"][0]["routes"]:
            if route["name"] == view_route("default"):
                route["match"] = {"path": "/mcp"}
                route["request_headers_to_add"] = [{"header": {"key": TENANT_HEADER, "value": "default/bench"}}]
    return config


def two_message_config(stack: Stack, folder: Path, port: int, admin_port: int) -> dict[str, Any]:
    """The stack's render with ``one_message`` off, on ``port``, against the stack's extproc."""
    m = load_folder(folder)
    settings = replace(stack.render_settings, listen_port=port, admin_port=admin_port, admin_socket="", one_message=False)
    return render(m.bindings, m.secrets, settings, mcp_servers=m.mcp_servers).envoy


def rotated(paths: dict[str, Any], i: int) -> list[str]:
    """The paths in the order of round ``i``: rotated each round, so that no path always follows
    the same one (at c1 on a busy machine, which process ran just before shifts a path's figure)."""
    names = list(paths)
    k = i % len(names)
    return names[k:] + names[:k]


def call_paths(urls: dict[str, str]) -> dict[str, tuple[str, str, str]]:
    """Each measured path: (URL, the tool's name there, the API key)."""
    paths = {
        "direct": (urls["direct"], "add", ""),
        "envoy_proxy": (urls["envoy_proxy"], "add", ""),
        "envoy_only": (urls["envoy_only"], "plain__add", ""),
        "gateway": (urls["gateway"], "plain__add", KEY),
        "gateway_credential": (urls["gateway"], "keyed__add", KEY),
        "gateway_two_messages": (urls["gateway_two_messages"], "plain__add", KEY),
        "null_extproc": (urls["null_extproc"], "plain__add", ""),
        "null_extproc_proxy": (urls["null_extproc_proxy"], "add", ""),
    }
    if "gateway_ab" in urls:
        paths["gateway_ab"] = (urls["gateway_ab"], "plain__add", KEY)
    return paths


AB_STACK = textwrap.dedent(
    """
    import sys
    from pathlib import Path
    from crdgol.stack import Stack, StackSettings
    stack = Stack(StackSettings(manifests=Path(sys.argv[1]), mock_port=None, quiet=True, envoy_concurrency=1, access_log="off"))
    stack.start()
    print(stack.url, flush=True)
    try:
        sys.stdin.read()
    finally:
        stack.stop()
    """
)


async def measure(urls: dict[str, str], calls: int, warmup: int) -> dict[str, list[float]]:
    paths = call_paths(urls)
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
            for name in rotated(paths, i):
                tool = paths[name][1]
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


async def measure_http(urls: dict[str, str], calls: int, warmup: int) -> dict[str, list[float]]:
    """The same calls as raw HTTP (httpx, one keep-alive connection per path, the body read whole):
    the client's own MCP parsing (SSE or JSON) left out of the figures."""
    import httpx

    paths = call_paths(urls)
    times: dict[str, list[float]] = {name: [] for name in paths}
    clients: dict[str, tuple[httpx.AsyncClient, dict[str, str]]] = {}
    try:
        for name, (url, _, key) in paths.items():
            http = httpx.AsyncClient(timeout=30)
            headers = {"accept": "application/json, text/event-stream", "content-type": "application/json"}
            if key:
                headers["authorization"] = f"Bearer {key}"
            init = {"jsonrpc": "2.0", "id": 0, "method": "initialize", "params": {"protocolVersion": "2025-06-18", "capabilities": {}, "clientInfo": {"name": "bench", "version": "1"}}}
            r = await http.post(url, json=init, headers=headers)
            r.raise_for_status()
            headers["mcp-session-id"] = r.headers["mcp-session-id"]
            headers["mcp-protocol-version"] = "2025-06-18"
            (await http.post(url, json={"jsonrpc": "2.0", "method": "notifications/initialized"}, headers=headers)).raise_for_status()
            clients[name] = (http, headers)
        for i in range(warmup + calls):
            for name in rotated(paths, i):
                url, tool = paths[name][0], paths[name][1]
                http, headers = clients[name]
                body = {"jsonrpc": "2.0", "id": i + 1, "method": "tools/call", "params": {"name": tool, "arguments": {"a": i, "b": 1}}}
                t0 = time.perf_counter()
                r = await http.post(url, json=body, headers=headers)
                elapsed = time.perf_counter() - t0
                if r.status_code != 200 or f'"result":{i + 1}' not in r.text.replace(" ", ""):
                    raise RuntimeError(f"{name}: a wrong answer {r.status_code} {r.text[:200]}")
                if i >= warmup:
                    times[name].append(elapsed * 1000)
    finally:
        for http, _ in clients.values():
            await http.aclose()
    return times


def cpu_seconds(pid: int) -> float:
    """User + system CPU of process ``pid`` so far."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


async def measure_cpu(urls: dict[str, str], pids: dict[str, int], rounds: int, calls: int) -> dict[str, dict[str, float]]:
    """extproc's and Envoy's CPU per tool call (µs), one vs two messages: blocks of ``calls`` raw
    HTTP calls per path, alternated ``rounds`` times (the median block counts). The access log of a
    block is settled before its CPU is read (its flush interval is 20 ms)."""
    import httpx

    paths = {"gateway": pids["envoy"], "gateway_two_messages": pids["envoy_two"]}
    per: dict[str, dict[str, list[float]]] = {n: {"extproc": [], "envoy": []} for n in paths}
    headers = {"accept": "application/json, text/event-stream", "content-type": "application/json", "authorization": f"Bearer {KEY}"}
    init = {"jsonrpc": "2.0", "id": 0, "method": "initialize", "params": {"protocolVersion": "2025-06-18", "capabilities": {}, "clientInfo": {"name": "bench", "version": "1"}}}
    async with httpx.AsyncClient(timeout=30) as http:
        sessions = {}
        for name in paths:
            r = await http.post(urls[name], json=init, headers=headers)
            sessions[name] = {**headers, "mcp-session-id": r.headers["mcp-session-id"], "mcp-protocol-version": "2025-06-18"}
        for _ in range(rounds):
            for name, envoy_pid in paths.items():
                await asyncio.sleep(0.2)
                e0, v0 = cpu_seconds(pids["extproc"]), cpu_seconds(envoy_pid)
                for i in range(calls):
                    body = {"jsonrpc": "2.0", "id": i + 1, "method": "tools/call", "params": {"name": "plain__add", "arguments": {"a": i, "b": 1}}}
                    r = await http.post(urls[name], json=body, headers=sessions[name])
                    r.raise_for_status()
                await asyncio.sleep(0.2)
                per[name]["extproc"].append((cpu_seconds(pids["extproc"]) - e0) / calls * 1e6)
                per[name]["envoy"].append((cpu_seconds(envoy_pid) - v0) / calls * 1e6)
    return {n: {k: round(statistics.median(v)) for k, v in d.items()} for n, d in per.items()}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--calls", type=int, default=400)
    p.add_argument("--warmup", type=int, default=30)
    p.add_argument("--out", type=Path, default=Path(__file__).resolve().parent / "results")
    p.add_argument("--ab-tree", type=Path, default=None, help="also measure the gateway of this source tree (gateway_ab)")
    args = p.parse_args()
    port = free_port()
    server = subprocess.Popen([sys.executable, "-c", SERVER, str(port), TOKEN], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    folder = Path(tempfile.mkdtemp(prefix="crdgol-bench-mcp-"))
    manifests(folder, f"http://127.0.0.1:{port}/mcp")
    stack = Stack(StackSettings(manifests=folder, mock_port=None, quiet=True, envoy_concurrency=1, access_log="off"))
    bare_port, proxy_port, null_port, null_proxy_port = free_port(), free_port(), free_port(), free_port()
    null_socket = str(folder.parent / f"{folder.name}-null.sock")
    config = envoy_only_config(folder, bare_port, proxy_port, free_port(), null_port, null_socket, null_proxy_port)
    (folder.parent / f"{folder.name}-envoy-only.json").write_text(json.dumps(config))
    null = subprocess.Popen([sys.executable, "-c", NULL_EXTPROC, null_socket], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    bare = two = ab = None
    try:
        time.sleep(1.0)
        stack.start()
        if args.ab_tree is not None:
            env = {**os.environ, "PYTHONPATH": str(args.ab_tree.resolve())}
            ab = subprocess.Popen([sys.executable, "-c", AB_STACK, str(folder)], stdin=subprocess.PIPE, stdout=subprocess.PIPE, env=env, cwd=args.ab_tree)
            assert ab.stdout is not None
            ab_url = ab.stdout.readline().decode().strip()
        two_port = free_port()
        (folder.parent / f"{folder.name}-two.json").write_text(json.dumps(two_message_config(stack, folder, two_port, free_port())))
        two = subprocess.Popen(
            [envoy_binary(), "-c", str(folder.parent / f"{folder.name}-two.json"), "--concurrency", "1", "--disable-hot-restart", "--log-level", "error"],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        wait_http(f"http://127.0.0.1:{two_port}/mcp", (401, 405), 20, two)  # GET: Envoy's 405
        bare = subprocess.Popen(
            [envoy_binary(), "-c", str(folder.parent / f"{folder.name}-envoy-only.json"), "--concurrency", "1", "--disable-hot-restart", "--log-level", "error"],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        wait_http(f"http://127.0.0.1:{bare_port}/mcp", (400, 404, 405, 406, 415), 20, bare)
        urls = {
            "direct": f"http://127.0.0.1:{port}/mcp",
            "envoy_proxy": f"http://127.0.0.1:{proxy_port}/mcp",
            "envoy_only": f"http://127.0.0.1:{bare_port}/mcp",
            "gateway": f"{stack.url}/mcp",
            "gateway_two_messages": f"http://127.0.0.1:{two_port}/mcp",
            "null_extproc": f"http://127.0.0.1:{null_port}/mcp",
            "null_extproc_proxy": f"http://127.0.0.1:{null_proxy_port}/mcp",
        }
        if ab is not None:
            urls["gateway_ab"] = f"{ab_url}/mcp"
        times = asyncio.run(measure(urls, args.calls, args.warmup))
        http_times = asyncio.run(measure_http(urls, args.calls, args.warmup))
        pids = {"extproc": stack.pid("extproc"), "envoy": stack.pid("envoy"), "envoy_two": two.pid}
        cpu = asyncio.run(measure_cpu(urls, pids, rounds=5, calls=200))
    finally:
        if ab is not None:
            assert ab.stdin is not None
            ab.stdin.close()  # the A/B stack stops itself
            ab.wait(30)
        for proc in (bare, two, null):
            if proc is not None:
                stop_process(proc)
        stack.stop()
        server.terminate()
        server.wait(10)
    summary: dict[str, Any] = {"calls": args.calls, "unit": "ms", "load_average": os.getloadavg()[0], "cpus": os.cpu_count()}
    text = f"# MCP tool call through /mcp vs direct ({args.calls} calls per path, c1, interleaved; load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} CPUs)\n"
    text += f"\nA/B tree (gateway_ab): {args.ab_tree}\n" if args.ab_tree is not None else ""
    for client, results in (("sdk", times), ("http", http_times)):
        part = summarize(results)
        summary[client] = part
        text += f"\n## {'the SDK ClientSession' if client == 'sdk' else 'raw HTTP (httpx)'}\n\n" + table(part)
    summary["cpu_us_per_call"] = cpu
    text += "\n## CPU per tool call (µs, median of 5 alternated blocks of 200 raw HTTP calls)\n\n| path | extproc | Envoy |\n|---|---:|---:|\n"
    text += "".join(f"| {n} | {c['extproc']} | {c['envoy']} |\n" for n, c in cpu.items())
    summary["target_added_p50_ms"] = 2.0
    summary["meets_target"] = all(summary[c][f"added_{n}"]["p50"] <= 2.0 for c in ("sdk", "http") for n in ("gateway", "gateway_credential"))
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "mcp_tools.json").write_text(json.dumps(summary, indent=2) + "\n")
    (args.out / "mcp_tools.md").write_text(text)
    print(text)
    return 0 if summary["meets_target"] else 1


PATHS = (
    "direct", "envoy_proxy", "envoy_only", "null_extproc_proxy", "null_extproc", "gateway", "gateway_credential", "gateway_two_messages", "gateway_ab"
)


def summarize(times: dict[str, list[float]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for name, values in times.items():
        out[name] = {f"p{q}": round(pct(values, q), 3) for q in (50, 90, 99)} | {"mean": round(statistics.fmean(values), 3)}
    for name in PATHS[1:]:
        if name in out:
            out[f"added_{name}"] = {q: round(out[name][q] - out["direct"][q], 3) for q in ("p50", "p90", "p99")}
    return out


def table(part: dict[str, Any]) -> str:
    paths = [n for n in PATHS if n in part]
    rows = [
        "| path | p50 ms | p90 ms | p99 ms |",
        "|---|---:|---:|---:|",
        *(f"| {n} | {part[n]['p50']} | {part[n]['p90']} | {part[n]['p99']} |" for n in paths),
        *(f"| added over direct: {n} | {part['added_' + n]['p50']} | {part['added_' + n]['p90']} | {part['added_' + n]['p99']} |" for n in paths[1:]),
    ]
    return "\n".join(rows) + "\n"


if __name__ == "__main__":
    raise SystemExit(main())
