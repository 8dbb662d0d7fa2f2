"""A workflow's AI steps are priced by its own namespace's binding: another namespace serving
the same model name at another price neither changes the run's cost nor shows it its prices."""

from __future__ import annotations

from pathlib import Path

from prometheus_client import CollectorRegistry

from controller.workflow.cost import BackendPrice, prices_by_namespace
from controller.workflow.egress import WorkflowEnvoySettings
from controller.workflow.host import WorkflowHost, WorkflowSettings
from controller.workflow.runner import WorkflowMetrics
from crdgol.pb import policy_pb2 as pb

OURS = BackendPrice("gpt-4o", 2_500_000, 10_000_000)
THEIRS = BackendPrice("gpt-4o", 900_000_000, 900_000_000)


def _binding(namespace: str, price: BackendPrice) -> pb.Binding:
    backend = pb.Backend(model=price.upstream_model, input_per_mtok_micros=price.input_per_mtok_micros, output_per_mtok_micros=price.output_per_mtok_micros)
    return pb.Binding(key=f"{namespace}/chat", model="chat", backends=[backend])


def _workflow(namespace: str) -> dict[str, object]:
    step = {"name": "ask", "type": "ai-inference", "aiInference": {"binding": "chat", "prompt": "hello"}}
    return {"apiVersion": "crdgol.io/v1alpha1", "kind": "WorkflowSpec", "metadata": {"name": "wf", "namespace": namespace}, "spec": {"steps": [step]}}


def test_each_namespaces_workflow_is_priced_by_its_own_binding(tmp_path: Path) -> None:
    # Listed in both orders: whichever namespace comes last must not win for the other.
    for bindings in ([_binding("team-a", OURS), _binding("team-b", THEIRS)], [_binding("team-b", THEIRS), _binding("team-a", OURS)]):
        host = WorkflowHost(WorkflowSettings(tmp_path, "http://127.0.0.1:9", WorkflowEnvoySettings()), WorkflowMetrics(CollectorRegistry()))
        served = {b.key: b.model for b in bindings}
        host.sync([_workflow("team-a"), _workflow("team-b")], [], served, prices_by_namespace(bindings))
        assert host.workflows["team-a/wf"].steps[0].prices == (OURS,)
        assert host.workflows["team-b/wf"].steps[0].prices == (THEIRS,)
