"""MCPServer: an MCP tool server served through the gateway at /mcp, as a typed spec.

``parse_mcp_server`` turns an MCPServer object into a frozen ``McpServerSpec`` or raises
``SpecError`` (its ``reason`` becomes the status condition's). The CRD
(``deploy/crds/mcpservers.yaml``) is the list of fields: ``python -m controller.mcp_servers``
regenerates ``controller/mcp_server_fields.py`` from it, and a unit test fails when they differ.

What the spec says, and who enforces it:

* ``url``: the server's streamable HTTP endpoint. Envoy's ``mcp_router`` reaches it through a
  cluster of its own (``controller.mcp_render``).
* ``toolPrefix``: its tools are listed and called as ``<prefix>__<tool>`` (``mcp_router``'s
  delimiter), so several servers' tools cannot collide under one endpoint.
* ``credentialsRef``/``credentialsHeader``: a Secret value sent to the server, never to the client
  (extproc hands it to the server's cluster, which strips every other server's).
* ``tenants``, ``tools``: who reaches the server, and which of its tools each may call (extproc).
* ``quotas``: tool calls per window and tenant, by the binding quota machinery (extproc).
"""

from __future__ import annotations

import re
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from controller.fields import Tree, crd_spec_tree, unknown_fields
from controller.models import Endpoint, SecretRef, parse_endpoint
from controller.models import _secret_ref as parse_secret_ref
from controller.models import _tenants as parse_tenants
from controller.quota_specs import QuotasSpec, parse_quotas, parse_tenant
from controller.spec_parsing import SpecError, parse_duration, reserved_address
from controller.spec_parsing import as_dict as _dict
from controller.spec_parsing import as_list as _list
from crdgol import tenancy

KIND = "MCPServer"
_NAME = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$")
# DNS-label-like and without "__", so "<prefix>__<tool>" splits at its first "__" unambiguously.
_PREFIX = re.compile(r"^[a-z0-9]([a-z0-9-]{0,30}[a-z0-9])?$")
_HEADER = re.compile(r"^[A-Za-z0-9][A-Za-z0-9-]{0,127}$")
# MCP tool names: the spec's recommended alphabet (letters, digits, _ - .), 1-128 characters.
_TOOL = re.compile(r"^[A-Za-z0-9_.-]{1,128}$")
ALL_TOOLS = "*"
# Headers a credential may not be sent in: hop-by-hop, routing, or the gateway's own.
_RESERVED_HEADERS = frozenset({"host", "content-length", "content-type", "transfer-encoding", "connection", "mcp-session-id"})


@dataclass(frozen=True, slots=True)
class McpServerSpec:
    namespace: str
    name: str
    generation: int
    endpoint: Endpoint
    path: str  # the MCP endpoint's path on the host ("/mcp")
    prefix: str
    credentials: SecretRef | None
    credentials_header: str  # lower-case
    # Qualified tenant patterns (crdgol.tenancy) that reach the server at all.
    tenants: tuple[str, ...]
    default_tools: tuple[str, ...]
    tenant_tools: tuple[tuple[str, tuple[str, ...]], ...]  # by qualified tenant
    quotas: QuotasSpec
    timeout: float

    @property
    def key(self) -> str:
        return f"{self.namespace}/{self.name}"


def _tools(raw: object, what: str) -> tuple[str, ...]:
    names = []
    for i, t in enumerate(_list(raw, what)):
        name = str(t)
        if name != ALL_TOOLS and not _TOOL.fullmatch(name):
            raise SpecError("InvalidTools", f"{what}[{i}]: {name!r} is not a tool name (letters, digits, _ - ., at most 128) or \"*\"")
        names.append(name)
    return tuple(sorted(set(names)))


def _check_quotas(quotas: QuotasSpec) -> QuotasSpec:
    rules = ([quotas.default] if quotas.default else []) + [q for _, q in quotas.tenants]
    if any(lim.metric != "requests" for q in rules for lim in q.limits):
        raise SpecError("InvalidQuota", "spec.quotas: a tool call has no tokens or price: only requests limits apply")
    return quotas


def parse_mcp_server(obj: dict[str, Any]) -> McpServerSpec:
    """The typed spec of an MCPServer object, or ``SpecError`` saying what to fix (never another
    exception: one bad resource must not stop the controller)."""
    try:
        return _parse(obj)
    except SpecError:
        raise
    except (TypeError, ValueError, OverflowError, AttributeError, KeyError) as exc:
        raise SpecError(
            "InvalidSpec", f"a field has a value of the wrong type or out of range ({type(exc).__name__}); check it against the CRD"
        ) from None


