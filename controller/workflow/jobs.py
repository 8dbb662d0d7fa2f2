"""Container steps on a cluster: one Kubernetes Job per attempt, its completion finishing the step.

``job_manifest`` is pure: the Job of one attempt, owned by the WorkflowRun (deleting the run
deletes its Jobs), labelled with run, step and attempt, named after them (so an attempt started
again after a controller restart finds its Job instead of starting a second one), with no
Job-level retries (``backoffLimit: 0``: the engine retries, with its backoff) and the step's
timeout as ``activeDeadlineSeconds``. The container gets the step's rendered ``args`` and ``env``
plus ``CRDGOL_PARAMS`` (the step's inputs as JSON), ``CRDGOL_RUN``, ``CRDGOL_STEP`` and
``CRDGOL_IDEMPOTENCY_KEY``; no service account token is mounted and privileges cannot be raised.

``JobRunner`` carries out a ``Call`` of a container step: creates the Job, waits for the watch on
Jobs (``job_event``, fed by the kopf adapter) to report it Complete or Failed, and turns that into
``StepSucceeded`` / ``StepFailed``. The outputs are ``exitCode`` and ``result``: the container's
termination message (``/dev/termination-log``, or the log's tail when it fails), parsed when it is
JSON. An aborted or timed-out attempt deletes its Job; a controller shutting down leaves it
running for the next controller to adopt.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import logging
import math
import time
from collections.abc import Awaitable, Callable
from typing import Any

from controller.models import GROUP, VERSION
from controller.workflow.accept import CompiledStep
from controller.workflow.calls import idempotency_key
from controller.workflow.engine import Call, RunState, StepFailed, StepSucceeded

log = logging.getLogger(__name__)

RUN_LABEL = "crdgol.io/workflow-run"
STEP_LABEL = "crdgol.io/workflow-step"
ATTEMPT_LABEL = "crdgol.io/workflow-attempt"
CONTAINER = "step"
# (method, path, body, content type) -> (HTTP status, parsed body): the operator's API client.
Request = Callable[[str, str, Any, str], Awaitable[tuple[int, Any]]]


def job_name(run: str, step: str, attempt: int) -> str:
    """``<run>-<step>-<attempt>``, cut to 63 characters with a digest when longer (a Job's name
    becomes its pods' ``job-name`` label, whose values are at most 63)."""
    name = f"{run}-{step}-{attempt}"
    if len(name) <= 63:
        return name
    digest = hashlib.sha256(f"{run}/{step}/{attempt}".encode()).hexdigest()[:10]
    return f"{name[: 63 - 11].rstrip('-')}-{digest}"


def job_manifest(state: RunState, run_uid: str, call: Call) -> dict[str, Any]:
    req = call.request
    labels = {
        "app.kubernetes.io/managed-by": "crdgol",
        RUN_LABEL: state.name,
        STEP_LABEL: call.step,
        ATTEMPT_LABEL: str(call.attempt),
    }
    env = [{"name": k, "value": v} for k, v in sorted(req["env"].items())]
    env += [
        {"name": "CRDGOL_PARAMS", "value": json.dumps(req["params"], separators=(",", ":"))},
        {"name": "CRDGOL_RUN", "value": state.key},
        {"name": "CRDGOL_STEP", "value": call.step},
        {"name": "CRDGOL_IDEMPOTENCY_KEY", "value": idempotency_key(state.key, call.step, call.attempt)},
    ]
    container: dict[str, Any] = {
        "name": CONTAINER,
        "image": req["image"],
        "env": env,
        "terminationMessagePolicy": "FallbackToLogsOnError",
        "securityContext": {"allowPrivilegeEscalation": False, "capabilities": {"drop": ["ALL"]}, "seccompProfile": {"type": "RuntimeDefault"}},
    }
    if req["command"]:
        container["command"] = list(req["command"])
    if req["args"]:
        container["args"] = list(req["args"])
    spec: dict[str, Any] = {
        "backoffLimit": 0,
        "template": {
            "metadata": {"labels": labels},
            "spec": {"restartPolicy": "Never", "automountServiceAccountToken": False, "containers": [container]},
        },
    }
    if call.timeout is not None:
        spec["activeDeadlineSeconds"] = max(1, math.ceil(call.timeout))
    return {
        "apiVersion": "batch/v1",
        "kind": "Job",
        "metadata": {
            "name": job_name(state.name, call.step, call.attempt),
            "namespace": state.namespace,
            "labels": labels,
            "ownerReferences": [
                {"apiVersion": f"{GROUP}/{VERSION}", "kind": "WorkflowRun", "name": state.name, "uid": run_uid, "controller": True, "blockOwnerDeletion": True}
            ],
        },
        "spec": spec,
    }


def finished(job: dict[str, Any]) -> str:
    """"Complete", "Failed" or "" (still running), from the Job's status conditions."""
    for cond in (job.get("status") or {}).get("conditions") or []:
        if cond.get("status") == "True" and cond.get("type") in ("Complete", "Failed"):
            return str(cond["type"])
    return ""


def _failure_reason(job: dict[str, Any]) -> str:
    for cond in (job.get("status") or {}).get("conditions") or []:
        if cond.get("type") == "Failed" and cond.get("status") == "True":
            return ": ".join(filter(None, [str(cond.get("reason") or ""), str(cond.get("message") or "")]))
    return ""


def _terminated(pods: Any, name: str) -> dict[str, Any]:
    """The step container's ``terminated`` state in the Job's newest pod ({} when none)."""
    items = pods.get("items") if isinstance(pods, dict) else None
    best: dict[str, Any] = {}
    for pod in sorted(items or [], key=lambda p: str((p.get("metadata") or {}).get("creationTimestamp") or "")):
        labels = (pod.get("metadata") or {}).get("labels") or {}
        if name not in (labels.get("job-name"), labels.get("batch.kubernetes.io/job-name")):
            continue
        for cs in (pod.get("status") or {}).get("containerStatuses") or []:
            if cs.get("name") == CONTAINER and (cs.get("state") or {}).get("terminated"):
                best = cs["state"]["terminated"]
    return best


def _result(message: str) -> Any:
    try:
        return json.loads(message) if message.strip() else None
    except ValueError:
        return message


class JobRunner:
    """Runs container-step attempts as Jobs through ``request`` (the operator's API client)."""

    def __init__(self, request: Request, run_uid: Callable[[str], str | None], clock: Callable[[], float] = time.time) -> None:
        self.request, self.run_uid, self.clock = request, run_uid, clock
        self._waiting: dict[tuple[str, str], asyncio.Future[dict[str, Any]]] = {}
        self.closing = False  # set while the controller stops: Jobs keep running, to be adopted

    def job_event(self, job: dict[str, Any]) -> None:
        """A Job changed (from the watch): wake the attempt waiting for it, if it has ended."""
        meta = job.get("metadata") or {}
        fut = self._waiting.get((str(meta.get("namespace")), str(meta.get("name"))))
        if fut is not None and not fut.done() and finished(job):
            fut.set_result(job)

    async def __call__(self, state: RunState, step: CompiledStep, call: Call) -> StepSucceeded | StepFailed:
        uid = self.run_uid(state.key)
        if uid is None:
            return StepFailed(call.step, call.attempt, "the WorkflowRun is gone", self.clock(), final=True)
        manifest = job_manifest(state, uid, call)
        name = manifest["metadata"]["name"]
        key = (state.namespace, name)
        fut: asyncio.Future[dict[str, Any]] = asyncio.get_running_loop().create_future()
        self._waiting[key] = fut
        base = f"/apis/batch/v1/namespaces/{state.namespace}/jobs"
        try:
            code, body = await self.request("POST", base, manifest, "application/json")
            if code == 409:  # this attempt's Job exists: started before a restart; adopt it
                code, body = await self.request("GET", f"{base}/{name}", None, "application/json")
            if code >= 300:
                detail = body.get("message") if isinstance(body, dict) else body
                return StepFailed(call.step, call.attempt, f"cannot create Job {name}: HTTP {code} {detail}", self.clock(), final=400 <= code < 500 and code != 429)
            job = body if isinstance(body, dict) and finished(body) else await fut
        except asyncio.CancelledError:
            if not self.closing:  # aborted or timed out: stop the Job (and its pod)
                await asyncio.shield(self._delete(base, name))
            raise
        finally:
            if self._waiting.get(key) is fut:
                del self._waiting[key]
        return await self._outcome(state, call, name, job)

    async def _delete(self, base: str, name: str) -> None:
        try:
            await self.request("DELETE", f"{base}/{name}?propagationPolicy=Background", None, "application/json")
        except Exception as exc:  # the owner reference still removes it with the run
            log.warning("cannot delete Job %s: %s", name, exc)

    async def _outcome(self, state: RunState, call: Call, name: str, job: dict[str, Any]) -> StepSucceeded | StepFailed:
        code, pods = await self.request("GET", f"/api/v1/namespaces/{state.namespace}/pods?labelSelector=job-name%3D{name}", None, "application/json")
        term = _terminated(pods, name) if code == 200 else {}
        exit_code = term.get("exitCode")
        message = str(term.get("message") or "")
        if finished(job) == "Complete":
            return StepSucceeded(call.step, call.attempt, {"exitCode": exit_code if exit_code is not None else 0, "result": _result(message), "job": name}, self.clock())
        why = _failure_reason(job) or "the Job failed"
        if exit_code is not None:
            why += f" (exit code {exit_code})"
        if message:
            why += f": {message.strip()[-500:]}"
        return StepFailed(call.step, call.attempt, f"Job {name}: {why}", self.clock())
