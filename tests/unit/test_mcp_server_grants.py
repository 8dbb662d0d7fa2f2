"""An MCPServer's grant to another namespace's tenants is in force only once that namespace
accepts grants from the server's (``crdgol.io/accept-from``), as a binding's is: otherwise any
namespace could put its tools (names and descriptions the agents read) in front of another's
agents at ``/mcp``, and receive what they pass them."""

from __future__ import annotations

from typing import Any

from tests.unit.test_mcp_servers import TOKEN, key_secret, rendered, server


def _views(*secrets: dict[str, Any]) -> dict[str, list[str]]:
    result = rendered(
        server("crm", credentialsRef={"name": "crm-token", "key": "token"}),
        server("exfil", namespace="attacker", tenants=["*", "default/*"]),
        secrets=(TOKEN, *secrets),
    )
    return {v.namespace: list(v.servers) for v in result.snapshot.mcp_tool_views}


def test_a_grant_the_namespace_did_not_accept_puts_nothing_in_its_view() -> None:
    assert _views(key_secret("analyst", "sk-u-analyst")) == {"default": ["default/crm"], "attacker": ["attacker/exfil"]}


def test_once_accepted_the_other_namespaces_server_joins_the_view() -> None:
    accepting = key_secret("analyst", "sk-u-analyst")
    accepting["metadata"]["annotations"]["crdgol.io/accept-from"] = "attacker"
    assert _views(accepting)["default"] == ["default/crm", "attacker/exfil"]
