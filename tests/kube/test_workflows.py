"""Workflows on a cluster: the kopf operator against kmock's emulated API server.

The runs' AI calls go through a real gateway (Envoy, extproc and the bundled mock, a ``Stack``
serving the same binding and API key as the emulated cluster holds); container steps are Jobs
whose pods and completion the test plays (kmock has no kubelet or Job controller).
"""

from __future__ import annotations

import asyncio
import copy
from collections.abc import AsyncIterator, Iterator
from typing import Any

import httpx
import kmock
import pytest

from controller.workflow.cluster import ClusterWorkflowSettings
from controller.workflow.egress import EGRESS_LISTENER, WorkflowEnvoySettings, target_cluster
from crdgol.stack import Stack, StackSettings
from tests.kube.conftest import (
    JOBS,
    RUNS,
    SPECS,
    ApiServer,
    Cluster,
    declare_resources,
    new_controller,
    operator_running,
)

API_KEY = "sk-wf-team-a-1f4c"
EGRESS_PORT = 18090
PRICING = {"inputPerMillion": "2.50", "outputPerMillion": "10.00"}

STACK_MANIFESTS = f"""
apiVersion: crdgol.io/v1alpha1
kind: AIModelBinding
metadata: {{name: chat, namespace: default}}
spec:
  model: chat
  tenants: [team-a]
  backends:
    - {{name: mock, provider: openai-compatible, endpoint: "http://127.0.0.1:8081/v1", model: mock-gpt,
       credentialsRef: {{name: provider, key: apiKey}}, pricing: {{inputPerMillion: "2.50", outputPerMillion: "10.00"}}}}
---
apiVersion: v1
kind: Secret
metadata: {{name: provider, namespace: default}}
stringData: {{apiKey: sk-mock-provider}}
---
apiVersion: v1
kind: Secret
metadata:
  name: team-a-key
  namespace: default
  labels: {{crdgol.io/api-key: "true"}}
  annotations: {{crdgol.io/tenant: team-a}}
stringData: {{key: {API_KEY}}}
"""


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    tmp = tmp_path_factory.mktemp("kubewf")
    folder = tmp / "manifests"
    folder.mkdir()
    s = Stack(StackSettings(manifests=folder, quiet=True, state_dir=tmp / "state"))
    (folder / "gateway.yaml").write_text(STACK_MANIFESTS.replace("127.0.0.1:8081", f"127.0.0.1:{s.mock_port}"))
    s.start()
    try:
        yield s
    finally:
        s.stop()


@pytest.fixture
async def wf(stack: Stack) -> AsyncIterator[Cluster]:
    """The emulated cluster with the operator running workflows against the stack's gateway."""
    httpx.delete(f"{stack.mock_url}/_mock/requests")
    async with ApiServer() as server, kmock.Server(server):
        declare_resources(server)
        controller = new_controller()
        settings = ClusterWorkflowSettings(
            gateway_url=stack.url, recheck_interval=0.5, retry_delay=0.5, egress=WorkflowEnvoySettings(egress_host="0.0.0.0", egress_port=EGRESS_PORT)
        )
        cluster = Cluster(server, controller)
        async with operator_running(server, controller, settings):
            await cluster.create({"apiVersion": "v1", "kind": "Secret", "metadata": {"name": "provider", "namespace": "default"}, "stringData": {"apiKey": "sk-mock-provider"}})
            await cluster.create(binding())
            await cluster.create(api_key_secret())
            await cluster.wait_condition("chat", "Ready", "True", "Served")
            yield cluster


def binding() -> dict[str, Any]:
    return {
        "apiVersion": "crdgol.io/v1alpha1",
        "kind": "AIModelBinding",
        "metadata": {"name": "chat", "namespace": "default"},
        "spec": {
            "model": "chat",
            "tenants": ["team-a"],
            "backends": [
                {"name": "mock", "provider": "openai-compatible", "endpoint": "http://127.0.0.1:8081/v1", "model": "mock-gpt",
                 "credentialsRef": {"name": "provider", "key": "apiKey"}, "pricing": PRICING}
            ],
        },
    }


