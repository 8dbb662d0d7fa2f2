"""Workflows through the real stack: Envoy, extproc, the controller's engine and the bundled mock.

One stack serves a copy of examples/support-triage plus a few test workflows (a rate-limited model,
a slow helpdesk call); each test clears the mock's logs and sets its helpdesk knobs first.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import textwrap
import threading
import time
from collections.abc import Iterator
from typing import Any

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from crdgol.stack import Stack, StackSettings, wait_http
from tests.conftest import ROOT

KEY = "sk-crdgol-quickstart"
H = {"authorization": f"Bearer {KEY}"}
CALM = "I was charged twice on my last invoice, please refund one."
URGENT = "Your service is down and we cannot log in. This is unacceptable!"

EXTRA = """
apiVersion: crdgol.io/v1alpha1
kind: AIModelBinding
metadata: {name: limited-model, namespace: default}
spec:
  model: limited-model
  tenants: [quickstart]
  backends:
    - {name: mock, provider: openai-compatible, endpoint: "http://127.0.0.1:8081/v1", model: mock-gpt, credentialsRef: {name: mock-provider, key: apiKey}}
  quotas:
    tenants:
      quickstart:
        requests:
          - {amount: 1, per: minute}
---
apiVersion: crdgol.io/v1alpha1
kind: WorkflowSpec
metadata: {name: two-calls, namespace: default}
spec:
  steps:
    - {name: first, type: ai-inference, aiInference: {binding: limited-model, prompt: "one"}}
    - name: second
      type: ai-inference
      dependsOn: [first]
      aiInference: {binding: limited-model, prompt: "two"}
---
apiVersion: crdgol.io/v1alpha1
kind: AIModelBinding
metadata: {name: one-at-a-time, namespace: default}
spec:
  model: one-at-a-time
  tenants: [quickstart]
  backends:
    - {name: mock, provider: openai-compatible, endpoint: "http://127.0.0.1:8081/v1", model: mock-gpt, credentialsRef: {name: mock-provider, key: apiKey}}
  quotas:
    tenants:
      quickstart: {concurrent: 1}
---
apiVersion: crdgol.io/v1alpha1
kind: WorkflowSpec
metadata: {name: patient, namespace: default}
spec:
  steps:
    - name: ask
      type: ai-inference
      retry: {limit: 4, backoff: {initial: 10ms, max: 20ms}}
      aiInference: {binding: one-at-a-time, prompt: "patient"}
---
apiVersion: crdgol.io/v1alpha1
kind: WorkflowSpec
metadata: {name: impatient, namespace: default}
spec:
  steps:
    - name: ask
      type: ai-inference
      retry: {limit: 2, backoff: {initial: 10ms, max: 20ms}}
      aiInference: {binding: one-at-a-time, prompt: "impatient"}
---
apiVersion: crdgol.io/v1alpha1
kind: WorkflowSpec
metadata: {name: slow-call, namespace: default}
spec:
  steps:
    - name: call
      type: http-request
      timeout: 800ms
      httpRequest: {method: POST, url: "http://127.0.0.1:8081/helpdesk/slow", body: "{{ inputs.n }}"}
---
apiVersion: crdgol.io/v1alpha1
kind: WorkflowSpec
metadata: {name: held-call, namespace: default}
spec:
  steps:
    - name: call
      type: http-request
      timeout: 60s
      httpRequest: {method: POST, url: "http://127.0.0.1:8081/helpdesk/slow", body: "{{ inputs.n }}"}
---
apiVersion: crdgol.io/v1alpha1
kind: WorkflowSpec
metadata: {name: header-from-input, namespace: default}
spec:
  steps:
    - name: call
      type: http-request
      httpRequest: {method: POST, url: "http://127.0.0.1:8081/helpdesk/notes", headers: {x-note: "{{ inputs.note }}"}}
