"""The workflow engine's pure, deterministic core.

``advance(workflow, state, event, rng)`` -> ``(new_state, actions)``. No I/O, no clock, no
randomness of its own: time comes in the event, jitter from the injected ``rng`` (a callable giving
floats in [0, 1)), so the same inputs give the same outputs and a recorded state is all a restarted
controller needs. States are immutable; every transition builds a new one.

The adapters (file mode, kopf) record the new state durably, then carry out the actions: ``Call``
(start one attempt of a step; its outcome comes back as ``StepSucceeded`` / ``StepFailed`` with
the same attempt number, and anything else for that attempt is ignored, so each attempt's outcome
counts at most once), ``Abort`` (stop an attempt in flight), ``Wake`` (send a ``Tick`` at that
time), ``Finish``.

Rules: a step starts when every step it depends on has finished and its ``when`` holds (else it is
Skipped); a dependency that Failed skips it, one that was Skipped skips it unless the step says
``onDependencySkipped: run``. A failed attempt is retried (``retry.limit`` more times, backoff
``initial * factor**(n-1)`` capped at ``max``, equal jitter, at least the upstream's Retry-After)
unless the failure is final. A step that fails for good with ``onFailure: fail`` fails the run:
attempts in flight are aborted, steps not started are Skipped. Then the exit steps run, seeing the
outcome as ``run.phase``; the run's phase is that outcome.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from typing import Any

import orjson

from controller.workflow.accept import CompiledStep, CompiledWorkflow
from controller.workflow.expr import ExprError

PENDING, RUNNING, SUCCEEDED, FAILED, SKIPPED, CANCELLED = "Pending", "Running", "Succeeded", "Failed", "Skipped", "Cancelled"
STEP_DONE = frozenset({SUCCEEDED, FAILED, SKIPPED})
RUN_DONE = frozenset({SUCCEEDED, FAILED, CANCELLED})
MAX_OUTPUT_BYTES = 32 * 1024

Rng = Callable[[], float]


@dataclass(frozen=True, slots=True)
class StepState:
    phase: str = PENDING
    attempts: int = 0
    started_at: float | None = None
    finished_at: float | None = None
    ready_at: float | None = None  # when its dependencies were all done (for the start delay)
    retry_at: float | None = None  # a failed attempt's retry waits until then
    message: str = ""
    outputs: Any = None
    truncated: bool = False
    tokens: dict[str, int] | None = None
    cost_micros: int | None = None  # money, when its model is priced (``controller.workflow.cost``)


@dataclass(frozen=True, slots=True)
class RunState:
    name: str
    namespace: str
    workflow: str
    inputs: dict[str, Any]
    tenant: str = ""
    api_key_ref: str = ""  # "namespace/name/key" of the Secret a resource-started run calls with
    phase: str = PENDING
    outcome: str = ""  # the steps' outcome, once decided (then exit steps run)
    created_at: float = 0.0
    started_at: float | None = None
    finished_at: float | None = None
    message: str = ""
    steps: dict[str, StepState] = field(default_factory=dict)

    @property
    def key(self) -> str:
        return f"{self.namespace}/{self.name}"

    @property
    def done(self) -> bool:
        return self.phase in RUN_DONE

    def to_json(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "namespace": self.namespace,
            "workflow": self.workflow,
            "inputs": self.inputs,
            "tenant": self.tenant,
            "apiKeyRef": self.api_key_ref,
            "phase": self.phase,
            "outcome": self.outcome,
            "createdAt": self.created_at,
            "startedAt": self.started_at,
            "finishedAt": self.finished_at,
            "message": self.message,
            "steps": {
                n: {
                    "phase": s.phase,
                    "attempts": s.attempts,
                    "startedAt": s.started_at,
                    "finishedAt": s.finished_at,
                    "readyAt": s.ready_at,
                    "retryAt": s.retry_at,
                    "message": s.message,
                    "outputs": s.outputs,
                    "truncated": s.truncated,
                    "tokens": s.tokens,
                    "costMicros": s.cost_micros,
                }
                for n, s in self.steps.items()
            },
        }

    @staticmethod
    def from_json(d: dict[str, Any]) -> RunState:
        return RunState(
            name=d["name"],
            namespace=d["namespace"],
            workflow=d["workflow"],
            inputs=d["inputs"],
            tenant=d.get("tenant", ""),
            api_key_ref=d.get("apiKeyRef", ""),
            phase=d["phase"],
            outcome=d.get("outcome", ""),
            created_at=d.get("createdAt", 0.0),
            started_at=d.get("startedAt"),
            finished_at=d.get("finishedAt"),
            message=d.get("message", ""),
            steps={
                n: StepState(
                    phase=s["phase"],
                    attempts=s["attempts"],
                    started_at=s.get("startedAt"),
                    finished_at=s.get("finishedAt"),
                    ready_at=s.get("readyAt"),
                    retry_at=s.get("retryAt"),
                    message=s.get("message", ""),
                    outputs=s.get("outputs"),
                    truncated=s.get("truncated", False),
                    tokens=s.get("tokens"),
                    cost_micros=s.get("costMicros"),
                )
                for n, s in d["steps"].items()
            },
        )


def new_run(wf: CompiledWorkflow, name: str, namespace: str, inputs: dict[str, Any], now: float, *, tenant: str = "", api_key_ref: str = "") -> RunState:
    return RunState(
        name=name,
        namespace=namespace,
        workflow=wf.spec.name,
        inputs=inputs,
        tenant=tenant,
        api_key_ref=api_key_ref,
        created_at=now,
        steps={s.spec.name: StepState() for s in wf.all_steps()},
    )


# --- events and actions -------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Tick:
    """Time passed (start, resume, a retry or the run deadline is due)."""

    now: float


@dataclass(frozen=True, slots=True)
class StepSucceeded:
    step: str
    attempt: int
    outputs: Any
    now: float
    tokens: dict[str, int] | None = None
    cost_micros: int | None = None


@dataclass(frozen=True, slots=True)
class StepFailed:
    step: str
    attempt: int
    message: str
    now: float
    final: bool = False  # no retry would help (a 4xx, a bad expression)
    retry_after: float | None = None  # seconds, from the upstream's Retry-After


@dataclass(frozen=True, slots=True)
class Cancel:
    now: float
    reason: str = "cancelled"


Event = Tick | StepSucceeded | StepFailed | Cancel


@dataclass(frozen=True, slots=True)
class Call:
    """Start ``attempt`` of ``step`` with this request (already rendered)."""

    step: str
    attempt: int
    type: str
    request: dict[str, Any]
    timeout: float | None
    ready_at: float


@dataclass(frozen=True, slots=True)
class Abort:
    step: str
    attempt: int


@dataclass(frozen=True, slots=True)
class Wake:
    at: float


@dataclass(frozen=True, slots=True)
class Finish:
    phase: str


Action = Call | Abort | Wake | Finish


# --- the transition function --------------------------------------------------------------------


def advance(wf: CompiledWorkflow, state: RunState, event: Event, rng: Rng) -> tuple[RunState, list[Action]]:
    """Apply ``event`` to ``state``; the new state and what to do next."""
    if state.done:
        return state, []
    steps = dict(state.steps)
    actions: list[Action] = []
    run = _Run(wf, state, steps, actions, rng, event.now)
    match event:
        case StepSucceeded():
            run.succeeded(event)
        case StepFailed():
            run.failed(event)
        case Cancel():
            if not run.outcome:
                run.conclude(CANCELLED, event.reason)
            else:  # cancelling while exit steps run: stop them too
                run.abort_group(wf.exit_steps, event.reason)
        case Tick():
            pass
    run.schedule()
    return run.result(), actions


class _Run:
    """One transition's working copy (private: ``advance`` is the interface)."""

    def __init__(self, wf: CompiledWorkflow, state: RunState, steps: dict[str, StepState], actions: list[Action], rng: Rng, now: float) -> None:
        self.wf, self.state, self.steps, self.actions, self.rng, self.now = wf, state, steps, actions, rng, now
        self.phase = RUNNING
        self.outcome = state.outcome
        self.message = state.message
        self.started_at = state.started_at if state.started_at is not None else now
        self.finished_at: float | None = None

    def result(self) -> RunState:
        return replace(
            self.state,
            phase=self.phase,
            outcome=self.outcome,
            started_at=self.started_at,
            finished_at=self.finished_at,
            message=self.message,
            steps=self.steps,
        )

    # outcomes of attempts

    def succeeded(self, ev: StepSucceeded) -> None:
        s = self.steps.get(ev.step)
        if s is None or s.phase != RUNNING or s.attempts != ev.attempt:
            return  # not this attempt's (a late answer after a timeout or an abort)
        outputs, truncated = cap_outputs(ev.outputs)
        self.steps[ev.step] = replace(
            s, phase=SUCCEEDED, finished_at=ev.now, outputs=outputs, truncated=truncated, tokens=ev.tokens, cost_micros=ev.cost_micros, message=""
        )

    def failed(self, ev: StepFailed) -> None:
        s = self.steps.get(ev.step)
        if s is None or s.phase != RUNNING or s.attempts != ev.attempt:
            return
        spec = self.wf.spec.step(ev.step)
        exit_step = any(c.spec.name == ev.step for c in self.wf.exit_steps)
        may_retry = not ev.final and s.attempts <= spec.retry.limit and (exit_step or not self.outcome)
        if may_retry:
            delay = backoff(spec.retry.backoff.initial, spec.retry.backoff.factor, spec.retry.backoff.max, s.attempts, self.rng)
            if ev.retry_after is not None:
                delay = max(delay, ev.retry_after)
            self.steps[ev.step] = replace(
                s, phase=PENDING, retry_at=ev.now + delay, message=f"attempt {s.attempts} failed: {ev.message}; retrying in {delay:.3g}s"
            )
            return
        tries = f" (after {s.attempts} attempts)" if s.attempts > 1 else ""
        self.steps[ev.step] = replace(s, phase=FAILED, finished_at=ev.now, message=f"{ev.message}{tries}")
        if spec.on_failure == "fail" and not exit_step and not self.outcome:
            self.conclude(FAILED, f"step {ev.step!r} failed: {ev.message}")

    def conclude(self, outcome: str, message: str) -> None:
        """The steps' outcome is decided: stop what runs, skip what has not started."""
        self.outcome, self.message = outcome, message
        self.abort_group(self.wf.steps, "run failed" if outcome == FAILED else message)

    def abort_group(self, group: tuple[CompiledStep, ...], why: str) -> None:
        for c in group:
            name = c.spec.name
            s = self.steps[name]
            if s.phase == RUNNING:
                self.actions.append(Abort(name, s.attempts))
                self.steps[name] = replace(s, phase=FAILED, finished_at=self.now, message=f"aborted: {why}")
            elif s.phase == PENDING:
                self.steps[name] = replace(s, phase=SKIPPED, finished_at=self.now, retry_at=None, message=f"not run: {why}")

    # scheduling

    def schedule(self) -> None:
        timeout = self.wf.spec.timeout
        if not self.outcome and timeout is not None and self.now >= self.started_at + timeout:
            self.conclude(FAILED, f"the run timed out after {timeout:g}s")
        if not self.outcome:
            self._start_ready(self.wf.steps)
            if all(self.steps[c.spec.name].phase in STEP_DONE for c in self.wf.steps):
                failed = [c.spec.name for c in self.wf.steps if self.steps[c.spec.name].phase == FAILED and c.spec.on_failure == "fail"]
                self.outcome = FAILED if failed else SUCCEEDED
        if self.outcome:
            self._start_ready(self.wf.exit_steps)
            if all(self.steps[c.spec.name].phase in STEP_DONE for c in self.wf.exit_steps):
                self.phase, self.finished_at = self.outcome, self.now
                bad = [c.spec.name for c in self.wf.exit_steps if self.steps[c.spec.name].phase == FAILED]
                if bad:
                    self.message = "; ".join(filter(None, [self.message, f"exit step {bad[0]!r} failed"]))
                self.actions.append(Finish(self.phase))
                return
        wakes = [s.retry_at for s in self.steps.values() if s.phase == PENDING and s.retry_at is not None]
        if timeout is not None and not self.outcome:
            wakes.append(self.started_at + timeout)
        if wakes:
            self.actions.append(Wake(min(wakes)))

    def _activation(self) -> dict[str, Any]:
        return {
            "inputs": self.state.inputs,
            "steps": {n: {"phase": s.phase, "outputs": s.outputs} for n, s in self.steps.items() if s.phase in STEP_DONE},
            "run": {"name": self.state.name, "phase": self.outcome or RUNNING},
            "params": {},
        }

    def _start_ready(self, group: tuple[CompiledStep, ...]) -> None:
        limit = self.wf.spec.parallelism or 1 << 30
        in_flight = sum(1 for s in self.steps.values() if s.phase == RUNNING)
        progressed = True
        while progressed:  # a skip or a transform can make later steps ready in the same event
            progressed = False
            for c in group:
                name = c.spec.name
                s = self.steps[name]
                if s.phase != PENDING:
                    continue
                if s.retry_at is not None:
                    if s.retry_at > self.now or in_flight >= limit:
                        continue
                    self._call(c, replace(s, retry_at=None))
                    in_flight += 1
                    continue
                deps = [self.steps[d] for d in c.spec.depends_on]
                if any(d.phase not in STEP_DONE for d in deps):
                    continue
                why = _skip_reason(c, deps, self.steps)
                if why:
                    self.steps[name] = replace(s, phase=SKIPPED, finished_at=self.now, message=why)
                    progressed = True
                    continue
                s = replace(s, ready_at=s.ready_at if s.ready_at is not None else self.now)
                self.steps[name] = s
                act = self._activation()
                try:
                    if c.when is not None and not _truthy(c.when.eval(act)):
                        self.steps[name] = replace(s, phase=SKIPPED, finished_at=self.now, message=f"when is false: {c.when.source}")
                        progressed = True
                        continue
                    if c.expression is not None:  # transform: evaluated right here, no call
                        act["params"] = {k: t.render(act) for k, t in c.inputs}
                        out, cut = cap_outputs(_jsonable(c.expression.eval(act)))
                        self.steps[name] = replace(s, phase=SUCCEEDED, attempts=1, started_at=self.now, finished_at=self.now, outputs=out, truncated=cut)
                        progressed = True
                        continue
                except ExprError as exc:
                    self.steps[name] = replace(s, phase=FAILED, attempts=s.attempts + 1, finished_at=self.now, message=str(exc))
                    if c.spec.on_failure == "fail" and group is self.wf.steps:
                        self.conclude(FAILED, f"step {name!r} failed: {exc}")
                        return
                    progressed = True
                    continue
                if in_flight >= limit:
                    continue
                self._call(c, s)
                in_flight += 1
                progressed = True  # a render error may have failed it at once

    def _call(self, c: CompiledStep, s: StepState) -> None:
        name = c.spec.name
        attempt = s.attempts + 1
        act = self._activation()
        try:
            act["params"] = {k: t.render(act) for k, t in c.inputs}
            request = render_request(c, act)
        except ExprError as exc:
            self.steps[name] = replace(s, phase=RUNNING, attempts=attempt, started_at=self.now)
            self.failed(StepFailed(name, attempt, str(exc), self.now, final=True))
            return
        self.steps[name] = replace(s, phase=RUNNING, attempts=attempt, started_at=self.now if s.started_at is None else s.started_at)
        ready = s.retry_at if s.retry_at is not None else (s.ready_at if s.ready_at is not None else self.now)
        self.actions.append(Call(name, attempt, c.spec.type, request, c.spec.timeout, ready))


