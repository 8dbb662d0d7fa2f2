"""A binding's recent usage and its backends' health, from the extproc replicas' reports.

Every extproc replica reports, every few seconds, what it has counted since it started
(cumulative per binding and backend) and what its Envoy says about each backend cluster
(``extproc.usage_report``, over the authenticated policy channel). ``UsageBook`` keeps a few
samples per replica and answers:

* ``usage(binding)``: requests, failed requests, tokens and money over the last ``window``
  seconds, summed over replicas. Each replica's part is its newest sample minus its newest sample
  at least ``window`` old (zero if it started within the window; its oldest sample otherwise, so
  after a controller restart the window fills up again from the first report on). A replica that
  stopped keeps counting until its last sample leaves the window. Samples are kept at most one
  per ``window / 60``, so memory does not grow with the report rate.
* ``health()``: each backend cluster's verdict, from replicas heard within ``stale_after``
  seconds; one replica seeing a backend ejected makes it unhealthy.

``keep_usage_fresh`` puts the figures into ``ControllerState`` every ``interval`` seconds, and the
status writers patch ``status.usage`` only when they changed: at most one usage write per binding
per interval. (Not a kopf timer: kopf gives every object with a timer a finalizer, and this
operator keeps bindings free of finalizers so that deleting one never waits for the controller.)
Health reaches ``status.backendHealth`` and the ``BackendsHealthy`` condition through the same
state, as in file mode.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import deque
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from crdgol.envoy_health import BackendHealth
from crdgol.pb import policy_pb2 as pb

if TYPE_CHECKING:
    from controller.state import ControllerState

log = logging.getLogger(__name__)

__all__ = ["Totals", "UsageBook", "keep_usage_fresh", "refresh_usage", "usage_status"]


@dataclass(frozen=True, slots=True)
class Totals:
    requests: int = 0
    failed: int = 0
    input_tokens: int = 0
    output_tokens: int = 0
    spend: float = 0.0

    def __add__(self, o: Totals) -> Totals:
        return Totals(
            self.requests + o.requests,
            self.failed + o.failed,
            self.input_tokens + o.input_tokens,
            self.output_tokens + o.output_tokens,
            self.spend + o.spend,
        )

    def since(self, base: Totals) -> Totals:
        """What was counted after ``base`` (never negative: counters only grow per process)."""
        return Totals(
            max(0, self.requests - base.requests),
            max(0, self.failed - base.failed),
            max(0, self.input_tokens - base.input_tokens),
            max(0, self.output_tokens - base.output_tokens),
            max(0.0, self.spend - base.spend),
        )


ZERO = Totals()
# Replicas remembered at once (each restart is a new one; a window holds a few hundred at most).
MAX_REPORTERS = 1000


@dataclass
class _Reporter:
    started_at: float
    samples: deque[tuple[float, dict[str, Totals]]] = field(default_factory=deque)
    health: dict[str, BackendHealth] = field(default_factory=dict)
    last_seen: float = 0.0


class UsageBook:
    def __init__(self, window: float = 3600.0, *, stale_after: float = 60.0, clock: Callable[[], float] = time.time) -> None:
        self.window = window
        self.stale_after = stale_after
        self._clock = clock
        self._step = window / 60
        self._reporters: dict[str, _Reporter] = {}

    def record(self, report: pb.UsageReport) -> None:
        now = self._clock()
        r = self._reporters.get(report.reporter)
        if r is None:
            if len(self._reporters) >= MAX_REPORTERS:  # bounded whatever a reporter claims to be
                del self._reporters[min(self._reporters, key=lambda k: self._reporters[k].last_seen)]
            r = self._reporters[report.reporter] = _Reporter(started_at=report.started_at)
        by_binding: dict[str, Totals] = {}
        for u in report.usage:
            by_binding[u.binding] = by_binding.get(u.binding, ZERO) + Totals(
                u.requests, u.failed, u.input_tokens, u.output_tokens, u.spend
            )
        # The newest sample always replaces one younger than a step; older ones stay as baselines.
        if len(r.samples) >= 2 and now - r.samples[-2][0] < self._step:
            r.samples[-1] = (now, by_binding)
        else:
            r.samples.append((now, by_binding))
        r.health = {h.cluster: BackendHealth(h.healthy, h.reason) for h in report.health}
        r.last_seen = now
        self._trim(now)

    def _trim(self, now: float) -> None:
        edge = now - self.window
        for name, r in list(self._reporters.items()):
            # Keep one sample at or before the window's start: the baseline.
            while len(r.samples) >= 2 and r.samples[1][0] <= edge:
                r.samples.popleft()
            if r.samples[-1][0] <= edge:  # everything it counted is older than the window
                del self._reporters[name]

    def usage(self, binding: str) -> Totals | None:
        """``binding``'s usage over the window; None when no replica has ever counted it."""
        now = self._clock()
        self._trim(now)
        edge = now - self.window
        total: Totals | None = None
        for r in self._reporters.values():
            latest = r.samples[-1][1].get(binding)
            if latest is None:
                continue
            first_at, first = r.samples[0]
            # The newest sample at least a window old; else zero for a replica that started within
            # the window; else the oldest sample seen (the controller came up meanwhile).
            base = ZERO if first_at > edge and r.started_at >= edge else first.get(binding, ZERO)
            part = latest.since(base)
            total = part if total is None else total + part
        return total

    def health(self) -> dict[str, BackendHealth]:
        """Each reported cluster's verdict (unhealthy if any fresh replica says so)."""
        edge = self._clock() - self.stale_after
        out: dict[str, BackendHealth] = {}
        for r in self._reporters.values():
            if r.last_seen < edge:
                continue
            for cluster, verdict in r.health.items():
                if cluster not in out or (out[cluster].healthy and not verdict.healthy):
                    out[cluster] = verdict
        return out


def usage_status(t: Totals, window: float) -> dict[str, Any]:
    """The ``status.usage`` document (money as a decimal string: floats drift in YAML)."""
    return {
        "windowSeconds": int(window),
        "requests": t.requests,
        "failedRequests": t.failed,
        "inputTokens": t.input_tokens,
        "outputTokens": t.output_tokens,
        "spend": f"{t.spend:.6f}",
    }


def refresh_usage(state: ControllerState, book: UsageBook) -> bool:
    """Put every binding's usage (as far as the reports know it) into ``state``; True if any changed."""
    fresh: dict[str, dict[str, Any]] = {}
    for key in state.binding_keys():
        totals = book.usage(key)
        if totals is not None:
            fresh[key] = usage_status(totals, book.window)
    if fresh == state.binding_usage:
        return False
    state.binding_usage = fresh
    return True


async def keep_usage_fresh(
    state: ControllerState, book: UsageBook, interval: float, write: Callable[[], Awaitable[None]]
) -> None:
    """Every ``interval`` seconds, refresh the usage in ``state`` and, if it changed, ``write``
    the statuses (the operator's coalesced publish-and-sync, which patches only what changed)."""
    while True:
        await asyncio.sleep(interval)
        try:
            if refresh_usage(state, book):
                await write()
        except Exception:  # a failed round must not end the refreshing
            log.exception("refreshing the bindings' usage failed")