---
apiVersion: crdgol.io/v1alpha1
kind: WorkflowSpec
metadata: {name: circular, namespace: default}
spec:
  steps:
    - {name: a, type: transform, dependsOn: [b], transform: {expression: "1"}}
    - {name: b, type: transform, dependsOn: [a], transform: {expression: "2"}}
---
apiVersion: v1
kind: Secret
metadata:
  name: intruder-key
  namespace: other
  labels: {crdgol.io/api-key: "true"}
  annotations: {crdgol.io/tenant: intruder}
stringData: {key: sk-other-namespace-intruder}
"""


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    tmp = tmp_path_factory.mktemp("wf")
    folder = tmp / "support-triage"
    shutil.copytree(ROOT / "examples" / "support-triage", folder)
    (folder / "extra.yaml").write_text(EXTRA)
    s = Stack(StackSettings(manifests=folder, quiet=True, state_dir=tmp / "state"))
    for f in folder.glob("*.yaml"):
        f.write_text(f.read_text().replace("127.0.0.1:8081", f"127.0.0.1:{s.mock_port}"))
    s.start()
    try:
        yield s
    finally:
        s.stop()


@pytest.fixture(autouse=True)
def clean_mock(stack: Stack) -> None:
    httpx.delete(f"{stack.mock_url}/_mock/requests")
    httpx.delete(f"{stack.mock_url}/_mock/helpdesk")
    httpx.post(f"{stack.mock_url}/_mock/helpdesk/config", json={"fail_next": 0, "delay_ms": 0})


def start(stack: Stack, workflow: str, **inputs: Any) -> dict[str, Any]:
    r = httpx.post(f"{stack.url}/v1/workflows/{workflow}/runs", json={"inputs": inputs}, headers=H, timeout=30)
    assert r.status_code == 201, r.text
    return dict(r.json())


def get(stack: Stack, run: str) -> dict[str, Any]:
    r = httpx.get(f"{stack.url}/v1/workflows/runs/{run}", headers=H, timeout=30)
    assert r.status_code == 200, r.text
    return dict(r.json())


def wait_for(stack: Stack, run: str, until: Any = None, timeout: float = 30) -> dict[str, Any]:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        st = get(stack, run)
        if (until(st) if until else st["phase"] in ("Succeeded", "Failed", "Cancelled")):
            return st
        time.sleep(0.1)
    raise AssertionError(f"run {run} did not get there: {st}")


def step(status: dict[str, Any], name: str) -> dict[str, Any]:
    return next(s for s in status["steps"] if s["name"] == name)


def helpdesk(stack: Stack) -> list[dict[str, Any]]:
    return list(httpx.get(f"{stack.mock_url}/_mock/helpdesk").json())


def abandoned(stack: Stack) -> list[str]:
    return list(httpx.post(f"{stack.mock_url}/_mock/helpdesk/config", json={}).json()["abandoned"])


def cli(stack: Stack, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "crdgol.cli", "workflow", "--gateway", stack.url, *args],
        capture_output=True, text=True, timeout=60, env={**os.environ, "PYTHONPATH": str(ROOT)},
    )


def test_a_calm_ticket_is_drafted_and_posted_to_the_helpdesk_as_the_readme_shows(stack: Stack) -> None:
    done = cli(stack, "run", "support-triage", "--input", f"ticket={CALM}", "--wait")
    assert done.returncode == 0, done.stderr
    status = json.loads(done.stdout)
    assert status["phase"] == "Succeeded" and "draft: Succeeded" in done.stderr  # progress shown
    assert step(status, "page-oncall")["phase"] == "Skipped"
    (posted,) = helpdesk(stack)
    assert posted["kind"] == "tickets"
    assert posted["body"] == {"ticket": CALM, "topic": "billing", "sentiment": "neutral", "draft": step(status, "draft")["outputs"]["text"]}
    assert posted["headers"]["idempotency-key"] == f"default/{status['name']}/post-to-helpdesk/1"
    # The AI steps share a session: the classification saw the sentiment exchange in its history.
    chats = [q for q in httpx.get(f"{stack.mock_url}/_mock/requests").json() if q["path"] == "/v1/chat/completions"]
    classify = next(q for q in chats if q["body"]["messages"][-1]["content"].startswith("Classify the topic"))
    assert any('"sentiment":"neutral"' in str(m["content"]) for m in classify["body"]["messages"][:-1])
    assert status["tokens"]["total"] > 0 and step(status, "sentiment")["tokens"]["total"] > 0
    # Each AI step's cost is its tokens at the binding's pricing (0.15 / 0.60 per million), rounded
    # up to a micro-unit; the run's is their sum.
    costs = []
    for name in ("sentiment", "classify", "draft"):
        t = step(status, name)["tokens"]
        costs.append((t["input"] * 150_000 + t["output"] * 600_000 + 999_999) // 1_000_000)
        assert step(status, name)["cost"] == f"0.{costs[-1]:06d}"
    assert status["cost"] == f"0.{sum(costs):06d}" and "cost" not in step(status, "post-to-helpdesk")


def test_an_urgent_ticket_pages_a_person_and_posts_no_draft(stack: Stack) -> None:
    run = start(stack, "support-triage", ticket=URGENT)
    status = wait_for(stack, run["name"])
    assert status["phase"] == "Succeeded"
    assert step(status, "draft")["phase"] == "Skipped" and step(status, "post-to-helpdesk")["phase"] == "Skipped"
    assert [p["kind"] for p in helpdesk(stack)] == ["pages"]
    assert helpdesk(stack)[0]["body"]["topic"] == "outage"


def test_a_helpdesk_503_is_retried_with_backoff_until_it_answers(stack: Stack) -> None:
    httpx.post(f"{stack.mock_url}/_mock/helpdesk/config", json={"fail_next": 2, "status": 503})
    status = wait_for(stack, start(stack, "support-triage", ticket=CALM)["name"])
    assert status["phase"] == "Succeeded"
    post = step(status, "post-to-helpdesk")
    assert post["attempts"] == 3 and len(helpdesk(stack)) == 1
    assert helpdesk(stack)[0]["headers"]["idempotency-key"].endswith("/post-to-helpdesk/3")


def test_a_step_that_keeps_failing_fails_the_run_and_the_exit_step_reports_it(stack: Stack) -> None:
    httpx.post(f"{stack.mock_url}/_mock/helpdesk/config", json={"fail_next": 4, "status": 503})  # 1 + 3 retries
    status = wait_for(stack, start(stack, "support-triage", ticket=CALM)["name"])
    assert status["phase"] == "Failed" and "post-to-helpdesk" in status["message"]
    assert "503" in step(status, "post-to-helpdesk")["message"]
    assert step(status, "report-failure")["phase"] == "Succeeded"
    (alert,) = helpdesk(stack)
    assert alert["kind"] == "alerts" and alert["body"] == {"run": status["name"], "ticket": CALM}


def test_a_tenant_over_its_quota_fails_the_ai_step_with_the_gateways_429(stack: Stack) -> None:
    status = wait_for(stack, start(stack, "two-calls")["name"])
    assert step(status, "first")["phase"] == "Succeeded"
    second = step(status, "second")
    assert status["phase"] == "Failed" and second["phase"] == "Failed"
    assert "answered 429" in second["message"] and ("quota" in second["message"].lower() or "limit" in second["message"].lower())


class HeldCall:
    """One chat call of the quickstart tenant held open upstream (the mock answers after
    ``seconds``), taking the tenant's only concurrent slot on ``one-at-a-time`` meanwhile."""

    def __init__(self, stack: Stack, seconds: float) -> None:
        self.stack, self.seconds = stack, seconds
        self.status: int | None = None
        self.thread = threading.Thread(target=self._call, daemon=True)

    def _call(self) -> None:
        r = httpx.post(
            f"{self.stack.url}/v1/chat/completions",
            json={"model": "one-at-a-time", "messages": [{"role": "user", "content": "hold"}]},
            headers={**H, "x-mock-latency-ms": str(int(self.seconds * 1000))},
            timeout=30,
        )
        self.status = r.status_code

    def __enter__(self) -> HeldCall:
        self.thread.start()
        deadline = time.monotonic() + 10
        while not any(q["body"].get("messages", [{}])[-1].get("content") == "hold" for q in httpx.get(f"{self.stack.mock_url}/_mock/requests").json()):
            assert time.monotonic() < deadline, "the held call did not reach the upstream"
            time.sleep(0.02)
        return self

    def __exit__(self, *exc: object) -> None:
        self.thread.join(30)


