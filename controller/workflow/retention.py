"""How many runs a tenant may have going, and which finished runs are removed: pure rules.

Runs started over HTTP are an attacker's lever: any holder of an API key can ``POST`` them. So:

* **Active cap** (``RunLimits.max_active_per_tenant``, the controller's
  ``--workflow-max-active-runs``): a tenant with that many runs Pending or Running (of all
  workflows together, however they were started) gets a ``429`` for the next ``POST``. It is the
  platform's guard, set on the controller, not on a WorkflowSpec (whose author would otherwise lift
  the cap on its own tenant's callers).
* **Finished runs** are removed ``ttl`` seconds after they ended, and beyond the newest ``keep`` of
  one workflow and tenant (oldest first). The controller's defaults (``--workflow-run-ttl``,
  ``--workflow-keep-finished-runs``) apply to **runs started over HTTP** only. A WorkflowSpec's own
  ``ttlAfterFinished`` / ``keepFinishedRuns`` replace them for its runs and then apply to **every**
  run of it, including those created as resources (like Argo's ``ttlStrategy``; the field it
  leaves out keeps the controller's default): a run someone created by hand is removed only when
  its spec asks.

``to_remove`` decides; the adapters delete (the run's journal in file mode, the WorkflowRun
resource on a cluster).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass

RETRY_AFTER_SECONDS = 5  # a 429's Retry-After: runs end at their own pace, so a hint, not a promise


@dataclass(frozen=True, slots=True)
class RunLimits:
    max_active_per_tenant: int = 100
    finished_ttl: float = 24 * 3600.0  # seconds after a run ended
    keep_finished: int = 100  # per workflow and tenant


@dataclass(frozen=True, slots=True)
class SpecRetention:
    """A WorkflowSpec's own retention (None: the controller's default, for HTTP-started runs)."""

    ttl: float | None = None
    keep: int | None = None


@dataclass(frozen=True, slots=True)
class FinishedRun:
    """One finished run as retention sees it."""

    key: str  # namespace/name
    workflow: str  # namespace/name of its WorkflowSpec
    tenant: str
    finished_at: float
    started_over_api: bool
    uid: str = ""  # on a cluster: the resource's uid, so a deletion cannot hit a new run of the same name


def to_remove(finished: Iterable[FinishedRun], now: float, limits: RunLimits, specs: Mapping[str, SpecRetention]) -> list[str]:
    """Keys of the finished runs to remove now: past their TTL, or beyond the newest ``keep`` of
    their workflow and tenant. A run whose spec sets neither field and that was not started over
    HTTP is never chosen."""
    groups: dict[tuple[str, str], list[FinishedRun]] = {}
    out: list[str] = []
    for run in finished:
        own = specs.get(run.workflow, SpecRetention())
        if own.ttl is None and own.keep is None and not run.started_over_api:
            continue
        ttl = own.ttl if own.ttl is not None else limits.finished_ttl
        if run.finished_at + ttl <= now:
            out.append(run.key)
        else:
            groups.setdefault((run.workflow, run.tenant), []).append(run)
    for (workflow, _), runs in groups.items():
        own = specs.get(workflow, SpecRetention())
        keep = own.keep if own.keep is not None else limits.keep_finished
        if len(runs) > keep:
            runs.sort(key=lambda r: (r.finished_at, r.key))
            out.extend(r.key for r in runs[: len(runs) - keep])
    return out


def over_cap_message(tenant: str, active: int, limits: RunLimits) -> str:
    return (
        f"tenant {tenant!r} has {active} workflow runs Pending or Running, the most it may have at once "
        f"({limits.max_active_per_tenant}); retry when some have finished"
    )
