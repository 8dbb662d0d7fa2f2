"""The workflow run API on a cluster: ``/v1/workflows/...`` through a real gateway onto WorkflowRuns.

The operator runs against kmock's emulated API server and serves the gateway's config over xDS and
the policy stream (Unix sockets); a real Envoy and extproc take that config, so a request with an
API key is authenticated by extproc and routed by Envoy to the operator's run API, which creates,
reads and cancels WorkflowRun resources. The runs' AI steps call that same gateway, whose binding
points at the bundled mock upstream.
"""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
import tempfile
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import httpx
import kmock
import pytest

from controller.app import Controller, ControllerSettings
from controller.bootstrap import ads_bootstrap
from controller.envoy_config import RenderSettings
from controller.models import SecretData, SpecError
from controller.workflow.api import Caller
from controller.workflow.cluster import ClusterWorkflowSettings
from controller.workflow.cluster_api import ClusterRuns
from controller.workflow.egress import WorkflowEnvoySettings
from controller.workflow.engine import RunState
from controller.workflow.retention import RunLimits
from crdgol.stack import envoy_binary, free_port, stop_process, wait_http
from crdgol.workflow_contract import API_TOKEN_HEADER, TENANT_HEADER
from tests.kube.conftest import JOBS, RUNS, ApiServer, Cluster, declare_resources, operator_running
from tests.kube.test_workflows import (
    API_KEY,
    CONTAINER_STEPS,
    THREE_STEPS,
    accepted,
    api_key_secret,
    binding,
    object_of,
    run,
    spec,
    wait_run,
)

OTHER_KEY = "sk-wf-team-b-77aa"
H = {"authorization": f"Bearer {API_KEY}"}


@pytest.fixture(scope="module")
def mock() -> Iterator[str]:
    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "crdgol.cli", "mock-llm", "--port", str(port)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        wait_http(f"http://127.0.0.1:{port}/healthz", (200,), 30, proc)
        yield f"http://127.0.0.1:{port}"
    finally:
        stop_process(proc)


@dataclass
class Gateway:
    cluster: Cluster
    url: str
    api_port: int


@pytest.fixture
async def gw(mock: str, request: pytest.FixtureRequest) -> AsyncIterator[Gateway]:
    """The operator (workflows and the run API on) with a real Envoy and extproc on its config;
    ``ClusterWorkflowSettings`` fields a test gives by indirect parametrisation replace its own."""
    sockets = Path(tempfile.mkdtemp(prefix="crdgol-kapi-"))
    sockets.chmod(0o700)
    listen, api_port = free_port(), free_port()
    rs = RenderSettings(listen_port=listen, admin_port=free_port(), extproc_sockets=(str(sockets / "extproc.sock"),))
    controller = Controller(ControllerSettings(render=rs, xds_socket=str(sockets / "xds.sock"), policy_socket=str(sockets / "policy.sock"), metrics_port=0))
    url = f"http://127.0.0.1:{listen}"
    settings = ClusterWorkflowSettings(
        gateway_url=url, recheck_interval=0.5, retry_delay=0.5, api_listen_host="127.0.0.1", api_listen_port=api_port,
        egress=WorkflowEnvoySettings(api_host="127.0.0.1", api_port=api_port),
    )
    settings = replace(settings, **getattr(request, "param", {}))
    procs: list[subprocess.Popen[bytes]] = []
    async with ApiServer() as server, kmock.Server(server):
        declare_resources(server)
        cluster = Cluster(server, controller)
        async with operator_running(server, controller, settings):
            try:
                await cluster.create({"apiVersion": "v1", "kind": "Secret", "metadata": {"name": "provider", "namespace": "default"}, "stringData": {"apiKey": "sk-mock-provider"}})
                b = binding()
                b["spec"]["backends"][0]["endpoint"] = f"{mock}/v1"
                b["spec"]["tenants"] = ["team-a", "other/team-b"]
                await cluster.create(b)
                await cluster.create(api_key_secret())
                other = {"apiVersion": "v1", "kind": "Secret", "metadata": {"name": "team-b-key", "namespace": "other", "labels": {"crdgol.io/api-key": "true"},
                         "annotations": {"crdgol.io/tenant": "team-b"}}, "stringData": {"key": OTHER_KEY}}
                await cluster.create(other)
                await cluster.wait_condition("chat", "Ready", "True", "Served")
                metrics = free_port()
                procs.append(subprocess.Popen(
                    [sys.executable, "-m", "crdgol.cli", "extproc", "--port", "0", "--socket", rs.extproc_sockets[0],
                     "--metrics-port", str(metrics), "--policy-server", f"unix:{sockets / 'policy.sock'}"],
                    stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                ))
                await asyncio.to_thread(wait_http, f"http://127.0.0.1:{metrics}/healthz", (200,), 30, procs[-1])
                (sockets / "envoy.json").write_text(json.dumps(ads_bootstrap(rs, "", 0, xds_socket=str(sockets / "xds.sock"))))
                procs.append(subprocess.Popen([envoy_binary(), "-c", str(sockets / "envoy.json"), "--log-level", "warning", "--disable-hot-restart"],
                                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))
                await asyncio.to_thread(wait_http, f"{url}/v1/models", (200, 401), 30, procs[-1])
                yield Gateway(cluster, url, api_port)
            finally:
                for p in reversed(procs):
                    stop_process(p)