def api_key_secret(name: str = "team-a-key", *, labelled: bool = True) -> dict[str, Any]:
    meta: dict[str, Any] = {"name": name, "namespace": "default", "annotations": {"crdgol.io/tenant": "team-a"}}
    if labelled:
        meta["labels"] = {"crdgol.io/api-key": "true"}
    return {"apiVersion": "v1", "kind": "Secret", "metadata": meta, "stringData": {"key": API_KEY}}


def spec(name: str, steps: list[dict[str, Any]]) -> dict[str, Any]:
    return {"apiVersion": "crdgol.io/v1alpha1", "kind": "WorkflowSpec", "metadata": {"name": name, "namespace": "default"}, "spec": {"steps": steps}}


def run(name: str, workflow: str, inputs: dict[str, Any] | None = None, secret: str = "team-a-key") -> dict[str, Any]:
    return {
        "apiVersion": "crdgol.io/v1alpha1",
        "kind": "WorkflowRun",
        "metadata": {"name": name, "namespace": "default"},
        "spec": {"workflowRef": {"name": workflow}, "inputs": inputs or {}, "apiKeySecretRef": {"name": secret, "key": "key"}},
    }


THREE_STEPS = [
    {"name": "ask", "type": "ai-inference", "aiInference": {"binding": "chat", "prompt": "Summarise: {{ inputs.text }}"}},
    {"name": "measure", "type": "transform", "dependsOn": ["ask"], "transform": {"expression": "size(steps.ask.outputs.text)"}},
    {"name": "answer", "type": "ai-inference", "dependsOn": ["measure"], "aiInference": {"binding": "chat", "prompt": "It was {{ steps.measure.outputs }} long"}},
]

CONTAINER_STEPS = [
    {"name": "ask", "type": "ai-inference", "aiInference": {"binding": "chat", "prompt": "Summarise: {{ inputs.text }}"}},
    {
        "name": "crunch",
        "type": "container",
        "dependsOn": ["ask"],
        "timeout": "90s",
        "retry": {"limit": 1, "backoff": {"initial": "100ms"}},
        "inputs": {"summary": "{{ steps.ask.outputs.text }}"},
        "container": {"image": "ghcr.io/example/cruncher:1", "command": ["crunch"], "args": ["--ticket", "{{ inputs.text }}"], "env": [{"name": "MODE", "value": "fast"}]},
    },
    {"name": "report", "type": "transform", "dependsOn": ["crunch"], "transform": {"expression": "steps.crunch.outputs.result.score * 2"}},
]


async def status_of(cluster: Cluster, name: str) -> dict[str, Any]:
    return dict((await cluster.get(RUNS, "default", name)).get("status") or {})


async def wait_run(cluster: Cluster, name: str, check: Any = None, timeout: float = 20.0) -> dict[str, Any]:
    async def done() -> dict[str, Any] | None:
        st = await status_of(cluster, name)
        ok = check(st) if check is not None else st.get("phase") in ("Succeeded", "Failed", "Cancelled")
        return st if ok else None

    result: dict[str, Any] = await cluster.eventually(done, timeout, f"run {name}")
    return result


def step(status: dict[str, Any], name: str) -> dict[str, Any]:
    return next(s for s in status.get("steps") or [] if s["name"] == name)


def chat_calls(stack: Stack) -> list[str]:
    """The Idempotency-Key of every chat call the mock upstream received."""
    reqs = httpx.get(f"{stack.mock_url}/_mock/requests").json()
    return [str(q["headers"].get("idempotency-key")) for q in reqs if q["path"] == "/v1/chat/completions"]


