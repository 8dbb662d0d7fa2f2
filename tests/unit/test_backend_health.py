"""Backend health: what a binding asks for becomes Envoy cluster settings, and Envoy's admin view
of its clusters becomes each binding's status."""

from __future__ import annotations

from typing import Any

import pytest

from controller.health import BackendHealth, backend_health
from controller.models import SpecError, parse_binding
from controller.render import RenderSettings, render
from controller.state import ControllerState


def binding(**spec: Any) -> dict[str, Any]:
    backends = [
        {"name": "a", "provider": "openai", "endpoint": "http://127.0.0.1:9/v1", "model": "m"},
        {"name": "b", "provider": "openai", "endpoint": "http://127.0.0.1:10/v1", "model": "m", "priority": 1},
    ]
    return {"apiVersion": "crdgol.io/v1alpha1", "kind": "AIModelBinding", "metadata": {"name": "chat"}, "spec": {"model": "chat", "backends": backends, **spec}}


def clusters(obj: dict[str, Any]) -> list[dict[str, Any]]:
    return list(render([parse_binding(obj)], [], RenderSettings()).clusters)


def test_every_backend_cluster_has_outlier_detection_and_circuit_breakers_by_default() -> None:
    for c in clusters(binding()):
        assert c["outlier_detection"]["consecutive_5xx"] == 5
        assert c["outlier_detection"]["base_ejection_time"] == "30.000s"
        (limits,) = c["circuit_breakers"]["thresholds"]
        # Retries are the fallback path: not capped at Envoy's default of 3 concurrent.
        assert limits["max_retries"] == 1024 and limits["max_requests"] == 1024
        assert "health_checks" not in c


def test_the_binding_configures_health_and_an_active_check() -> None:
    spec = {
        "outlierDetection": {"consecutive5xx": 0},
        "circuitBreakers": {"maxRequests": 10, "maxRetries": 2},
        "activeCheck": {"path": "/healthz", "interval": "2s", "unhealthyThreshold": 2},
    }
    c = clusters(binding(health=spec))[0]
    assert "outlier_detection" not in c  # 0 turns ejection off
    assert c["circuit_breakers"]["thresholds"][0]["max_requests"] == 10
    (check,) = c["health_checks"]
    assert check["http_health_check"] == {"path": "/healthz", "host": "127.0.0.1"}
    assert (check["interval"], check["unhealthy_threshold"], check["healthy_threshold"]) == ("2.000s", 2, 1)


@pytest.mark.parametrize("health", [{"activeCheck": {"path": "healthz"}}, {"outlierDetection": {"interval": "0s"}}, {"circuitBreakers": {"maxRequests": 0}}])
def test_bad_health_settings_are_refused(health: dict[str, Any]) -> None:
    with pytest.raises(SpecError):
        parse_binding(binding(health=health))


def test_envoys_cluster_flags_become_each_bindings_backend_health() -> None:
    state = ControllerState(RenderSettings(), clock=lambda: 1.0)
    state.upsert_binding(binding())
    result = state.rebuild()
    names = [be.cluster for b in result.snapshot.bindings for be in b.backends]
    admin = {
        "cluster_statuses": [
            {"name": names[0], "host_statuses": [{"health_status": {"failed_outlier_check": True, "eds_health_status": "HEALTHY"}}]},
            {"name": names[1], "host_statuses": [{"health_status": {"eds_health_status": "HEALTHY"}}]},
            {"name": "crdgol-extproc", "host_statuses": [{"health_status": {"eds_health_status": "HEALTHY"}}]},
        ]
    }
    state.backend_health = backend_health(admin)
    assert state.backend_health[names[0]] == BackendHealth(False, "ejected")
    status = state.status("default/chat")
    assert status is not None
    assert status.to_k8s("now")["backendHealth"] == {"a": "ejected", "b": "healthy"}
    cond = {c.type: c for c in status.conditions}["BackendsHealthy"]
    assert (cond.status, cond.message) == ("False", "unhealthy: a (ejected)")
    assert status.ready  # served, and says which backend is unhealthy


def test_without_envoys_view_the_status_says_nothing_about_health() -> None:
    state = ControllerState(RenderSettings(), clock=lambda: 1.0)
    state.upsert_binding(binding())
    state.rebuild()
    status = state.status("default/chat")
    assert status is not None and status.health == () and all(c.type != "BackendsHealthy" for c in status.conditions)


def test_the_status_with_backend_health_is_valid_against_the_crd() -> None:
    from tests.unit.test_crds import schema_errors

    state = ControllerState(RenderSettings(), clock=lambda: 1.0)
    obj = binding()
    state.upsert_binding(obj)
    result = state.rebuild()
    state.backend_health = {be.cluster: BackendHealth(be.id.endswith(".b"), "" if be.id.endswith(".b") else "ejected") for b in result.snapshot.bindings for be in b.backends}
    status = state.status("default/chat")
    assert status is not None
    assert schema_errors("aimodelbindings", {**obj, "status": status.to_k8s("2026-01-01T00:00:00Z")}) == []