async def call(method: str, url: str, **kwargs: Any) -> httpx.Response:
    async with httpx.AsyncClient(timeout=30) as client:
        return await client.request(method, url, **kwargs)


def chat_keys(mock: str) -> list[str]:
    reqs = httpx.get(f"{mock}/_mock/requests").json()
    return [str(q["headers"].get("idempotency-key")) for q in reqs if q["path"] == "/v1/chat/completions"]


async def test_a_run_started_over_http_is_a_workflowrun_naming_the_callers_key_secret_and_its_status_is_read_back(gw: Gateway, mock: str) -> None:
    httpx.delete(f"{mock}/_mock/requests")
    await gw.cluster.create(spec("three", THREE_STEPS))
    await accepted(gw.cluster, "three")

    r = await call("POST", f"{gw.url}/v1/workflows/three/runs", json={"inputs": {"text": "the printer is on fire"}}, headers=H)
    assert r.status_code == 201, r.text
    created = r.json()
    name = created["name"]
    assert created["namespace"] == "default" and created["workflow"] == "three" and created["phase"] == "Pending"
    assert created["tenant"] == "default/team-a"

    obj = object_of(gw.cluster, RUNS, name)
    assert obj is not None
    assert obj["spec"] == {"workflowRef": {"name": "three"}, "inputs": {"text": "the printer is on fire"}, "apiKeySecretRef": {"name": "team-a-key", "key": "key"}}
    assert API_KEY not in json.dumps(obj)  # the key is named by its Secret, never copied

    final = await wait_run(gw.cluster, name)
    assert final["phase"] == "Succeeded", final
    got = (await call("GET", f"{gw.url}/v1/workflows/runs/{name}", headers=H)).json()
    assert got["phase"] == "Succeeded" and got["tenant"] == "default/team-a"
    assert [s["phase"] for s in got["steps"]] == ["Succeeded"] * 3 and got["tokens"]["total"] > 0
    assert got["cost"] == final["cost"]
    listed = (await call("GET", f"{gw.url}/v1/workflows/runs", headers={"x-api-key": API_KEY})).json()["runs"]
    assert [x["name"] for x in listed] == [name]
    # Its AI steps went through the gateway with the caller's key.
    assert chat_keys(mock) == [f"default/{name}/ask/1", f"default/{name}/answer/1"]


async def test_the_workflow_cli_runs_waits_for_and_lists_a_run_on_the_cluster(gw: Gateway) -> None:
    await gw.cluster.create(spec("three", THREE_STEPS))
    await accepted(gw.cluster, "three")

    def cli(*args: str) -> subprocess.CompletedProcess[str]:
        root = str(Path(__file__).resolve().parents[2])
        argv = [sys.executable, "-m", "crdgol.cli", "workflow", "--gateway", gw.url, "--api-key", API_KEY, *args]
        return subprocess.run(argv, capture_output=True, text=True, timeout=90, env={**os.environ, "PYTHONPATH": root})

    done = await asyncio.to_thread(cli, "run", "three", "--input", "text=the fax is jammed", "--wait")
    assert done.returncode == 0, done.stderr
    status = json.loads(done.stdout)
    assert status["phase"] == "Succeeded" and status["namespace"] == "default"
    assert (object_of(gw.cluster, RUNS, status["name"]) or {})["status"]["phase"] == "Succeeded"
    listed = await asyncio.to_thread(cli, "list")
    assert listed.returncode == 0 and status["name"] in listed.stdout


