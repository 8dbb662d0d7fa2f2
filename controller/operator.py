"""The kopf operator: AIModelBindings and Secrets from the Kubernetes API -> ``Controller``.

A thin adapter. Validation, rendering and status live in ``ControllerState``; this module only
moves objects between the API server and the state, publishes, and writes ``.status`` back.

* **Bindings**: ``create``/``update``/``resume`` upsert the object and publish; deletion is seen as
  the watch's ``DELETED`` event (an ``on.event`` handler). No finalizer is ever added: deleting a
  binding only removes it from the render, so nothing has to happen *before* it is gone (kopf
  does not call even ``optional=True`` delete handlers for an object deleted without a finalizer,
  hence the event handler). A spec that does not parse is *not* an exception — kopf would retry
  it forever — but ``Accepted=False`` in status plus a Warning Event.
* **Status**: after every publish, every binding whose ``BindingStatus`` differs from the one last
  written is patched (``StatusWriter``), so a binding also changes status when *another* resource
  changes it (its Secret appears, another binding takes its model). Writes that fail are retried
  by a periodic sweep. Patches go through a small aiohttp client built from the same
  ``kopf.ConnectionInfo`` kopf logs in with, because kopf has no public API for patching
  arbitrary objects outside their own handlers.
* **Secrets**: watched with ``on.event`` filtered by ``ControllerState.watches_secret`` (API-key
  labelled, or referenced by a binding). Event handlers, unlike change handlers, make kopf write
  nothing to the object: no ``last-handled-configuration`` annotation holding the Secret's data,
  and no ``patch`` permission on Secrets needed. A Secret referenced by a binding that arrives
  *after* the Secret was (filtered out and) listed is read once by name when the binding arrives.
* **Publishing** is coalesced (``Batcher``): handlers of many objects (e.g. the initial listing of
  5,000 bindings on a restart) share one render instead of rendering once per object.
* **A restart rolls out the whole config**: at start the operator lists the bindings, API-key
  Secrets, MCPServers and WorkflowSpecs there are, and nothing reaches Envoy or extproc until all
  of them are in the state (``controller.initial_sync``): a partial render would replace the
  previous controller's config, which Envoy and extproc keep meanwhile.
* **One active controller**: kopf peering under the given name (``--peering``, default
  ``crdgol``); ``""`` runs standalone. Peering needs kopf's peering CRDs
  (``clusterkopfpeerings.kopf.dev`` when cluster-wide, ``kopfpeerings.kopf.dev`` per namespace
  otherwise) installed and RBAC ``get/list/watch/patch`` on them; without them kopf refuses to
  start in the mandatory peering mode.
* **Workflows**: with ``OperatorOptions.workflows`` set, WorkflowSpecs, WorkflowRuns and their
  Jobs are handled by ``controller.workflow.cluster`` (its handlers join this registry).
* **Persistence**: kopf's progress and diff-base are annotations under ``operator.crdgol.io/``, so
  nothing is written into ``.status`` but the controller's own fields.
"""

from __future__ import annotations

import asyncio
import contextlib
import copy
import json
import logging
import threading
import time
from collections.abc import Awaitable, Callable, Collection, Coroutine
from dataclasses import dataclass
from typing import Any, cast

import aiohttp
import kopf

from controller.app import Controller, ControllerSettings
from controller.binding_usage import keep_usage_fresh
from controller.initial_sync import InitialSync, listed_keys
from controller.mcp_operator import PLURAL as MCP_PLURAL
from controller.mcp_operator import McpServerHandlers
from controller.models import API_KEY_LABEL, GROUP, VERSION, SpecError, parse_binding
from controller.state import BindingStatus, ControllerState
from controller.workflow.cluster import ClusterWorkflows, ClusterWorkflowSettings
from controller.workflow.runner import WorkflowMetrics

log = logging.getLogger(__name__)

PLURAL = "aimodelbindings"
KIND = "AIModelBinding"
PREFIX = "operator.crdgol.io"  # kopf's own annotations (progress, diff-base)


