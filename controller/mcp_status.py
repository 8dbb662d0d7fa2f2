"""The controller's MCPServers: last good spec per resource, and the status each one gets.

The same rules as bindings (``controller.state``): a new spec that does not parse is refused
(``Accepted=False``) while the last good one keeps serving; one that parses but cannot be served
(a missing Secret, a prefix already taken in its namespace) is ``Ready=False`` with the reason.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any

from controller.mcp_render import McpRender
from controller.mcp_servers import McpServerSpec, parse_mcp_server
from controller.spec_parsing import SpecError

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class McpServerStatus:
    key: str
    observed_generation: int
    # (type, status, reason, message)
    conditions: tuple[tuple[str, str, str, str], ...]
    prefix: str = ""
    views: tuple[str, ...] = ()

    @property
    def ready(self) -> bool:
        return any(t == "Ready" and s == "True" for t, s, _, _ in self.conditions)

    def to_k8s(self, now: str) -> dict[str, Any]:
        return {
            "observedGeneration": self.observed_generation,
            "toolPrefix": self.prefix,
            "views": list(self.views),
            "conditions": [
                {"type": t, "status": s, "reason": r, "message": m, "observedGeneration": self.observed_generation, "lastTransitionTime": now}
                for t, s, r, m in self.conditions
            ],
        }


@dataclass
class _Entry:
    generation: int
    good: McpServerSpec | None
    refused: SpecError | None = None
    source: dict[str, Any] | None = None


@dataclass
class McpServerBook:
    _entries: dict[str, _Entry] = field(default_factory=dict)

    def upsert(self, obj: dict[str, Any]) -> None:
        meta = obj.get("metadata") or {}
        key = f"{meta.get('namespace') or 'default'}/{meta.get('name')}"
        generation = int(meta.get("generation") or 1)
        prev = self._entries.get(key)
        if prev is not None and prev.source == obj:
            return
        try:
            spec = parse_mcp_server(obj)
        except SpecError as exc:
            log.warning("refusing MCPServer %s generation %d: %s", key, generation, exc.message)
            self._entries[key] = _Entry(generation, prev.good if prev else None, exc, source=obj)
            return
        self._entries[key] = _Entry(generation, spec, source=obj)

    def delete(self, namespace: str, name: str) -> None:
        self._entries.pop(f"{namespace}/{name}", None)

    def replace_all(self, objs: list[dict[str, Any]]) -> None:
        """Make the book exactly these MCPServer objects (file mode: the folder is the truth)."""
        keep = set()
        for obj in objs:
            self.upsert(obj)
            meta = obj.get("metadata") or {}
            keep.add(f"{meta.get('namespace') or 'default'}/{meta.get('name')}")
        for key in set(self._entries) - keep:
            del self._entries[key]

    def keys(self) -> set[str]:
        return set(self._entries)

    def specs(self) -> list[McpServerSpec]:
        return [e.good for e in self._entries.values() if e.good is not None]

    def references(self, namespace: str, name: str) -> list[str]:
        """MCPServers whose credentialsRef names the Secret ``namespace/name``."""
        return [
            f"MCPServer {key}"
            for key, e in self._entries.items()
            if e.good is not None and e.good.credentials is not None and (e.good.credentials.namespace, e.good.credentials.name) == (namespace, name)
        ]

    def status(self, key: str, render: McpRender | None, version: int) -> McpServerStatus | None:
        entry = self._entries.get(key)
        if entry is None:
            return None
        conditions: list[tuple[str, str, str, str]] = []
        if entry.refused is not None:
            conditions.append(("Accepted", "False", entry.refused.reason, entry.refused.message))
        else:
            conditions.append(("Accepted", "True", "Valid", "the spec is valid"))
        spec = entry.good
        problem = render.problems.get(key) if render is not None else None
        views: tuple[str, ...] = ()
        if spec is None:
            conditions.append(("Ready", "False", "NoValidSpec", "no valid spec has been seen yet"))
        elif problem is not None:
            conditions.append(("Ready", "False", problem.reason, problem.message))
        elif render is not None and key in render.reach:
            views = render.reach[key]
            note = " (an older valid spec; the newest was refused)" if entry.refused else ""
            conditions.append(
                ("Ready", "True", "Served", f"tools served as {spec.prefix}__<tool> at /mcp to tenants of {', '.join(views)} in config version {version}{note}")
            )
        elif render is not None:
            conditions.append(("Ready", "False", "PrefixConflict", f"every namespace it grants already reaches another server with the prefix {spec.prefix!r}"))
        else:
            conditions.append(("Ready", "Unknown", "Pending", "not rendered yet"))
        return McpServerStatus(key, entry.generation, tuple(conditions), spec.prefix if spec else "", views)

    def statuses(self, render: McpRender | None, version: int) -> dict[str, McpServerStatus]:
        out = {}
        for key in sorted(self._entries):
            st = self.status(key, render, version)
            if st is not None:
                out[key] = st
        return out
