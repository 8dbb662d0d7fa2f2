"""MCP tool servers as extproc enforces them: compiled once per policy snapshot.

``McpPolicy.view_for`` finds the federated view a caller reaches (one per namespace, see
``controller.mcp_render``); ``View.tool`` resolves a federated tool name ``<prefix>__<tool>`` to
its server; ``ToolServer.visible_to`` and ``may_call`` are the permission checks. Pure look-ups.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from crdgol import tenancy
from crdgol.mcp_contract import RESOURCE_DELIMITER, TOOL_DELIMITER
from crdgol.pb import policy_pb2 as pb
from extproc.policy import QuotaPolicy, quota_policy

ALL_TOOLS = "*"


@dataclass(frozen=True, slots=True)
class ToolServer:
    key: str  # "namespace/name" of the MCPServer
    prefix: str
    tenants: frozenset[str]  # qualified patterns
    default_tools: frozenset[str]
    tenant_tools: dict[str, frozenset[str]]
    quotas: QuotaPolicy
    # The header the server expects its credential in, and the value ("" for none).
    credential_header: str
    credential_value: str = field(repr=False)
    # Tool names allowed by name somewhere in the spec: bounded, so fit for metric labels.
    named_tools: frozenset[str] = frozenset()
    # The server's MCP endpoint, where extproc ends sessions (``extproc.mcp_sessions``).
    url: str = ""

    def __repr__(self) -> str:  # never print the credential
        return f"ToolServer(key={self.key!r}, prefix={self.prefix!r})"

    def visible_to(self, tenant: str) -> bool:
        return tenancy.granted(self.tenants, tenant)

    def tools_for(self, tenant: str) -> frozenset[str]:
        return self.tenant_tools.get(tenant, self.default_tools)

    def may_call(self, tenant: str, tool: str) -> bool:
        allowed = self.tools_for(tenant)
        return ALL_TOOLS in allowed or tool in allowed


@dataclass(frozen=True, slots=True)
class View:
    namespace: str
    route: str
    by_prefix: dict[str, ToolServer]

    def tool(self, federated: str) -> tuple[ToolServer, str] | None:
        """The server and its own tool (or prompt) name for ``<prefix>__<tool>``; None when no
        server has it."""
        prefix, sep, tool = federated.partition(TOOL_DELIMITER)
        server = self.by_prefix.get(prefix) if sep and tool else None
        return (server, tool) if server is not None else None

    def resource(self, federated: str) -> tuple[ToolServer, str] | None:
        """The server and its own URI (or URI template) for ``<prefix>+<scheme>://<rest>``, as
        Envoy's mcp_router names resources; None when no server has it."""
        scheme, sep, rest = federated.partition("://")
        prefix, plus, own_scheme = scheme.partition(RESOURCE_DELIMITER)
        server = self.by_prefix.get(prefix) if sep and plus and own_scheme else None
        return (server, f"{own_scheme}://{rest}") if server is not None else None


@dataclass(frozen=True, slots=True)
class McpPolicy:
    views: dict[str, View] = field(default_factory=dict)  # by namespace
    servers: dict[str, ToolServer] = field(default_factory=dict)  # by key

    def view_for(self, tenants: tuple[str, ...]) -> tuple[View | None, str, bool]:
        """The view a caller acting as one of ``tenants`` reaches, as which tenant, and whether it
        is ambiguous (its tenants live in several namespaces that each have a view: refused, as a
        model reached through two namespaces is)."""
        found = [(self.views[ns], t) for t in tenants if (ns := tenancy.namespace_of(t)) in self.views]
        if not found:
            return None, "", False
        if len({v.namespace for v, _ in found}) > 1:
            return None, "", True
        return found[0][0], found[0][1], False


def compile_mcp(snap: pb.PolicySnapshot) -> McpPolicy:
    """Compile the snapshot's MCP tool servers and views. Raises ValueError when inconsistent."""
    servers: dict[str, ToolServer] = {}
    for s in snap.mcp_tool_servers:
        if s.key in servers:
            raise ValueError(f"MCP server {s.key} appears twice")
        tenant_tools = {t: frozenset(v.tools) for t, v in s.tenant_tools.items()}
        named = set(s.default_tools).union(*tenant_tools.values()) - {ALL_TOOLS}
        servers[s.key] = ToolServer(
            key=s.key,
            prefix=s.prefix,
            tenants=frozenset(s.tenants),
            default_tools=frozenset(s.default_tools),
            tenant_tools=tenant_tools,
            quotas=quota_policy(s.quotas),
            credential_header=s.credential_header,
            credential_value=s.credential_value,
            named_tools=frozenset(named),
            url=s.url,
        )
    views: dict[str, View] = {}
    for v in snap.mcp_tool_views:
        members: dict[str, ToolServer] = {}
        for key in v.servers:
            server = servers.get(key)
            if server is None:
                raise ValueError(f"MCP view of {v.namespace} names an unknown server {key}")
            if server.prefix in members:
                raise ValueError(f"MCP view of {v.namespace} has two servers with the prefix {server.prefix!r}")
            members[server.prefix] = server
        views[v.namespace] = View(v.namespace, v.route, members)
    return McpPolicy(views, servers)
