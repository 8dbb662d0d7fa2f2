"""The workflow engine on a cluster: WorkflowSpecs and WorkflowRuns from the Kubernetes API.

A thin adapter over the same core and ``Runner`` as file mode; ``register`` adds its kopf
handlers to the operator's registry (``controller.operator``).

* **WorkflowSpec**: accepted against the bindings the controller serves (``accept``) on create,
  update and resume, and again by a kopf timer, so a spec refused for a binding that did not
  exist yet is accepted once it does. Status: ``observedGeneration``, ``steps`` and an
  ``Accepted`` condition whose reason and message name the step and the problem (a cycle, an
  expression that does not compile, an unknown binding); a refusal is also a Warning Event.
* **WorkflowRun**: started on create, resumed on the operator's resume. Its status subresource is
  the run's durable record (``RunStatusWriter``): every transition is patched there before the
  engine acts on it, so a restarted controller reads each run back from its status and finishes
  it without repeating a finished step. Step transitions are Events on the run. A run calls with
  the API key in the Secret ``spec.apiKeySecretRef`` names, in the run's own namespace, labelled
  ``crdgol.io/api-key: "true"`` (so a run cannot make the controller send any other Secret
  anywhere); the key is kept in memory only. A run whose WorkflowSpec or Secret is missing stays
  Pending with ``Accepted=False`` and is retried (kopf's ``TemporaryError``). Deleting a run
  cancels it (its Jobs go with it: they are owned by it).
* **Jobs**: container steps run as Jobs (``controller.workflow.jobs``); the watch on Jobs
  labelled with a run finishes their steps.
* **Egress**: the accepted specs' http-request targets become Envoy's egress listener in the
  gateway's config (``egress_resources``), published with the bindings.
* **Limits** (``retention``): the run API counts a tenant's active runs (the runner's live ones
  plus those it created that the watch has not delivered yet) against its cap; finished runs
  seen on the watch are deleted by their retention (``sweep``).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import secrets
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field, replace
from typing import Any, cast

import aiohttp
import kopf
from aiohttp import web

from controller.models import API_KEY_LABEL, GROUP, VERSION, SpecError, parse_secret
from controller.render import EnvoyExtras
from controller.state import ControllerState
from controller.workflow.accept import CompiledWorkflow, accept
from controller.workflow.api import RunApi
from controller.workflow.calls import CallTarget
from controller.workflow.cluster_api import STARTED_BY_ANNOTATION, ClusterRuns
from controller.workflow.cost import prices_by_namespace
from controller.workflow.egress import (
    WorkflowEnvoySettings,
    api_route_and_cluster,
    egress_resources,
)
from controller.workflow.engine import RUN_DONE, RunState
from controller.workflow.host import tenant_of
from controller.workflow.jobs import RUN_LABEL, JobRunner, Request
from controller.workflow.retention import FinishedRun, RunLimits, SpecRetention, to_remove
from controller.workflow.runner import Runner, WorkflowMetrics
from controller.workflow.spec import parse_run, parse_workflow
from controller.workflow.status import k8s_status, parse_rfc3339, rfc3339, state_from_status

log = logging.getLogger(__name__)

SPECS = "workflowspecs"
RUNS = "workflowruns"


@dataclass(frozen=True, slots=True)
class ClusterWorkflowSettings:
    gateway_url: str  # the gateway listener, as the engine's AI steps reach it
    egress_url: str = ""  # Envoy's egress listener, as http-request steps reach it
    # The egress listener rendered into the gateway's Envoy (port 0: none).
    egress: WorkflowEnvoySettings = field(default_factory=WorkflowEnvoySettings)
    # The run API (``/v1/workflows/...`` through the gateway): where it listens (port 0: off).
    # Envoy reaches it at ``egress.api_host:api_port`` (the controller's Service).
    api_listen_host: str = "0.0.0.0"
    api_listen_port: int = 0
    recheck_interval: float = 5.0  # how often specs are accepted again (bindings change)
    retry_delay: float = 5.0  # a run waiting for its spec or Secret tries again after this
    limits: RunLimits = field(default_factory=RunLimits)
    sweep_interval: float = 30.0  # how often finished runs are checked against their retention


def _path(plural: str, namespace: str, name: str, sub: str = "") -> str:
    return f"/apis/{GROUP}/{VERSION}/namespaces/{namespace}/{plural}/{name}" + (f"/{sub}" if sub else "")


def _ref(body: kopf.Body | dict[str, Any], kind: str) -> kopf.Body:
    meta = body.get("metadata") or {}
    ref = {"apiVersion": f"{GROUP}/{VERSION}", "kind": kind, "metadata": {k: meta.get(k) for k in ("name", "namespace", "uid")}}
    return kopf.Body(cast(kopf.RawBody, ref))


def _post(ref: kopf.Body, type_: str, reason: str, message: str) -> None:
    # Outside a running operator (no kopf context) there is nothing to post to.
    with contextlib.suppress(LookupError):
        kopf.event(ref, type=type_, reason=reason, message=message[:1024])


def _quiet_recheck(record: logging.LogRecord) -> bool:
    """Drop kopf's "Timer ... succeeded" line of the spec re-check (one per spec every few
    seconds); its failures and everything else still log."""
    return not (record.levelno == logging.INFO and "'workflowspec-recheck' succeeded" in record.getMessage())


MAX_STATUS_BYTES = 900 * 1024  # the API server refuses objects over ~1.5 MiB (etcd); keep room


def fit_status(status: dict[str, Any], limit: int = MAX_STATUS_BYTES) -> dict[str, Any]:
    """The status cut to ``limit`` bytes of JSON: the largest step outputs become a 1 KiB preview
    (marked ``outputsTruncated``) until it fits. Each step's outputs are capped at 32 KiB already,
    so only a run of many large steps gets here; after a restart its later steps see the cut
    outputs."""
    sizes = {i: len(json.dumps(item.get("outputs"))) for i, item in enumerate(status["steps"]) if item.get("outputs") is not None}
    total = len(json.dumps(status))
    for i in sorted(sizes, key=lambda k: -sizes[k]):
        if total <= limit:
            break
        preview = json.dumps(status["steps"][i]["outputs"])[:1024]
        status["steps"][i] = {**status["steps"][i], "outputs": {"truncated": True, "preview": preview}, "outputsTruncated": True}
        total -= sizes[i] - len(json.dumps(status["steps"][i]["outputs"]))
    return status


class RunStatusWriter:
    """The WorkflowRun status subresource as the runs' ``RunRecorder``.

    ``record`` returns once the API server has the transition; a failing write is retried with
    backoff (the run waits: it never acts on a transition that is not recorded). A run whose
    resource is gone (404) is cancelled instead.
    """

    def __init__(self, request: Request, on_gone: Callable[[str], None], clock: Callable[[], float] = time.time) -> None:
        self.request, self.on_gone, self.clock = request, on_gone, clock
        self.generations: dict[str, int] = {}
        self.gone: set[str] = set()

    def created(self, state: RunState) -> None:
        pass  # the resource itself is the record of a new run

    async def record(self, state: RunState) -> None:
        if state.key in self.gone:
            return
        patch = {"status": fit_status(k8s_status(state, self.generations.get(state.key, 1), self.clock()))}
        delay = 0.1
        while True:
            try:
                code, body = await self.request("PATCH", _path(RUNS, state.namespace, state.name, "status"), patch, "application/merge-patch+json")
            except (aiohttp.ClientError, TimeoutError, RuntimeError) as exc:
                code, body = 0, str(exc)
            if code < 300 and code != 0:
                return
            if code == 404:
                self.gone.add(state.key)
                self.on_gone(state.key)
                return
            detail = body.get("message") if isinstance(body, dict) else body
            log.warning("cannot record WorkflowRun %s (HTTP %s %s); retrying in %.1fs", state.key, code, detail, delay)
            await asyncio.sleep(delay)
            delay = min(delay * 2, 5.0)


class ClusterWorkflows:
    """WorkflowSpecs and WorkflowRuns of one operator."""

    def __init__(
        self,
        settings: ClusterWorkflowSettings,
        state: ControllerState,
        request: Request,
        publish: Callable[[], Awaitable[None]],
        metrics: WorkflowMetrics,
        clock: Callable[[], float] = time.time,
    ) -> None:
        if settings.api_listen_port and not settings.egress.api_token:
            # Envoy's route to the run API adds this token; the API serves nothing without it
            # (it trusts the tenant header). Per process: the route comes from this controller.
            settings = replace(settings, egress=replace(settings.egress, api_token=secrets.token_urlsafe(32)))
        self.settings, self.state, self.request, self.publish, self.clock = settings, state, request, publish, clock
        self.cancelled: set[str] = set()  # runs cancelled over the API before this engine started them
        self._api_site: web.AppRunner | None = None
        self.accepted: dict[str, CompiledWorkflow] = {}
        self.refused: dict[str, SpecError] = {}
        self._spec_status: dict[str, tuple[int, str, str, str]] = {}  # key -> (generation, status, reason, message)
        self._keys: dict[str, str] = {}  # run key -> the API key it calls with (memory only)
        self._uids: dict[str, str] = {}
        self._refs: dict[str, kopf.Body] = {}
        self._egress: EnvoyExtras | None = None
        self.recorder = RunStatusWriter(request, self._gone, clock)
        self.jobs = JobRunner(request, self._uids.get, clock)
        self.runner = Runner(
            self.recorder,
            CallTarget(gateway=settings.gateway_url.rstrip("/"), egress=settings.egress_url.rstrip("/")),
            metrics,
            lambda st: self._keys.get(st.key),
            clock,
            containers=self.jobs,
            on_transition=self._announce,
            keep_finished=False,
        )
        self._tasks: set[asyncio.Task[Any]] = set()
        # Runs the run API created that the operator has not picked up yet: key -> (tenant, until
        # when it counts). With the runner's live runs they are the tenant's active runs.
        self._admitted: dict[str, tuple[str, float]] = {}
        self._sweeper: asyncio.Task[None] | None = None
        # Finished WorkflowRuns as the watch last showed them (retention's input): kept from the
        # events instead of listing every run, statuses and all, on each sweep.
        self._finished: dict[str, FinishedRun] = {}

    # --- WorkflowSpecs ----------------------------------------------------------------------------

    def _served(self, namespace: str) -> tuple[dict[str, str], dict[str, Any]]:
        result = self.state.result
        bindings = list(result.snapshot.bindings) if result is not None else []
        models = {b.key.split("/", 1)[1]: b.model for b in bindings if b.key.split("/", 1)[0] == namespace}
        return models, prices_by_namespace(bindings).get(namespace, {})

    async def spec_changed(self, body: kopf.Body) -> None:
        meta = body.get("metadata") or {}
        namespace, name = str(meta.get("namespace") or "default"), str(meta.get("name"))
        key, generation = f"{namespace}/{name}", int(meta.get("generation") or 1)
        obj = {k: body[k] for k in body}
        try:
            spec = parse_workflow(obj)
            models, prices = self._served(namespace)
            self.accepted[key] = accept(spec, models, prices=prices)
            self.refused.pop(key, None)
            steps = len(spec.steps) + len(spec.exit_steps)
            verdict = ("True", "Accepted", f"{steps} steps; runs may start")
        except SpecError as exc:
            self.accepted.pop(key, None)
            self.refused[key] = exc
            steps = len((body.get("spec") or {}).get("steps") or [])
            verdict = ("False", exc.reason, exc.message)
        if not await self._write_spec_status(body, key, generation, steps, verdict):
            # Deleted meanwhile (the recheck timer can fire with a body the watch has since seen
            # deleted): accepting it again would bring its egress listener back for good.
            await self.spec_gone(*key.split("/", 1))
            return
        await self._egress_changed()

    async def _write_spec_status(self, body: kopf.Body, key: str, generation: int, steps: int, verdict: tuple[str, str, str]) -> bool:
        """Write the spec's Accepted condition when it changed; False if the spec is gone (404)."""
        status, reason, message = verdict
        if self._spec_status.get(key) == (generation, *verdict):
            return True
        previous = ((body.get("status") or {}).get("conditions") or [{}])[0]
        since = previous.get("lastTransitionTime") if previous.get("status") == status else None
        cond = {
            "type": "Accepted", "status": status, "reason": reason, "message": message[:32768],
            "observedGeneration": generation, "lastTransitionTime": since or rfc3339(self.clock()),
        }
        namespace, name = key.split("/", 1)
        patch = {"status": {"observedGeneration": generation, "steps": steps, "conditions": [cond]}}
        try:
            code, _ = await self.request("PATCH", _path(SPECS, namespace, name, "status"), patch, "application/merge-patch+json")
        except (aiohttp.ClientError, TimeoutError, RuntimeError) as exc:
            log.warning("cannot write status of WorkflowSpec %s: %s", key, exc)
            return True  # the timer writes it again
        if code == 404:
            return False
        if code >= 300:
            log.warning("cannot write status of WorkflowSpec %s: HTTP %d", key, code)
            return True
        changed = key in self._spec_status and self._spec_status[key][1:] != verdict
        self._spec_status[key] = (generation, *verdict)
        if status == "False":
            log.error("WorkflowSpec %s refused: %s: %s", key, reason, message)
            _post(_ref(body, "WorkflowSpec"), "Warning", reason, message)
        elif changed:
            _post(_ref(body, "WorkflowSpec"), "Normal", reason, message)
        return True

    async def spec_gone(self, namespace: str, name: str) -> None:
        key = f"{namespace}/{name}"
        self.accepted.pop(key, None)
        self.refused.pop(key, None)
        self._spec_status.pop(key, None)
        await self._egress_changed()

    async def _egress_changed(self) -> None:
        """Publish the egress listener (when the accepted specs' targets changed) and the route
        to the run API."""
        if not self.settings.egress.egress_port and not self.settings.api_listen_port:
            return
        listeners, clusters = egress_resources(self.accepted.values(), self.settings.egress)
        routes, api_clusters = api_route_and_cluster(self.settings.egress) if self.settings.api_listen_port else ([], [])
        extras = EnvoyExtras(routes=tuple(routes), listeners=tuple(listeners), clusters=tuple(clusters + api_clusters))
        if extras == self._egress:
            return
        self._egress = extras
        self.state.extras = extras
        await self.publish()

    # --- WorkflowRuns -----------------------------------------------------------------------------

    async def run_started(self, body: kopf.Body) -> None:
        """Start (on create) or resume (on the operator's resume) one WorkflowRun."""
        meta = body.get("metadata") or {}
        key = f"{meta.get('namespace') or 'default'}/{meta.get('name')}"
        waiting = False
        try:
            await self._start_run(body)
        except kopf.TemporaryError:
            waiting = True
            raise
        finally:
            # Counted by the run API until now; from here on the runner counts it while it runs.
            # Not before it is live (a start between would find it counted nowhere), nor while it
            # waits for its spec or Secret (it stays admitted until ``ADMITTED_FOR`` has passed).
            if not waiting:
                self._admitted.pop(key, None)

    async def _start_run(self, body: kopf.Body) -> None:
        meta = body.get("metadata") or {}
        namespace, name = str(meta.get("namespace") or "default"), str(meta.get("name"))
        key = f"{namespace}/{name}"
        status = dict(body.get("status") or {})
        if status.get("phase") in RUN_DONE or self.runner.get(key) is not None or key in self.cancelled:
            return
        self._uids[key] = str(meta.get("uid") or "")
        self._refs[key] = _ref(body, "WorkflowRun")
        self.recorder.generations[key] = int(meta.get("generation") or 1)
        self.recorder.gone.discard(key)
        try:
            run = parse_run({k: body[k] for k in body})
        except SpecError as exc:  # the spec is immutable: this will not get better
            await self._refuse(key, exc, final=True)
            return
        secret_ref = run.api_key_secret_ref
        if secret_ref is None:
            await self._refuse(key, SpecError("ApiKeyRequired", "spec.apiKeySecretRef must name the Secret key holding the API key the run calls with"), final=True)
            return
        wf = self.accepted.get(f"{namespace}/{run.workflow_ref.name}")
        found: tuple[str, str] | SpecError
        if wf is None:
            refusal = self.refused.get(f"{namespace}/{run.workflow_ref.name}")
            found = SpecError(refusal.reason, f"WorkflowSpec {run.workflow_ref.name!r} is refused: {refusal.message}") if refusal else SpecError(
                "WorkflowNotFound", f"no WorkflowSpec {run.workflow_ref.name!r} in namespace {namespace} (yet)"
            )
        else:
            found = await self._api_key(namespace, secret_ref.name, secret_ref.key)
        if wf is None or isinstance(found, SpecError):
            assert isinstance(found, SpecError)
            # A run recorded by an earlier controller keeps its phase (its spec may simply not be
            # accepted again yet, on a restart): only the condition says what it waits for.
            await self._refuse(key, found, final=False, keep_phase=bool(status.get("steps")))
            raise kopf.TemporaryError(f"{found.reason}: {found.message}", delay=self.settings.retry_delay)
        api_key, tenant = found
        if key in self.cancelled or self.runner.get(key) is not None:  # cancelled (or started) while the Secret was read
            return
        self._keys[key] = api_key
        ref = f"{namespace}/{secret_ref.name}/{secret_ref.key}"
        if status.get("steps"):
            created = parse_rfc3339(meta.get("creationTimestamp")) or self.clock()
            state = state_from_status(status, wf, name, namespace, run.inputs, created, ref)
            log.info("WorkflowRun %s: resuming from its recorded status", key)
            self.runner.resume(state, wf)
        else:
            self.runner.start(wf, name, run.inputs, tenant=tenant, api_key_ref=ref)

    async def _api_key(self, namespace: str, name: str, field_: str) -> tuple[str, str] | SpecError:
        """(API key, tenant) from the run's Secret, or why not."""
        try:
            code, secret = await self.request("GET", f"/api/v1/namespaces/{namespace}/secrets/{name}", None, "application/json")
        except (aiohttp.ClientError, TimeoutError, RuntimeError) as exc:
            return SpecError("SecretUnreadable", f"cannot read Secret {namespace}/{name}: {exc}")
        if code != 200 or not isinstance(secret, dict):
            return SpecError("SecretNotFound", f"Secret {namespace}/{name} does not exist (or cannot be read: HTTP {code})")
        if str(((secret.get("metadata") or {}).get("labels") or {}).get(API_KEY_LABEL, "")).lower() != "true":
            return SpecError("NotAnApiKeySecret", f"Secret {namespace}/{name} is not labelled {API_KEY_LABEL}: \"true\"; a run calls only with an API key Secret")
        try:
            parsed = parse_secret(secret)
        except SpecError as exc:
            return SpecError("InvalidSecret", f"Secret {namespace}/{name}: {exc.message}")
        value = parsed.data.get(field_)
        if not value:
            return SpecError("SecretNotFound", f"Secret {namespace}/{name} has no key {field_!r}")
        return value, tenant_of(parsed)

    async def _refuse(self, key: str, problem: SpecError, *, final: bool, keep_phase: bool = False) -> None:
        namespace, name = key.split("/", 1)
        now = rfc3339(self.clock())
        status: dict[str, Any] = {
            "message": problem.message,
            "conditions": [{"type": "Accepted", "status": "False", "reason": problem.reason, "message": problem.message[:32768],
                            "observedGeneration": self.recorder.generations.get(key, 1), "lastTransitionTime": now}],
        }
        if not keep_phase:
            status["phase"] = "Failed" if final else "Pending"
        if final:
            status["finishedAt"] = now
        with contextlib.suppress(aiohttp.ClientError, TimeoutError, RuntimeError):
            await self.request("PATCH", _path(RUNS, namespace, name, "status"), {"status": status}, "application/merge-patch+json")
        ref = self._refs.get(key)
        if ref is not None:
            _post(ref, "Warning", problem.reason, problem.message)

    async def run_gone(self, namespace: str, name: str) -> None:
        key = f"{namespace}/{name}"
        self.recorder.gone.add(key)
        self._gone(key)

    # --- the run API (``cluster_api.ClusterRuns``) -------------------------------------------------

    def workflow_state(self, namespace: str, name: str) -> SpecError | bool | None:
        key = f"{namespace}/{name}"
        return True if key in self.accepted else self.refused.get(key)

    def live(self, key: str) -> RunState | None:
        return self.runner.get(key)

    async def cancel_live(self, key: str) -> RunState | None:
        return await self.runner.cancel(key, "cancelled over the API")

    def cancel_before_start(self, key: str) -> None:
        self.cancelled.add(key)

    # How long a run created over the API counts as active before the operator picks it up: the
    # watch delivers it in well under this; should it never come, the run is not running here.
    ADMITTED_FOR = 120.0

    def admit(self, tenant: str, key: str) -> int | None:
        """Count ``key`` as one of ``tenant``'s active runs, unless it is at its cap: then the
        number it has (and nothing is counted). Synchronous, so concurrent starts cannot pass the
        cap together; ``release`` undoes it when the resource is not created."""
        now = self.clock()
        for k, (_, until) in list(self._admitted.items()):
            if until <= now:
                del self._admitted[k]
        active = self.runner.active(tenant) + sum(1 for t, _ in self._admitted.values() if t == tenant)
        if active >= self.settings.limits.max_active_per_tenant:
            return active
        self._admitted[key] = (tenant, now + self.ADMITTED_FOR)
        return None

    def release(self, key: str) -> None:
        self._admitted.pop(key, None)

    # --- retention ------------------------------------------------------------------------------------

    def run_seen(self, event_type: str, obj: dict[str, Any]) -> None:
        """A WorkflowRun event from the watch: note it if it has finished (or forget it)."""
        meta, status = obj.get("metadata") or {}, obj.get("status") or {}
        key = f"{meta.get('namespace') or 'default'}/{meta.get('name')}"
        ended = parse_rfc3339(status.get("finishedAt"))
        if event_type == "DELETED" or status.get("phase") not in RUN_DONE or ended is None:
            self._finished.pop(key, None)
            return
        workflow = str(((obj.get("spec") or {}).get("workflowRef") or {}).get("name") or "")
        by_api = (meta.get("annotations") or {}).get(STARTED_BY_ANNOTATION) == "api"
        self._finished[key] = FinishedRun(
            key, f"{key.split('/', 1)[0]}/{workflow}", str(status.get("tenant") or ""), ended, by_api, uid=str(meta.get("uid") or "")
        )

    async def sweep(self) -> list[str]:
        """Delete the finished WorkflowRuns ``retention.to_remove`` picks, in the namespaces that
        have WorkflowSpecs here: those the run API created (``STARTED_BY_ANNOTATION``) by the
        controller's defaults, any run of a spec that sets its own retention by the spec's."""
        namespaces = {k.split("/", 1)[0] for k in (*self.accepted, *self.refused)}
        finished = [r for r in self._finished.values() if r.key.split("/", 1)[0] in namespaces]
        specs = {k: SpecRetention(w.spec.ttl_after_finished, w.spec.keep_finished_runs) for k, w in self.accepted.items()}
        gone = []
        for key in to_remove(finished, self.clock(), self.settings.limits, specs):
            namespace, name = key.split("/", 1)
            uid = self._finished[key].uid if key in self._finished else ""
            # The uid as a precondition: a run deleted and created again under its name since the
            # watch showed it finished is another run (409, left alone).
            options = {"kind": "DeleteOptions", "apiVersion": "v1", "preconditions": {"uid": uid}} if uid else None
            try:
                code, _ = await self.request("DELETE", _path(RUNS, namespace, name), options, "application/json")
            except (aiohttp.ClientError, TimeoutError, RuntimeError) as exc:
                log.warning("workflow run retention: cannot delete WorkflowRun %s: %s", key, exc)
                continue
            if code < 300 or code in (404, 409):
                gone.append(key)
                self._finished.pop(key, None)
            else:
                log.warning("workflow run retention: cannot delete WorkflowRun %s: HTTP %s", key, code)
        if gone:
            log.info("workflow runs deleted by their retention: %d", len(gone))
        return gone

    async def _sweep_forever(self) -> None:
        while True:
            await asyncio.sleep(self.settings.sweep_interval)
            await self.sweep()

    def start_sweeping(self) -> None:
        if self._sweeper is None:
            self._sweeper = asyncio.create_task(self._sweep_forever(), name="workflow run retention")

    async def serve_api(self) -> None:
        """Open the run API on its TCP port (when configured) and publish Envoy's route to it;
        start deleting finished runs by their retention."""
        self.start_sweeping()
        if not self.settings.api_listen_port:
            return
        backend = ClusterRuns(self, self.request, self.state.secrets_in, self.clock, self.settings.limits)
        self._api_site = web.AppRunner(RunApi(backend, self.settings.egress.api_token).app(), access_log=None)
        await self._api_site.setup()
        await web.TCPSite(self._api_site, self.settings.api_listen_host, self.settings.api_listen_port, backlog=1024).start()
        await self._egress_changed()

    def _gone(self, key: str) -> None:
        """The run's resource was deleted: stop it (its Jobs are deleted with it)."""
        if self.runner.get(key) is not None:
            task = asyncio.create_task(self.runner.cancel(key, "the WorkflowRun was deleted"))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)
        for d in (self._keys, self._uids, self._refs):
            d.pop(key, None)
        self.cancelled.discard(key)

    def _announce(self, before: RunState, after: RunState) -> None:
        """Events for the run's step transitions and its end."""
        ref = self._refs.get(after.key)
        if ref is None:
            return
        for name, s in after.steps.items():
            old = before.steps.get(name)
            if old is not None and (old.phase, old.attempts) == (s.phase, s.attempts):
                continue
            if s.phase == "Running":
                _post(ref, "Normal", "StepStarted", f"step {name}: attempt {s.attempts} started")
            elif s.phase == "Pending" and s.retry_at is not None:
                _post(ref, "Warning", "StepRetrying", f"step {name}: {s.message}")
            elif s.phase == "Failed":
                _post(ref, "Warning", "StepFailed", f"step {name}: {s.message}")
            elif s.phase in ("Succeeded", "Skipped"):
                _post(ref, "Normal", f"Step{s.phase}", f"step {name}: {s.phase.lower()}" + (f" ({s.message})" if s.message else ""))
        if after.phase != before.phase and after.phase in RUN_DONE:
            _post(ref, "Normal" if after.phase == "Succeeded" else "Warning", f"Run{after.phase}", after.message or f"the run {after.phase.lower()}")
        if after.done:  # its last state is recorded: nothing of it need stay in memory
            for d in (self._keys, self._uids, self._refs):
                d.pop(after.key, None)
            self.recorder.generations.pop(after.key, None)

    # --- kopf ---------------------------------------------------------------------------------------

    def register(self, registry: kopf.OperatorRegistry) -> None:
        specs, runs = (GROUP, VERSION, SPECS), (GROUP, VERSION, RUNS)
        logging.getLogger("kopf.objects").addFilter(_quiet_recheck)

        @kopf.on.resume(*specs, registry=registry, id="workflowspec-resume")
        @kopf.on.create(*specs, registry=registry, id="workflowspec-create")
        @kopf.on.update(*specs, registry=registry, id="workflowspec-update")
        async def spec_changed(body: kopf.Body, **_: Any) -> None:
            await self.spec_changed(body)

        # Bindings come and go: a spec is accepted again every few seconds (status is written only
        # when the verdict changes), so one refused for a missing binding runs once it exists.
        @kopf.timer(*specs, registry=registry, id="workflowspec-recheck", interval=self.settings.recheck_interval)
        async def spec_recheck(body: kopf.Body, **_: Any) -> None:
            await self.spec_changed(body)

        @kopf.on.event(*specs, registry=registry, id="workflowspec-gone")
        async def spec_deleted(event: kopf.RawEvent, name: str, namespace: str | None, **_: Any) -> None:
            if event.get("type") == "DELETED":
                await self.spec_gone(namespace or "default", name)

        @kopf.on.resume(*runs, registry=registry, id="workflowrun-resume")
        @kopf.on.create(*runs, registry=registry, id="workflowrun-create")
        async def run_started(body: kopf.Body, **_: Any) -> None:
            await self.run_started(body)

        @kopf.on.event(*runs, registry=registry, id="workflowrun-gone")
        async def run_event(event: kopf.RawEvent, name: str, namespace: str | None, **_: Any) -> None:
            self.run_seen(str(event.get("type") or ""), dict(event.get("object") or {}))
            if event.get("type") == "DELETED":
                await self.run_gone(namespace or "default", name)

        @kopf.on.event("batch", "v1", "jobs", registry=registry, id="workflow-jobs", labels={RUN_LABEL: kopf.PRESENT})
        async def job_changed(body: kopf.Body, **_: Any) -> None:
            self.jobs.job_event({k: body[k] for k in body})

    async def close(self) -> None:
        self.jobs.closing = True  # Jobs keep running; the next controller adopts them
        if self._sweeper is not None:
            self._sweeper.cancel()
        for task in list(self._tasks):
            task.cancel()
        await self.runner.close()
        if self._api_site is not None:
            await self._api_site.cleanup()
