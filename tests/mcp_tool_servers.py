"""A real MCP tool server (the official SDK's MCPServer, streamable HTTP) for the /mcp tests.

Run as ``python tests/mcp_tool_servers.py --name NAME --port P [--token T]``. Its tools:

* ``echo(text)`` -> ``"<NAME>:<text>"``; ``add(a, b)``; ``wipe()`` (the one tests forbid);
* ``steps(n, delay_ms)``: reports progress and logs a message per step, then ``"done"``;
* ``visits()``: how many times this MCP session called it (proves the session is kept).

Resources ``note://greeting`` (``"<NAME>: hello"``) and ``note://items/{item}``; a prompt
``review(code)`` (``"<NAME> reviews <code>"``).

With ``--token T`` every MCP request must carry ``authorization: Bearer T`` (401 otherwise).
``GET /_seen`` lists, per request received, its ``authorization`` value, header names, HTTP method
and ``mcp-session-id``, so a test can tell which credentials, internal headers and session ends
reached the server.

``ToolServer`` starts one as a subprocess on a free loopback port and stops it.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import subprocess
import sys
import time
import urllib.request
from pathlib import Path
from typing import Any

# At module level: the SDK reads the tools' annotations (strings here) in this module's globals.
from mcp.server.mcpserver import Context, MCPServer


def build(name: str, token: str) -> Any:
    app = MCPServer(name, log_level="WARNING")
    visits: dict[str, int] = {}
    seen: list[dict[str, Any]] = []

    @app.tool()
    def echo(text: str) -> str:
        """Echo the text, signed with the server's name."""
        return f"{name}:{text}"

    @app.tool()
    def add(a: int, b: int) -> int:
        """Add two numbers."""
        return a + b

    @app.tool()
    def wipe() -> str:
        """A destructive tool some tenants may not call."""
        return f"{name}: wiped"

    @app.tool()
    async def steps(n: int, delay_ms: int, ctx: Context) -> str:
        """Report progress n times, delay_ms apart."""
        for i in range(n):
            await ctx.report_progress(i + 1, n, f"step {i + 1}")
            await ctx.info(f"{name} step {i + 1}")
            await asyncio.sleep(delay_ms / 1000)
        return "done"

    @app.tool(name="visits")
    async def visits_(ctx: Context) -> int:
        """How many times this session has called this tool."""
        key = (ctx.headers or {}).get("mcp-session-id", "")
        visits[key] = visits.get(key, 0) + 1
        return visits[key]

    @app.resource("note://greeting")
    def greeting() -> str:
        """A fixed resource."""
        return f"{name}: hello"

    @app.resource("note://items/{item}")
    def item(item: str) -> str:
        """A resource template."""
        return f"{name}: item {item}"

    @app.prompt()
    def review(code: str) -> str:
        """A prompt with an argument."""
        return f"{name} reviews {code}"

    inner = app.streamable_http_app()

    async def asgi(scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await inner(scope, receive, send)
            return
        headers = {k.decode().lower(): v.decode() for k, v in scope["headers"]}
        if scope["path"] == "/_seen":
            body = json.dumps(seen).encode()
            await send({"type": "http.response.start", "status": 200, "headers": [(b"content-type", b"application/json")]})
            await send({"type": "http.response.body", "body": body})
            return
        seen.append(
            {"authorization": headers.get("authorization", ""), "headers": sorted(headers), "method": scope["method"], "session": headers.get("mcp-session-id", "")}
        )
        if token and headers.get("authorization") != f"Bearer {token}":
            await send({"type": "http.response.start", "status": 401, "headers": [(b"content-type", b"application/json")]})
            await send({"type": "http.response.body", "body": b'{"error": "unauthorized"}'})
            return
        await inner(scope, receive, send)

    return asgi


def main() -> None:
    import uvicorn

    p = argparse.ArgumentParser()
    p.add_argument("--name", required=True)
    p.add_argument("--port", type=int, required=True)
    p.add_argument("--token", default="")
    args = p.parse_args()
    uvicorn.run(build(args.name, args.token), host="127.0.0.1", port=args.port, log_level="warning", lifespan="on")


class ToolServer:
    """One server as a subprocess on a free port."""

    def __init__(self, name: str, token: str = "") -> None:
        from crdgol.stack import free_port

        self.name, self.token = name, token
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}/mcp"
        argv = [sys.executable, str(Path(__file__).resolve()), "--name", name, "--port", str(self.port)]
        if token:
            argv += ["--token", token]
        self.proc = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + 20
        while True:
            try:
                self.seen()
                return
            except OSError:
                if self.proc.poll() is not None or time.monotonic() > deadline:
                    self.stop()
                    raise RuntimeError(f"MCP server {name} did not start") from None
                time.sleep(0.1)

    def seen(self) -> list[dict[str, Any]]:
        with urllib.request.urlopen(f"http://127.0.0.1:{self.port}/_seen", timeout=2) as r:
            return list(json.loads(r.read()))

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(5)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


if __name__ == "__main__":
    main()