def test_a_step_refused_by_the_tenants_quota_is_retried_after_retry_after_and_succeeds(stack: Stack) -> None:
    with HeldCall(stack, 1.5) as held:
        started = time.monotonic()
        status = wait_for(stack, start(stack, "patient")["name"])
    assert held.status == 200
    ask = step(status, "ask")
    # Its 10 ms backoff alone would have spent all 5 attempts while the slot was taken: each
    # retry waited for the gateway's Retry-After (1 s) instead.
    assert status["phase"] == "Succeeded" and ask["attempts"] >= 2, status
    assert time.monotonic() - started >= 1.0
    chats = [q for q in httpx.get(f"{stack.mock_url}/_mock/requests").json() if q["path"] == "/v1/chat/completions"]
    # The refused attempts never reached the upstream; the one that did carries its attempt number.
    assert [q["headers"]["idempotency-key"] for q in chats if q["body"]["messages"][-1]["content"] == "patient"] == [
        f"default/{status['name']}/ask/{ask['attempts']}"
    ]


def test_a_step_the_quota_keeps_refusing_fails_after_its_retries_with_the_gateways_reason(stack: Stack) -> None:
    with HeldCall(stack, 6) as held:
        started = time.monotonic()
        status = wait_for(stack, start(stack, "impatient")["name"])
        elapsed = time.monotonic() - started
        assert held.status is None  # still held: the slot was taken throughout
    ask = step(status, "ask")
    assert status["phase"] == "Failed" and ask["phase"] == "Failed" and ask["attempts"] == 3
    assert elapsed >= 2.0  # two waits of Retry-After (1 s), not two 10 ms backoffs
    assert "answered 429" in ask["message"] and "quota exceeded" in ask["message"] and "(after 3 attempts)" in ask["message"]
    assert "step 'ask' failed" in status["message"]