@dataclass(frozen=True, slots=True)
class OperatorOptions:
    """How the operator talks to the cluster; the defaults are production's."""

    namespaces: tuple[str, ...] = ()  # empty: every namespace (cluster-wide)
    peering: str = "crdgol"  # "" = standalone, no peering objects needed
    connection: kopf.ConnectionInfo | None = None  # None: in-cluster / kubeconfig
    server_timeout: int | None = None  # watch requests' server-side timeout (seconds)
    batch_delay: float = 0.05  # how long a publish waits for more changes to join it
    # How long a (re)started operator waits for the objects it listed at start before rolling out
    # without them (``controller.initial_sync``).
    initial_sync_timeout: float = 30.0
    resync_interval: float = 5.0  # sweep for status writes that failed
    workflows: ClusterWorkflowSettings | None = None  # None: WorkflowSpecs and WorkflowRuns are not run


def operator_settings(options: OperatorOptions) -> kopf.OperatorSettings:
    settings = kopf.OperatorSettings()
    # Only warnings (refusals, failures) become Kubernetes Events; kopf's per-handler INFO lines
    # would otherwise post an Event for every change of every binding.
    settings.posting.level = logging.WARNING
    settings.persistence.progress_storage = kopf.AnnotationsProgressStorage(prefix=PREFIX)
    settings.persistence.diffbase_storage = kopf.AnnotationsDiffBaseStorage(
        prefix=PREFIX, key="last-handled-configuration"
    )
    settings.persistence.finalizer = f"{PREFIX}/finalizer"  # declared, never needed
    if options.server_timeout is not None:
        settings.watching.server_timeout = options.server_timeout
        settings.watching.client_timeout = options.server_timeout + 5
    settings.peering.clusterwide = not options.namespaces
    if options.peering:
        settings.peering.standalone = False
        settings.peering.mandatory = True
        settings.peering.name = options.peering
    else:
        settings.peering.standalone = True
    return settings


# --- a minimal API client for what kopf has no public API for ---------------------------------


class KubeClient:
    """Status patches and Secret reads, with the credentials kopf's login produced."""

    def __init__(self) -> None:
        self._info: kopf.ConnectionInfo | None = None
        self._session: aiohttp.ClientSession | None = None
        self._stale: list[aiohttp.ClientSession] = []

    @property
    def logged_in(self) -> bool:
        return self._info is not None

    def use(self, info: kopf.ConnectionInfo) -> None:
        if info == self._info:
            return
        self._info = info
        if self._session is not None:
            self._stale.append(self._session)  # closed later: requests may still be in flight
            self._session = None

    def _session_for(self) -> tuple[aiohttp.ClientSession, str]:
        info = self._info
        if info is None:
            raise RuntimeError("not logged in to the Kubernetes API yet")
        if self._session is None:
            self._session = aiohttp.ClientSession(
                connector=aiohttp.TCPConnector(ssl=info.as_ssl_context()),
                headers=info.as_http_headers(),
                proxy=info.proxy_url,
                trust_env=info.trust_env,
                timeout=aiohttp.ClientTimeout(total=30),
            )
        return self._session, info.server.rstrip("/")

    async def request(
        self, method: str, path: str, body: Any = None, content_type: str = "application/json"
    ) -> tuple[int, Any]:
        session, server = self._session_for()
        data = None if body is None else json.dumps(body)
        headers = {"Content-Type": content_type} if body is not None else {}
        async with session.request(method, server + path, data=data, headers=headers) as rsp:
            text = await rsp.text()
            try:
                doc = json.loads(text) if text else None
            except ValueError:
                doc = text
            return rsp.status, doc

    async def close(self) -> None:
        for session in [*self._stale, *([self._session] if self._session else [])]:
            await session.close()
        self._stale, self._session = [], None


def _binding_path(namespace: str, name: str, subresource: str = "") -> str:
    tail = f"/{subresource}" if subresource else ""
    return f"/apis/{GROUP}/{VERSION}/namespaces/{namespace}/{PLURAL}/{name}{tail}"