def _skip_reason(c: CompiledStep, deps: list[StepState], steps: dict[str, StepState]) -> str:
    for d, st in zip(c.spec.depends_on, deps, strict=True):
        if st.phase == FAILED:
            return f"not run: dependency {d!r} failed"
        if st.phase == SKIPPED and c.spec.on_dependency_skipped == "skip":
            return f"not run: dependency {d!r} was skipped"
    return ""


def _truthy(value: Any) -> bool:
    if not isinstance(value, bool):
        raise ExprError(f"when must be true or false, not {type(value).__name__}")
    return value


def _jsonable(value: Any) -> Any:
    try:
        json.dumps(value)
    except (TypeError, ValueError) as exc:
        raise ExprError(f"the value is not JSON: {exc}") from None
    return value


def render_request(c: CompiledStep, act: dict[str, Any]) -> dict[str, Any]:
    """The request of one attempt, every template filled in."""
    s = c.spec
    if s.ai_inference is not None:
        req: dict[str, Any] = {"model": c.model, "messages": [{"role": r, "content": t.render_text(act)} for r, t in c.messages]}
        if s.ai_inference.max_tokens is not None:
            req["max_tokens"] = s.ai_inference.max_tokens
        return req
    if s.http_request is not None:
        assert c.url is not None
        return {
            "method": s.http_request.method,
            "url": c.url.render_text(act),
            "headers": {k: t.render_text(act) for k, t in c.headers},
            "body": None if c.body is None else c.body.render_text(act),
        }
    if s.container is not None:
        return {
            "image": s.container.image,
            "command": list(s.container.command),
            "args": [t.render_text(act) for t in c.args],
            "env": {k: t.render_text(act) for k, t in c.env},
            "params": act["params"],
        }
    return {"params": act["params"]}


def backoff(initial: float, factor: float, cap: float, attempt: int, rng: Rng) -> float:
    """Delay before retrying after failed attempt number ``attempt`` (1-based): equal jitter."""
    base = min(cap, initial * factor ** (attempt - 1))
    return base / 2 + rng() * base / 2


def cap_outputs(outputs: Any) -> tuple[Any, bool]:
    """Outputs as recorded: anything over ``MAX_OUTPUT_BYTES`` of JSON is cut and marked."""
    try:
        raw = orjson.dumps(outputs)
    except TypeError:  # not JSON orjson takes (an integer beyond 64 bits): the slower encoder
        raw = json.dumps(outputs, separators=(",", ":")).encode()
    if len(raw) <= MAX_OUTPUT_BYTES:
        return outputs, False
    return {"truncated": True, "preview": raw[: MAX_OUTPUT_BYTES // 2].decode("utf-8", "ignore")}, True