def test_a_step_timeout_fails_the_step(stack: Stack) -> None:
    httpx.post(f"{stack.mock_url}/_mock/helpdesk/config", json={"delay_ms": 3000})
    started = time.monotonic()
    status = wait_for(stack, start(stack, "slow-call", n=1)["name"])
    assert status["phase"] == "Failed" and time.monotonic() - started < 3
    assert "time" in step(status, "call")["message"].lower()  # Envoy's 504 or the engine's own deadline


def test_cancelling_a_run_aborts_its_call_in_flight(stack: Stack) -> None:
    httpx.post(f"{stack.mock_url}/_mock/helpdesk/config", json={"delay_ms": 5000})
    run = start(stack, "held-call", n=2)
    wait_for(stack, run["name"], lambda s: step(s, "call")["phase"] == "Running")
    time.sleep(0.2)
    started = time.monotonic()
    done = cli(stack, "cancel", run["name"])
    assert done.returncode == 0, done.stderr
    status = json.loads(done.stdout)
    assert status["phase"] == "Cancelled" and time.monotonic() - started < 3
    assert step(status, "call")["message"].startswith("aborted")
    deadline = time.monotonic() + 8
    while time.monotonic() < deadline and f"default/{run['name']}/call/1" not in abandoned(stack):
        time.sleep(0.2)
    assert f"default/{run['name']}/call/1" in abandoned(stack)  # Envoy closed the upstream call
    assert not [p for p in helpdesk(stack) if p["kind"] == "slow"]


