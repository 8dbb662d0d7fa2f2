"""Running workflow runs: the engine's actions carried out, every transition recorded first.

``Runner`` owns the runs of one controller, in file mode and on a cluster alike. Each run is an
asyncio task that takes events (step outcomes, wake-ups, cancellation) one at a time, asks the
pure core for the next state and actions, records the state (a ``RunRecorder``: the run's journal
file in file mode, the WorkflowRun's status subresource on a cluster) and only then acts: starts
calls, aborts them, schedules a wake-up. A controller killed at any point finds on restart every
finished step recorded and re-runs only what was in flight (each call carries an Idempotency-Key
of run, step and attempt): at-least-once, never a finished step again.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import random
import resource
import secrets
import time
from collections import OrderedDict, defaultdict
from collections.abc import Awaitable, Callable, Coroutine
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

import aiohttp
import orjson
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from controller.workflow.accept import CompiledStep, CompiledWorkflow
from controller.workflow.calls import CallContext, CallTarget, call_ai, call_http
from controller.workflow.engine import (
    RUN_DONE,
    Abort,
    Action,
    Call,
    Cancel,
    Event,
    Finish,
    RunState,
    StepFailed,
    StepSucceeded,
    Tick,
    Wake,
    advance,
    new_run,
)

if TYPE_CHECKING:
    from controller.run_tracing import RunTracer

log = logging.getLogger(__name__)


class WorkflowMetrics:
    def __init__(self, registry: CollectorRegistry) -> None:
        r = registry
        self.runs = Gauge("crdgol_workflow_runs", "Workflow runs known to the controller, by workflow and phase.", ["workflow", "phase"], registry=r)
        self.step_seconds = Histogram(
            "crdgol_workflow_step_duration_seconds", "Duration of one step attempt, by step type and outcome.", ["type", "outcome"], registry=r
        )
        self.in_flight = Gauge("crdgol_workflow_steps_in_flight", "Step attempts in flight.", registry=r)
        self.retries = Counter("crdgol_workflow_step_retries", "Step attempts after the first.", ["workflow"], registry=r)
        self.pickup_delay = Histogram(
            "crdgol_workflow_run_pickup_delay_seconds",
            "From a run being created (or resumed) to the engine starting it (its first steps become ready then).",
            buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.25, 0.375, 0.5, 0.75, 1.0, 1.25, 1.5, 2.0, 2.5, 5.0),
            registry=r,
        )
        self.first_start_delay = Histogram(
            "crdgol_workflow_run_first_start_delay_seconds",
            "From a run being created (or resumed) to its first step attempt starting: pickup plus that step's ready -> start.",
            buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.25, 0.375, 0.5, 0.75, 1.0, 1.25, 1.5, 2.0, 2.5, 5.0),
            registry=r,
        )
        self.start_delay = Histogram(
            "crdgol_workflow_step_start_delay_seconds",
            "From a step becoming ready (its dependencies done in a started run, or its retry falling due) to its attempt starting.",
            buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.25, 0.5, 1.0, 2.5, 5.0),
            registry=r,
        )


class RunRecorder(Protocol):
    """Where a run's state is kept, durably, before the engine acts on it."""

    def created(self, state: RunState) -> None:
        """A new run, recorded before anything of it runs."""

    async def record(self, state: RunState) -> None:
        """A transition; durable when this returns."""


# Carries out one attempt of a container step (on a cluster: a Kubernetes Job).
ContainerRunner = Callable[[RunState, CompiledStep, Call], Awaitable[StepSucceeded | StepFailed]]


def _fd_limit() -> int:
    soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
    return soft if soft != resource.RLIM_INFINITY else 1 << 20