async def finish_job(cluster: Cluster, name: str, *, exit_code: int = 0, message: str = "", failed: bool = False) -> None:
    """What the kubelet and the Job controller would do: the pod ends, then the Job does."""
    job = await cluster.get(JOBS, "default", name)
    await cluster.create({
        "apiVersion": "v1", "kind": "Pod",
        "metadata": {"name": f"{name}-x7k2p", "namespace": "default", "labels": {"job-name": name, "batch.kubernetes.io/job-name": name}},
        "spec": copy.deepcopy(job["spec"]["template"]["spec"]),
        "status": {"phase": "Failed" if failed else "Succeeded",
                   "containerStatuses": [{"name": "step", "state": {"terminated": {"exitCode": exit_code, "message": message}}}]},
    })
    cond = {"type": "Failed", "status": "True", "reason": "BackoffLimitExceeded", "message": "Job has reached the specified backoff limit"} if failed else {"type": "Complete", "status": "True"}
    await cluster.patch_status(JOBS, "default", name, {"conditions": [cond], "failed" if failed else "succeeded": 1})


async def test_a_runs_status_is_patched_step_by_step_with_tokens_cost_and_events(wf: Cluster, stack: Stack) -> None:
    await wf.create(spec("three", THREE_STEPS))
    await accepted(wf, "three")
    await wf.create(run("three-1", "three", {"text": "the printer is on fire"}))

    final = await wait_run(wf, "three-1")
    assert final["phase"] == "Succeeded", final
    assert final["tenant"] == "default/team-a"
    assert [s["phase"] for s in final["steps"]] == ["Succeeded"] * 3
    assert step(final, "measure")["outputs"] == len(step(final, "ask")["outputs"]["text"])
    # Tokens from the gateway's answers, money from the binding's pricing (2.50 / 10.00 per million).
    for name in ("ask", "answer"):
        s = step(final, name)
        assert s["tokens"]["total"] > 0 and s["attempts"] == 1
        cost = (s["tokens"]["input"] * 2_500_000 + s["tokens"]["output"] * 10_000_000 + 999_999) // 1_000_000
        assert s["cost"] == f"0.{cost:06d}"
    assert final["cost"] == f"{(int(step(final, 'ask')['cost'][2:]) + int(step(final, 'answer')['cost'][2:])) / 1e6:.6f}"
    assert final["tokens"]["total"] == step(final, "ask")["tokens"]["total"] + step(final, "answer")["tokens"]["total"]
    completed = next(c for c in final["conditions"] if c["type"] == "Completed")
    assert completed["status"] == "True" and completed["reason"] == "Succeeded"
    # The status went through each step in turn: the API server held every stage.
    stages = [
        tuple(s["phase"] for s in v["status"]["steps"])
        for v in wf.history(RUNS, "default", "three-1")
        if (v.get("status") or {}).get("steps")
    ]
    assert stages[0] == ("Running", "Pending", "Pending")
    assert ("Succeeded", "Succeeded", "Running") in stages
    assert stages[-1] == ("Succeeded", "Succeeded", "Succeeded")
    assert stages.index(("Succeeded", "Succeeded", "Running")) > 0
    # Each call went through the gateway once, with the run's Idempotency-Key.
    assert sorted(chat_calls(stack)) == ["default/three-1/answer/1", "default/three-1/ask/1"]

    reasons = await wf.eventually(lambda: [e["reason"] for e in wf.events() if e["involvedObject"].get("name") == "three-1" and e["reason"] == "RunSucceeded"], what="events")
    assert reasons
    names = {(e["reason"], e["message"]) for e in wf.events() if e["involvedObject"].get("name") == "three-1"}
    assert ("StepStarted", "step ask: attempt 1 started") in names and ("StepSucceeded", "step answer: succeeded") in names
    assert API_KEY not in str(wf.history(RUNS, "default", "three-1"))