def mcp_server_problems(obj: dict[str, Any]) -> list[str]:
    """Unknown fields of an MCPServer object (``metadata`` and ``status`` are not checked)."""
    from controller.mcp_server_fields import MCP_SERVER_SPEC

    top: Tree = {"apiVersion": None, "kind": None, "metadata": None, "spec": MCP_SERVER_SPEC, "status": None}
    return unknown_fields(obj, top, "")


def _parse(obj: dict[str, Any]) -> McpServerSpec:
    unknown = mcp_server_problems(obj)
    if unknown:
        more = f" (and {len(unknown) - 3} more)" if len(unknown) > 3 else ""
        raise SpecError("UnknownField", "; ".join(unknown[:3]) + more)
    meta = _dict(obj.get("metadata"), "metadata")
    name = str(meta.get("name") or "")
    namespace = str(meta.get("namespace") or "default")
    if not _NAME.fullmatch(name):
        raise SpecError("InvalidSpec", f"metadata.name: {name!r} must be a DNS label")
    if not tenancy.valid_namespace(namespace):
        raise SpecError("InvalidSpec", f"metadata.namespace: {namespace!r} must be a DNS label")
    spec = _dict(obj.get("spec"), "spec")
    endpoint = parse_endpoint(spec.get("url"), "spec.url")
    reserved = reserved_address(endpoint.host, loopback=False)
    if reserved:
        # Its answers reach the caller, path and all: not the cloud metadata service.
        raise SpecError("InvalidEndpoint", f"spec.url: {reserved}")
    # parse_endpoint keeps a path prefix for the model APIs (and drops a trailing /v1): the MCP
    # endpoint is the URL's whole path.
    path = "/" + str(spec.get("url")).split("://", 1)[1].partition("/")[2].rstrip("/")
    prefix = str(spec.get("toolPrefix") or "")
    if not _PREFIX.fullmatch(prefix) or "--" in prefix:
        raise SpecError("InvalidToolPrefix", f"spec.toolPrefix: {prefix!r} must be 1-32 lowercase letters, digits and single '-'")
    header = str(spec.get("credentialsHeader") or "authorization").lower()
    if not _HEADER.fullmatch(header) or header in _RESERVED_HEADERS or header.startswith("x-crdgol-"):
        raise SpecError("InvalidSpec", f"spec.credentialsHeader: {header!r} cannot carry a credential")
    tools = _dict(spec.get("tools"), "spec.tools")
    tenant_tools: dict[str, tuple[str, ...]] = {}
    for t, v in _dict(tools.get("tenants"), "spec.tools.tenants").items():
        what = f"spec.tools.tenants.{t}"
        key = parse_tenant(tenancy.parse_key, t, namespace, what)
        if key in tenant_tools:
            raise SpecError("InvalidTenant", f"{what}: the tenant {key} has two entries")
        tenant_tools[key] = _tools(v, what)
    default_tools = _tools(tools["default"], "spec.tools.default") if "default" in tools else (ALL_TOOLS,)
    return McpServerSpec(
        namespace=namespace,
        name=name,
        generation=int(meta.get("generation") or 1),
        endpoint=endpoint,
        path=path if path != "/" else "/mcp",
        prefix=prefix,
        credentials=parse_secret_ref(spec.get("credentialsRef"), namespace, "spec.credentialsRef"),
        credentials_header=header,
        tenants=parse_tenants(spec.get("tenants"), namespace),
        default_tools=default_tools,
        tenant_tools=tuple(sorted(tenant_tools.items())),
        quotas=_check_quotas(parse_quotas(spec.get("quotas"), namespace)),
        timeout=parse_duration(spec.get("timeout", "300s"), "spec.timeout"),
    )


# --- the field list, generated from the CRD -----------------------------------------------------

CRD = Path(__file__).resolve().parent.parent / "deploy" / "crds" / "mcpservers.yaml"


def fields_module_text(crd: dict[str, Any]) -> str:
    from controller.fields import _literal

    return (
        '"""Generated from deploy/crds/mcpservers.yaml by ``python -m controller.mcp_servers``: do not edit."""\n\n'
        "from __future__ import annotations\n\n"
        "from controller.fields import Tree\n\n"
        f"MCP_SERVER_SPEC: Tree = {_literal(crd_spec_tree(crd))}\n"
    )


def main() -> int:
    import yaml

    out = Path(__file__).resolve().parent / "mcp_server_fields.py"
    out.write_text(fields_module_text(yaml.safe_load(CRD.read_text())))
    print(f"wrote {out}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
