"""Metrics of MCP tool traffic through /mcp: tool calls by tenant, server, tool and outcome.

Labels stay bounded: servers and tenants come from the policy; a tool is named in a label only
when the server's spec names it, or among the first ``TOOL_LABELS_PER_SERVER`` other tools seen
for that server (a server that allows every tool decides their names, not the gateway); the rest
count as ``_other``. A tool no server of the caller's view has is ``_unknown`` under server
``_unknown``: a client's typo never becomes a label.
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter

TOOL_LABELS_PER_SERVER = 64
UNKNOWN = "_unknown"
OTHER = "_other"
# JSON-RPC methods worth a label of their own, and the HTTP methods that carry none (DELETE ends
# a session, GET asks for a standalone stream); any other is "other".
METHODS = frozenset(
    {"initialize", "ping", "tools/list", "tools/call", "notifications/initialized", "resources/list", "prompts/list", "resources/templates/list", "logging/setLevel"}
    | {"resources/read", "prompts/get", "GET", "DELETE"}
)


class ToolCallMetrics:
    def __init__(self, registry: CollectorRegistry) -> None:
        self.calls = Counter(
            "crdgol_mcp_tool_calls",
            "MCP tool calls through /mcp as the gateway decided them, by tenant, server, tool and outcome "
            "(allowed: sent to the server; forbidden, rate_limited, unknown_tool: refused).",
            ["tenant", "server", "tool", "outcome"],
            registry=registry,
        )
        self.messages = Counter(
            "crdgol_mcp_messages",
            "JSON-RPC messages MCP clients sent to /mcp, by method and what the gateway did: forwarded, or the HTTP status it answered with.",
            ["method", "status"],
            registry=registry,
        )
        self.session_store_errors = Counter(
            "crdgol_mcp_session_store_errors",
            "MCP session checks (ownership, ended) that could not reach the store: the request went on without them.",
            registry=registry,
        )
        self._tools: dict[str, set[str]] = {}

    def tool_label(self, server: str, tool: str, named: frozenset[str]) -> str:
        if tool in named:
            return tool
        seen = self._tools.setdefault(server, set())
        if tool in seen:
            return tool
        if len(seen) < TOOL_LABELS_PER_SERVER:
            seen.add(tool)
            return tool
        return OTHER

    @staticmethod
    def method_label(method: str) -> str:
        return method if method in METHODS else "other"
