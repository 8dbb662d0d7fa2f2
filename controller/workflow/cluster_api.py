"""The run API on a cluster: ``/v1/workflows/...`` over WorkflowRun resources.

The ``RunBackend`` ``ClusterRuns`` turns the API's calls into the Kubernetes API's: a run started
over HTTP is a WorkflowRun created in the workflow's namespace (one of the caller's own, as in
file mode), which the operator then picks up like any other. It names, in
``spec.apiKeySecretRef``, the Secret in that namespace holding the very API key the caller sent
(found by the key's SHA-256, which extproc forwards instead of the key): the key is never copied
into the resource. A caller whose key is in no API-key labelled Secret there (a JWT, or a key
only in an unlabelled Secret) gets a 409 saying so. Reads come from the resource's status (the
run's durable record); a cancel is the engine's own when the run is live in this controller,
otherwise the status is marked Cancelled before the run ever starts.
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
import time
from collections.abc import Callable
from typing import Any, Protocol

import aiohttp

from controller.models import GROUP, VERSION, SecretData, SpecError
from controller.workflow.api import BackendUnavailable, Caller, Started, TooManyRuns
from controller.workflow.engine import RUN_DONE, RunState
from controller.workflow.host import tenant_of
from controller.workflow.jobs import Request
from controller.workflow.retention import RunLimits, over_cap_message
from controller.workflow.status import parse_rfc3339, rfc3339
from crdgol import tenancy

RUNS = "workflowruns"
WORKFLOW_LABEL = "crdgol.io/workflow"
STARTED_BY_ANNOTATION = "crdgol.io/started-by"


class Engine(Protocol):
    """What the run API needs of the cluster adapter (``ClusterWorkflows``)."""

    def workflow_state(self, namespace: str, name: str) -> SpecError | bool | None:
        """True: accepted; a SpecError: refused; None: no such WorkflowSpec."""

    def live(self, key: str) -> RunState | None: ...

    async def cancel_live(self, key: str) -> RunState | None: ...

    def cancel_before_start(self, key: str) -> None: ...

    def admit(self, tenant: str, key: str) -> int | None:
        """Count a run about to be created as the tenant's; None, or its active runs when at its cap."""

    def release(self, key: str) -> None:
        """Undo ``admit`` (the resource was not created)."""


def _runs_path(namespace: str, name: str = "", sub: str = "") -> str:
    return f"/apis/{GROUP}/{VERSION}/namespaces/{namespace}/{RUNS}" + (f"/{name}" if name else "") + (f"/{sub}" if sub else "")


def api_status(obj: dict[str, Any], tenant: str) -> dict[str, Any]:
    """A WorkflowRun as the API shows it: ``run_status``'s shape from the resource's status."""
    meta, spec, status = obj.get("metadata") or {}, obj.get("spec") or {}, dict(obj.get("status") or {})
    out: dict[str, Any] = {
        "name": meta.get("name"),
        "namespace": meta.get("namespace"),
        "workflow": (spec.get("workflowRef") or {}).get("name"),
        "phase": status.get("phase") or "Pending",
        "tenant": status.get("tenant") or tenant,
        "steps": status.get("steps") or [],
        "tokens": status.get("tokens") or {"input": 0, "output": 0, "total": 0},
    }
    for k in ("cost", "startedAt", "finishedAt", "message", "conditions"):
        if status.get(k):
            out[k] = status[k]
    return out


