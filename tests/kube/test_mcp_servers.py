"""MCPServers on a cluster: accepted by the operator like bindings, with status written back."""

from __future__ import annotations

from typing import Any

from tests.kube.conftest import Cluster

MCPSERVERS = "crdgol.io/v1alpha1/mcpservers"


def mcp_server(name: str, **spec: Any) -> dict[str, Any]:
    return {
        "apiVersion": "crdgol.io/v1alpha1",
        "kind": "MCPServer",
        "metadata": {"name": name, "namespace": "default"},
        "spec": {"url": "http://tools.default.svc:8000/mcp", "toolPrefix": name, **spec},
    }


async def status(cluster: Cluster, name: str) -> dict[str, Any]:
    obj = await cluster.get(MCPSERVERS, "default", name)
    return dict(obj.get("status") or {})


def ready(st: dict[str, Any]) -> dict[str, Any]:
    return next((c for c in st.get("conditions", []) if c["type"] == "Ready"), {})


async def test_an_mcp_server_is_served_its_secret_read_and_its_status_written(cluster: Cluster) -> None:
    # The Secret exists before the MCPServer (filtered out of the Secret watch until then).
    await cluster._call(
        "POST", cluster.path("v1/secrets", "default"),
        json={"apiVersion": "v1", "kind": "Secret", "metadata": {"name": "tools-token", "namespace": "default"}, "stringData": {"token": "tok-1"}},
    )
    await cluster._call("POST", cluster.path(MCPSERVERS, "default"), json=mcp_server("tools", credentialsRef={"name": "tools-token", "key": "token"}))

    async def served() -> dict[str, Any] | None:
        st = await status(cluster, "tools")
        return st if ready(st).get("status") == "True" else None

    st = await cluster.eventually(served, what="MCPServer tools Ready")
    assert st["views"] == ["default"] and st["toolPrefix"] == "tools" and st["observedGeneration"] == 1
    snap = cluster.controller.policy.snapshot
    assert snap is not None
    assert [(s.key, s.credential_value) for s in snap.mcp_tool_servers] == [("default/tools", "Bearer tok-1")]
    # And the SDS secret Envoy's credential injector on the server's cluster reads (over ADS).
    result = cluster.controller.state.result
    assert result is not None
    assert [x["generic_secret"]["secret"]["inline_string"] for x in result.secrets if x["name"] == "crdgol-mcp-credential.default.tools"] == ["Bearer tok-1"]

    # A second server with the same prefix (later by name: the first by name keeps it) is refused
    # with a reason; deleting the first serves it.
    await cluster._call("POST", cluster.path(MCPSERVERS, "default"), json=mcp_server("zeta", toolPrefix="tools"))

    async def conflict() -> bool:
        return ready(await status(cluster, "zeta")).get("reason") == "PrefixConflict"

    await cluster.eventually(conflict, what="PrefixConflict")
    await cluster.delete(MCPSERVERS, "default", "tools")

    async def moved() -> bool:
        snap = cluster.controller.policy.snapshot
        return snap is not None and [s.key for s in snap.mcp_tool_servers] == ["default/zeta"]

    await cluster.eventually(moved, what="the other server served")
