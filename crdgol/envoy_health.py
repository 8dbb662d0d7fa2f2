"""Envoy's verdict on each backend cluster, read from its admin ``/clusters?format=json``.

On the ground floor because two processes read it: the controller in file mode (it can reach
Envoy's admin) and extproc on a cluster (it shares the pod's loopback with Envoy, and reports the
verdicts to the controller: ``extproc.usage_report``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

Json = dict[str, Any]


@dataclass(frozen=True, slots=True)
class BackendHealth:
    healthy: bool
    reason: str  # "" when healthy; "ejected" (outlier detection), "failed_check", "no_host"


def backend_health(clusters_json: Json) -> dict[str, BackendHealth]:
    """Envoy admin ``/clusters?format=json`` -> verdict per cluster name.

    A host is unhealthy when any failure flag is set: ``failed_outlier_check`` (ejected),
    ``failed_active_health_check``, or an EDS status other than HEALTHY/UNKNOWN.
    """
    out: dict[str, BackendHealth] = {}
    for cluster in clusters_json.get("cluster_statuses", []):
        name = str(cluster.get("name", ""))
        hosts = cluster.get("host_statuses", [])
        verdict = BackendHealth(False, "no_host")
        for host in hosts:
            hs = host.get("health_status", {})
            if hs.get("failed_outlier_check"):
                verdict = BackendHealth(False, "ejected")
            elif hs.get("failed_active_health_check"):
                verdict = BackendHealth(False, "failed_check")
            elif hs.get("eds_health_status", "HEALTHY") not in ("HEALTHY", "UNKNOWN"):
                verdict = BackendHealth(False, "unhealthy")
            else:
                verdict = BackendHealth(True, "")
                break
        out[name] = verdict
    return out
