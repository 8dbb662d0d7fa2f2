"""Backend health: what a binding asks for (``spec.health``), the Envoy cluster settings that
enforce it, and reading Envoy's verdict back for the binding's status.

* **Outlier detection** (on by default): a backend host that answers ``consecutive5xx`` 5xx in a
  row (or fails to connect that often) is ejected for ``baseEjectionTime`` (longer each time it
  is ejected again), and the binding's status says so. A backend cluster has one host, so Envoy's
  panic threshold still sends a first attempt there (with no healthy host at all it would answer
  "no healthy upstream" without retrying, which is worse); the route's retry policy then moves
  the request to the next priority, so callers are served by the healthy backend.
* **Circuit breakers** (on by default): caps on connections, pending and active requests and
  concurrent retries per backend, so one slow provider cannot hold every connection. Retries are a
  fallback path here, so their cap defaults to the request cap, not Envoy's 3.
* **Active health checks** (off unless ``activeCheck`` is given): an HTTP GET on ``path`` every
  ``interval``; a backend that fails ``unhealthyThreshold`` checks is out until it passes
  ``healthyThreshold``.

``backend_health`` reads Envoy's admin ``/clusters?format=json`` into per-backend verdicts; the
controller puts them in each binding's status.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Any

from controller.spec_parsing import SpecError, as_dict, int_in, parse_duration
from crdgol.envoy_health import (
    BackendHealth as BackendHealth,  # re-exported: file mode reads it here
)
from crdgol.envoy_health import backend_health as backend_health

Json = dict[str, Any]


@dataclass(frozen=True, slots=True)
class OutlierSpec:
    consecutive_5xx: int = 5  # 0 = off
    interval: float = 10.0
    base_ejection_time: float = 30.0
    max_ejection_percent: int = 100


@dataclass(frozen=True, slots=True)
class BreakerSpec:
    max_connections: int = 1024
    max_pending_requests: int = 1024
    max_requests: int = 1024
    max_retries: int = 1024


@dataclass(frozen=True, slots=True)
class ActiveCheckSpec:
    path: str = "/v1/models"
    interval: float = 10.0
    timeout: float = 2.0
    unhealthy_threshold: int = 3
    healthy_threshold: int = 1


@dataclass(frozen=True, slots=True)
class HealthSpec:
    outlier: OutlierSpec = OutlierSpec()
    breakers: BreakerSpec = BreakerSpec()
    active: ActiveCheckSpec | None = None


DEFAULT = HealthSpec()


def parse_health(raw: object) -> HealthSpec:
    """``spec.health`` -> ``HealthSpec`` (defaults for whatever is absent), or ``SpecError``."""
    if raw is None:
        return DEFAULT  # the common case, shared: 5,000 bindings parse on a restart
    h = as_dict(raw, "spec.health")
    o = as_dict(h.get("outlierDetection"), "spec.health.outlierDetection")
    c = as_dict(h.get("circuitBreakers"), "spec.health.circuitBreakers")
    d_o, d_c, d_a = OutlierSpec(), BreakerSpec(), ActiveCheckSpec()
    what = "spec.health"
    active = None
    if h.get("activeCheck") is not None:
        a = as_dict(h.get("activeCheck"), f"{what}.activeCheck")
        path = str(a.get("path", d_a.path))
        if not path.startswith("/"):
            raise SpecError("InvalidSpec", f"{what}.activeCheck.path: {path!r} must start with /")
        active = ActiveCheckSpec(
            path=path,
            interval=parse_duration(a.get("interval", "10s"), f"{what}.activeCheck.interval"),
            timeout=parse_duration(a.get("timeout", "2s"), f"{what}.activeCheck.timeout"),
            unhealthy_threshold=int_in(a.get("unhealthyThreshold", d_a.unhealthy_threshold), f"{what}.activeCheck.unhealthyThreshold", 1, 100),
            healthy_threshold=int_in(a.get("healthyThreshold", d_a.healthy_threshold), f"{what}.activeCheck.healthyThreshold", 1, 100),
        )
    return HealthSpec(
        outlier=OutlierSpec(
            consecutive_5xx=int_in(o.get("consecutive5xx", d_o.consecutive_5xx), f"{what}.outlierDetection.consecutive5xx", 0, 1000),
            interval=parse_duration(o.get("interval", "10s"), f"{what}.outlierDetection.interval"),
            base_ejection_time=parse_duration(o.get("baseEjectionTime", "30s"), f"{what}.outlierDetection.baseEjectionTime"),
            max_ejection_percent=int_in(o.get("maxEjectionPercent", 100), f"{what}.outlierDetection.maxEjectionPercent", 0, 100),
        ),
        breakers=BreakerSpec(
            max_connections=int_in(c.get("maxConnections", d_c.max_connections), f"{what}.circuitBreakers.maxConnections", 1, 10**6),
            max_pending_requests=int_in(c.get("maxPendingRequests", d_c.max_pending_requests), f"{what}.circuitBreakers.maxPendingRequests", 1, 10**6),
            max_requests=int_in(c.get("maxRequests", d_c.max_requests), f"{what}.circuitBreakers.maxRequests", 1, 10**6),
            max_retries=int_in(c.get("maxRetries", d_c.max_retries), f"{what}.circuitBreakers.maxRetries", 0, 10**6),
        ),
        active=active,
    )


def _seconds(value: float) -> str:
    return f"{value:.3f}s"


@functools.lru_cache(maxsize=4096)
def cluster_health(h: HealthSpec, host: str) -> Json:
    """The fields a backend cluster gains from ``h`` (merged into the cluster by the caller).

    Cached (most bindings share the defaults): callers must not mutate the result."""
    out: Json = {
        "circuit_breakers": {
            "thresholds": [
                {
                    "priority": "DEFAULT",
                    "max_connections": h.breakers.max_connections,
                    "max_pending_requests": h.breakers.max_pending_requests,
                    "max_requests": h.breakers.max_requests,
                    "max_retries": h.breakers.max_retries,
                }
            ]
        },
    }
    o = h.outlier
    if o.consecutive_5xx > 0:
        out["outlier_detection"] = {
            "consecutive_5xx": o.consecutive_5xx,
            "consecutive_gateway_failure": o.consecutive_5xx,
            "interval": _seconds(o.interval),
            "base_ejection_time": _seconds(o.base_ejection_time),
            "max_ejection_percent": o.max_ejection_percent,
            "enforcing_consecutive_5xx": 100,
            "enforcing_consecutive_gateway_failure": 100,
            # Success-rate ejection needs many hosts; a backend cluster has one.
            "enforcing_success_rate": 0,
        }
    a = h.active
    if a is not None:
        out["health_checks"] = [
            {
                "timeout": _seconds(a.timeout),
                "interval": _seconds(a.interval),
                "unhealthy_threshold": a.unhealthy_threshold,
                "healthy_threshold": a.healthy_threshold,
                "http_health_check": {"path": a.path, "host": host},
            }
        ]
    return out
