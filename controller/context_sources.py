"""Context read from MCP servers: the typed spec of ``spec.context.mcpServers`` and ``mcpSources``.

``parse_mcp`` turns the two lists of a binding's context into frozen specs, or raises
``SpecError`` naming the field to fix (it becomes the binding's status condition). Checks:

* a server has a DNS-label ``name`` (unique), an ``http(s)`` ``url`` with no credentials, query
  or fragment in it and not a link-local address (cloud metadata services live there, and what a
  server returns reaches the model and so the caller), an optional ``credentialsRef`` sent in
  ``credentialsHeader`` (``authorization`` by default, as ``Bearer <value>``), a ``timeout``
  (default 1s, at most 1.5s: the read happens inside extproc's 2s answer to Envoy) and a ``cacheTTL`` (default 60s, ``0s`` for none, at most 24h);
* a source names a declared ``server`` and exactly one of ``resource`` (a URI template) or
  ``prompt`` (a name, with ``arguments`` templates); its templates use the system prompt's
  variables plus ``${session}``; ``onFailure`` is ``skip`` (default) or ``refuse``; ``maxTokens``
  caps what it injects (default 2000).

The credential is resolved by the render into the policy snapshot only.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from urllib.parse import urlsplit

from controller.spec_parsing import SpecError, parse_duration, reserved_address
from controller.spec_parsing import as_dict as _dict
from controller.spec_parsing import as_list as _list
from controller.spec_parsing import int_in as _int

__all__ = ["McpServerSpec", "McpSourceSpec", "McpSpec", "check_variables", "parse_mcp"]

FAIL_POLICIES = ("skip", "refuse")
DEFAULT_TIMEOUT = 1.0
MAX_TIMEOUT = 1.5
DEFAULT_CACHE_TTL = 60.0
DEFAULT_SOURCE_TOKENS = 2000
_NAME = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$")
_HEADER = re.compile(r"^[A-Za-z0-9-]{1,64}$")
# Headers the HTTP client sets itself, or that would change how the request is framed.
_RESERVED_HEADERS = frozenset(
    {"host", "content-length", "content-type", "transfer-encoding", "connection", "accept", "mcp-session-id", "mcp-protocol-version"}
)
_VAR = re.compile(r"\$\{([^}]*)\}")
_ZERO = re.compile(r"^0+(\.0+)?(ms|s|m|h)?$")
_KNOWN_VAR = re.compile(r"(tenant|date|model|session|user\.[A-Za-z0-9_-]+)(:-.*)?", re.S)


@dataclass(frozen=True, slots=True)
class McpCredentialRef:
    name: str
    key: str
    namespace: str


@dataclass(frozen=True, slots=True)
class McpServerSpec:
    name: str
    url: str
    host: str
    port: int
    credentials: McpCredentialRef | None = None
    credentials_header: str = "authorization"
    timeout: float = DEFAULT_TIMEOUT
    cache_ttl: float = DEFAULT_CACHE_TTL


@dataclass(frozen=True, slots=True)
class McpSourceSpec:
    server: str
    title: str
    resource: str = ""
    prompt: str = ""
    arguments: tuple[tuple[str, str], ...] = ()
    refuse_on_failure: bool = False
    max_tokens: int = DEFAULT_SOURCE_TOKENS


@dataclass(frozen=True, slots=True)
class McpSpec:
    servers: tuple[McpServerSpec, ...] = ()
    sources: tuple[McpSourceSpec, ...] = field(default_factory=tuple)


def check_variables(template: str, what: str) -> None:
    """Refuse a source template with an unknown variable or an unterminated ``${``."""
    for m in _VAR.finditer(template):
        if not _KNOWN_VAR.fullmatch(m.group(1)):
            raise SpecError(
                "InvalidContext",
                f"{what}: unknown variable ${{{m.group(1)}}}; use ${{tenant}}, ${{date}}, ${{model}}, ${{session}} or ${{user.<field>}}",
            )
    if template.count("${") != len(_VAR.findall(template)):
        raise SpecError("InvalidContext", f"{what}: an unterminated ${{ (write $$ for a literal $)")


def _url(raw: object, what: str) -> tuple[str, str, int]:
    text = str(raw or "")
    shown = re.sub(r"//[^/@]*@", "//***@", text)
    try:
        parts = urlsplit(text)
        port = parts.port
    except ValueError:
        raise SpecError("InvalidContext", f"{what}: {shown!r} is not a valid URL") from None
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise SpecError("InvalidContext", f"{what}: {shown!r} is not an http(s) URL")
    if parts.username or parts.password or parts.query or parts.fragment:
        raise SpecError("InvalidContext", f"{what}: put credentials in credentialsRef, not in the URL; no query or fragment")
    if any(c.isspace() or ord(c) < 0x20 or c == "\x7f" for c in parts.path):
        raise SpecError("InvalidContext", f"{what}: the path may not hold spaces or control characters")
    reserved = reserved_address(parts.hostname, loopback=False)
    if reserved:
        raise SpecError("InvalidContext", f"{what}: {reserved}")
    return text, parts.hostname, port or (443 if parts.scheme == "https" else 80)


def _server(raw: object, i: int, namespace: str) -> McpServerSpec:
    what = f"spec.context.mcpServers[{i}]"
    s = _dict(raw, what)
    name = str(s.get("name") or "")
    if not _NAME.fullmatch(name):
        raise SpecError("InvalidContext", f"{what}.name: {name!r} must be a DNS label")
    url, host, port = _url(s.get("url"), f"{what}.url")
    ref = s.get("credentialsRef")
    credentials = None
    if ref is not None:
        r = _dict(ref, f"{what}.credentialsRef")
        if not r.get("name") or not r.get("key"):
            raise SpecError("InvalidSecretRef", f"{what}.credentialsRef: needs 'name' and 'key'")
        credentials = McpCredentialRef(str(r["name"]), str(r["key"]), str(r.get("namespace") or namespace))
    header = str(s.get("credentialsHeader") or "authorization").lower()
    if not _HEADER.fullmatch(header) or header in _RESERVED_HEADERS:
        raise SpecError("InvalidContext", f"{what}.credentialsHeader: {header!r} is not a header the credential may go in")
    timeout = parse_duration(s.get("timeout", "1s"), f"{what}.timeout")
    if not 0 < timeout <= MAX_TIMEOUT:
        # The read happens while Envoy waits for extproc's answer to the request body, which it
        # gives up on after 2s (then 503 policy_unavailable): a read must end well before.
        raise SpecError("InvalidContext", f"{what}.timeout: must be more than 0 and at most 1.5s (extproc answers Envoy within 2s)")
    raw_ttl = s.get("cacheTTL", "60s")
    ttl = 0.0 if _ZERO.fullmatch(str(raw_ttl).strip()) else parse_duration(raw_ttl, f"{what}.cacheTTL")
    if ttl > 86400:
        raise SpecError("InvalidContext", f"{what}.cacheTTL: at most 24h")
    return McpServerSpec(name, url, host, port, credentials, header, timeout, ttl)


def _source(raw: object, i: int, servers: frozenset[str]) -> McpSourceSpec:
    what = f"spec.context.mcpSources[{i}]"
    s = _dict(raw, what)
    server = str(s.get("server") or "")
    if server not in servers:
        known = ", ".join(sorted(servers)) or "none are declared"
        raise SpecError("InvalidContext", f"{what}.server: {server!r} is not in spec.context.mcpServers ({known})")
    resource = str(s.get("resource") or "")
    prompt = _dict(s.get("prompt"), f"{what}.prompt")
    if bool(resource) == bool(prompt):
        raise SpecError("InvalidContext", f"{what}: give exactly one of resource or prompt")
    arguments: list[tuple[str, str]] = []
    name = ""
    if resource:
        check_variables(resource, f"{what}.resource")
    else:
        name = str(prompt.get("name") or "")
        if not name:
            raise SpecError("InvalidContext", f"{what}.prompt.name is required")
        for k, v in _dict(prompt.get("arguments"), f"{what}.prompt.arguments").items():
            check_variables(str(v), f"{what}.prompt.arguments.{k}")
            arguments.append((str(k), str(v)))
    fail = str(s.get("onFailure") or "skip")
    if fail not in FAIL_POLICIES:
        raise SpecError("InvalidContext", f"{what}.onFailure: must be skip or refuse, got {fail!r}")
    return McpSourceSpec(
        server=server,
        title=str(s.get("title") or resource or f"prompt {name}"),
        resource=resource,
        prompt=name,
        arguments=tuple(sorted(arguments)),
        refuse_on_failure=fail == "refuse",
        max_tokens=_int(s.get("maxTokens", DEFAULT_SOURCE_TOKENS), f"{what}.maxTokens", 1, 100_000),
    )


def parse_mcp(context: dict[str, object], namespace: str) -> McpSpec:
    """The MCP servers and sources of ``spec.context`` (both empty when none are given)."""
    servers = tuple(_server(s, i, namespace) for i, s in enumerate(_list(context.get("mcpServers"), "spec.context.mcpServers")))
    names = [s.name for s in servers]
    for i, n in enumerate(names):
        if n in names[:i]:
            raise SpecError("InvalidContext", f"spec.context.mcpServers[{i}].name: {n!r} is declared twice")
    known = frozenset(names)
    sources = tuple(_source(s, i, known) for i, s in enumerate(_list(context.get("mcpSources"), "spec.context.mcpSources")))
    return McpSpec(servers, sources)
