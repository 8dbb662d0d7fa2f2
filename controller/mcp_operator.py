"""MCPServers on a cluster: kopf handlers that feed ``ControllerState.mcp``, and their status.

Accepted the way bindings are (``controller.operator``): create, update and resume upsert the
object and publish; the watch's ``DELETED`` event removes it; no finalizer. After each publish,
every MCPServer whose status changed is patched (a failed write is retried by the operator's
periodic sweep, which publishes again).
"""

from __future__ import annotations

import copy
import logging
import time
from collections.abc import Awaitable, Callable
from typing import Any

import aiohttp
import kopf

from controller.mcp_status import McpServerStatus
from controller.models import GROUP, VERSION
from controller.state import ControllerState

log = logging.getLogger(__name__)

PLURAL = "mcpservers"

Request = Callable[..., Awaitable[tuple[int, Any]]]


class McpServerHandlers:
    def __init__(self, state: ControllerState, request: Request, publish: Callable[[], Awaitable[None]]) -> None:
        self.state = state
        self.request = request
        self.publish = publish
        self._known: set[str] = set()
        self._written: dict[str, McpServerStatus] = {}

    async def changed(self, body: kopf.Body) -> None:
        obj = copy.deepcopy({k: body[k] for k in body})
        meta = obj.get("metadata") or {}
        self._known.add(f"{meta.get('namespace') or 'default'}/{meta.get('name')}")
        self.state.mcp.upsert(obj)
        await self._read_secret(obj)
        await self.publish()

    async def _read_secret(self, obj: dict[str, Any]) -> None:
        """Read the credential Secret by name: one that existed before this MCPServer was filtered
        out of the (filtered) Secret watch, whose later events do pass now."""
        meta, spec = obj.get("metadata") or {}, obj.get("spec") or {}
        ref = spec.get("credentialsRef") if isinstance(spec, dict) else None
        if not isinstance(ref, dict) or not ref.get("name"):
            return
        namespace = str(ref.get("namespace") or meta.get("namespace") or "default")
        try:
            code, secret = await self.request("GET", f"/api/v1/namespaces/{namespace}/secrets/{ref['name']}")
        except (aiohttp.ClientError, TimeoutError, RuntimeError) as exc:
            log.warning("cannot read Secret %s/%s: %s", namespace, ref["name"], exc)
            return
        if code == 200 and isinstance(secret, dict):
            self.state.upsert_secret(secret)

    async def gone(self, namespace: str, name: str) -> None:
        self.state.mcp.delete(namespace, name)
        self._known.discard(f"{namespace}/{name}")
        self._written.pop(f"{namespace}/{name}", None)
        await self.publish()

    async def sync(self) -> None:
        """Patch the status of every MCPServer whose status changed since it was last written."""
        result = self.state.result
        now = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
        for key, status in self.state.mcp.statuses(result.mcp if result else None, self.state.version).items():
            if key not in self._known or self._written.get(key) == status:
                continue
            namespace, name = key.split("/", 1)
            path = f"/apis/{GROUP}/{VERSION}/namespaces/{namespace}/{PLURAL}/{name}/status"
            try:
                code, _ = await self.request("PATCH", path, {"status": status.to_k8s(now)}, "application/merge-patch+json")
            except (aiohttp.ClientError, TimeoutError, RuntimeError) as exc:
                log.warning("cannot write status of MCPServer %s: %s", key, exc)
                continue
            if code < 300 or code == 404:
                self._written[key] = status
            else:
                log.warning("cannot write status of MCPServer %s: HTTP %d", key, code)

    def register(self, registry: kopf.OperatorRegistry) -> None:
        res = (GROUP, VERSION, PLURAL)

        @kopf.on.resume(*res, registry=registry, id="mcpserver-resume")
        async def resumed(body: kopf.Body, **_: Any) -> None:
            await self.changed(body)

        @kopf.on.create(*res, registry=registry, id="mcpserver-create")
        async def created(body: kopf.Body, **_: Any) -> None:
            await self.changed(body)

        @kopf.on.update(*res, registry=registry, id="mcpserver-update")
        async def updated(body: kopf.Body, **_: Any) -> None:
            await self.changed(body)

        @kopf.on.event(*res, registry=registry, id="mcpserver-gone")
        async def deleted(event: kopf.RawEvent, name: str, namespace: str | None, **_: Any) -> None:
            if event.get("type") == "DELETED":
                await self.gone(namespace or "default", name)