# --- status --------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class _Written:
    status: BindingStatus
    doc: dict[str, Any]


class StatusWriter:
    """Keeps every binding's ``.status`` equal to ``ControllerState.status``, writing only changes."""

    def __init__(
        self,
        state: ControllerState,
        client: KubeClient,
        clock: Callable[[], float] = time.time,
        concurrency: int = 16,
    ) -> None:
        self.state = state
        self.client = client
        self.clock = clock
        self._written: dict[str, _Written] = {}
        self._refs: dict[str, kopf.Body] = {}  # key -> what Events need to name the object
        self._slots = asyncio.Semaphore(concurrency)

    def remember(self, body: kopf.Body) -> str:
        meta = body.get("metadata") or {}
        key = f"{meta.get('namespace') or 'default'}/{meta.get('name')}"
        ref = {
            "apiVersion": body.get("apiVersion") or f"{GROUP}/{VERSION}",
            "kind": body.get("kind") or KIND,
            "metadata": {"name": meta.get("name"), "namespace": meta.get("namespace"), "uid": meta.get("uid")},
        }
        self._refs[key] = kopf.Body(cast(kopf.RawBody, ref))
        return key

    def forget(self, key: str) -> None:
        self._refs.pop(key, None)
        self._written.pop(key, None)

    def written(self, key: str) -> BindingStatus | None:
        entry = self._written.get(key)
        return entry.status if entry else None

    async def sync(self) -> bool:
        """Patch every binding whose status changed; False if some write must be retried."""
        now = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(self.clock()))
        todo = [
            (key, st)
            for key, st in self.state.statuses().items()
            if key in self._refs and (self.written(key) != st)
        ]
        results = await asyncio.gather(*(self._write(key, st, now) for key, st in todo))
        return all(results)

    async def _write(self, key: str, status: BindingStatus, now: str) -> bool:
        prev = self._written.get(key)
        doc = status.to_k8s(now)
        if prev is not None:  # a condition keeps its transition time while its status holds
            before = {c["type"]: c for c in prev.doc["conditions"]}
            for cond in doc["conditions"]:
                old = before.get(cond["type"])
                if old is not None and old["status"] == cond["status"]:
                    cond["lastTransitionTime"] = old["lastTransitionTime"]
        namespace, name = key.split("/", 1)
        async with self._slots:
            try:
                code, rsp = await self.client.request(
                    "PATCH",
                    _binding_path(namespace, name, "status"),
                    {"status": doc},
                    "application/merge-patch+json",
                )
            except (aiohttp.ClientError, TimeoutError, RuntimeError) as exc:
                log.warning("cannot write status of AIModelBinding %s: %s", key, exc)
                return False
        if code == 404:  # deleted meanwhile; its DELETED event is on its way
            return True
        if code >= 300:
            message = rsp.get("message") if isinstance(rsp, dict) else rsp
            log.warning("cannot write status of AIModelBinding %s: HTTP %d %s", key, code, message)
            return False
        if key in self._refs:  # not forgotten while the patch was in flight
            self._written[key] = _Written(status, doc)
            self._announce(key, prev.status if prev else None, status)
        return True

    def _announce(self, key: str, prev: BindingStatus | None, new: BindingStatus) -> None:
        """Post an Event for each condition that turned bad (or good again)."""
        ref = self._refs.get(key)
        if ref is None:
            return
        before = {c.type: c for c in prev.conditions} if prev else {}
        try:
            for cond in new.conditions:
                old = before.get(cond.type)
                if cond.status == "False" and (old is None or (old.status, old.reason, old.message) != (cond.status, cond.reason, cond.message)):
                    kopf.warn(ref, reason=cond.reason, message=f"{cond.type}=False: {cond.message}")
                elif cond.type == "Ready" and cond.status == "True" and (old is None or old.status != "True"):
                    kopf.event(ref, type="Normal", reason=cond.reason, message=cond.message)
        except LookupError:  # outside a running operator (no kopf context): nothing to post to
            pass