async def test_a_container_step_runs_as_a_job_whose_completion_finishes_the_step(wf: Cluster) -> None:
    await wf.create(spec("crunch", CONTAINER_STEPS))
    await accepted(wf, "crunch")
    created = await wf.create(run("crunch-1", "crunch", {"text": "ticket 42"}))

    job = await wf.eventually(lambda: object_of(wf, JOBS, "crunch-1-crunch-1"), what="the Job")
    meta, pod = job["metadata"], job["spec"]["template"]["spec"]
    assert meta["labels"]["crdgol.io/workflow-run"] == "crunch-1" and meta["labels"]["crdgol.io/workflow-step"] == "crunch"
    (owner,) = meta["ownerReferences"]
    assert (owner["kind"], owner["name"], owner["uid"], owner["controller"]) == ("WorkflowRun", "crunch-1", created["metadata"]["uid"], True)
    assert job["spec"]["backoffLimit"] == 0 and job["spec"]["activeDeadlineSeconds"] == 90
    (c,) = pod["containers"]
    assert c["image"] == "ghcr.io/example/cruncher:1" and c["command"] == ["crunch"] and c["args"] == ["--ticket", "ticket 42"]
    env = {e["name"]: e["value"] for e in c["env"]}
    assert env["MODE"] == "fast" and env["CRDGOL_IDEMPOTENCY_KEY"] == "default/crunch-1/crunch/1"
    assert '"summary":' in env["CRDGOL_PARAMS"] and pod["automountServiceAccountToken"] is False
    running = await status_of(wf, "crunch-1")
    assert step(running, "crunch")["phase"] == "Running" and step(running, "report")["phase"] == "Pending"

    # The first attempt's container fails: the engine retries it as a second Job.
    await finish_job(wf, "crunch-1-crunch-1", exit_code=3, message="disk full", failed=True)
    retrying = await wait_run(wf, "crunch-1", lambda st: step(st, "crunch")["attempts"] == 2)
    assert "BackoffLimitExceeded" in str(await wf.eventually(lambda: [e for e in wf.events() if e["reason"] == "StepRetrying"], what="a retry event"))
    assert step(retrying, "crunch")["phase"] == "Running"
    await wf.eventually(lambda: object_of(wf, JOBS, "crunch-1-crunch-2"), what="the second Job")
    await finish_job(wf, "crunch-1-crunch-2", message='{"score": 21}')

    final = await wait_run(wf, "crunch-1")
    assert final["phase"] == "Succeeded", final
    assert step(final, "crunch")["outputs"] == {"exitCode": 0, "result": {"score": 21}, "job": "crunch-1-crunch-2"}
    assert step(final, "report")["outputs"] == 42


async def test_a_spec_with_a_cycle_is_refused_with_a_condition_naming_the_steps(wf: Cluster) -> None:
    steps = [
        {"name": "a", "type": "transform", "dependsOn": ["b"], "transform": {"expression": "1"}},
        {"name": "b", "type": "transform", "dependsOn": ["a"], "transform": {"expression": "2"}},
    ]
    await wf.create(spec("loop", steps))
    refused = await wf.eventually(lambda: spec_condition(wf, "loop"), what="a condition")
    assert (refused["status"], refused["reason"]) == ("False", "DependencyCycle")
    assert "cycle among a, b" in refused["message"] and refused["observedGeneration"] == 1
    warning = await wf.eventually(lambda: [e for e in wf.events() if e["reason"] == "DependencyCycle"], what="a Warning Event")
    assert warning[0]["type"] == "Warning" and warning[0]["involvedObject"]["kind"] == "WorkflowSpec"
    # A run of it waits, saying why.
    await wf.create(run("loop-1", "loop"))
    pending = await wait_run(wf, "loop-1", lambda st: st.get("conditions"))
    assert pending["phase"] == "Pending" and "cycle among a, b" in pending["conditions"][0]["message"]

    # Fixed, it is accepted, and the waiting run starts.
    await wf.patch(SPECS, "default", "loop", {"spec": {"steps": [steps[0] | {"dependsOn": []}, steps[1]]}})
    await wf.eventually(lambda: (spec_condition(wf, "loop") or {}).get("status") == "True", what="accepted")
    assert (spec_condition(wf, "loop") or {})["observedGeneration"] == 2
    assert (await wait_run(wf, "loop-1"))["phase"] == "Succeeded"