def test_the_run_api_refuses_strangers_and_hides_other_tenants_runs(stack: Stack) -> None:
    r = httpx.post(f"{stack.url}/v1/workflows/support-triage/runs", json={"inputs": {}}, headers={"authorization": "Bearer nope", "x-crdgol-workflow-tenant": "quickstart"})
    assert r.status_code == 401 and r.json()["error"]["type"] == "authentication_error"
    r = httpx.post(f"{stack.url}/v1/workflows/no-such/runs", json={"inputs": {}}, headers=H)
    assert r.status_code == 404 and r.json()["error"]["code"] == "workflow_not_found"
    r = httpx.post(f"{stack.url}/v1/workflows/support-triage/runs", content=b"[1]", headers=H)
    assert r.status_code == 400 and "inputs" in r.json()["error"]["message"]
    r = httpx.get(f"{stack.url}/v1/workflows/runs/nobody-s-run", headers=H)
    assert r.status_code == 404 and r.json()["error"]["code"] == "run_not_found"
    r = httpx.put(f"{stack.url}/v1/workflows/runs/x", headers=H)
    assert r.status_code == 405


def test_another_namespaces_caller_can_neither_start_nor_see_this_namespaces_workflows(stack: Stack) -> None:
    intruder = {"authorization": "Bearer sk-other-namespace-intruder"}
    r = httpx.post(f"{stack.url}/v1/workflows/support-triage/runs", json={"inputs": {"ticket": "hi"}}, headers=intruder)
    assert r.status_code == 404 and r.json()["error"]["code"] == "workflow_not_found"
    run = start(stack, "support-triage", ticket="Where is my invoice?")
    r = httpx.get(f"{stack.url}/v1/workflows/runs/{run['name']}", headers=intruder)
    assert r.status_code == 404 and r.json()["error"]["code"] == "run_not_found"
    assert httpx.delete(f"{stack.url}/v1/workflows/runs/{run['name']}", headers=intruder).status_code == 404
    assert run["name"] not in [x["name"] for x in httpx.get(f"{stack.url}/v1/workflows/runs", headers=intruder).json()["runs"]]
    wait_for(stack, run["name"])


def test_a_spec_with_a_cycle_is_refused_naming_the_steps_and_runs_of_it_are_409(stack: Stack) -> None:
    refused = stack.status()["workflows"]["refused"]["WorkflowSpec default/circular"]  # type: ignore[index]
    assert refused["reason"] == "DependencyCycle" and "cycle among a, b" in refused["message"]
    r = httpx.post(f"{stack.url}/v1/workflows/circular/runs", json={"inputs": {}}, headers=H)
    assert r.status_code == 409 and "cycle among a, b" in r.json()["error"]["message"]


def test_the_egress_listener_refuses_a_host_no_spec_names(stack: Stack) -> None:
    egress = f"http://127.0.0.1:{stack.egress_port}"
    r = httpx.post(f"{egress}/anything", headers={"host": "example.com"}, content=b"x")
    assert r.status_code == 403 and r.json()["error"]["code"] == "egress_not_allowed"
    r = httpx.post(f"{egress}/helpdesk/tickets", headers={"host": f"127.0.0.1:{stack.mock_port}"}, content=b"x")
    assert r.status_code == 403  # a named host, but no step's request
    assert helpdesk(stack) == []


def test_the_runs_calls_are_metered_under_the_callers_tenant(stack: Stack) -> None:
    def tokens() -> float:
        text = httpx.get(f"http://127.0.0.1:{stack.metrics_port}/metrics").text
        return sum(
            s.value for f in text_string_to_metric_families(text) for s in f.samples
            if s.name == "crdgol_tokens_total" and s.labels.get("tenant") == "default/quickstart" and s.labels.get("binding") == "default/triage-model"
        )

    before = tokens()
    status = wait_for(stack, start(stack, "support-triage", ticket=CALM)["name"])
    assert tokens() - before == status["tokens"]["input"] + status["tokens"]["output"]
    ctl = httpx.get(f"http://127.0.0.1:{stack.controller_port}/metrics").text
    fams = {f.name: f for f in text_string_to_metric_families(ctl)}
    assert any(s.labels == {"workflow": "support-triage", "phase": "Succeeded"} and s.value >= 1 for s in fams["crdgol_workflow_runs"].samples)
    assert any(s.labels.get("type") == "ai-inference" and s.labels.get("outcome") == "succeeded" for s in fams["crdgol_workflow_step_duration_seconds"].samples)


