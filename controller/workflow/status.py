"""A run's status as users see it: the WorkflowRun status subresource, the API and the CLI.

One shape everywhere (the CRD's ``status``), plus ``name``, ``namespace`` and ``workflow`` so an
API answer stands on its own. Times are RFC 3339; outputs are capped by the engine and marked.

On a cluster the status subresource is also the run's durable record: ``k8s_status`` adds what
resuming needs (the steps' ``outcome``, a pending retry's ``retryAt``) and ``state_from_status``
reads a run back from it after a controller restart.
"""

from __future__ import annotations

import calendar
import time
from typing import Any

from controller.workflow.accept import CompiledWorkflow
from controller.workflow.cost import money, parse_money
from controller.workflow.engine import RUN_DONE, RunState, StepState


def rfc3339(t: float | None) -> str | None:
    return None if t is None else time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(t))


def run_status(state: RunState) -> dict[str, Any]:
    steps = []
    totals = {"input": 0, "output": 0, "total": 0}
    cost: int | None = None
    for name, s in state.steps.items():
        item: dict[str, Any] = {"name": name, "phase": s.phase, "attempts": s.attempts}
        for k, v in (("startedAt", rfc3339(s.started_at)), ("finishedAt", rfc3339(s.finished_at)), ("message", s.message)):
            if v:
                item[k] = v
        if s.outputs is not None:
            item["outputs"] = s.outputs
        if s.truncated:
            item["outputsTruncated"] = True
        if s.tokens:
            item["tokens"] = s.tokens
            for k in totals:
                totals[k] += int(s.tokens.get(k, 0))
        if s.cost_micros is not None:
            item["cost"] = money(s.cost_micros)
            cost = (cost or 0) + s.cost_micros
        steps.append(item)
    out: dict[str, Any] = {
        "name": state.name,
        "namespace": state.namespace,
        "workflow": state.workflow,
        "phase": state.phase,
        "tenant": state.tenant,
        "steps": steps,
        "tokens": totals,
    }
    if cost is not None:
        out["cost"] = money(cost)
    for k, v in (("startedAt", rfc3339(state.started_at)), ("finishedAt", rfc3339(state.finished_at)), ("message", state.message)):
        if v:
            out[k] = v
    return out


def parse_rfc3339(text: object) -> float | None:
    if not isinstance(text, str):
        return None
    try:
        return float(calendar.timegm(time.strptime(text[:19], "%Y-%m-%dT%H:%M:%S")))
    except ValueError:
        return None


def k8s_status(state: RunState, generation: int, now: float) -> dict[str, Any]:
    """The WorkflowRun's ``.status`` as a JSON merge patch: every top-level field present (None
    removes a field the previous write had), the lists replaced whole."""
    doc = run_status(state)
    for k in ("name", "namespace", "workflow"):
        del doc[k]
    for item in doc["steps"]:
        s = state.steps[item["name"]]
        if s.phase == "Pending" and s.retry_at is not None:
            item["retryAt"] = rfc3339(s.retry_at)
    done = state.phase in RUN_DONE
    reason = state.phase if done else ("Running" if state.phase == "Running" else "Pending")
    completed = {
        "type": "Completed",
        "status": "True" if done else "False",
        "reason": reason,
        "message": state.message or (f"the run {state.phase.lower()}" if done else "the run has not ended"),
        "observedGeneration": generation,
        "lastTransitionTime": rfc3339(state.finished_at if done else (state.started_at or now)),
    }
    accepted = {
        "type": "Accepted", "status": "True", "reason": "Started", "message": f"running WorkflowSpec {state.workflow}",
        "observedGeneration": generation, "lastTransitionTime": rfc3339(state.created_at or now),
    }
    out: dict[str, Any] = {k: None for k in ("startedAt", "finishedAt", "message", "cost", "outcome")}
    out.update(doc)
    out["outcome"] = state.outcome or None
    out["observedGeneration"] = generation
    out["conditions"] = [accepted, completed]
    return out


def state_from_status(status: dict[str, Any], wf: CompiledWorkflow, name: str, namespace: str, inputs: dict[str, Any], created_at: float, api_key_ref: str) -> RunState:
    """A run as its status recorded it (steps the spec no longer has are dropped, new ones Pending)."""
    recorded = {str(i.get("name")): i for i in status.get("steps") or [] if isinstance(i, dict)}
    steps: dict[str, StepState] = {}
    for c in wf.all_steps():
        i = recorded.get(c.spec.name)
        if i is None:
            steps[c.spec.name] = StepState()
            continue
        steps[c.spec.name] = StepState(
            phase=str(i.get("phase") or "Pending"),
            attempts=int(i.get("attempts") or 0),
            started_at=parse_rfc3339(i.get("startedAt")),
            finished_at=parse_rfc3339(i.get("finishedAt")),
            retry_at=parse_rfc3339(i.get("retryAt")),
            message=str(i.get("message") or ""),
            outputs=i.get("outputs"),
            truncated=bool(i.get("outputsTruncated")),
            tokens=i.get("tokens"),
            cost_micros=parse_money(i.get("cost")),
        )
    return RunState(
        name=name,
        namespace=namespace,
        workflow=wf.spec.name,
        inputs=inputs,
        tenant=str(status.get("tenant") or ""),
        api_key_ref=api_key_ref,
        phase=str(status.get("phase") or "Pending"),
        outcome=str(status.get("outcome") or ""),
        created_at=created_at,
        started_at=parse_rfc3339(status.get("startedAt")),
        finished_at=parse_rfc3339(status.get("finishedAt")),
        message=str(status.get("message") or ""),
        steps=steps,
    )
