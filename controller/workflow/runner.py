"""Running workflow runs: the engine's actions carried out, every transition recorded first.

``Runner`` owns the runs of one controller. Each run is an asyncio task that takes events (step
outcomes, wake-ups, cancellation) one at a time, asks the pure core for the next state and
actions, appends the state to the run's journal (``RunStore``: one file per run) and only
then acts: starts calls, aborts them, schedules a wake-up. A controller killed at any point
finds on restart every finished step recorded and re-runs only what was in flight (each call
carries an Idempotency-Key of run, step and attempt): at-least-once, never a finished step again.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import random
import secrets
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

import aiohttp
import orjson
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from controller.workflow.accept import CompiledWorkflow

if TYPE_CHECKING:
    from controller.run_tracing import RunTracer
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
        self.start_delay = Histogram(
            "crdgol_workflow_step_start_delay_seconds",
            "From a step becoming ready (or its retry falling due) to its call starting.",
            buckets=(0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1.0),
            registry=r,
        )


class RunStore:
    """One journal file per run: each transition appends the whole new state as one JSON line.

    Appending costs a fraction of writing a temporary file and renaming it (the rename dominated
    the engine's CPU per step). A write() that returned is in the kernel's page cache, so a killed
    controller loses nothing it recorded; a torn last line (a power cut mid-write) is skipped on
    load, falling back to the state before it.
    """

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        folder.mkdir(parents=True, exist_ok=True)

    def _path(self, key: str) -> Path:
        namespace, name = key.split("/", 1)
        return self.folder / f"{namespace}.{name}.jsonl"

    def save(self, state: RunState) -> None:
        doc = state.to_json()
        try:
            line = orjson.dumps(doc) + b"\n"
        except TypeError:  # an integer beyond 64 bits in some output: the slower encoder
            line = json.dumps(doc, separators=(",", ":")).encode() + b"\n"
        with open(self._path(state.key), "ab") as f:
            f.write(line)

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
    events: asyncio.Queue[Event] = field(default_factory=asyncio.Queue)
    calls: dict[str, asyncio.Task[None]] = field(default_factory=dict)
    task: asyncio.Task[None] | None = None
    done: asyncio.Event = field(default_factory=asyncio.Event)
    span: Any = None  # the run's span, when tracing is on (controller.run_tracing)


class Runner:
    """The runs of one controller (file mode): start, look up, cancel, resume."""

    def __init__(
        self,
        store: RunStore,
        target: CallTarget,
        metrics: WorkflowMetrics,
        api_key: Callable[[RunState], str | None],
        clock: Callable[[], float] = time.time,
        rng: random.Random | None = None,
    ) -> None:
        self.store, self.target, self.metrics, self.api_key, self.clock = store, target, metrics, api_key, clock
        self.rng = rng or random.Random()
        self.runs: dict[str, _Live] = {}
        self.finished: dict[str, RunState] = {}
        self.tracer: RunTracer | None = None  # set when tracing is on
        self._http: aiohttp.ClientSession | None = None

    async def _session(self) -> aiohttp.ClientSession:
        if self._http is None:
            self._http = aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=None), connector=aiohttp.TCPConnector(limit=0))
        return self._http

    def get(self, key: str) -> RunState | None:
        live = self.runs.get(key)
        return live.state if live is not None else self.finished.get(key)

    def all(self) -> list[RunState]:
        return [*(r.state for r in self.runs.values()), *self.finished.values()]

    def new_name(self, namespace: str, workflow: str) -> str:
        """A run name no run of this controller has (recorded or live)."""
        while True:
            name = f"{workflow}-{secrets.token_hex(4)}"
            if self.get(f"{namespace}/{name}") is None:
                return name

    def start(self, wf: CompiledWorkflow, name: str, inputs: dict[str, Any], *, tenant: str, api_key_ref: str = "") -> RunState:
        state = new_run(wf, name, wf.spec.namespace, inputs, self.clock(), tenant=tenant, api_key_ref=api_key_ref)
        self.store.save(state)  # recorded before anything runs
        self._launch(state, wf)
        return state

    def resume(self, state: RunState, wf: CompiledWorkflow) -> None:
        """Continue a recorded run: attempts in flight at the crash are started again."""
        if state.phase in RUN_DONE:
            self.finished[state.key] = state
            return
        steps = dict(state.steps)
        for name, s in steps.items():
            if s.phase == "Running":  # its outcome was never recorded: run that attempt again
                steps[name] = replace(s, phase="Pending", attempts=s.attempts - 1, retry_at=state.created_at if s.attempts > 1 else None)
        self._launch(replace(state, steps=steps), wf)

    def _launch(self, state: RunState, wf: CompiledWorkflow) -> None:
        live = _Live(state, wf)
        if self.tracer is not None:
            live.span = self.tracer.run_started(state)
        self.runs[state.key] = live
        live.events.put_nowait(Tick(self.clock()))
        live.task = asyncio.create_task(self._loop(live), name=f"run {state.key}")

    async def cancel(self, key: str, reason: str = "cancelled") -> RunState | None:
        live = self.runs.get(key)
        if live is None:
            return self.finished.get(key)
        live.events.put_nowait(Cancel(self.clock(), reason))
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(live.done.wait(), 10)
        return self.get(key)

    async def wait(self, key: str) -> RunState | None:
        live = self.runs.get(key)
        if live is not None:
            await live.done.wait()
        return self.get(key)

    async def _loop(self, live: _Live) -> None:
        wf = live.workflow
        self._count(live.state.workflow, live.state.phase, +1)
        try:
            while True:
                event = await live.events.get()
                before = live.state
                state, actions = advance(wf, before, event, self.rng.random)
                if state is before:
                    continue
                self.store.save(state)  # the transition is durable before any action
                live.state = state
                if state.phase != before.phase:
                    self._count(state.workflow, before.phase, -1)
                    self._count(state.workflow, state.phase, +1)
                if self._act(live, actions):
                    break
        finally:
            self.runs.pop(live.state.key, None)
            if live.state.phase in RUN_DONE:
                self.finished[live.state.key] = live.state
            for t in live.calls.values():
                t.cancel()
            if self.tracer is not None:
                self.tracer.run_finished(live.span, live.state)
            live.done.set()

    def _count(self, workflow: str, phase: str, delta: int) -> None:
        self.metrics.runs.labels(workflow, phase).inc(delta)

    def _act(self, live: _Live, actions: list[Action]) -> bool:
        loop = asyncio.get_running_loop()
        for a in actions:
            match a:
                case Call():
                    if a.attempt > 1:
                        self.metrics.retries.labels(live.state.workflow).inc()
                    self.metrics.start_delay.observe(max(0.0, self.clock() - a.ready_at))
                    live.calls[a.step] = asyncio.create_task(self._attempt(live, a))
                case Abort():
                    task = live.calls.pop(a.step, None)
                    if task is not None:
                        task.cancel()
                case Wake():
                    loop.call_later(max(0.0, a.at - self.clock()), live.events.put_nowait, Tick(a.at))
                case Finish():
                    log.info("workflow run %s finished: %s", live.state.key, a.phase)
                    return True
        return False

    async def _attempt(self, live: _Live, call: Call) -> None:
        started, started_ns = time.perf_counter(), time.time_ns()
        step = live.workflow.step(call.step)
        self.metrics.in_flight.inc()
        event: StepSucceeded | StepFailed
        try:
            key = self.api_key(live.state)
            if key is None and call.type == "ai-inference":
                event = StepFailed(call.step, call.attempt, "no API key to call the gateway with for this run's tenant", self.clock(), final=True)
            else:
                http = await self._session()
                ctx = CallContext(run_key=live.state.key, workflow_key=live.workflow.key, api_key=key or "", session=f"wf.{live.state.namespace}.{live.state.name}")
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
            raise
        finally:
            self.metrics.in_flight.dec()
        outcome = "succeeded" if isinstance(event, StepSucceeded) else "failed"
        if self.tracer is not None:
            self.tracer.step_finished(live.span, call, event, started_ns)
        self.metrics.step_seconds.labels(call.type, outcome).observe(time.perf_counter() - started)
        if live.calls.get(call.step) is asyncio.current_task():
            del live.calls[call.step]
        live.events.put_nowait(event)

    async def close(self) -> None:
        for live in list(self.runs.values()):
            if live.task is not None:
                live.task.cancel()
        for live in list(self.runs.values()):
            for t in live.calls.values():
                t.cancel()
        if self._http is not None:
            await self._http.close()
