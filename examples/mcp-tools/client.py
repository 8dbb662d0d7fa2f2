"""Call the federated MCP tools through the gateway with the official MCP SDK's client.

    .venv/bin/python examples/mcp-tools/client.py [--gateway http://127.0.0.1:8080] [--key sk-crdgol-intern]

Lists the tools the key's tenant may call, looks a customer up, searches (printing the progress
the search server streams), then tries a tool the intern may not call.
"""

from __future__ import annotations

import argparse
import asyncio

from mcp import ClientSession, MCPError
from mcp.client.streamable_http import streamable_http_client
from mcp.shared._httpx_utils import create_mcp_http_client


async def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--gateway", default="http://127.0.0.1:8080")
    p.add_argument("--key", default="sk-crdgol-intern")
    args = p.parse_args()
    http = create_mcp_http_client(headers={"authorization": f"Bearer {args.key}"})
    async with streamable_http_client(f"{args.gateway}/mcp", http_client=http) as (read, write), ClientSession(read, write) as mcp:
        await mcp.initialize()
        print("tools:", sorted(t.name for t in (await mcp.list_tools()).tools))
        customer = await mcp.call_tool("crm__lookup_customer", {"customer_id": "c-1001"})
        print("lookup:", customer.content[0].text)  # type: ignore[union-attr]

        async def progress(done: float, total: float | None, message: str | None) -> None:
            print(f"  progress {done:.0f}/{total:.0f}: {message}")

        hits = await mcp.call_tool("search__web_search", {"query": "crdgol"}, progress_callback=progress)
        print("search:", [c.text for c in hits.content])  # type: ignore[union-attr]
        try:
            await mcp.call_tool("crm__update_customer", {"customer_id": "c-1001", "note": "called"})
            print("update: done")
        except MCPError as exc:
            print("update refused:", exc)


if __name__ == "__main__":
    asyncio.run(main())