async def test_another_namespaces_caller_can_neither_start_see_nor_cancel_this_namespaces_runs(gw: Gateway) -> None:
    await gw.cluster.create(spec("crunch", CONTAINER_STEPS))
    await accepted(gw.cluster, "crunch")
    intruder = {"authorization": f"Bearer {OTHER_KEY}", TENANT_HEADER: "default/team-a"}  # the forged header is overwritten

    r = await call("POST", f"{gw.url}/v1/workflows/crunch/runs", json={"inputs": {"text": "x"}}, headers=intruder)
    assert r.status_code == 404 and r.json()["error"]["code"] == "workflow_not_found"
    name = (await call("POST", f"{gw.url}/v1/workflows/crunch/runs", json={"inputs": {"text": "x"}}, headers=H)).json()["name"]
    assert (await call("GET", f"{gw.url}/v1/workflows/runs/{name}", headers=intruder)).status_code == 404
    assert (await call("DELETE", f"{gw.url}/v1/workflows/runs/{name}", headers=intruder)).status_code == 404
    assert (await call("GET", f"{gw.url}/v1/workflows/runs", headers=intruder)).json() == {"runs": []}

    r = await call("POST", f"{gw.url}/v1/workflows/no-such/runs", json={"inputs": {}}, headers=H)
    assert r.status_code == 404 and r.json()["error"]["code"] == "workflow_not_found"
    r = await call("POST", f"{gw.url}/v1/workflows/crunch/runs", content=b"[1]", headers=H)
    assert r.status_code == 400 and r.json()["error"]["type"] == "invalid_request_error"
    r = await call("POST", f"{gw.url}/v1/workflows/crunch/runs", json={"inputs": {}}, headers={"authorization": "Bearer nope"})
    assert r.status_code == 401 and r.json()["error"]["type"] == "authentication_error"
    # The run API's own port serves nothing that did not come through Envoy's route (its token).
    direct = await call("POST", f"http://127.0.0.1:{gw.api_port}/v1/workflows/crunch/runs", json={"inputs": {}}, headers={TENANT_HEADER: "default/team-a", API_TOKEN_HEADER: "guess"})
    assert direct.status_code == 403 and direct.json()["error"]["code"] == "not_through_gateway"


async def test_delete_cancels_a_running_run_whose_status_then_says_cancelled(gw: Gateway) -> None:
    await gw.cluster.create(spec("crunch", CONTAINER_STEPS))
    await accepted(gw.cluster, "crunch")
    name = (await call("POST", f"{gw.url}/v1/workflows/crunch/runs", json={"inputs": {"text": "never mind"}}, headers=H)).json()["name"]
    await gw.cluster.eventually(lambda: object_of(gw.cluster, JOBS, f"{name}-crunch-1"), what="the Job")

    r = await call("DELETE", f"{gw.url}/v1/workflows/runs/{name}", headers=H)
    assert r.status_code == 200 and r.json()["phase"] == "Cancelled", r.text
    assert (object_of(gw.cluster, RUNS, name) or {})["status"]["phase"] == "Cancelled"  # recorded in the resource
    await gw.cluster.eventually(lambda: object_of(gw.cluster, JOBS, f"{name}-crunch-1") is None, what="the Job deleted")
    assert (await call("GET", f"{gw.url}/v1/workflows/runs/{name}", headers=H)).json()["phase"] == "Cancelled"


async def test_a_run_cancelled_while_it_waits_for_its_spec_never_starts(gw: Gateway, mock: str) -> None:
    httpx.delete(f"{mock}/_mock/requests")
    await gw.cluster.create(run("early", "later"))  # created with kubectl; its WorkflowSpec does not exist yet
    await wait_run(gw.cluster, "early", lambda st: (st.get("conditions") or [{}])[0].get("reason") == "WorkflowNotFound")
    r = await call("DELETE", f"{gw.url}/v1/workflows/runs/early", headers=H)
    assert r.status_code == 200 and r.json()["phase"] == "Cancelled", r.text
    await gw.cluster.create(spec("later", THREE_STEPS))
    await accepted(gw.cluster, "later")
    await asyncio.sleep(1.5)  # three of the operator's retries of a waiting run
    assert (object_of(gw.cluster, RUNS, "early") or {})["status"]["phase"] == "Cancelled"
    assert chat_keys(mock) == []


class _Engine:
    def workflow_state(self, namespace: str, name: str) -> SpecError | bool | None:
        return True

    def live(self, key: str) -> RunState | None:
        return None

    async def cancel_live(self, key: str) -> RunState | None:
        return None

    def cancel_before_start(self, key: str) -> None:
        pass

    def admit(self, tenant: str, key: str) -> int | None:
        return None

    def release(self, key: str) -> None:
        pass