def xds_resources(cluster: Cluster) -> dict[str, list[str]]:
    """Names of the listeners and clusters the controller serves Envoy over xDS."""
    from envoy.config.cluster.v3 import cluster_pb2
    from envoy.config.listener.v3 import listener_pb2

    snap = cluster.controller.xds.snapshot
    out: dict[str, list[str]] = {"listeners": [], "clusters": []}
    for url, items in (snap.resources.items() if snap else ()):
        for any_ in items:
            if url.endswith("Listener"):
                msg: Any = listener_pb2.Listener()
                any_.Unpack(msg)
                out["listeners"].append(msg.name)
            elif url.endswith(".Cluster"):
                msg = cluster_pb2.Cluster()
                any_.Unpack(msg)
                out["clusters"].append(msg.name)
    return out


async def test_the_hosts_accepted_specs_call_become_the_gateways_egress_listener(wf: Cluster) -> None:
    assert EGRESS_LISTENER not in xds_resources(wf)["listeners"]
    steps = [{"name": "post", "type": "http-request", "httpRequest": {"method": "POST", "url": "https://helpdesk.example.com/tickets", "body": "{{ inputs.t }}"}}]
    await wf.create(spec("post-it", steps))
    await accepted(wf, "post-it")
    await wf.eventually(lambda: EGRESS_LISTENER in xds_resources(wf)["listeners"], what="the egress listener in Envoy's config")
    assert target_cluster("https", "helpdesk.example.com", 443) in xds_resources(wf)["clusters"]
    await wf.delete(SPECS, "default", "post-it")
    await wf.eventually(lambda: EGRESS_LISTENER not in xds_resources(wf)["listeners"], what="the egress listener gone")


async def test_a_run_calls_only_with_an_api_key_secret_of_its_own_namespace(wf: Cluster, stack: Stack) -> None:
    await wf.create(spec("three", THREE_STEPS))
    await wf.create(api_key_secret("not-a-key-secret", labelled=False))
    await wf.create(run("sneaky", "three", {"text": "x"}, secret="not-a-key-secret"))
    pending = await wait_run(wf, "sneaky", lambda st: st.get("conditions"))
    assert pending["phase"] == "Pending" and pending["conditions"][0]["reason"] == "NotAnApiKeySecret"
    assert chat_calls(stack) == []
    await wf.create(run("missing", "three", {"text": "x"}, secret="nope"))
    assert (await wait_run(wf, "missing", lambda st: st.get("conditions")))["conditions"][0]["reason"] == "SecretNotFound"


async def test_a_restarted_controller_resumes_runs_without_repeating_finished_steps(stack: Stack) -> None:
    httpx.delete(f"{stack.mock_url}/_mock/requests")
    settings = ClusterWorkflowSettings(gateway_url=stack.url, recheck_interval=0.5, retry_delay=0.5)
    async with ApiServer() as server, kmock.Server(server):
        declare_resources(server)
        cluster = Cluster(server, new_controller())
        async with operator_running(server, cluster.controller, settings):
            await cluster.create({"apiVersion": "v1", "kind": "Secret", "metadata": {"name": "provider", "namespace": "default"}, "stringData": {"apiKey": "sk"}})
            await cluster.create(binding())
            await cluster.create(api_key_secret())
            await cluster.wait_condition("chat", "Ready", "True", "Served")
            await cluster.create(spec("crunch", CONTAINER_STEPS))
            await accepted(cluster, "crunch")
            await cluster.create(run("crunch-2", "crunch", {"text": "resume me"}))
            await cluster.eventually(lambda: object_of(cluster, JOBS, "crunch-2-crunch-1"), what="the Job")
        # The controller is gone, its Job still runs (owned by the run, not by the controller).
        assert object_of(cluster, JOBS, "crunch-2-crunch-1")
        recorded = await status_of(cluster, "crunch-2")
        assert step(recorded, "ask")["phase"] == "Succeeded" and step(recorded, "crunch")["phase"] == "Running"

        cluster.controller = new_controller()  # a new process: nothing in memory
        async with operator_running(server, cluster.controller, settings):
            await asyncio.sleep(1.0)  # it has resumed the run and adopted the Job
            await finish_job(cluster, "crunch-2-crunch-1", message='{"score": 5}')
            final = await wait_run(cluster, "crunch-2")
    assert final["phase"] == "Succeeded", final
    assert step(final, "report")["outputs"] == 10 and step(final, "crunch")["attempts"] == 1
    assert chat_calls(stack) == ["default/crunch-2/ask/1"]  # the finished AI step was not called again
    assert not object_of(cluster, JOBS, "crunch-2-crunch-2")


