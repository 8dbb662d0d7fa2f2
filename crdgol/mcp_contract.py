"""What the controller's render and extproc must agree on for MCP tool servers behind /mcp.

Defined once here (the ground floor) and imported by both sides; no literal is spelled twice.
"""

from __future__ import annotations

# The federated endpoint MCP clients connect to.
MCP_PATH = "/mcp"
# Envoy's mcp_router names a tool "<server name>__<tool>"; crdgol names its servers by their
# toolPrefix, so a federated tool is "<toolPrefix>__<tool>".
TOOL_DELIMITER = "__"
# Its prompts are named the same way; a resource is "<server name>+<scheme>://<rest>".
RESOURCE_DELIMITER = "+"
# Set by extproc on every /mcp request it lets through (any value a client sent is removed): the
# qualified tenant, which mcp_router binds each MCP session to (a session id presented by another
# tenant is refused). The server clusters strip it before anything leaves Envoy.
TENANT_HEADER = "x-crdgol-mcp-tenant"
# gRPC initial metadata of the upstream ext_proc filter on a server's cluster: which MCPServer
# ("namespace/name") the request goes to, so extproc sets that server's credential. (Envoy's
# mcp_router builds each server's request afresh, with none of the client's headers: the
# credential cannot ride along from the downstream filter.)
SERVER_METADATA = "x-crdgol-mcp-server"
# Set by extproc on a tools/list request only: the view's route for it enables an ext_proc filter
# (told so by LIST_METADATA in its gRPC metadata) that reads the merged answer and removes the
# tools the tenant may not call. Every other request's answer streams past extproc untouched.
LIST_FILTER_HEADER = "x-crdgol-mcp-list"
LIST_METADATA = "x-crdgol-mcp-list"
# One message per /mcp request (``crdgol.request_path``): extproc gets the body alone and cannot
# set headers in its answer, so it names the view, the tenant and the list mark as dynamic
# metadata (``crdgol.request_path.ROUTE_NAMESPACE``, the view under ``ROUTE_KEY``), and the
# view's route turns these keys into TENANT_HEADER and LIST_FILTER_HEADER.
TENANT_KEY = "mcp_tenant"
LIST_KEY = "mcp_list"
# A tools/call goes straight to its server (``server_route``), not through the view's mcp_router:
# extproc names the server's own session (from the client's composite Mcp-Session-Id) under
# SERVER_SESSION_KEY, which the route sends as the server's Mcp-Session-Id, and the client's id
# under CLIENT_SESSION_KEY, which the route puts back on the answer in place of the server's.
SESSION_HEADER = "mcp-session-id"
SERVER_SESSION_KEY = "mcp_server_session"
CLIENT_SESSION_KEY = "mcp_client_session"


def view_route(namespace: str) -> str:
    """The x-crdgol-route value that sends a request to ``namespace``'s federated view."""
    return f"crdgol-mcp.{namespace}"


def server_route(namespace: str, prefix: str) -> str:
    """The route value that sends a tools/call of ``namespace``'s view straight to the server
    whose toolPrefix is ``prefix``."""
    return f"{view_route(namespace)}~{prefix}"


def quota_key(server_key: str) -> str:
    """The quota scope's resource part for tool calls to ``server_key`` (never a binding's key)."""
    return f"MCPServer:{server_key}"