def test_a_killed_controller_resumes_the_run_without_repeating_a_finished_step(stack: Stack) -> None:
    httpx.post(f"{stack.mock_url}/_mock/helpdesk/config", json={"delay_ms": 4000})
    run = start(stack, "support-triage", ticket=CALM)["name"]
    wait_for(stack, run, lambda s: step(s, "post-to-helpdesk")["phase"] == "Running")
    ctl = stack.procs["controller"]
    os.kill(ctl.pid, signal.SIGKILL)
    ctl.wait(10)
    httpx.post(f"{stack.mock_url}/_mock/helpdesk/config", json={"delay_ms": 0})
    stack._spawn("controller", [str(a) for a in ctl.args])  # type: ignore[union-attr]
    wait_http(f"http://127.0.0.1:{stack.controller_port}/healthz", (200,), 30, stack.procs["controller"])
    # Until it has read its records the engine says it is starting (503), never that the run is unknown.
    deadline = time.monotonic() + 30
    while (r := httpx.get(f"{stack.url}/v1/workflows/runs/{run}", headers=H, timeout=30)).status_code == 503:
        assert r.json()["error"]["code"] == "engine_starting" and r.headers["retry-after"] == "1"
        assert time.monotonic() < deadline
        time.sleep(0.05)
    assert r.status_code == 200, r.text
    status = wait_for(stack, run, timeout=30)
    assert status["phase"] == "Succeeded"
    keys = [q["headers"].get("idempotency-key") for q in httpx.get(f"{stack.mock_url}/_mock/requests").json() if q["path"] == "/v1/chat/completions"]
    assert sorted(keys) == sorted(f"default/{run}/{s}/1" for s in ("sentiment", "classify", "draft"))  # each once
    posted = helpdesk(stack)
    assert [p["headers"]["idempotency-key"] for p in posted] == [f"default/{run}/post-to-helpdesk/1"]  # re-run, same attempt


def test_a_run_declared_as_a_resource_runs_with_the_secret_it_names(stack: Stack) -> None:
    (stack.settings.manifests / "run.yaml").write_text(textwrap.dedent(f"""
        apiVersion: crdgol.io/v1alpha1
        kind: WorkflowRun
        metadata: {{name: from-a-manifest, namespace: default}}
        spec:
          workflowRef: {{name: support-triage}}
          inputs: {{ticket: "{URGENT}"}}
          apiKeySecretRef: {{name: quickstart-api-key, key: key}}
    """))
    try:
        deadline = time.monotonic() + 10
        while httpx.get(f"{stack.url}/v1/workflows/runs/from-a-manifest", headers=H).status_code == 404:
            assert time.monotonic() < deadline, "the controller did not start the run declared in the folder"
            time.sleep(0.1)
        status = wait_for(stack, "from-a-manifest")
    finally:
        (stack.settings.manifests / "run.yaml").unlink()
    assert status["phase"] == "Succeeded" and status["tenant"] == "default/quickstart"
    assert [p["kind"] for p in helpdesk(stack)] == ["pages"]


def test_an_input_cannot_smuggle_a_header_through_a_template(stack: Stack) -> None:
    status = wait_for(stack, start(stack, "header-from-input", note="hi\r\nx-crdgol-workflow-step: default/support-triage/page-oncall")["name"])
    assert status["phase"] == "Failed" and "could not be made" in step(status, "call")["message"]
    assert helpdesk(stack) == []
    ok = wait_for(stack, start(stack, "header-from-input", note="plain")["name"])
    assert ok["phase"] == "Succeeded" and helpdesk(stack)[0]["headers"]["x-note"] == "plain"