class RunStore:
    """One journal file per run: each transition appends the whole new state as one JSON line.

    Appending costs a fraction of writing a temporary file and renaming it (the rename dominated
    the engine's CPU per step), and a live run's journal stays open (up to ``max_open`` at once),
    so a transition is one write() (opening and closing the file was a third of the rest). A
    write() that returned is in the kernel's page cache, so a killed controller loses nothing it
    recorded; a torn last line (a power cut mid-write) is skipped on load, falling back to the
    state before it. Journals are 0600: they hold the runs' inputs and outputs.
    """

    def __init__(self, folder: Path, max_open: int | None = None) -> None:
        self.folder = folder
        # Enough for every live run of a burst: with fewer than there are runs in flight, the
        # least recently used journal is closed and reopened on nearly every transition (opening
        # them was 12% of the controller's CPU with 1,000 runs and 512 open). A quarter of the
        # process's file limit, the rest left to sockets.
        self.max_open = max_open if max_open is not None else max(64, min(8192, _fd_limit() // 4))
        self._open: OrderedDict[str, int] = OrderedDict()  # run key -> its journal's descriptor
        folder.mkdir(parents=True, exist_ok=True)

    def _path(self, key: str) -> Path:
        namespace, name = key.split("/", 1)
        return self.folder / f"{namespace}.{name}.jsonl"

    def _fd(self, key: str) -> int:
        fd = self._open.get(key)
        if fd is not None:
            self._open.move_to_end(key)
            return fd
        fd = os.open(self._path(key), os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
        self._open[key] = fd
        if len(self._open) > self.max_open:
            os.close(self._open.popitem(last=False)[1])
        return fd

    def save(self, state: RunState) -> None:
        doc = state.to_json()
        try:
            line = orjson.dumps(doc) + b"\n"
        except TypeError:  # an integer beyond 64 bits in some output: the slower encoder
            line = json.dumps(doc, separators=(",", ":")).encode() + b"\n"
        fd = self._fd(state.key)
        view = memoryview(line)
        while view:
            view = view[os.write(fd, view) :]
        if state.phase in RUN_DONE:
            os.close(self._open.pop(state.key))

    def created(self, state: RunState) -> None:
        self.save(state)

    async def record(self, state: RunState) -> None:
        self.save(state)  # in the page cache when write() returns: a kill loses nothing

    def remove(self, key: str) -> None:
        """Forget a run: its journal is deleted (retention)."""
        fd = self._open.pop(key, None)
        if fd is not None:
            os.close(fd)
        self._path(key).unlink(missing_ok=True)

    def close(self) -> None:
        while self._open:
            os.close(self._open.popitem()[1])

    def load_all(self) -> list[RunState]:
        out = []
        for p in sorted(self.folder.glob("*.jsonl")):
            state = None
            try:
                for line in p.read_text(encoding="utf-8").splitlines():
                    try:
                        state = RunState.from_json(json.loads(line))
                    except (ValueError, KeyError):
                        log.error("workflow run journal %s: skipping an unreadable line", p)
            except OSError as exc:
                log.error("workflow run journal %s is unreadable (%s): skipping it", p, exc)
            if state is not None:
                out.append(state)
        return out


@dataclass
class _Live:
    state: RunState
    workflow: CompiledWorkflow
    # One transition at a time per run. With a synchronous recorder (file mode) it is never
    # contended: nothing awaits while holding it.
    lock: asyncio.Lock = field(default_factory=asyncio.Lock)
    calls: dict[str, asyncio.Task[None]] = field(default_factory=dict)
    timers: set[asyncio.TimerHandle] = field(default_factory=set)
    done: asyncio.Event = field(default_factory=asyncio.Event)
    since: float | None = None  # when it was created (or resumed), until its first attempt starts
    span: Any = None  # the run's span, when tracing is on (controller.run_tracing)


class Runner:
    """The runs of one controller: start, look up, cancel, resume.

    ``on_transition(before, after)`` is told of every recorded transition (the cluster adapter
    posts Events from it); ``containers`` runs container steps (None: there is no cluster, and
    the specs were refused before any run); ``keep_finished`` keeps ended runs for look-ups (the
    run API in file mode; on a cluster they live in their resources).
    """

    def __init__(
        self,
        store: RunRecorder,
        target: CallTarget,
        metrics: WorkflowMetrics,
        api_key: Callable[[RunState], str | None],
        clock: Callable[[], float] = time.time,
        rng: random.Random | None = None,
        *,
        containers: ContainerRunner | None = None,
        on_transition: Callable[[RunState, RunState], None] | None = None,
        keep_finished: bool = True,
    ) -> None:
        self.store, self.target, self.metrics, self.api_key, self.clock = store, target, metrics, api_key, clock
        self.rng = rng or random.Random()
        self.containers, self.on_transition, self.keep_finished = containers, on_transition, keep_finished
        self.runs: dict[str, _Live] = {}
        self.finished: dict[str, RunState] = {}
        self._active: defaultdict[str, int] = defaultdict(int)  # live runs by tenant (the run API's cap)
        self.tracer: RunTracer | None = None  # set when tracing is on
        self._http: aiohttp.ClientSession | None = None
        self._background: set[asyncio.Task[None]] = set()

    async def _session(self) -> aiohttp.ClientSession:
        if self._http is None:
            self._http = aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=None), connector=aiohttp.TCPConnector(limit=0))
        return self._http

    def get(self, key: str) -> RunState | None:
        live = self.runs.get(key)
        return live.state if live is not None else self.finished.get(key)

    def all(self) -> list[RunState]:
        return [*(r.state for r in self.runs.values()), *self.finished.values()]

    def active(self, tenant: str) -> int:
        """The tenant's runs this controller is running (Pending or Running)."""
        return self._active.get(tenant, 0)

    def keep(self, state: RunState) -> None:
        """Keep a recorded run that is not running (ended, or waiting for its spec) for look-ups."""
        if state.key not in self.finished:
            self._count(state.workflow, state.phase, +1)
        self.finished[state.key] = state

    def forget(self, key: str) -> RunState | None:
        """Drop a finished run kept for look-ups (retention removed it)."""
        state = self.finished.pop(key, None)
        if state is not None:
            self._count(state.workflow, state.phase, -1)
        return state

    def new_name(self, namespace: str, workflow: str) -> str:
        """A run name no run of this controller has (recorded or live)."""
        while True:
            name = f"{workflow}-{secrets.token_hex(4)}"
            if self.get(f"{namespace}/{name}") is None:
                return name

    def start(self, wf: CompiledWorkflow, name: str, inputs: dict[str, Any], *, tenant: str, api_key_ref: str = "") -> RunState:
        state = new_run(wf, name, wf.spec.namespace, inputs, self.clock(), tenant=tenant, api_key_ref=api_key_ref)
        self.store.created(state)  # recorded before anything runs
        self._launch(state, wf)
        return state

    def resume(self, state: RunState, wf: CompiledWorkflow) -> None:
        """Continue a recorded run: attempts in flight at the crash are started again."""
        if state.phase in RUN_DONE:
            if self.keep_finished:
                self.keep(state)
            return
        steps = dict(state.steps)
        for name, s in steps.items():
            if s.phase == "Running":  # its outcome was never recorded: run that attempt again
                steps[name] = replace(s, phase="Pending", attempts=s.attempts - 1, retry_at=state.created_at if s.attempts > 1 else None)
        self._launch(replace(state, steps=steps), wf)

    async def start_here(self, wf: CompiledWorkflow, name: str, inputs: dict[str, Any], *, tenant: str) -> tuple[RunState, Coroutine[Any, Any, None] | None]:
        """Create a run and pick it up in the calling task, with no turn of the event loop in
        between: (its state with its first steps Running, a coroutine). The coroutine starts the
        first of those calls at once and runs what follows from it; the caller must await it in
        the same task (the step's abort cancels that task), after answering its own client if it
        likes (the run API writes its 201 first). None: no call to run.

        Under a burst of new runs this puts the wait in front of the run's creation (requests
        waiting for the loop) instead of between its creation and its first step starting
        (``crdgol_workflow_run_first_start_delay_seconds``; benchmarks/RESULTS.md)."""
        state = new_run(wf, name, wf.spec.namespace, inputs, self.clock(), tenant=tenant)
        self.store.created(state)  # recorded before anything runs
        live = self._register(state, wf)
        now = self.clock()
        self.metrics.pickup_delay.observe(max(0.0, now - (live.since or now)))
        call = await self._deliver(live, Tick(now))
        return live.state, (self._drive(live, None, call) if call is not None else None)

    def _register(self, state: RunState, wf: CompiledWorkflow) -> _Live:
        live = _Live(state, wf, since=self.clock())
        if self.tracer is not None:
            live.span = self.tracer.run_started(state)
        self.runs[state.key] = live
        self._active[state.tenant] += 1
        self._count(state.workflow, state.phase, +1)
        return live

    def _launch(self, state: RunState, wf: CompiledWorkflow) -> None:
        live = self._register(state, wf)
        self._spawn(live, self._pick_up(live, live.since or self.clock()))

    async def _pick_up(self, live: _Live, since: float) -> None:
        """The run's first transition: its steps without dependencies become ready now, when
        the engine gets to the run (how long that took is the pickup delay, reported apart)."""
        now = self.clock()
        self.metrics.pickup_delay.observe(max(0.0, now - since))
        await self._drive(live, Tick(now), None)

    def _spawn(self, live: _Live, work: Coroutine[Any, Any, None], step: str = "") -> None:
        """A task of the run: a step's call (kept to abort it) or a delivery (start, wake-up)."""
        task = asyncio.create_task(work, name=f"run {live.state.key} {step or 'event'}")
        if step:
            live.calls[step] = task
        else:
            self._background.add(task)
            task.add_done_callback(self._background.discard)

    async def cancel(self, key: str, reason: str = "cancelled") -> RunState | None:
        live = self.runs.get(key)
        if live is None:
            return self.finished.get(key)
        await self._deliver(live, Cancel(self.clock(), reason), run_here=False)
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(live.done.wait(), 10)
        return self.get(key)

    async def wait(self, key: str) -> RunState | None:
        live = self.runs.get(key)
        if live is not None:
            await live.done.wait()
        return self.get(key)

    async def _drive(self, live: _Live, event: Event | None, call: Call | None) -> None:
        """Deliver ``event``, then run ``call`` and every call its outcome hands back, in this
        task: a step whose dependency just finished starts at once, without queueing behind
        the event loop's other work for a new task (what the ready -> start delay measures)."""
        if event is not None:
            call = await self._deliver(live, event)
        while call is not None:
            outcome = await self._attempt(live, call)
            call = await self._deliver(live, outcome)

    async def _deliver(self, live: _Live, event: Event, *, run_here: bool = True) -> Call | None:
        """Apply ``event``, record the new state, then act. With ``run_here`` it returns one call
        for the calling task to run itself (the first one the transition starts); the others
        get tasks of their own."""
        async with live.lock:
            if live.done.is_set():
                return None
            before = live.state
            state, actions = advance(live.workflow, before, event, self.rng.random)
            if state is before:
                return None
            await self.store.record(state)  # the transition is durable before any action
            live.state = state
            if state.phase != before.phase:
                self._count(state.workflow, before.phase, -1)
                self._count(state.workflow, state.phase, +1)
            if self.on_transition is not None:
                self.on_transition(before, state)
            return self._act(live, actions, run_here)

    def _count(self, workflow: str, phase: str, delta: int) -> None:
        self.metrics.runs.labels(workflow, phase).inc(delta)

    def _act(self, live: _Live, actions: list[Action], run_here: bool) -> Call | None:
        loop = asyncio.get_running_loop()
        mine: Call | None = None
        current = asyncio.current_task() if run_here else None
        for a in actions:
            match a:
                case Call():
                    if a.attempt > 1:
                        self.metrics.retries.labels(live.state.workflow).inc()
                    if mine is None and current is not None:
                        mine = a
                        live.calls[a.step] = current
                    else:
                        self._spawn(live, self._drive(live, None, a), a.step)
                case Abort():
                    task = live.calls.pop(a.step, None)
                    if task is not None and task is not current:
                        task.cancel()
                case Wake():
                    timer = loop.call_later(max(0.0, a.at - self.clock()), self._wake, live, a.at)
                    live.timers.add(timer)
                case Finish():
                    log.info("workflow run %s finished: %s", live.state.key, a.phase)
                    self._finish(live)
                    return None
        return mine

    def _wake(self, live: _Live, at: float) -> None:
        if not live.done.is_set():
            self._spawn(live, self._drive(live, Tick(at), None))

    def _finish(self, live: _Live) -> None:
        if self.runs.get(live.state.key) is live:
            del self.runs[live.state.key]
            self._active[live.state.tenant] -= 1
            if not self._active[live.state.tenant]:
                del self._active[live.state.tenant]
        if live.state.phase in RUN_DONE and self.keep_finished:
            self.finished[live.state.key] = live.state
        current = asyncio.current_task()
        for t in live.calls.values():
            if t is not current:
                t.cancel()
        live.calls.clear()
        for timer in live.timers:
            timer.cancel()
        if self.tracer is not None:
            self.tracer.run_finished(live.span, live.state)
        live.done.set()

    async def _attempt(self, live: _Live, call: Call) -> StepSucceeded | StepFailed:
        """One attempt, from its start (when the ready -> start delay is taken) to its outcome."""
        self.metrics.start_delay.observe(max(0.0, self.clock() - call.ready_at))
        if live.since is not None:
            self.metrics.first_start_delay.observe(max(0.0, self.clock() - live.since))
            live.since = None
        started = time.perf_counter()
        span = self.tracer.step_started(live.span, call) if self.tracer is not None else None
        step = live.workflow.step(call.step)
        self.metrics.in_flight.inc()
        event: StepSucceeded | StepFailed
        try:
            key = self.api_key(live.state) if call.type == "ai-inference" else ""
            if key is None:
                event = StepFailed(call.step, call.attempt, "no API key to call the gateway with for this run's tenant", self.clock(), final=True)
            elif call.type == "container":
                if self.containers is None:
                    event = StepFailed(call.step, call.attempt, "container steps need a cluster to run on", self.clock(), final=True)
                else:
                    async with asyncio.timeout(call.timeout):
                        event = await self.containers(live.state, step, call)
            else:
                http = await self._session()
                ctx = CallContext(
                    run_key=live.state.key, workflow_key=live.workflow.key, api_key=key, session=f"wf.{live.state.namespace}.{live.state.name}",
                    traceparent=self.tracer.traceparent(span) if self.tracer is not None and span is not None else "",
                )
                fn = call_ai if call.type == "ai-inference" else call_http
                async with asyncio.timeout(call.timeout):
                    event = await fn(http, self.target, ctx, step, call)
        except TimeoutError:
            event = StepFailed(call.step, call.attempt, f"timed out after {call.timeout:g}s", self.clock())
        except aiohttp.ClientError as exc:
            event = StepFailed(call.step, call.attempt, f"call failed: {type(exc).__name__}: {exc}", self.clock())
        except (ValueError, TypeError, KeyError) as exc:
            # A request the client refuses to send (a rendered header with a line break) or an
            # answer it cannot read: fail the attempt for good rather than leave the step Running.
            log.warning("workflow run %s step %s attempt %d: %s", live.state.key, call.step, call.attempt, type(exc).__name__)
            event = StepFailed(call.step, call.attempt, f"the call could not be made or read: {type(exc).__name__}: {exc}", self.clock(), final=True)
        except asyncio.CancelledError:
            self.metrics.step_seconds.labels(call.type, "aborted").observe(time.perf_counter() - started)
            if self.tracer is not None and span is not None:
                self.tracer.step_aborted(span)
            raise
        finally:
            self.metrics.in_flight.dec()
        outcome = "succeeded" if isinstance(event, StepSucceeded) else "failed"
        if self.tracer is not None and span is not None:
            self.tracer.step_finished(span, event)
        self.metrics.step_seconds.labels(call.type, outcome).observe(time.perf_counter() - started)
        if live.calls.get(call.step) is asyncio.current_task():
            del live.calls[call.step]
        return event

    async def close(self) -> None:
        for task in list(self._background):
            task.cancel()
        for live in list(self.runs.values()):
            for timer in live.timers:
                timer.cancel()
            for t in live.calls.values():
                t.cancel()
        if self._http is not None:
            await self._http.close()
