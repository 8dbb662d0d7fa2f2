"""The operator against kmock's Kubernetes emulator: a real HTTP API server on loopback.

kmock's ``KubernetesEmulator`` stores objects and serves list/watch/get/create/patch/delete, but
as plain JSON: it leaves the API server's own bookkeeping to the test. ``ApiServer`` adds the part
the operator relies on — ``metadata.generation`` (bumped when a patch touches ``spec``),
``resourceVersion``, ``uid``, ``generateName`` (kopf's Events), the ``status`` subresource only
changing ``status``, and Secrets' ``stringData`` folded into base64 ``data``. Resource discovery
is declared from ``deploy/crds/*.yaml`` plus the few core resources kopf needs.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import itertools
import threading
import time
import uuid
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import kmock
import kopf
import pytest
import yaml

from controller.app import Controller, ControllerSettings
from controller.operator import operator_main
from controller.workflow.cluster import ClusterWorkflowSettings
from crdgol.stack import free_port

ROOT = Path(__file__).resolve().parents[2]
BINDINGS = "crdgol.io/v1alpha1/aimodelbindings"
SECRETS = "v1/secrets"
SPECS = "crdgol.io/v1alpha1/workflowspecs"
RUNS = "crdgol.io/v1alpha1/workflowruns"
JOBS = "batch/v1/jobs"
PODS = "v1/pods"
RESOURCES = {"AIModelBinding": BINDINGS, "Secret": SECRETS, "WorkflowSpec": SPECS, "WorkflowRun": RUNS, "Job": JOBS, "Pod": PODS}
ALL_VERBS = ["create", "delete", "deletecollection", "get", "list", "patch", "update", "watch"]


class ApiServer(kmock.KubernetesEmulator):
    """kmock's emulator plus the API server's bookkeeping on writes."""

    _versions = itertools.count(1)

    async def _handle(self, request: kmock.Request) -> Any:
        if request.resource is not None and isinstance(request.data, dict):
            self._admit(request)
        return await super()._handle(request)

    def _admit(self, request: kmock.Request) -> None:
        data: dict[str, Any] = request.data
        if request.action == kmock.action.CREATE:
            meta = data.setdefault("metadata", {})
            if not meta.get("name") and meta.get("generateName"):
                meta["name"] = f"{meta['generateName']}{uuid.uuid4().hex[:8]}"
            meta.setdefault("uid", str(uuid.uuid4()))
            meta.setdefault("creationTimestamp", time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()))
            meta["generation"] = 1
            meta["resourceVersion"] = str(next(self._versions))
            if request.resource == SECRETS and "stringData" in data:
                strings = data.pop("stringData") or {}
                encoded = {k: base64.b64encode(str(v).encode()).decode() for k, v in strings.items()}
                data["data"] = {**(data.get("data") or {}), **encoded}
        elif request.action == kmock.action.UPDATE:
            if request.subresource == "status":
                for key in [k for k in data if k != "status"]:
                    del data[key]
            else:
                data.pop("status", None)  # ignored on the main resource (status subresource)
                if "spec" in data:
                    current = self.objects[request.resource, request.namespace, request.name]
                    generation = int(current.get("metadata", {}).get("generation") or 1)
                    data.setdefault("metadata", {})["generation"] = generation + 1
            data.setdefault("metadata", {})["resourceVersion"] = str(next(self._versions))


def declare_resources(server: ApiServer) -> None:
    for doc in (ROOT / "deploy" / "crds").glob("*.yaml"):
        for crd in yaml.safe_load_all(doc.read_text()):
            spec = crd["spec"]
            for version in spec["versions"]:
                server.resources[f"{spec['group']}/{version['name']}/{spec['names']['plural']}"] = (
                    kmock.ResourceInfo(
                        kind=spec["names"]["kind"],
                        singular=spec["names"]["singular"],
                        namespaced=spec["scope"] == "Namespaced",
                        verbs=ALL_VERBS,
                        shortnames=spec["names"].get("shortNames", []),
                        categories=spec["names"].get("categories", []),
                        subresources=set(version.get("subresources") or {}),
                    )
                )
    core = {"secrets": "Secret", "events": "Event", "namespaces": "Namespace", "pods": "Pod"}
    for plural, kind in core.items():
        server.resources[f"v1/{plural}"] = kmock.ResourceInfo(
            kind=kind, singular=kind.lower(), namespaced=plural != "namespaces", verbs=ALL_VERBS
        )
    server.resources[JOBS] = kmock.ResourceInfo(kind="Job", singular="job", namespaced=True, verbs=ALL_VERBS, subresources={"status"})
    server.resources["apiextensions.k8s.io/v1/customresourcedefinitions"] = kmock.ResourceInfo(
        kind="CustomResourceDefinition", singular="customresourcedefinition", namespaced=False, verbs=ALL_VERBS
    )


@dataclass
class Cluster:
    """The emulated API server as a test sees it: kubectl-like calls and polling."""

    server: ApiServer
    controller: Controller

    @staticmethod
    def path(resource: str, namespace: str, name: str = "") -> str:
        group_version, plural = resource.rsplit("/", 1)
        base = "/api/v1" if group_version == "v1" else f"/apis/{group_version}"
        return f"{base}/namespaces/{namespace}/{plural}" + (f"/{name}" if name else "")

    async def _call(self, method: str, path: str, **kwargs: Any) -> Any:
        async with self.server.request(method, path, **kwargs) as rsp:
            body = await rsp.json(content_type=None)
            assert rsp.status < 300, (method, path, rsp.status, body)
            return body

    async def create(self, obj: dict[str, Any]) -> Any:
        resource = RESOURCES[obj["kind"]]
        return await self._call("POST", self.path(resource, obj["metadata"].get("namespace") or "default"), json=obj)

    async def patch_status(self, resource: str, namespace: str, name: str, status: dict[str, Any]) -> Any:
        headers = {"Content-Type": "application/merge-patch+json"}
        return await self._call("PATCH", self.path(resource, namespace, name) + "/status", json={"status": status}, headers=headers)

    def history(self, resource: str, namespace: str, name: str) -> list[dict[str, Any]]:
        """Every version the API server held of one object, oldest first."""
        obj = self.server.objects[resource, namespace, name]
        return [dict(v.raw) for v in obj.history if v is not None]

    async def patch(self, resource: str, namespace: str, name: str, patch: dict[str, Any]) -> Any:
        headers = {"Content-Type": "application/merge-patch+json"}
        return await self._call("PATCH", self.path(resource, namespace, name), json=patch, headers=headers)

    async def delete(self, resource: str, namespace: str, name: str) -> Any:
        return await self._call("DELETE", self.path(resource, namespace, name))

    async def get(self, resource: str, namespace: str, name: str) -> Any:
        return await self._call("GET", self.path(resource, namespace, name))

    async def eventually(self, check: Callable[[], Any], timeout: float = 15.0, what: str = "") -> Any:
        """Poll ``check`` (sync or async) until it returns something truthy."""
        deadline = asyncio.get_running_loop().time() + timeout
        last: Any = None
        while True:
            last = check()
            if asyncio.iscoroutine(last):
                last = await last
            if last:
                return last
            if asyncio.get_running_loop().time() > deadline:
                raise AssertionError(f"timed out after {timeout}s waiting for {what or check}")
            await asyncio.sleep(0.05)

    async def condition(self, name: str, type_: str, namespace: str = "default") -> dict[str, Any]:
        obj = await self.get(BINDINGS, namespace, name)
        for cond in (obj.get("status") or {}).get("conditions", []):
            if cond["type"] == type_:
                return dict(cond)
        return {}

    async def wait_condition(
        self, name: str, type_: str, status: str, reason: str = "", namespace: str = "default", timeout: float = 5.0
    ) -> dict[str, Any]:
        async def check() -> dict[str, Any] | None:
            cond = await self.condition(name, type_, namespace)
            if cond.get("status") == status and (not reason or cond.get("reason") == reason):
                return cond
            return None

        result: dict[str, Any] = await self.eventually(check, timeout, f"{name} {type_}={status} {reason}")
        return result

    def events(self) -> list[dict[str, Any]]:
        """Kubernetes Events the operator posted."""
        return [dict(obj) for (res, _ns, _n), obj in self.server.objects.items() if res == "v1/events" and not obj.deleted]


@contextlib.asynccontextmanager
async def operator_running(server: ApiServer, controller: Controller, workflows: ClusterWorkflowSettings | None = None) -> AsyncIterator[None]:
    """The operator against ``server`` until the block ends.

    kopf runs in its own thread and loop, as in production (and as kopf's KopfRunner does): on
    stopping, kopf.operator cancels every task its loop gained since it started, which in a
    shared loop would include pytest's own fixture tasks.
    """
    stop, ready = threading.Event(), threading.Event()
    failures: list[BaseException] = []
    connection = kopf.ConnectionInfo(server=str(server.url).rstrip("/"))

    def run() -> None:
        try:
            asyncio.run(
                operator_main(
                    controller.settings,
                    [],
                    "",
                    stop_flag=stop,
                    ready_flag=ready,
                    controller=controller,
                    connection=connection,
                    server_timeout=10,
                    workflows=workflows,
                )
            )
        except BaseException as exc:
            failures.append(exc)

    thread = threading.Thread(target=run, name="kopf", daemon=True)
    thread.start()
    assert await asyncio.to_thread(ready.wait, 10), "the operator did not start"
    try:
        yield
    finally:
        stop.set()
        await asyncio.to_thread(thread.join, 15)
        assert not thread.is_alive(), "the operator did not stop"
        assert not failures, failures


def new_controller() -> Controller:
    return Controller(ControllerSettings(xds_port=free_port(), policy_port=free_port(), metrics_port=0, usage_interval=0.3))


@pytest.fixture
async def cluster() -> AsyncIterator[Cluster]:
    async with ApiServer() as server, kmock.Server(server):
        declare_resources(server)
        controller = new_controller()
        async with operator_running(server, controller):
            yield Cluster(server, controller)
