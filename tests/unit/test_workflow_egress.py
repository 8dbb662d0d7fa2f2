"""The workflow engine's Envoy resources: an egress listener that names only the specs' hosts."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import yaml

from controller.manifests import load_folder
from controller.render import EnvoyExtras, RenderSettings, render
from controller.workflow.accept import accept
from controller.workflow.egress import (
    WorkflowEnvoySettings,
    api_route_and_cluster,
    egress_resources,
)
from controller.workflow.spec import parse_workflow
from crdgol.cli import write_sds_files
from crdgol.stack import envoy_binary

ROOT = Path(__file__).resolve().parents[2]
SETTINGS = WorkflowEnvoySettings(egress_port=18081, api_socket="/tmp/crdgol-test/workflows.sock")


def example() -> tuple[object, ...]:
    docs = list(yaml.safe_load_all((ROOT / "examples/support-triage/workflow.yaml").read_text()))
    wf = accept(parse_workflow(docs[0]), {"triage-model": "triage-model"}, file_mode=True)
    return (wf,)


def test_each_named_host_gets_a_virtual_host_with_a_route_per_step_and_everything_else_a_403() -> None:
    (listener,), clusters = egress_resources(example(), SETTINGS)  # type: ignore[arg-type]
    hcm = listener["filter_chains"][0]["filters"][0]["typed_config"]
    vhosts = {v["name"]: v for v in hcm["route_config"]["virtual_hosts"]}
    helpdesk = vhosts["crdgol-egress.http.127.0.0.1.8081"]
    assert helpdesk["domains"] == ["127.0.0.1:8081"]
    steps = [r["name"] for r in helpdesk["routes"]]
    assert sorted(steps[:-1]) == ["default/support-triage/page-oncall", "default/support-triage/post-to-helpdesk", "default/support-triage/report-failure"]
    assert steps[-1] == "unknown-step"  # last: a named host, but not a step's request
    assert all(r["route"]["timeout"] == "10.000s" for r in helpdesk["routes"][:-1])
    assert helpdesk["routes"][-1]["direct_response"]["status"] == 403
    assert vhosts["not-allowed"]["domains"] == ["*"] and vhosts["not-allowed"]["routes"][0]["direct_response"]["status"] == 403
    assert [c["name"] for c in clusters] == ["crdgol-egress.http.127.0.0.1.8081"]


def test_no_http_step_no_egress_listener() -> None:
    assert egress_resources((), SETTINGS) == ([], [])


def test_the_gateway_config_with_the_workflow_resources_is_accepted_by_envoy(tmp_path: Path) -> None:
    m = load_folder(ROOT / "examples" / "support-triage")
    listeners, clusters = egress_resources(example(), SETTINGS)  # type: ignore[arg-type]
    routes, api = api_route_and_cluster(SETTINGS)
    extras = EnvoyExtras(routes=tuple(routes), listeners=tuple(listeners), clusters=tuple(clusters + api))
    config = tmp_path / "envoy.json"
    result = render(m.bindings, m.secrets, RenderSettings(sds_dir=str(tmp_path)), extras=extras)
    write_sds_files(tmp_path, result.secrets)  # the provider credentials the static config names
    config.write_text(json.dumps(result.envoy))
    proc = subprocess.run([envoy_binary(), "--mode", "validate", "-c", str(config), "--log-level", "error"], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_on_a_cluster_the_run_api_route_adds_the_controllers_token_and_resolves_its_service() -> None:
    from controller.workflow.egress import API_CLUSTER, api_route_and_cluster
    from crdgol.workflow_contract import API_TOKEN_HEADER

    settings = WorkflowEnvoySettings(api_host="crdgol-controller.crdgol-system.svc", api_port=8091, api_token="s3cret-token")
    (route,), (cluster,) = api_route_and_cluster(settings)
    assert route["route"]["cluster"] == API_CLUSTER
    assert route["request_headers_to_add"] == [
        {"header": {"key": API_TOKEN_HEADER, "value": "s3cret-token"}, "append_action": "OVERWRITE_IF_EXISTS_OR_ADD"}
    ]
    assert cluster["type"] == "STRICT_DNS"
    assert "s3cret-token" not in repr(settings)
    (_,), (local,) = api_route_and_cluster(WorkflowEnvoySettings(api_socket="/tmp/x.sock"))
    assert local["type"] == "STATIC"
