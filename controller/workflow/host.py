"""The workflow engine inside the file-mode controller (what ``crdgol up`` runs).

``WorkflowHost.sync`` takes the folder's WorkflowSpecs, WorkflowRuns and Secrets with the bindings
the gateway serves: accepts the specs (refusing, with the step named, what cannot run), starts
the runs the folder declares that have no recorded state yet, and on its first call resumes the
runs recorded before a restart. ``extras`` are the Envoy resources it needs (egress listener, run
API route); ``serve_api`` opens the run API on its Unix socket, where a run started over HTTP is
capped per tenant and picked up in its request's handler, and starts the sweep that removes
finished runs by their retention (``retention``).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import time
from collections.abc import Coroutine, Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from aiohttp import web

from controller.models import API_KEY_LABEL, TENANT_ANNOTATION, SecretData, SpecError, parse_secret
from controller.render import EnvoyExtras
from controller.workflow.accept import CompiledWorkflow, accept
from controller.workflow.api import Caller, RunApi, Started, TooManyRuns
from controller.workflow.calls import CallTarget
from controller.workflow.cost import BackendPrice
from controller.workflow.egress import (
    WorkflowEnvoySettings,
    api_route_and_cluster,
    egress_resources,
)
from controller.workflow.engine import RunState
from controller.workflow.retention import (
    FinishedRun,
    RunLimits,
    SpecRetention,
    over_cap_message,
    to_remove,
)
from controller.workflow.runner import Runner, RunStore, WorkflowMetrics
from controller.workflow.spec import parse_run, parse_workflow
from controller.workflow.status import run_status
from crdgol import tenancy

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class WorkflowSettings:
    state_dir: Path
    gateway_url: str  # the gateway listener, as the engine's AI steps call it
    envoy: WorkflowEnvoySettings
    limits: RunLimits = field(default_factory=RunLimits)
    sweep_interval: float = 1.0  # how often finished runs are checked against their retention


def tenant_of(secret: SecretData) -> str:
    """The tenant an API-key Secret's keys act as: qualified by the Secret's namespace, as the
    gateway qualifies it (``crdgol.tenancy``)."""
    name = secret.annotations.get(TENANT_ANNOTATION) or secret.labels.get(TENANT_ANNOTATION) or secret.name
    return tenancy.qualified(secret.namespace, name)


class WorkflowHost:
    def __init__(self, settings: WorkflowSettings, metrics: WorkflowMetrics) -> None:
        self.settings = settings
        e = settings.envoy
        self.store = RunStore(settings.state_dir / "runs")
        self.runner = Runner(
            self.store,
            CallTarget(gateway=settings.gateway_url, egress=f"http://{e.egress_host}:{e.egress_port}"),
            metrics,
            self._api_key,
        )
        self.workflows: dict[str, CompiledWorkflow] = {}
        self.problems: dict[str, SpecError] = {}
        self._secrets: dict[str, SecretData] = {}
        self._resumed = False
        self._runner_site: web.AppRunner | None = None
        self._declared: set[str] = set()  # runs the folder declares as WorkflowRun manifests
        self._sweeper: asyncio.Task[None] | None = None

    # --- inputs -------------------------------------------------------------------------------

    def sync(
        self,
        others: Iterable[dict[str, Any]],
        secrets: Iterable[dict[str, Any]],
        served: Mapping[str, str],
        prices: Mapping[str, Mapping[str, tuple[BackendPrice, ...]]] | None = None,
    ) -> None:
        """``served``: "namespace/name" of each served binding -> its model; ``prices``: per
        namespace, each model its bindings serve -> their backends' prices (the AI steps' cost;
        ``controller.workflow.cost.prices_by_namespace``)."""
        self._secrets = {}
        for obj in secrets:
            try:
                s = parse_secret(obj)
            except SpecError:
                continue
            self._secrets[s.key] = s
        docs = list(others)
        workflows: dict[str, CompiledWorkflow] = {}
        problems: dict[str, SpecError] = {}
        for obj in (d for d in docs if d.get("kind") == "WorkflowSpec"):
            meta = obj.get("metadata") or {}
            key = f"{meta.get('namespace') or 'default'}/{meta.get('name')}"
            try:
                spec = parse_workflow(obj)
                models = {k.split("/", 1)[1]: m for k, m in served.items() if k.split("/", 1)[0] == spec.namespace}
                workflows[key] = accept(spec, models, file_mode=True, prices=(prices or {}).get(spec.namespace))
            except SpecError as exc:
                problems[f"WorkflowSpec {key}"] = exc
                if self.problems.get(f"WorkflowSpec {key}") is None or self.problems[f"WorkflowSpec {key}"].message != exc.message:
                    log.error("WorkflowSpec %s refused: %s: %s", key, exc.reason, exc.message)
        self.workflows = workflows
        if not self._resumed:
            self._resumed = True
            for state in self.store.load_all():
                wf = workflows.get(f"{state.namespace}/{state.workflow}")
                if wf is None and state.phase not in ("Succeeded", "Failed", "Cancelled"):
                    log.error("workflow run %s: its WorkflowSpec is not accepted; leaving it as recorded", state.key)
                    self.runner.keep(state)
                    continue
                if wf is not None:
                    self.runner.resume(state, wf)
                else:
                    self.runner.keep(state)
        self._declared = set()
        for obj in (d for d in docs if d.get("kind") == "WorkflowRun"):
            meta = obj.get("metadata") or {}
            key = f"{meta.get('namespace') or 'default'}/{meta.get('name')}"
            self._declared.add(key)
            if self.runner.get(key) is not None:
                continue
            try:
                run = parse_run(obj)
                wf = workflows.get(f"{run.namespace}/{run.workflow_ref.name}")
                if wf is None:
                    raise SpecError("WorkflowNotFound", f"WorkflowSpec {run.namespace}/{run.workflow_ref.name} does not exist or is refused")
                ref = run.api_key_secret_ref
                if ref is None:
                    raise SpecError("ApiKeyRequired", "spec.apiKeySecretRef must name the Secret key holding the API key the run calls with")
                secret = self._secrets.get(f"{ref.namespace}/{ref.name}")
                if secret is None or not secret.data.get(ref.key):
                    raise SpecError("SecretNotFound", f"Secret {ref.namespace}/{ref.name} has no key {ref.key!r}")
                self.runner.start(wf, run.name, run.inputs, tenant=tenant_of(secret), api_key_ref=f"{ref.namespace}/{ref.name}/{ref.key}")
                problems.pop(f"WorkflowRun {key}", None)
            except SpecError as exc:
                if f"WorkflowRun {key}" not in self.problems:
                    log.error("WorkflowRun %s refused: %s: %s", key, exc.reason, exc.message)
                problems[f"WorkflowRun {key}"] = exc
        self.problems = problems

    def _api_key(self, state: RunState) -> str | None:
        if state.api_key_ref:
            namespace, name, key = state.api_key_ref.split("/", 2)
            secret = self._secrets.get(f"{namespace}/{name}")
            return secret.data.get(key) if secret is not None else None
        # An API-started run calls with a key of the caller's tenant (the controller reads them
        # all; the run records only the tenant, never a key).
        for k in sorted(self._secrets):
            s = self._secrets[k]
            if s.labels.get(API_KEY_LABEL, "").lower() == "true" and tenant_of(s) == state.tenant:
                for v in s.data.values():
                    if v:
                        return v
        return None

    @property
    def resumed(self) -> bool:
        """Whether the runs recorded before a restart are loaded (the first ``sync`` did it)."""
        return self._resumed

    # --- the run API ----------------------------------------------------------------------------

    async def start_from_api(self, namespace: str, workflow: str, inputs: dict[str, Any], tenant: str) -> tuple[RunState, Coroutine[Any, Any, None] | None]:
        """A run started over HTTP, picked up at once (``Runner.start_here``): its state and the
        rest of its first call, for the handler's task."""
        wf = self.workflows.get(f"{namespace}/{workflow}")
        if wf is None:
            problem = self.problems.get(f"WorkflowSpec {namespace}/{workflow}")
            if problem is not None:
                raise SpecError(problem.reason, f"WorkflowSpec {workflow!r} is refused: {problem.message}")
            raise LookupError(f"no WorkflowSpec {workflow!r}")
        if self._api_key(RunState("", namespace, workflow, {}, tenant=tenant)) is None:
            raise SpecError("NoApiKey", f"tenant {tenant!r} has no API key Secret the run could call the gateway with")
        # Counted and started with no await in between: concurrent starts cannot pass the cap.
        active = self.runner.active(tenant)
        if active >= self.settings.limits.max_active_per_tenant:
            raise TooManyRuns(over_cap_message(tenant, active, self.settings.limits))
        return await self.runner.start_here(wf, self.runner.new_name(namespace, workflow), inputs, tenant=tenant)

    # --- retention ------------------------------------------------------------------------------

    def sweep(self, now: float) -> list[str]:
        """Remove the finished runs ``retention.to_remove`` picks (their journals too). A run
        declared by a manifest still in the folder is kept whatever its spec says: removing its
        journal would start it again."""
        specs = {k: SpecRetention(w.spec.ttl_after_finished, w.spec.keep_finished_runs) for k, w in self.workflows.items()}
        finished = [
            FinishedRun(key, f"{st.namespace}/{st.workflow}", st.tenant, st.finished_at or st.created_at, started_over_api=not st.api_key_ref)
            for key, st in self.runner.finished.items()
            if st.done and key not in self._declared
        ]
        gone = to_remove(finished, now, self.settings.limits, specs)
        for key in gone:
            self.runner.forget(key)
            self.store.remove(key)
        if gone:
            log.info("workflow runs removed by their retention: %d", len(gone))
        return gone

    async def _sweep_forever(self) -> None:
        while True:
            await asyncio.sleep(self.settings.sweep_interval)
            try:
                self.sweep(time.time())
            except OSError as exc:  # a journal that cannot be deleted: try again next time
                log.error("workflow run retention: %s", exc)

    async def serve_api(self) -> None:
        self._sweeper = asyncio.create_task(self._sweep_forever(), name="workflow run retention")
        api = RunApi(FileRuns(self))
        self._runner_site = web.AppRunner(api.app(), access_log=None)
        await self._runner_site.setup()
        e = self.settings.envoy
        if e.api_socket:
            path = Path(e.api_socket)
            path.unlink(missing_ok=True)
            old = os.umask(0o177)  # the socket is created 0600: only this user (and Envoy as it) reach it
            try:
                await web.UnixSite(self._runner_site, str(path), backlog=4096).start()
            finally:
                os.umask(old)
        elif e.api_port:
            await web.TCPSite(self._runner_site, e.api_host, e.api_port, backlog=4096).start()

    async def close(self) -> None:
        if self._sweeper is not None:
            self._sweeper.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._sweeper
        await self.runner.close()
        self.store.close()
        if self._runner_site is not None:
            await self._runner_site.cleanup()

    # --- outputs --------------------------------------------------------------------------------

    def extras(self) -> EnvoyExtras:
        listeners, clusters = egress_resources(self.workflows.values(), self.settings.envoy)
        routes, api_clusters = api_route_and_cluster(self.settings.envoy)
        return EnvoyExtras(routes=tuple(routes), listeners=tuple(listeners), clusters=tuple(clusters + api_clusters))

    def status_doc(self) -> dict[str, Any]:
        return {
            "workflows": {k: {"accepted": True, "steps": len(w.steps) + len(w.exit_steps)} for k, w in self.workflows.items()},
            "refused": {k: {"reason": p.reason, "message": p.message} for k, p in self.problems.items()},
            "runs": {r.key: r.phase for r in self.runner.all()},
        }