async def test_a_key_found_only_in_a_secret_without_the_api_key_label_is_refused_not_copied() -> None:
    import hashlib

    created: list[Any] = []

    async def request(method: str, path: str, body: Any, content_type: str) -> tuple[int, Any]:
        created.append(body)
        return 201, body

    unlabelled = SecretData("default", "provider", {"apiKey": API_KEY})
    runs = ClusterRuns(_Engine(), request, lambda ns: [unlabelled] if ns == "default" else [])
    caller = Caller(frozenset({"default/team-a"}), hashlib.sha256(API_KEY.encode()).hexdigest())
    with pytest.raises(SpecError) as refused:
        await runs.start(caller, "default", "three", {}, "default/team-a")
    assert refused.value.reason == "NotAnApiKeySecret" and "default/provider" in refused.value.message
    with pytest.raises(SpecError) as jwt:
        await runs.start(Caller(frozenset({"default/team-a"})), "default", "three", {}, "default/team-a")
    assert jwt.value.reason == "NoApiKey"
    assert created == []  # no WorkflowRun was created


LIMITED = {"limits": RunLimits(max_active_per_tenant=3, finished_ttl=2.0, keep_finished=10), "sweep_interval": 0.3}


@pytest.mark.parametrize("gw", [LIMITED], indirect=True)
async def test_concurrent_starts_beyond_the_tenants_cap_get_429_and_create_no_workflowrun(gw: Gateway) -> None:
    await gw.cluster.create(spec("crunch", CONTAINER_STEPS))  # its Jobs never finish here: the runs stay Running
    await accepted(gw.cluster, "crunch")
    async with httpx.AsyncClient(timeout=30, headers=H) as client:
        answers = await asyncio.gather(*(client.post(f"{gw.url}/v1/workflows/crunch/runs", json={"inputs": {"text": str(i)}}) for i in range(12)))
    assert sorted(r.status_code for r in answers) == [201] * 3 + [429] * 9
    refused = next(r for r in answers if r.status_code == 429)
    assert refused.headers["retry-after"] == "5" and refused.json()["error"]["code"] == "too_many_active_runs"
    created = sorted(r.json()["name"] for r in answers if r.status_code == 201)
    assert sorted(k[2] for k, o in gw.cluster.server.objects.items() if k[0] == RUNS and not o.deleted) == created  # nothing else
    # Picked up by the operator, they are still counted (now as the engine's live runs).
    await gw.cluster.eventually(lambda: all(object_of(gw.cluster, JOBS, f"{n}-crunch-1") for n in created), timeout=20, what="their Jobs")
    assert (await call("POST", f"{gw.url}/v1/workflows/crunch/runs", json={"inputs": {}}, headers=H)).status_code == 429
    assert (await call("DELETE", f"{gw.url}/v1/workflows/runs/{created[0]}", headers=H)).json()["phase"] == "Cancelled"
    assert (await call("POST", f"{gw.url}/v1/workflows/crunch/runs", json={"inputs": {}}, headers=H)).status_code == 201


@pytest.mark.parametrize("gw", [LIMITED], indirect=True)
async def test_a_finished_run_the_api_created_is_deleted_after_the_ttl_and_one_made_by_hand_only_if_its_spec_asks(gw: Gateway) -> None:
    await gw.cluster.create(spec("three", THREE_STEPS))
    short = spec("short", THREE_STEPS)
    short["spec"]["ttlAfterFinished"] = "2s"
    await gw.cluster.create(short)
    await accepted(gw.cluster, "three")
    await accepted(gw.cluster, "short")
    over_api = (await call("POST", f"{gw.url}/v1/workflows/three/runs", json={"inputs": {"text": "a"}}, headers=H)).json()["name"]
    await gw.cluster.create(run("by-hand", "three", {"text": "b"}))
    await gw.cluster.create(run("by-hand-short", "short", {"text": "c"}))
    finals = await asyncio.gather(*(wait_run(gw.cluster, name) for name in (over_api, "by-hand", "by-hand-short")))
    assert [f["phase"] for f in finals] == ["Succeeded"] * 3
    await gw.cluster.eventually(lambda: object_of(gw.cluster, RUNS, over_api) is None, timeout=10, what="the API's run deleted")
    await gw.cluster.eventually(lambda: object_of(gw.cluster, RUNS, "by-hand-short") is None, timeout=10, what="the short-lived spec's run deleted")
    await asyncio.sleep(1.0)  # several more sweeps
    assert object_of(gw.cluster, RUNS, "by-hand") is not None  # created by hand, its spec asks nothing: kept
    assert (await call("GET", f"{gw.url}/v1/workflows/runs/{over_api}", headers=H)).status_code == 404
