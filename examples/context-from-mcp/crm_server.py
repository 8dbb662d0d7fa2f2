"""A small CRM as an MCP server (the official SDK's MCPServer, streamable HTTP on /mcp).

    .venv/bin/python examples/context-from-mcp/crm_server.py [--port 8765] [--token crm-demo-token]

Resources ``crm://customers/{customer_id}`` (a customer record) and the prompt ``triage``. Every
MCP request must carry ``Authorization: Bearer <token>``. ``GET /reads`` counts the reads served.
"""

from __future__ import annotations

import argparse
import asyncio
from collections import Counter
from typing import Any

import uvicorn
from mcp.server.mcpserver import MCPServer
from starlette.requests import Request
from starlette.responses import JSONResponse, Response

CUSTOMERS = {
    "c-100": "Ada Lovelace, plan Enterprise, 1 open ticket (invoice charged twice), renews 2027-01-31.",
    "c-200": "Grace Hopper, plan Starter, no open tickets, card expires next month.",
}


def app(token: str) -> Any:
    mcp = MCPServer("crm", log_level="WARNING")
    reads: Counter[str] = Counter()

    @mcp.resource("crm://customers/{customer_id}")
    def customer(customer_id: str) -> str:
        reads["customer"] += 1
        return CUSTOMERS.get(customer_id, f"No customer {customer_id} in the CRM.")

    @mcp.prompt()
    def triage(plan_of: str) -> str:
        reads["triage"] += 1
        plan = "Enterprise" if "Enterprise" in CUSTOMERS.get(plan_of, "") else "standard"
        return f"{plan} customers: acknowledge within 1 hour, offer a call for billing issues."

    @mcp.custom_route("/reads", methods=["GET"])
    async def count(_request: Request) -> Response:
        return JSONResponse(dict(reads))

    inner = mcp.streamable_http_app()

    async def with_token(scope: Any, receive: Any, send: Any) -> None:
        guarded = scope["type"] == "http" and scope["path"].startswith("/mcp")
        if guarded and dict(scope["headers"]).get(b"authorization", b"").decode() != f"Bearer {token}":
            await JSONResponse({"error": "unauthorized"}, status_code=401)(scope, receive, send)
            return
        await inner(scope, receive, send)

    return with_token


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--port", type=int, default=8765)
    parser.add_argument("--token", default="crm-demo-token")
    args = parser.parse_args()
    config = uvicorn.Config(app(args.token), host="127.0.0.1", port=args.port, log_level="warning")
    asyncio.run(uvicorn.Server(config).serve())


if __name__ == "__main__":
    main()