class FileRuns:
    """The run API's ``RunBackend`` in file mode: the runs of this controller's engine."""

    def __init__(self, host: WorkflowHost) -> None:
        self.host = host

    def ready(self) -> bool:
        return self.host.resumed

    async def start(self, caller: Caller, namespace: str, workflow: str, inputs: dict[str, Any], tenant: str) -> Started:
        state, then = await self.host.start_from_api(namespace, workflow, inputs, tenant)
        return Started(run_status(state), then)

    def _own(self, caller: Caller, namespace: str, name: str) -> RunState | None:
        state = self.host.runner.get(f"{namespace}/{name}")
        return state if state is not None and state.tenant in caller.tenants else None

    async def read(self, caller: Caller, namespace: str, name: str) -> dict[str, Any] | None:
        state = self._own(caller, namespace, name)
        return run_status(state) if state is not None else None

    async def runs(self, caller: Caller) -> list[dict[str, Any]]:
        mine = sorted((r for r in self.host.runner.all() if r.tenant in caller.tenants), key=lambda r: r.created_at)
        return [run_status(r) for r in mine]

    async def cancel(self, caller: Caller, namespace: str, name: str) -> dict[str, Any] | None:
        state = self._own(caller, namespace, name)
        if state is None:
            return None
        after = await self.host.runner.cancel(state.key)
        return run_status(after or state)