def object_of(cluster: Cluster, resource: str, name: str, namespace: str = "default") -> dict[str, Any] | None:
    try:
        obj = cluster.server.objects[resource, namespace, name]
    except KeyError:
        return None
    return None if obj.deleted else dict(obj.raw)


def spec_condition(cluster: Cluster, name: str) -> dict[str, Any] | None:
    obj = object_of(cluster, SPECS, name)
    conds = ((obj or {}).get("status") or {}).get("conditions") or []
    return dict(conds[0]) if conds else None


async def accepted(cluster: Cluster, name: str) -> None:
    await cluster.eventually(lambda: (spec_condition(cluster, name) or {}).get("status") == "True", what=f"WorkflowSpec {name} accepted")


async def test_deleting_a_run_cancels_it_and_stops_its_job(wf: Cluster) -> None:
    await wf.create(spec("crunch", CONTAINER_STEPS))
    await accepted(wf, "crunch")
    await wf.create(run("crunch-3", "crunch", {"text": "never mind"}))
    await wf.eventually(lambda: object_of(wf, JOBS, "crunch-3-crunch-1"), what="the Job")
    await wf.delete(RUNS, "default", "crunch-3")
    # kmock has no garbage collector: the Job is gone because the engine aborted the attempt.
    await wf.eventually(lambda: object_of(wf, JOBS, "crunch-3-crunch-1") is None, what="the Job deleted")
    assert object_of(wf, RUNS, "crunch-3") is None
    events = [e["reason"] for e in wf.events() if e["involvedObject"].get("name") == "crunch-3"]
    assert "StepStarted" in events and "RunSucceeded" not in events


async def test_a_restarted_controller_deletes_finished_runs_by_their_retention_from_what_its_watch_lists(stack: Stack) -> None:
    quiet = ClusterWorkflowSettings(gateway_url=stack.url, recheck_interval=0.5, retry_delay=0.5, sweep_interval=3600)
    adds = [{"name": "add", "type": "transform", "transform": {"expression": "inputs.n + 1"}}]
    async with ApiServer() as server, kmock.Server(server):
        declare_resources(server)
        cluster = Cluster(server, new_controller())
        async with operator_running(server, cluster.controller, quiet):
            await cluster.create(api_key_secret())
            short = spec("short", adds)
            short["spec"]["ttlAfterFinished"] = "1s"
            await cluster.create(short)
            await cluster.create(spec("kept", adds))
            await accepted(cluster, "short")
            await accepted(cluster, "kept")
            await cluster.create(run("short-1", "short", {"n": 1}))
            await cluster.create(run("kept-1", "kept", {"n": 1}))
            for name in ("short-1", "kept-1"):
                assert (await wait_run(cluster, name))["phase"] == "Succeeded"
        await asyncio.sleep(1.2)  # past the short spec's TTL, with no controller running
        assert object_of(cluster, RUNS, "short-1") is not None

        cluster.controller = new_controller()  # a new process: it knows the runs only from its watch's listing
        async with operator_running(server, cluster.controller, ClusterWorkflowSettings(gateway_url=stack.url, recheck_interval=0.5, sweep_interval=0.3)):
            await cluster.eventually(lambda: object_of(cluster, RUNS, "short-1") is None, timeout=10, what="the expired run deleted")
            await asyncio.sleep(1.0)
            assert object_of(cluster, RUNS, "kept-1") is not None  # created by hand, its spec asks nothing