# --- coalesced publishing ------------------------------------------------------------------------


class Batcher:
    """Runs ``job`` for many callers at once.

    Every caller waits for a run that *started after* it called, so whatever it changed before
    calling is included; callers arriving within ``delay`` share one run. Runs never overlap.
    """

    def __init__(self, job: Callable[[], Awaitable[None]], delay: float) -> None:
        self._job = job
        self._delay = delay
        self._next: asyncio.Future[None] | None = None
        self._lock = asyncio.Lock()
        self._tasks: set[asyncio.Task[None]] = set()

    async def __call__(self) -> None:
        if self._next is None:
            self._next = asyncio.get_running_loop().create_future()
            task = asyncio.create_task(self._run(self._next))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)
        await asyncio.shield(self._next)

    async def _run(self, fut: asyncio.Future[None]) -> None:
        await asyncio.sleep(self._delay)
        async with self._lock:
            if self._next is fut:
                self._next = None  # from here on, callers need the next run
            try:
                await self._job()
            except Exception as exc:
                fut.set_exception(exc)
            else:
                fut.set_result(None)
            finally:
                if fut.done() and not fut.cancelled():
                    fut.exception()  # mark retrieved: a caller may have been cancelled meanwhile

    async def close(self) -> None:
        for task in list(self._tasks):
            task.cancel()
        for task in list(self._tasks):
            with contextlib.suppress(asyncio.CancelledError):
                await task


# --- the operator --------------------------------------------------------------------------------


def _plain(body: kopf.Body) -> dict[str, Any]:
    """A detached plain-dict copy of a kopf body (the state keeps what it is given)."""
    return copy.deepcopy({k: body[k] for k in body})