class ClusterRuns:
    """``RunBackend`` over WorkflowRun resources (see the module's docstring)."""

    def __init__(
        self, engine: Engine, request: Request, secrets_in: Callable[[str], list[SecretData]], clock: Callable[[], float] = time.time, limits: RunLimits | None = None
    ) -> None:
        self.engine, self.request, self.secrets_in, self.clock = engine, request, secrets_in, clock
        self.limits = limits or RunLimits()

    def ready(self) -> bool:
        return True  # the runs live in the API server: nothing to load first

    async def _call(self, method: str, path: str, body: Any = None, content_type: str = "application/json") -> tuple[int, Any]:
        try:
            return await self.request(method, path, body, content_type)
        except (aiohttp.ClientError, TimeoutError, RuntimeError) as exc:
            raise BackendUnavailable(f"the Kubernetes API cannot be reached: {type(exc).__name__}") from exc

    def _key_secret(self, caller: Caller, namespace: str, tenant: str) -> tuple[str, str]:
        """(Secret name, data key) in ``namespace`` holding the key the caller sent, as ``tenant``."""
        unlabelled = ""
        if caller.key_digest:
            digest = bytes.fromhex(caller.key_digest)
            for s in sorted(self.secrets_in(namespace), key=lambda s: s.name):
                for field_, value in sorted(s.data.items()):
                    if not value or not hmac.compare_digest(hashlib.sha256(value.encode()).digest(), digest):
                        continue
                    if not s.is_api_key:
                        unlabelled = s.name
                    elif tenant_of(s) == tenant:
                        return s.name, field_
        if unlabelled:
            raise SpecError(
                "NotAnApiKeySecret",
                f'the API key you called with is in Secret {namespace}/{unlabelled}, which is not labelled crdgol.io/api-key: "true"; '
                "a run calls only with an API-key Secret",
            )
        raise SpecError(
            "NoApiKey",
            f"a run started over HTTP calls with the API key you sent, from its Secret in namespace {namespace}; "
            f"your credential is not an API key of tenant {tenant!r} there (a JWT cannot start runs on a cluster)",
        )

    async def start(self, caller: Caller, namespace: str, workflow: str, inputs: dict[str, Any], tenant: str) -> Started:
        verdict = self.engine.workflow_state(namespace, workflow)
        if verdict is None:
            raise LookupError(f"no WorkflowSpec {workflow!r}")
        if isinstance(verdict, SpecError):
            raise SpecError(verdict.reason, f"WorkflowSpec {workflow!r} is refused: {verdict.message}")
        secret, field_ = self._key_secret(caller, namespace, tenant)
        for _ in range(5):  # a name already taken (by a run kubectl created) gets another
            name = f"{workflow[:52]}-{secrets.token_hex(4)}"
            # Counted before the resource is created (no await in between), so concurrent starts
            # cannot pass the cap together; released again unless it was created.
            active = self.engine.admit(tenant, f"{namespace}/{name}")
            if active is not None:
                raise TooManyRuns(over_cap_message(tenant, active, self.limits))
            created = None
            try:
                created = await self._create(namespace, name, workflow, inputs, secret, field_, tenant)
            finally:
                if created is None:
                    self.engine.release(f"{namespace}/{name}")
            if created is not None:
                return Started(created)  # the operator picks it up from its watch
        raise BackendUnavailable("cannot find a free name for the run; retry", 503)

    async def _create(self, namespace: str, name: str, workflow: str, inputs: dict[str, Any], secret: str, field_: str, tenant: str) -> dict[str, Any] | None:
        """The run's status once its WorkflowRun is created; None: the name is taken."""
        obj = {
            "apiVersion": f"{GROUP}/{VERSION}",
            "kind": "WorkflowRun",
            "metadata": {"name": name, "namespace": namespace, "labels": {WORKFLOW_LABEL: workflow}, "annotations": {STARTED_BY_ANNOTATION: "api"}},
            "spec": {"workflowRef": {"name": workflow}, "inputs": inputs, "apiKeySecretRef": {"name": secret, "key": field_}},
        }
        code, body = await self._call("POST", _runs_path(namespace), obj)
        if code == 409:
            return None
        if code >= 300 or not isinstance(body, dict):
            detail = body.get("message") if isinstance(body, dict) else ""
            if code in (400, 422):  # the API server's schema refused it (e.g. inputs too large)
                raise SpecError("InvalidRun", f"the WorkflowRun was refused: {detail}")
            raise BackendUnavailable(f"cannot create the WorkflowRun: HTTP {code} {detail}".strip())
        return api_status(body, tenant)

    def _tenant(self, obj: dict[str, Any]) -> str:
        """The run's tenant: as its status records it, or (not picked up yet) its Secret's."""
        recorded = str((obj.get("status") or {}).get("tenant") or "")
        if recorded:
            return recorded
        meta, ref = obj.get("metadata") or {}, (obj.get("spec") or {}).get("apiKeySecretRef") or {}
        for s in self.secrets_in(str(meta.get("namespace"))):
            if s.name == ref.get("name") and s.is_api_key:
                return tenant_of(s)
        return ""

    async def _get(self, caller: Caller, namespace: str, name: str) -> dict[str, Any] | None:
        code, obj = await self._call("GET", _runs_path(namespace, name))
        if code == 404:
            return None
        if code >= 300 or not isinstance(obj, dict):
            raise BackendUnavailable(f"cannot read the WorkflowRun: HTTP {code}")
        return obj if self._tenant(obj) in caller.tenants else None

    async def read(self, caller: Caller, namespace: str, name: str) -> dict[str, Any] | None:
        obj = await self._get(caller, namespace, name)
        return api_status(obj, self._tenant(obj)) if obj is not None else None

    async def runs(self, caller: Caller) -> list[dict[str, Any]]:
        out: list[tuple[float, dict[str, Any]]] = []
        for namespace in sorted({tenancy.namespace_of(t) for t in caller.tenants}):
            code, doc = await self._call("GET", _runs_path(namespace))
            if code >= 300 or not isinstance(doc, dict):
                raise BackendUnavailable(f"cannot list WorkflowRuns: HTTP {code}")
            for obj in doc.get("items") or []:
                tenant = self._tenant(obj)
                if tenant in caller.tenants:
                    created = parse_rfc3339((obj.get("metadata") or {}).get("creationTimestamp")) or 0.0
                    out.append((created, api_status(obj, tenant)))
        return [doc for _, doc in sorted(out, key=lambda x: (x[0], str(x[1]["name"])))]

    async def cancel(self, caller: Caller, namespace: str, name: str) -> dict[str, Any] | None:
        obj = await self._get(caller, namespace, name)
        if obj is None:
            return None
        key = f"{namespace}/{name}"
        if self.engine.live(key) is not None:
            await self.engine.cancel_live(key)  # recorded in the status by the engine
        elif (obj.get("status") or {}).get("phase") not in RUN_DONE:
            # Not started here (waiting for its spec or Secret, or not picked up yet): mark it
            # Cancelled, and tell the engine not to start it should its pickup be under way.
            self.engine.cancel_before_start(key)
            now = rfc3339(self.clock())
            message = "cancelled before it started"
            status = {
                "phase": "Cancelled", "finishedAt": now, "message": message,
                "conditions": [{"type": "Completed", "status": "True", "reason": "Cancelled", "message": message, "lastTransitionTime": now}],
            }
            code, _ = await self._call("PATCH", _runs_path(namespace, name, "status"), {"status": status}, "application/merge-patch+json")
            if code >= 300 and code != 404:
                raise BackendUnavailable(f"cannot cancel the WorkflowRun: HTTP {code}")
        return await self.read(caller, namespace, name)
