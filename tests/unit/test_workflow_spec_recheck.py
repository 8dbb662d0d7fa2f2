"""On a cluster, a WorkflowSpec deleted while its recheck timer fires stays gone: the late recheck
must not accept it again (its egress listener would come back for good)."""

from __future__ import annotations

from typing import Any

import kopf
from prometheus_client import CollectorRegistry

from controller.envoy_config import RenderSettings
from controller.state import ControllerState
from controller.workflow.cluster import ClusterWorkflows, ClusterWorkflowSettings
from controller.workflow.egress import EGRESS_LISTENER, WorkflowEnvoySettings
from controller.workflow.runner import WorkflowMetrics

SPEC = {
    "metadata": {"name": "post-it", "namespace": "default", "generation": 1},
    "spec": {"steps": [{"name": "post", "type": "http-request", "httpRequest": {"method": "POST", "url": "https://helpdesk.example.com/t"}}]},
}


async def test_a_recheck_that_finds_its_spec_deleted_takes_the_spec_and_its_egress_out() -> None:
    exists = True

    async def request(method: str, path: str, body: Any, content_type: str) -> tuple[int, Any]:
        return (200, {}) if exists else (404, {"kind": "Status", "code": 404})

    async def publish() -> None:
        pass

    state = ControllerState(RenderSettings())
    engine = ClusterWorkflows(
        ClusterWorkflowSettings(gateway_url="http://127.0.0.1:9", egress=WorkflowEnvoySettings(egress_port=10001)),
        state, request, publish, WorkflowMetrics(CollectorRegistry()),
    )

    def listeners() -> set[str]:
        return {str(x["name"]) for x in state.extras.listeners}

    try:
        await engine.spec_changed(kopf.Body(SPEC))  # type: ignore[arg-type]
        assert "default/post-it" in engine.accepted and EGRESS_LISTENER in listeners()
        exists = False
        await engine.spec_gone("default", "post-it")  # the watch's DELETED event
        await engine.spec_changed(kopf.Body(SPEC))  # type: ignore[arg-type]  # the timer, with the old body
        assert "default/post-it" not in engine.accepted and EGRESS_LISTENER not in listeners()
    finally:
        await engine.close()
