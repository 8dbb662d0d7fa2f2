"""A run's status as users see it: the WorkflowRun status subresource, the API and the CLI.

One shape everywhere (the CRD's ``status``), plus ``name``, ``namespace`` and ``workflow`` so an
API answer stands on its own. Times are RFC 3339; outputs are capped by the engine and marked.
"""

from __future__ import annotations

import time
from typing import Any

from controller.workflow.engine import RunState


def rfc3339(t: float | None) -> str | None:
    return None if t is None else time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(t))


def run_status(state: RunState) -> dict[str, Any]:
    steps = []
    totals = {"input": 0, "output": 0, "total": 0}
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
    for k, v in (("startedAt", rfc3339(state.started_at)), ("finishedAt", rfc3339(state.finished_at)), ("message", state.message)):
        if v:
            out[k] = v
    return out