class Operator:
    """The handlers, bound to one ``Controller``. ``registry()`` builds a fresh kopf registry."""

    def __init__(self, controller: Controller, options: OperatorOptions) -> None:
        self.controller = controller
        self.options = options
        self.client = KubeClient()
        self.status = StatusWriter(controller.state, self.client)
        self.mcp_servers = McpServerHandlers(controller.state, self.client.request, self.publish_later)
        self.publish = Batcher(self._publish_and_sync, options.batch_delay)
        self._secrets_seen: set[str] = set()  # Secrets the state holds (from events or reads)
        self._resync: asyncio.Task[None] | None = None
        self._usage: asyncio.Task[None] | None = None
        self._deadline: asyncio.TimerHandle | None = None
        self.workflows = (
            ClusterWorkflows(options.workflows, controller.state, self.client.request, self.publish, WorkflowMetrics(controller.metrics.registry))
            if options.workflows is not None
            else None
        )
        if self.workflows is not None:
            self.workflows.runner.tracer = controller.run_tracer  # None unless tracing is on

    @property
    def state(self) -> ControllerState:
        return self.controller.state

    async def _publish_and_sync(self) -> None:
        await self.controller.publish()
        await self.status.sync()
        await self.mcp_servers.sync()

    async def publish_later(self) -> None:
        await self.publish()

    async def _resync_loop(self) -> None:
        while True:
            await asyncio.sleep(self.options.resync_interval)
            try:
                await self.publish()
            except Exception:  # a failing sweep must not end the sweeping
                log.exception("status resync failed")

    # -- inputs --

    async def binding_changed(self, body: kopf.Body) -> None:
        self.status.remember(body)
        obj = _plain(body)
        self.state.upsert_binding(obj)
        await self._read_missing_secrets(obj)
        await self.publish()

    async def binding_gone(self, namespace: str, name: str) -> None:
        self.state.delete_binding(namespace, name)
        self.status.forget(f"{namespace}/{name}")
        await self.publish()

    async def secret_event(self, kind: str | None, body: kopf.Body) -> None:
        meta = body.get("metadata") or {}
        namespace, name = str(meta.get("namespace") or "default"), str(meta.get("name"))
        if kind == "DELETED":
            self.state.delete_secret(namespace, name)
            self._secrets_seen.discard(f"{namespace}/{name}")
        else:
            self.state.upsert_secret(_plain(body))
            self._secrets_seen.add(f"{namespace}/{name}")
        await self.publish()

    def watches_secret(self, body: kopf.Body) -> bool:
        return self.state.watches_secret({"metadata": body.get("metadata") or {}})

    async def _read_missing_secrets(self, obj: dict[str, Any]) -> None:
        """Read Secrets a binding names that the (filtered) watch has not delivered.

        A Secret that existed before the first binding naming it was filtered out of the watch;
        once the binding is in the state, later events of that Secret pass the filter.
        """
        try:
            spec = parse_binding(obj)
        except SpecError:
            return
        refs = spec.secret_refs()
        for ref in refs:
            if ref is None or f"{ref.namespace}/{ref.name}" in self._secrets_seen:
                continue
            try:
                code, secret = await self.client.request("GET", f"/api/v1/namespaces/{ref.namespace}/secrets/{ref.name}")
            except (aiohttp.ClientError, TimeoutError, RuntimeError) as exc:
                log.warning("cannot read Secret %s/%s: %s", ref.namespace, ref.name, exc)
                continue
            if code == 200 and isinstance(secret, dict):
                self.state.upsert_secret(secret)
                self._secrets_seen.add(f"{ref.namespace}/{ref.name}")
            elif code != 404:
                log.warning("cannot read Secret %s/%s: HTTP %d", ref.namespace, ref.name, code)

    # -- lifecycle --

    async def start(self) -> None:
        await self._hold_until_listed()
        await self.controller.start()
        if self.workflows is not None:
            await self.workflows.serve_api()
        self._resync = asyncio.create_task(self._resync_loop(), name="crdgol status resync")
        # status.usage from the extproc replicas' reports, refreshed at most every usage_interval.
        settings = self.controller.settings
        self._usage = asyncio.create_task(keep_usage_fresh(self.state, self.controller.usage, settings.usage_interval, self.publish))

    async def _hold_until_listed(self) -> None:
        """List what the cluster holds now; roll-outs wait for it (``controller.initial_sync``)."""
        if not self.client.logged_in:
            # kopf runs startup handlers before its login handlers: log in the same way now.
            with contextlib.suppress(Exception):
                await asyncio.to_thread(self.login, logger=log)
        kinds = [("AIModelBinding", f"{GROUP}/{VERSION}", PLURAL, ""), ("Secret", "v1", "secrets", f"{API_KEY_LABEL}%3Dtrue"),
                 ("MCPServer", f"{GROUP}/{VERSION}", MCP_PLURAL, "")]
        if self.workflows is not None:
            kinds.append(("WorkflowSpec", f"{GROUP}/{VERSION}", "workflowspecs", ""))
        expected = await listed_keys(self.client.request, kinds, self.options.namespaces)
        gate = InitialSync(expected, time.monotonic() + self.options.initial_sync_timeout)

        def present() -> dict[str, set[str]]:
            held = self.state.held()
            if self.workflows is not None:
                held["WorkflowSpec"] = {*self.workflows.accepted, *self.workflows.refused}
            return held

        self.controller.hold_rollout = lambda: gate.holds(present())
        if any(expected.values()):
            log.info("waiting for %s listed at start before the first roll-out", ", ".join(f"{len(v)} {k}" for k, v in expected.items() if v))
        # Past the deadline the next publish rolls out whatever is there.
        self._deadline = asyncio.get_running_loop().call_later(self.options.initial_sync_timeout, lambda: asyncio.ensure_future(self.publish()))

    async def stop(self) -> None:
        if self._deadline is not None:
            self._deadline.cancel()
        for task in (self._resync, self._usage):
            if task is not None:
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await task
        if self.workflows is not None:
            await self.workflows.close()
        await self.publish.close()
        await self.controller.stop()
        await self.client.close()

    def login(self, **kwargs: Any) -> kopf.ConnectionInfo | None:
        info = self.options.connection
        if info is None:
            info = (
                kopf.login_via_client(**kwargs)
                or kopf.login_with_service_account(**kwargs)
                or kopf.login_with_kubeconfig(**kwargs)
            )
        if info is not None:
            self.client.use(info)
        return info

    # -- registration --

    def registry(self) -> kopf.OperatorRegistry:
        registry = kopf.OperatorRegistry()
        res = (GROUP, VERSION, PLURAL)

        @kopf.on.login(registry=registry, id="login")
        def login(**kwargs: Any) -> kopf.ConnectionInfo | None:
            return self.login(**kwargs)

        @kopf.on.startup(registry=registry, id="start-controller")
        async def startup(**_: Any) -> None:
            await self.start()

        @kopf.on.cleanup(registry=registry, id="stop-controller")
        async def cleanup(**_: Any) -> None:
            await self.stop()

        @kopf.on.resume(*res, registry=registry, id="binding-resume")
        async def binding_resumed(body: kopf.Body, **_: Any) -> None:
            await self.binding_changed(body)

        @kopf.on.create(*res, registry=registry, id="binding-create")
        async def binding_created(body: kopf.Body, **_: Any) -> None:
            await self.binding_changed(body)

        @kopf.on.update(*res, registry=registry, id="binding-update")
        async def binding_updated(body: kopf.Body, **_: Any) -> None:
            await self.binding_changed(body)

        @kopf.on.event(*res, registry=registry, id="binding-gone")
        async def binding_deleted(event: kopf.RawEvent, name: str, namespace: str | None, **_: Any) -> None:
            if event.get("type") == "DELETED":
                await self.binding_gone(namespace or "default", name)

        self.mcp_servers.register(registry)

        def secret_filter(body: kopf.Body, **_: Any) -> bool:
            return self.watches_secret(body)

        @kopf.on.event("v1", "secrets", registry=registry, id="secret", when=secret_filter)
        async def secret(event: kopf.RawEvent, body: kopf.Body, **_: Any) -> None:
            await self.secret_event(event.get("type"), body)

        if self.workflows is not None:
            self.workflows.register(registry)
        return registry


