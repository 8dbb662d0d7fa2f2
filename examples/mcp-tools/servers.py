"""The two MCP tool servers of examples/mcp-tools, built with the official MCP Python SDK.

    .venv/bin/python examples/mcp-tools/servers.py [--search-port 8711] [--crm-port 8712]

* ``search`` (no credential): ``web_search(query)`` and ``fetch_page(url)``, canned answers;
  ``web_search`` reports its progress as it goes.
* ``crm`` (requires ``Authorization: Bearer <token>``, the ``crm-mcp-token`` Secret's value):
  ``lookup_customer(customer_id)`` and ``update_customer(customer_id, note)``.

Both speak streamable HTTP at ``/mcp``. The gateway federates them at ``http://127.0.0.1:8080/mcp``.
"""

from __future__ import annotations

import argparse
import asyncio
from typing import Any

import uvicorn
from mcp.server.mcpserver import Context, MCPServer

CUSTOMERS = {"c-1001": {"name": "Ada Lovelace", "plan": "enterprise", "open_tickets": 2}}
NOTES: dict[str, list[str]] = {}


def search_server() -> Any:
    app = MCPServer("search", log_level="WARNING")

    @app.tool()
    async def web_search(query: str, ctx: Context) -> list[str]:
        """Search the (pretend) web."""
        hits = [f"{query} - result {i}" for i in range(1, 4)]
        for i, _ in enumerate(hits, 1):
            await ctx.report_progress(i, len(hits), f"searched source {i}")
            await asyncio.sleep(0.05)
        return hits

    @app.tool()
    def fetch_page(url: str) -> str:
        """Fetch a (pretend) page."""
        return f"<html><title>{url}</title>Nothing to see.</html>"

    return app.streamable_http_app()


def crm_server(token: str) -> Any:
    app = MCPServer("crm", log_level="WARNING")

    @app.tool()
    def lookup_customer(customer_id: str) -> dict[str, Any]:
        """A customer's record."""
        return {"id": customer_id, **CUSTOMERS.get(customer_id, {"name": "unknown"}), "notes": NOTES.get(customer_id, [])}

    @app.tool()
    def update_customer(customer_id: str, note: str) -> str:
        """Add a note to a customer's record."""
        NOTES.setdefault(customer_id, []).append(note)
        return f"noted on {customer_id}"

    inner = app.streamable_http_app()

    async def require_token(scope: dict[str, Any], receive: Any, send: Any) -> None:
        headers = dict(scope.get("headers") or [])
        if scope["type"] == "http" and headers.get(b"authorization") != f"Bearer {token}".encode():
            await send({"type": "http.response.start", "status": 401, "headers": [(b"content-type", b"application/json")]})
            await send({"type": "http.response.body", "body": b'{"error": "missing or wrong token"}'})
            return
        await inner(scope, receive, send)

    return require_token


async def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--search-port", type=int, default=8711)
    p.add_argument("--crm-port", type=int, default=8712)
    p.add_argument("--crm-token", default="crm-secret-token-123", help="the value of the crm-mcp-token Secret")
    args = p.parse_args()
    servers = [
        uvicorn.Server(uvicorn.Config(search_server(), host="127.0.0.1", port=args.search_port, log_level="warning")),
        uvicorn.Server(uvicorn.Config(crm_server(args.crm_token), host="127.0.0.1", port=args.crm_port, log_level="warning")),
    ]
    await asyncio.gather(*(s.serve() for s in servers))


if __name__ == "__main__":
    asyncio.run(main())