async def operator_main(
    settings: ControllerSettings,
    namespaces: Collection[str],
    peering: str,
    *,
    stop_flag: asyncio.Event | threading.Event | None = None,
    ready_flag: asyncio.Event | threading.Event | None = None,
    controller: Controller | None = None,
    connection: kopf.ConnectionInfo | None = None,
    server_timeout: int | None = None,
    workflows: ClusterWorkflowSettings | None = None,
) -> None:
    """Run the operator in the current event loop until ``stop_flag`` is set (or a signal).

    The loop should be the operator's own (``run_operator``; tests run it in a thread, as kopf's
    ``KopfRunner`` does): when stopping, kopf cancels every task the loop gained since it started.
    ``connection`` replaces kubeconfig/in-cluster login (tests point it at an emulated API server);
    ``controller`` lets the caller inspect the state and snapshots it publishes.
    """
    options = OperatorOptions(
        namespaces=tuple(namespaces),
        peering=peering,
        connection=connection,
        server_timeout=server_timeout,
        workflows=workflows,
    )
    op = Operator(controller or Controller(settings), options)
    await kopf.operator(
        registry=op.registry(),
        settings=operator_settings(options),
        clusterwide=not options.namespaces,
        namespaces=list(options.namespaces),
        standalone=not peering,
        peering_name=peering or None,
        stop_flag=stop_flag,
        ready_flag=ready_flag,
    )


def run_operator(settings: ControllerSettings, namespaces: list[str], peering: str, workflows: ClusterWorkflowSettings | None = None) -> int:
    """``crdgol controller`` against a cluster: kubeconfig or in-cluster credentials."""
    runner: Callable[[Coroutine[Any, Any, None]], None]
    try:
        import uvloop

        runner = uvloop.run
    except ImportError:
        runner = asyncio.run
    try:
        runner(operator_main(settings, namespaces, peering, workflows=workflows))
    except Exception:
        log.exception("the operator stopped with an error")
        return 1
    return 0
